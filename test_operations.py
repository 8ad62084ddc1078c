"""Tests for running babytrackd: the README's commands, start-up, Retry-After, /metrics privacy,
the client address behind a proxy, upgrades, and the self-hosting files in deploy/."""

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import ADMIN_PASSWORD, Server

HERE = os.path.dirname(os.path.abspath(__file__))
JSON = {'Accept': 'application/json'}


def read(name):
    with open(os.path.join(HERE, name)) as text:
        return text.read()


def readme_commands():
    """Return the two commands at the top of the README: (serve, test)."""
    block = re.search(r'```sh\n(.*?)```', read('README.md'), re.S)[1]
    return [line.split('  #')[0].strip() for line in block.splitlines()][:2]


# The README's commands ----------------------------------------------------------------------------

def test_ci_runs_exactly_the_readmes_test_command():
    serve, test = readme_commands()
    assert serve == 'python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python -m babytrackd'
    assert test == ('python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt'
                    ' && .venv/bin/python -m pytest -q')
    assert read('.ci/run').strip().splitlines()[-1] == test


# Start-up ---------------------------------------------------------------------------------------

def test_first_start_tells_the_operator_everything(tmp_path):
    server = Server(tmp_path, ADMIN_PASS='', BASE_URL='http://babytrack.example:1', BACKUP_KEEP='7')
    try:
        log = server.log()
        password = re.search(r'created admin "jane" with password: (\S+)', log)[1]
        assert f'log in at http://babytrack.example:{server.port}/admin as jane' in log
        assert f'database {server.db_path}; daily snapshots in {tmp_path}/backups/ (the newest 7 kept)' in log
        assert 'set ADMIN_PASS to choose the admin password' in log
        assert 'BASE_URL http://babytrack.example' in log and 'cookies will not be Secure' in log
        assert log.count(password) == 1
        assert not [line for line in log.splitlines() if line.startswith('{') and password in line]
    finally:
        server.stop()


def test_a_local_start_with_its_own_password_gives_no_warnings(server):
    log = server.log()
    assert 'log in at http://127.0.0.1' in log and 'daily snapshots off (BACKUP_KEEP=0)' in log
    assert 'Secure' not in log and 'set ADMIN_PASS' not in log and ADMIN_PASSWORD not in log


def test_without_base_url_the_console_says_how_to_set_it(bt, monkeypatch, capsys):
    monkeypatch.delenv('BASE_URL', raising=False)
    bt.announce()
    assert 'set BASE_URL to its public https:// address' in capsys.readouterr().out


def test_a_trusted_proxy_header_on_a_port_open_to_all_warns(bt, monkeypatch, capsys):
    warnings = []
    monkeypatch.setattr(bt.log, 'warning', lambda message, *args: warnings.append(message % args))
    monkeypatch.setattr(bt, 'TRUST_PROXY_HEADER', 'X-Real-IP')
    monkeypatch.setattr(bt, 'HOST', '127.0.0.1')
    bt.announce()
    assert not [warning for warning in warnings if 'TRUST_PROXY_HEADER' in warning]
    monkeypatch.setattr(bt, 'HOST', '0.0.0.0')
    bt.announce()
    assert [warning for warning in warnings if 'a client connecting directly can forge X-Real-IP' in warning]


@pytest.mark.parametrize('host, local', [('localhost', True), ('127.0.0.1', True), ('127.8.0.1', True),
                                         ('::1', True), ('0.0.0.0', False), ('192.168.1.5', False),
                                         ('babytrack.example.com', False)])
def test_what_counts_as_this_machine(bt, host, local):
    assert bt.on_this_machine(host) is local


# Retry-After on the login limit -----------------------------------------------------------------

def fail_logins_ago(bt, seconds, address='10.0.0.1'):
    """Make the address's failed logins the limit's worth, `seconds` ago."""
    bt.db.execute('DELETE FROM login_failures')
    for _ in range(bt.LOGIN_FAILURES):
        bt.login_limiter.fail(address, now=time.time() - seconds)


def test_a_json_login_refused_by_the_limit_says_when_to_retry(web):
    for _ in range(5):
        web.post_json('/admin/login', {'username': 'jane', 'password': 'nope'}, status=401)
    answer = web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, status=429)
    assert 15 * 60 - 5 <= int(answer.headers['Retry-After']) <= 15 * 60
    assert 'Too many failed logins' in answer.json['error']


def test_the_login_form_refused_by_the_limit_says_when_to_retry(bt, web):
    fail_logins_ago(bt, 600)
    answer = web.post('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, status=429)
    assert int(answer.headers['Retry-After']) in (300, 301)
    assert 'Too many failed logins. Try again in 5 minutes.' in answer.text or 'Try again in 6 minutes.' in answer.text


def test_retry_after_is_when_the_limit_lets_go(bt, web):
    fail_logins_ago(bt, 15 * 60 - 30)
    retry = int(web.post_json('/admin/login', {'username': 'jane', 'password': 'x'}, status=429).headers['Retry-After'])
    assert retry in (30, 31)
    assert web.post('/admin/login', {'username': 'jane', 'password': 'x'}, status=429).text.count('Try again in 1 minute.') == 1
    fail_logins_ago(bt, 15 * 60 + 1)  # the window has passed: the login goes through
    assert 'Retry-After' not in web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}).headers


# /metrics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('peer, status', [
    ('127.0.0.1', 200), ('::1', 200), ('::ffff:127.0.0.1', 200), ('10.1.2.3', 200), ('172.16.0.9', 200),
    ('192.168.1.5', 200), ('fd12:3456::1', 200),
    ('81.2.69.160', 404), ('8.8.8.8', 404), ('2606:4700::1111', 404), ('', 404),
])
def test_metrics_answer_only_this_machine_and_private_networks(web, peer, status):
    answer = web.get('/metrics', extra_environ={'REMOTE_ADDR': peer}, status=status)
    assert ('babytrackd_open_sockets' in answer.text) == (status == 200)


def test_forwarded_headers_do_not_open_metrics(web):
    for header in ('X-Forwarded-For', 'X-Real-IP', 'Fly-Client-IP'):
        web.get('/metrics', headers={header: '127.0.0.1'}, extra_environ={'REMOTE_ADDR': '81.2.69.160'}, status=404)


def test_metrics_through_our_own_proxy_are_private(bt, web, monkeypatch):
    monkeypatch.setattr(bt, 'TRUST_PROXY_HEADER', 'X-Real-IP')
    web.get('/metrics', headers={'X-Real-IP': '203.0.113.7'}, extra_environ={'REMOTE_ADDR': '127.0.0.1'}, status=404)
    web.get('/metrics', extra_environ={'REMOTE_ADDR': '127.0.0.1'}, status=200)


def test_metrics_token_opens_metrics_from_anywhere(bt, web, monkeypatch):
    public = {'REMOTE_ADDR': '81.2.69.160'}  # (Python counts documentation ranges such as 203.0.113/24 as private)
    web.get('/metrics', headers={'Authorization': 'Bearer '}, extra_environ=public, status=404)
    monkeypatch.setattr(bt, 'METRICS_TOKEN', 's3cret-token')
    answer = web.get('/metrics', headers={'Authorization': 'Bearer s3cret-token'}, extra_environ=public)
    assert 'babytrackd_open_sockets' in answer.text
    for wrong in ('Bearer s3cret-tokeN', 'Bearer s3cret', 's3cret-token', 'Basic s3cret-token'):
        web.get('/metrics', headers={'Authorization': wrong}, extra_environ=public, status=404)
    monkeypatch.setattr(bt, 'TRUST_PROXY_HEADER', 'X-Real-IP')
    web.get('/metrics', headers={'Authorization': 'Bearer s3cret-token', 'X-Real-IP': '203.0.113.7'},
            extra_environ={'REMOTE_ADDR': '127.0.0.1'}, status=200)


def test_on_fly_metrics_answer_its_private_network_and_not_its_public_proxy(bt, web, monkeypatch):
    monkeypatch.setattr(bt, 'BEHIND_FLY_PROXY', True)
    private = {'REMOTE_ADDR': 'fdaa:0:1::3'}
    web.get('/metrics', extra_environ=private, status=200)
    web.get('/metrics', headers={'Fly-Client-IP': '203.0.113.7'}, extra_environ=private, status=404)


# The client's address behind a proxy ------------------------------------------------------------

def test_the_trusted_proxy_header_names_the_client_for_the_login_limit(bt, web, monkeypatch):
    monkeypatch.setattr(bt, 'TRUST_PROXY_HEADER', 'X-Forwarded-For')
    via_proxy = {'REMOTE_ADDR': '127.0.0.1'}
    for number in range(5):  # what a client writes in front of the proxy's own entry changes nothing
        web.post_json('/admin/login', {'username': 'jane', 'password': 'nope'}, extra_environ=via_proxy,
                      headers={'X-Forwarded-For': f'10.9.9.{number}, 198.51.100.1'}, status=401)
    web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, extra_environ=via_proxy,
                  headers={'X-Forwarded-For': '198.51.100.1'}, status=429)
    web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, extra_environ=via_proxy,
                  headers={'X-Forwarded-For': '198.51.100.2'}, status=200)


def test_an_untrusted_proxy_header_is_ignored(bt, web):
    assert bt.TRUST_PROXY_HEADER is None
    for number in range(5):
        web.post_json('/admin/login', {'username': 'jane', 'password': 'nope'},
                      headers={'X-Real-IP': f'198.51.100.{number}'}, status=401)
    web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD},
                  headers={'X-Real-IP': '198.51.100.99'}, status=429)


# Upgrades ---------------------------------------------------------------------------------------

def test_an_old_database_is_copied_before_it_is_upgraded(bt, tmp_path):
    path = tmp_path / 'old' / 'babytrack.db'
    path.parent.mkdir()
    with sqlite3.connect(path) as old:
        old.executescript(bt.MIGRATIONS[0] + '; PRAGMA user_version = 1;')
        old.execute("INSERT INTO families (id, name, created_at) VALUES ('f1', 'Baby Old', 1)")
        old.execute("""INSERT INTO entries (id, family_id, ts, type, value, updated_at, seq)
                       VALUES ('e1', 'f1', 1700000000000, 'feed', 'bottle', 1700000000000, 1)""")
    old.close()
    bt.db.close()
    bt.open_db(str(path))
    assert bt.db.execute('PRAGMA user_version').fetchone()[0] == len(bt.MIGRATIONS)
    assert bt.get_family('f1')['name'] == 'Baby Old'
    assert bt.db.execute("SELECT night_start FROM families WHERE id = 'f1'").fetchone()[0] == '19:00'
    # the old entry is in the change log, so the next write's seq follows it and last activity is its time
    assert bt.list_families()[0]['last_activity'] == 1700000000000
    assert bt.apply_entry('f1', 'add', {'entry': {'id': 'e2', 'ts': 1700000060000, 'type': 'feed', 'value': 'bottle'}},
                          'Mum')[2]['seq'] == 2
    copy = tmp_path / 'old' / 'backups' / 'before-migration-1.db'
    with sqlite3.connect(copy) as kept:
        assert kept.execute('PRAGMA user_version').fetchone()[0] == 1
        assert kept.execute('SELECT name FROM families').fetchall() == [('Baby Old',)]
        assert kept.execute('SELECT id, value FROM entries').fetchall() == [('e1', 'bottle')]
        assert kept.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
    kept.close()
    assert os.listdir(copy.parent) == ['before-migration-1.db']


def test_a_new_or_current_database_is_not_copied(bt, tmp_path):
    bt.db.close()
    bt.open_db(str(tmp_path / 'fresh.db'))  # created at version 0
    bt.db.close()
    bt.open_db(str(tmp_path / 'fresh.db'))  # already current
    assert not (tmp_path / 'backups').exists()


# Self-hosting files -----------------------------------------------------------------------------

def test_the_environment_example_names_only_real_settings(bt):
    names = re.findall(r'^#?([A-Z_]+)=', read('deploy/babytrackd.env.example'), re.M)
    assert {'BASE_URL', 'ADMIN_PASS', 'HOST', 'TRUST_PROXY_HEADER', 'METRICS_TOKEN'} <= set(names)
    assert all(hasattr(bt, name) for name in names), [name for name in names if not hasattr(bt, name)]
    assert 'HOST=127.0.0.1' in read('deploy/babytrackd.env.example')


def test_the_proxies_upgrade_ws_and_set_the_header_babytrackd_trusts():
    trusted = re.search(r'^TRUST_PROXY_HEADER=(\S+)', read('deploy/babytrackd.env.example'), re.M)[1]
    nginx, caddy = read('deploy/nginx.conf'), read('deploy/Caddyfile')
    ws = re.search(r'location = /ws \{(.*?)\}', nginx, re.S)[1]
    for line in ('proxy_http_version 1.1;', 'proxy_set_header Upgrade $http_upgrade;',
                 'proxy_set_header Connection $connection_upgrade;', f'proxy_set_header {trusted} $remote_addr;'):
        assert line in ws
    assert re.search(r'map \$http_upgrade \$connection_upgrade \{\s*default upgrade;\s*\'\'\s+close;', nginx)
    assert nginx.count(f'proxy_set_header {trusted} $remote_addr;') == 2  # / and /ws
    assert f'header_up {trusted} {{remote_host}}' in caddy and 'reverse_proxy 127.0.0.1:8080' in caddy


def test_the_unit_file_keeps_the_database_in_its_state_directory():
    unit = read('deploy/babytrackd.service')
    for line in ('User=babytrackd', 'StateDirectory=babytrackd', 'Environment=DB_PATH=/var/lib/babytrackd/babytrack.db',
                 'EnvironmentFile=/etc/babytrackd/env', 'Restart=on-failure', 'KillSignal=SIGTERM',
                 'ExecStart=/opt/babytrackd/.venv/bin/python -m babytrackd'):
        assert line in unit.splitlines(), line


@pytest.mark.skipif(not shutil.which('systemd-analyze'), reason='systemd-analyze is not installed')
def test_the_unit_file_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart exists: point the unit at a stand-in for /opt/babytrackd
    (tmp_path / '.venv' / 'bin').mkdir(parents=True)
    (tmp_path / '.venv' / 'bin' / 'python').symlink_to(sys.executable)
    unit = read('deploy/babytrackd.service').replace('/opt/babytrackd', str(tmp_path))

    def verify(text):
        (tmp_path / 'babytrackd.service').write_text(text)
        done = subprocess.run(['systemd-analyze', 'verify', str(tmp_path / 'babytrackd.service')],
                              capture_output=True, text=True, timeout=60)
        return done.returncode, (done.stdout + done.stderr).strip()

    assert verify(unit) == (0, '')
    assert 'Failed to parse' in verify(unit.replace('Restart=on-failure', 'Restart=sometimes'))[1]  # it does look
