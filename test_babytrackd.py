"""Tests for babytrackd, in the order of the module's chapters.

WebTest drives the JSON API in-process on a real SQLite file; the sync protocol, handshakes,
revocation and presence run against a real server process over real sockets (conftest.py).
"""

import base64
import json
import os
import re
import socket
import sqlite3
import time

import bcrypt
import pytest
import websocket

from conftest import ADMIN_PASSWORD, AdminClient, Device, Server, close_code, wait_for

JSON = {'Accept': 'application/json'}
HOUR = 3600 * 1000


def now_ms():
    return int(time.time() * 1000)


def make_family(web, name='Baby Smith', **fields):
    return web.post_json('/admin/families', {'name': name, **fields}, headers=JSON).json


def make_link(web, family_id, label='Mum', expires_at=None):
    return web.post_json(f'/admin/families/{family_id}/links', {'label': label, 'expires_at': expires_at},
                         headers=JSON).json


def entry(entry_id, ts=None, type='feed', value='bottle', updated_at=None, **extra):
    ts = ts if ts is not None else now_ms() - HOUR
    return {'id': entry_id, 'ts': ts, 'type': type, 'value': value,
            'updated_at': updated_at if updated_at is not None else ts, **extra}


def write(device, action, fields):
    message = {'type': 'entry', 'action': action}
    message.update({'id': fields['id'], 'updated_at': fields.get('updated_at')} if action == 'delete'
                   else {'entry': fields})
    device.send(message)
    return device.entry_echo(fields['id'])


def stored_entries(server, family_id):
    """Read the family's rows straight from the server's SQLite file."""
    with sqlite3.connect(server.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute('SELECT * FROM entries WHERE family_id = ? ORDER BY seq', (family_id,))]


@pytest.fixture
def family(admin):
    """A family with two links, Mum and Dad, on the real server."""
    created = admin.create_family('Baby Smith')
    created['mum'] = admin.create_link(created['id'], 'Mum')['token']
    created['dad'] = admin.create_link(created['id'], 'Dad')['token']
    return created


@pytest.fixture
def devices(server, family):
    """Mum's and Dad's devices connected (presence settled)."""
    mum = Device(server, family['id'], family['mum'])
    dad = Device(server, family['id'], family['dad'])
    mum.recv_until(lambda m: m['type'] == 'presence' and m['members'] == ['Dad', 'Mum'])
    yield mum, dad
    mum.close()
    dad.close()


# Configuration and start-up ---------------------------------------------------------------------

def test_first_start_prints_a_generated_password_once(tmp_path):
    server = Server(tmp_path, ADMIN_PASS='')
    try:
        printed = re.search(r'password: (\S+)', server.log())
        assert printed, server.log()
        assert 'log in at http://127.0.0.1' in server.log()
        status, _ = AdminClient(server).call('POST', '/admin/login', {'username': 'jane', 'password': printed[1]})
        assert status == 200
        server.stop()
        server.start()
        assert len(re.findall(r'password: ', server.log())) == 1
        status, _ = AdminClient(server).call('POST', '/admin/login', {'username': 'jane', 'password': printed[1]})
        assert status == 200
    finally:
        server.stop()


def test_admin_pass_may_be_a_bcrypt_hash(bt, web):
    bt.ensure_admin('jane', bcrypt.hashpw(b'from-a-hash', bcrypt.gensalt(4)).decode())
    web.post_json('/admin/login', {'username': 'jane', 'password': 'from-a-hash'})
    web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, status=401)


def test_admin_password_is_stored_as_bcrypt(bt):
    stored = bt.one('SELECT password_hash FROM admins WHERE username = ?', 'jane')['password_hash']
    assert stored.startswith('$2') and ADMIN_PASSWORD not in stored


# Schema and migrations --------------------------------------------------------------------------

def test_schema_is_versioned_in_wal_mode_and_reopens_cleanly(bt, tmp_path):
    assert bt.db.execute('PRAGMA user_version').fetchone()[0] == len(bt.MIGRATIONS)
    assert bt.db.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    assert bt.db.execute('PRAGMA foreign_keys').fetchone()[0] == 1
    family = bt.create_family('Kept')
    bt.open_db(str(tmp_path / 'babytrack.db'))
    assert bt.get_family(family['id'])['name'] == 'Kept'


# Admin API --------------------------------------------------------------------------------------

def test_login_sets_a_strict_http_only_session_cookie(web):
    answer = web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD})
    assert answer.json == {'ok': True}
    cookie = answer.headers['Set-Cookie']
    assert 'HttpOnly' in cookie and 'samesite=strict' in cookie.lower() and 'Secure' not in cookie
    assert web.get('/admin/families', headers=JSON).json == {'families': []}


@pytest.mark.parametrize('username, password', [('jane', 'wrong'), ('nobody', ADMIN_PASSWORD), ('jane', 5)])
def test_wrong_credentials_get_one_message(web, username, password):
    answer = web.post_json('/admin/login', {'username': username, 'password': password}, status=401)
    assert answer.json == {'error': 'Wrong username or password.'}


def test_login_is_rate_limited_per_address(web):
    for _ in range(5):
        web.post_json('/admin/login', {'username': 'jane', 'password': 'nope'}, status=401)
    limited = web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, status=429)
    assert 'Too many failed logins' in limited.json['error']
    web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD},
                  extra_environ={'REMOTE_ADDR': '10.0.0.2'}, status=200)


def test_a_forwarded_for_header_does_not_dodge_the_rate_limit(web):
    for number in range(5):
        web.post_json('/admin/login', {'username': 'jane', 'password': 'nope'},
                      headers={'X-Forwarded-For': f'203.0.113.{number}'}, status=401)
    web.post_json('/admin/login', {'username': 'jane', 'password': 'nope'},
                  headers={'X-Forwarded-For': '203.0.113.99'}, status=429)


def test_parallel_guesses_count_before_bcrypt_runs(server):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: AdminClient(server).call(
            'POST', '/admin/login', {'username': 'jane', 'password': 'guess'})[0], range(20)))
    assert statuses.count(401) == 5 and statuses.count(429) == 15


def test_a_long_passphrase_works(bt, web):
    passphrase = 'correct horse battery staple ' * 4  # 116 bytes: past bcrypt's 72
    bt.ensure_admin('jane', passphrase)
    web.post_json('/admin/login', {'username': 'jane', 'password': passphrase}, status=200)


def test_a_new_password_ends_every_session_and_the_same_one_keeps_them(bt, logged_in):
    bt.ensure_admin('jane', ADMIN_PASSWORD)  # a restart with the same ADMIN_PASS
    logged_in.get('/admin/families', headers=JSON, status=200)
    bt.ensure_admin('jane', 'a brand new passphrase')
    logged_in.get('/admin/families', headers=JSON, status=401)


def test_renaming_the_admin_retires_the_old_one(bt, web):
    bt.ensure_admin('janet', 'her passphrase')
    web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, status=401)
    web.post_json('/admin/login', {'username': 'janet', 'password': 'her passphrase'}, status=200)


def test_rate_limit_window_passes(bt):
    limiter = bt.RateLimiter(5, 900)
    for second in range(5):
        limiter.fail('1.2.3.4', now=second)
    assert limiter.retry_after('1.2.3.4', now=899) == 1
    assert limiter.retry_after('1.2.3.4', now=905) == 0
    assert limiter.retry_after('5.6.7.8', now=10) == 0


def test_logout_ends_the_session(logged_in):
    logged_in.post_json('/admin/logout', {})
    logged_in.get('/admin/families', headers=JSON, status=401)


@pytest.mark.parametrize('method, path', [
    ('GET', '/admin/families'), ('POST', '/admin/families'), ('GET', '/admin/families/abc'),
    ('PATCH', '/admin/families/abc'), ('PUT', '/admin/families/abc/config'),
    ('GET', '/admin/families/abc/summary'), ('POST', '/admin/families/abc/links'),
    ('DELETE', '/admin/families/abc/links/xyz')])
def test_admin_routes_need_a_session(web, method, path):
    answer = web.request(path, method=method, headers=JSON, body=b'{}', content_type='application/json',
                         expect_errors=True)
    assert answer.status_int == 401 and answer.json == {'error': 'Log in first.'}


def test_logged_out_page_shows_the_login_form(web):
    assert 'name="password"' in web.get('/admin').text


def test_create_and_list_families(logged_in):
    created = make_family(logged_in, 'Baby Smith', notes='first child', tz='Australia/Sydney')
    assert re.fullmatch(r'[A-Za-z0-9_-]{8}', created['id'])
    assert {k: created[k] for k in ('name', 'notes', 'archived', 'tz')} == {
        'name': 'Baby Smith', 'notes': 'first child', 'archived': False, 'tz': 'Australia/Sydney'}
    listed = logged_in.get('/admin/families', headers=JSON).json['families']
    assert [f['id'] for f in listed] == [created['id']]
    assert listed[0]['today'] == {'sleep_minutes': 0, 'feeds': 0, 'wet': 0, 'dirty': 0}
    assert listed[0]['last_activity'] is None


def test_new_family_gets_the_default_zone(logged_in, bt):
    assert make_family(logged_in)['tz'] == bt.DEFAULT_TZ == 'UTC'


@pytest.mark.parametrize('body, message', [
    ({'name': ''}, 'name must not be empty'),
    ({'name': '   '}, 'name must not be empty'),
    ({'name': 'x' * 201}, 'name must be at most 200 characters'),
    ({'name': 42}, 'name must be text'),
    ({}, 'name must be text'),
    ({'name': 'A', 'notes': 'x' * 10_001}, 'notes must be at most 10,000 characters'),
    ({'name': 'A', 'tz': 'Mars/Olympus'}, 'tz must be an IANA time zone'),
])
def test_family_validation(logged_in, body, message):
    answer = logged_in.post_json('/admin/families', body, headers=JSON, status=400)
    assert message in answer.json['error']
    assert logged_in.get('/admin/families', headers=JSON).json['families'] == []


def test_archived_families_are_listed_only_on_request(logged_in):
    make_family(logged_in, 'Kept')
    archived = make_family(logged_in, 'Done')
    answer = logged_in.patch_json(f"/admin/families/{archived['id']}", {'archived': True}, headers=JSON)
    assert answer.json['archived'] is True
    assert [f['name'] for f in logged_in.get('/admin/families', headers=JSON).json['families']] == ['Kept']
    everyone = logged_in.get('/admin/families?archived=1', headers=JSON).json['families']
    assert sorted(f['name'] for f in everyone) == ['Done', 'Kept']


@pytest.mark.parametrize('body, message', [
    ({'archived': 'yes'}, 'archived must be true or false'),
    ({'name': ''}, 'name must not be empty'),
    ({'tz': 'Nowhere'}, 'tz must be an IANA'),
    ({'colour': 'red'}, 'unknown field: colour'),
])
def test_family_update_validation(logged_in, body, message):
    family = make_family(logged_in)
    answer = logged_in.patch_json(f"/admin/families/{family['id']}", body, headers=JSON, status=400)
    assert message in answer.json['error']
    assert logged_in.get(f"/admin/families/{family['id']}", headers=JSON).json['name'] == 'Baby Smith'


def test_family_update_changes_fields(logged_in):
    family = make_family(logged_in)
    answer = logged_in.patch_json(f"/admin/families/{family['id']}",
                                  {'name': 'Baby Jones', 'notes': 'n', 'tz': 'Europe/London'}, headers=JSON)
    assert (answer.json['name'], answer.json['notes'], answer.json['tz']) == ('Baby Jones', 'n', 'Europe/London')


def test_family_detail_has_links_config_and_entries_newest_first(logged_in, bt):
    family = make_family(logged_in)
    link = make_link(logged_in, family['id'])
    for number in range(3):
        bt.apply_entry(family['id'], 'add', {'entry': entry(f'e{number}', ts=now_ms() - (3 - number) * HOUR)}, 'Mum')
    bt.apply_entry(family['id'], 'delete', {'id': 'e0', 'updated_at': now_ms()}, 'Mum')
    detail = logged_in.get(f"/admin/families/{family['id']}", headers=JSON).json
    assert [l['token'] for l in detail['links']] == [link['token']]
    assert detail['config'] == bt.DEFAULT_CONFIG
    assert [e['id'] for e in detail['entries']] == ['e2', 'e1']
    limited = logged_in.get(f"/admin/families/{family['id']}?limit=1", headers=JSON).json
    assert [e['id'] for e in limited['entries']] == ['e2']
    logged_in.get(f"/admin/families/{family['id']}?limit=-1", headers=JSON, status=400)


def test_unknown_family_is_404(logged_in):
    answer = logged_in.get('/admin/families/nosuchid', headers=JSON, status=404)
    assert answer.json == {'error': 'No such family.'}
    logged_in.patch_json('/admin/families/nosuchid', {'name': 'x'}, headers=JSON, status=404)


def test_config_is_stored(logged_in):
    family = make_family(logged_in)
    groups = [{'category': 'sleep', 'stateful': True, 'buttons': [{'label': 'nap', 'counted': True}]}]
    logged_in.put_json(f"/admin/families/{family['id']}/config", {'data': groups}, headers=JSON)
    assert logged_in.get(f"/admin/families/{family['id']}", headers=JSON).json['config'] == groups


@pytest.mark.parametrize('data, message', [
    ({'category': 'x'}, 'config must be a list'),
    ([{'buttons': [{'label': 'a'}]}], 'group 1 category must be text'),
    ([{'category': 'a', 'buttons': []}], 'group 1 must have a list of buttons'),
    ([{'category': 'a', 'buttons': [{'label': ''}]}], 'group 1 button 1 label must not be empty'),
    ([{'category': 'a', 'buttons': ['x']}], 'group 1 button 1 must be an object'),
    ([{'category': 'a', 'buttons': [{'label': 'b', 'counted': 'yes'}]}], 'counted must be true or false'),
    ([{'category': 'a', 'buttons': [{'label': 'b'}]}, {'category': 'a', 'buttons': [{'label': 'c'}]}],
     'appears twice'),
    ([{'category': 'a', 'buttons': [{'label': 'b' * 60}] * 300}], 'at most 16 KiB'),
    ([{'category': f'c{n}', 'buttons': [{'label': 'b'}]} for n in range(21)], 'at most 20 groups'),
    ([{'category': f'c{n}', 'stateful': True, 'buttons': [{'label': 'b'}]} for n in range(5)], '4 of them stateful'),
])
def test_config_validation(logged_in, bt, data, message):
    family = make_family(logged_in)
    answer = logged_in.put_json(f"/admin/families/{family['id']}/config", {'data': data}, headers=JSON, status=400)
    assert message in answer.json['error']
    assert bt.get_config(family['id']) == bt.DEFAULT_CONFIG


def test_summary_answers_the_day(logged_in, bt):
    family = make_family(logged_in)
    answer = logged_in.get(f"/admin/families/{family['id']}/summary?date=2026-01-11", headers=JSON).json
    assert answer['date'] == '2026-01-11' and answer['tz'] == 'UTC' and len(answer['hours']) == 24
    assert answer['totals'] == {'sleep_minutes': 0, 'feeds': 0, 'wet': 0, 'dirty': 0}
    logged_in.get(f"/admin/families/{family['id']}/summary?date=11/01/2026", headers=JSON, status=400)


def test_links_are_created_and_revoked(logged_in, bt):
    family = make_family(logged_in)
    link = make_link(logged_in, family['id'], 'Grandma', expires_at=now_ms() + 7 * 24 * HOUR)
    assert re.fullmatch(r'[A-Za-z0-9_-]{32}', link['token'])
    assert link['url'] == f"{bt.BASE_URL}/t/{link['token']}" and link['label'] == 'Grandma'
    logged_in.delete(f"/admin/families/{family['id']}/links/{link['token']}", headers=JSON, status=204)
    assert logged_in.get(f"/admin/families/{family['id']}", headers=JSON).json['links'] == []
    logged_in.delete(f"/admin/families/{family['id']}/links/{link['token']}", headers=JSON, status=404)


@pytest.mark.parametrize('body, message', [
    ({'expires_at': 1}, 'expires_at must be in the future'),
    ({'expires_at': 'tomorrow'}, 'expires_at must be an integer'),
    ({'label': 'x' * 101}, 'label must be at most 100 characters'),
])
def test_link_validation(logged_in, body, message):
    family = make_family(logged_in)
    answer = logged_in.post_json(f"/admin/families/{family['id']}/links", body, headers=JSON, status=400)
    assert message in answer.json['error']


@pytest.mark.parametrize('content_type', ['text/plain', 'application/x-www-form-urlencoded'])
def test_json_writes_need_a_json_content_type(logged_in, content_type):
    answer = logged_in.post('/admin/families', 'name=A', headers={'Accept': 'application/json'},
                            content_type=content_type, status=415)
    assert 'application/json' in answer.json['error']
    assert logged_in.get('/admin/families', headers=JSON).json['families'] == []


def test_deeply_nested_json_is_refused(logged_in):
    answer = logged_in.post('/admin/families', b'[' * 5000, content_type='application/json', status=400)
    assert 'not valid JSON' in answer.json['error']


@pytest.mark.parametrize('raw, message', [(b'{"name": ', 'not valid JSON'), (b'["A"]', 'must be a JSON object'),
                                          (b'{"name": "\xed\xa0\x80"}', 'not valid JSON'),  # a surrogate, raw
                                          (b'{"name": "Caf\xe9"}', 'not valid JSON')])  # Latin-1, not UTF-8
def test_malformed_json_is_refused(logged_in, raw, message):
    answer = logged_in.post('/admin/families', raw, content_type='application/json', status=400)
    assert message in answer.json['error']


def test_bodies_over_64_kib_get_413(logged_in):
    answer = logged_in.post_json('/admin/families', {'name': 'A', 'notes': 'x' * 70_000}, status=413)
    assert 'over 64 KiB' in answer.json['error']
    assert logged_in.get('/admin/families', headers=JSON).json['families'] == []


def test_a_crash_is_a_plain_500_without_traceback(logged_in, bt, monkeypatch):
    def explode(*args):
        raise RuntimeError('secret internals')
    monkeypatch.setattr(bt, 'list_families', explode)
    answer = logged_in.get('/admin/families', headers=JSON, status=500, expect_errors=True)
    assert answer.json == {'error': 'Something went wrong on the server. Please try again.'}
    assert 'Traceback' not in answer.text and 'secret' not in answer.text


def test_form_posts_need_the_csrf_token(logged_in):
    page = logged_in.get('/admin')
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
    logged_in.post('/admin/families/new', {'name': 'Forged'}, status=403)
    logged_in.post('/admin/families/new', {'name': 'Forged', 'csrf': 'wrong'}, status=403)
    assert logged_in.get('/admin/families', headers=JSON).json['families'] == []
    logged_in.post('/admin/families/new', {'name': 'Real', 'csrf': token}, status=303)
    assert [f['name'] for f in logged_in.get('/admin/families', headers=JSON).json['families']] == ['Real']


def test_a_strange_csrf_token_is_a_403_not_a_crash(logged_in):
    logged_in.post('/admin/families/new', {'name': 'X', 'csrf': 'é'}, status=403)


def test_form_routes_refuse_json(logged_in):
    logged_in.post_json('/admin/families/new', {'name': 'X'}, status=415)


def test_login_form_refuses_a_foreign_origin(web):
    form = {'username': 'jane', 'password': ADMIN_PASSWORD}
    web.post('/admin/login', form, headers={'Origin': 'https://evil.example'}, status=403)
    answer = web.post('/admin/login', form, headers={'Origin': 'http://localhost:80'}, status=303)
    assert answer.headers['Location'].endswith('/admin')


def test_security_headers(web):
    headers = web.get('/admin').headers
    assert "script-src 'self'" in headers['Content-Security-Policy']
    assert headers['X-Frame-Options'] == 'DENY' and headers['Referrer-Policy'] == 'no-referrer'


# Parents' access --------------------------------------------------------------------------------

def test_a_share_link_sets_the_cookie_and_opens_the_app(logged_in, web):
    family = make_family(logged_in, 'Baby <Smith>')
    link = make_link(logged_in, family['id'], 'Mum')
    answer = web.get(f"/t/{link['token']}", status=303)
    assert answer.headers['Location'].endswith('/app/')
    cookie = answer.headers['Set-Cookie']
    assert f"bt_link={link['token']}" in cookie and 'HttpOnly' in cookie and 'samesite=lax' in cookie.lower()
    assert 'Path=/' in cookie
    me = web.get('/app/me').json
    assert me == {'family': {'id': family['id'], 'name': 'Baby <Smith>', 'tz': 'UTC', 'night_start': '19:00',
                             'night_end': '07:00'}, 'label': 'Mum', 'expires_at': None}


@pytest.mark.parametrize('spoil, status, words', [
    ('unknown', 404, 'not valid'), ('revoked', 410, 'turned off'), ('expired', 410, 'expired'),
    ('archived', 410, 'ended')])
def test_a_link_that_does_not_work_gets_a_friendly_page(logged_in, bt, web, spoil, status, words):
    family = make_family(logged_in)
    link = make_link(logged_in, family['id'], expires_at=now_ms() + HOUR)
    token = 'x' * 32 if spoil == 'unknown' else link['token']
    if spoil == 'revoked':
        logged_in.delete(f"/admin/families/{family['id']}/links/{token}")
    if spoil == 'expired':
        bt.db.execute('UPDATE access_links SET expires_at = ? WHERE token = ?', (now_ms() - 1, token))
    if spoil == 'archived':
        logged_in.patch_json(f"/admin/families/{family['id']}", {'archived': True})
    answer = web.get(f'/t/{token}', status=status)
    assert words in answer.text and '<html' in answer.text
    assert 'Set-Cookie' not in answer.headers
    web.set_cookie('bt_link', token)
    assert web.get('/app/me', status=status).json['reason'] == spoil


def test_app_me_without_a_cookie_is_401(web):
    assert 'link' in web.get('/app/me', status=401).json['error']


def test_health(web):
    assert web.get('/health').json == {'ok': True, 'version': '1.0.0'}


# WebSocket handshake ----------------------------------------------------------------------------

def handshake_status(server, path, cookie=None, origin=None):
    """Send a raw WebSocket upgrade request; return the HTTP status code the server answers."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f'GET {path} HTTP/1.1', f'Host: 127.0.0.1:{server.port}', 'Upgrade: websocket',
             'Connection: Upgrade', f'Sec-WebSocket-Key: {key}', 'Sec-WebSocket-Version: 13']
    lines += [f'Cookie: {cookie}'] if cookie else []
    lines += [f'Origin: {origin}'] if origin else []
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as conn:
        conn.sendall(('\r\n'.join(lines) + '\r\n\r\n').encode())
        return int(conn.recv(4096).split(b' ')[1])


def test_handshake_refusals_are_plain_http(server, admin, family):
    fid, mum = family['id'], family['mum']
    other = admin.create_family('Other')
    assert handshake_status(server, f'/ws?family={fid}', f'bt_link={mum}') == 101
    assert handshake_status(server, f'/ws?family={fid}') == 401
    assert handshake_status(server, f'/ws?family={fid}', 'bt_link=forged' + 'x' * 26) == 401
    assert handshake_status(server, f"/ws?family={other['id']}", f'bt_link={mum}') == 403
    assert handshake_status(server, f'/ws?family={fid}', f'bt_link={mum}', origin='https://evil.example') == 403
    assert handshake_status(server, f'/ws?family={fid}&since=abc', f'bt_link={mum}') == 400
    assert handshake_status(server, '/admin', f'bt_link={mum}') == 200  # no upgrade anywhere but /ws
    assert handshake_status(server, f'/health?family={fid}', f'bt_link={mum}') == 200
    admin.revoke_link(fid, mum)
    assert handshake_status(server, f'/ws?family={fid}', f'bt_link={mum}') == 403


# Sync -------------------------------------------------------------------------------------------

def test_two_devices_see_each_others_writes(devices):
    mum, dad = devices
    assert mum.init['members'] == ['Mum'] and dad.init['members'] == ['Dad', 'Mum']
    sent = entry('feed-1')
    mum.send({'type': 'entry', 'action': 'add', 'entry': sent})
    for device in (mum, dad):  # the sender's copy is its acknowledgement
        got = device.entry_echo('feed-1')
        assert got['action'] == 'add'
        assert got['entry'] == {**sent, 'deleted': False, 'seq': got['entry']['seq'], 'by': 'Mum'}
    echo = write(dad, 'update', {'id': 'feed-1', 'value': 'breast left', 'updated_at': sent['updated_at'] + 1})
    assert echo['action'] == 'update' and echo['entry']['value'] == 'breast left' and echo['entry']['by'] == 'Dad'
    assert mum.entry_echo('feed-1')['entry']['value'] == 'breast left'


def test_init_without_since_has_live_entries_and_with_since_the_changes(server, family, devices):
    mum, _ = devices
    for name in ('a', 'b', 'c'):
        write(mum, 'add', entry(name))
    deleted = write(mum, 'delete', {'id': 'b', 'updated_at': now_ms()})
    fresh = Device(server, family['id'], family['dad'])
    assert sorted(e['id'] for e in fresh.init['entries']) == ['a', 'c']
    assert fresh.init['cursor'] == deleted['entry']['seq']
    behind = Device(server, family['id'], family['dad'], since=deleted['entry']['seq'] - 2)
    assert [(e['id'], e['deleted']) for e in behind.init['entries']] == [('c', False), ('b', True)]
    assert behind.init['config'][0]['category'] == 'sleep'


def test_repeats_store_once_and_answer_only_the_sender(server, family, devices):
    mum, dad = devices
    sent = entry('tap-1')
    first = write(mum, 'add', sent)
    dad.entry_echo('tap-1')
    for updated_at in (sent['updated_at'], sent['updated_at'] + 5000):  # same fields: a repeat either way
        again = write(mum, 'add', dict(sent, updated_at=updated_at))
        assert again['entry'] == first['entry']
    dad.expect_silence()
    assert len(stored_entries(server, family['id'])) == 1


def test_a_stale_update_changes_nothing_and_answers_its_sender(server, family, devices):
    mum, dad = devices
    newer = write(mum, 'add', entry('e', updated_at=now_ms()))
    dad.entry_echo('e')
    stale = write(dad, 'update', {'id': 'e', 'value': 'old edit', 'updated_at': newer['entry']['updated_at'] - 60_000})
    assert stale['action'] == 'update' and stale['entry'] == newer['entry'] and stale['stale'] is True
    mum.expect_silence()
    assert stored_entries(server, family['id'])[0]['value'] == 'bottle'


def test_equal_updated_at_ends_the_same_whatever_the_order(server, family, devices):
    mum, dad = devices
    base, stamp = now_ms() - HOUR, now_ms()
    for entry_id, order in (('x', ('left', 'right')), ('y', ('right', 'left'))):
        write(mum, 'add', entry(entry_id, ts=base, updated_at=base))
        for value in order:
            write(mum, 'update', {'id': entry_id, 'value': value, 'updated_at': stamp})
    final = {row['id']: (row['value'], row['updated_at']) for row in stored_entries(server, family['id'])}
    assert final['x'] == final['y'] == ('right', stamp)


def test_an_updated_at_more_than_5_minutes_ahead_is_clamped_and_a_nearer_one_kept(devices):
    mum, _ = devices
    before = now_ms()
    echo = write(mum, 'add', entry('future', updated_at=before + 24 * HOUR))
    assert before <= echo['entry']['updated_at'] <= now_ms()
    echo = write(mum, 'add', entry('edge', updated_at=before + 5 * 60_000 + 10_000))
    assert before <= echo['entry']['updated_at'] <= now_ms()
    near = now_ms() + 2 * 60_000
    assert write(mum, 'add', entry('near', updated_at=near))['entry']['updated_at'] == near


def test_deletes_are_tombstones_under_last_write_wins(server, family, devices):
    mum, dad = devices
    added = write(mum, 'add', entry('d', updated_at=now_ms() - 10_000))
    dad.entry_echo('d')
    deleted_at = now_ms()
    gone = write(dad, 'delete', {'id': 'd', 'updated_at': deleted_at})
    assert gone['action'] == 'delete' and gone['entry']['deleted'] is True and gone['entry']['seq'] > added['entry']['seq']
    assert mum.entry_echo('d')['entry']['deleted'] is True
    late_edit = write(mum, 'update', {'id': 'd', 'value': 'late', 'updated_at': now_ms() - 5000})
    assert late_edit['entry']['deleted'] is True  # the newer delete stands
    undo = write(mum, 'update', {'id': 'd', 'deleted': False, 'updated_at': deleted_at + 1})  # later, even within one ms
    assert undo['entry']['deleted'] is False
    assert stored_entries(server, family['id'])[0]['deleted'] == 0


def test_offline_edits_with_old_timestamps_reach_a_device_that_resumes_from_its_cursor(server, family, devices):
    mum, dad = devices
    early = now_ms() - 2 * HOUR
    write(mum, 'add', entry('late-1', ts=early, updated_at=early))
    grandma_token = AdminClient_for(server).create_link(family['id'], 'Grandma')['token']
    grandma = Device(server, family['id'], grandma_token)
    cursor = grandma.init['cursor']
    grandma.close()
    # Dad was offline an hour ago: his outbox arrives now with its old timestamps.
    write(dad, 'add', entry('offline-1', ts=early + 60_000, updated_at=early + 60_000))
    write(dad, 'update', {'id': 'late-1', 'value': 'breast right', 'updated_at': early + 120_000})
    back = Device(server, family['id'], grandma_token, since=cursor)
    assert {(e['id'], e['value']) for e in back.init['entries']} == {('offline-1', 'bottle'), ('late-1', 'breast right')}
    assert back.init['cursor'] == max(e['seq'] for e in back.init['entries'])


def AdminClient_for(server):
    client = AdminClient(server)
    client.login()
    return client


@pytest.mark.parametrize('message, error', [
    ('not json', 'not valid JSON'),
    ('[1, 2]', 'must be a JSON object'),
    ('{"type": "dance"}', 'type must be entry, config or ping'),
    ({'type': 'entry', 'action': 'merge', 'entry': entry('a')}, 'action must be add, update or delete'),
    ({'type': 'entry', 'action': 'add', 'entry': 'a'}, 'entry must be an object'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('has space')}, 'entry id must be'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('x' * 65)}, 'entry id must be'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', ts=946684799999)}, 'ts must be between'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', ts=now_ms() + 25 * HOUR)}, 'ts must be between'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', ts=True)}, 'ts must be an integer'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', ts=1.5e12)}, 'ts must be an integer'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', ts=10 ** 30)}, 'ts must be between'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', type='')}, 'type must not be empty'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', type='t' * 65)}, 'type must be at most 64'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', value=None)}, 'value must be text'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', value='v' * 4097)}, 'value must be at most 4,096'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', updated_at=-1)}, 'updated_at must not be negative'),
    ({'type': 'entry', 'action': 'add', 'entry': entry('a', updated_at='now')}, 'updated_at must be an integer'),
    ({'type': 'entry', 'action': 'add', 'entry': {'id': 'a', 'ts': now_ms()}}, 'entry needs type, value'),
    ({'type': 'entry', 'action': 'update', 'entry': {'id': 'ghost', 'value': 'x'}}, 'no such entry'),
    ({'type': 'entry', 'action': 'delete', 'id': 'ghost'}, 'no such entry'),
    ({'type': 'entry', 'action': 'update', 'entry': entry('a', deleted='yes')}, 'deleted must be true or false'),
    ({'type': 'config', 'data': 'buttons'}, 'config must be a list'),
    (json.dumps({'type': 'entry', 'action': 'add', 'entry': entry('a', value='\ud800')}), 'not valid JSON'),
])
def test_invalid_messages_are_refused_and_the_socket_stays_usable(server, family, devices, message, error):
    mum, dad = devices
    mum.ws.send(message if isinstance(message, str) else json.dumps(message))
    refusal = mum.recv_until(lambda m: m['type'] == 'error')
    assert error in refusal['error']
    mum.send({'type': 'ping'})
    assert mum.recv_until(lambda m: m['type'] == 'pong')
    dad.expect_silence(0.1)
    assert stored_entries(server, family['id']) == []


def test_a_refusal_names_the_entry(devices):
    mum, _ = devices
    mum.send({'type': 'entry', 'action': 'add', 'entry': entry('bad-one', value=7)})
    assert mum.recv_until(lambda m: m['type'] == 'error')['id'] == 'bad-one'


def test_an_entry_id_of_another_family_is_refused(server, admin, family, devices):
    mum, _ = devices
    write(mum, 'add', entry('shared-id'))
    other = admin.create_family('Other')
    stranger = Device(server, other['id'], admin.create_link(other['id'], 'Stranger')['token'])
    stranger.send({'type': 'entry', 'action': 'update', 'entry': entry('shared-id', value='hijack', updated_at=now_ms())})
    assert 'already in use' in stranger.recv_until(lambda m: m['type'] == 'error')['error']
    assert stored_entries(server, family['id'])[0]['value'] == 'bottle'


def test_config_from_a_device_or_the_admin_reaches_every_device(admin, family, devices):
    mum, dad = devices
    groups = [{'category': 'sleep', 'stateful': True, 'buttons': [{'label': 'nap', 'counted': True}]}]
    mum.send({'type': 'config', 'data': groups})
    for device in (mum, dad):
        assert device.recv_until(lambda m: m['type'] == 'config')['data'] == groups
    groups[0]['buttons'].append({'label': 'up'})
    admin.put_config(family['id'], groups)
    for device in (mum, dad):
        assert device.recv_until(lambda m: m['type'] == 'config')['data'] == groups
    assert admin.family(family['id'])['config'] == groups


def test_presence_tracks_joins_and_leaves_and_names_unlabelled_links(server, admin, family, devices):
    mum, dad = devices
    nameless = Device(server, family['id'], admin.create_link(family['id'])['token'])
    assert nameless.init['members'] == ['Dad', 'device', 'Mum']
    assert mum.recv_until(lambda m: m['type'] == 'presence')['members'] == ['Dad', 'device', 'Mum']
    nameless.close()
    assert mum.recv_until(lambda m: m['type'] == 'presence')['members'] == ['Dad', 'Mum']


# Revocation and limits --------------------------------------------------------------------------

def test_revoking_a_link_closes_its_sockets_within_a_second(admin, family, devices):
    mum, dad = devices
    started = time.monotonic()
    admin.revoke_link(family['id'], family['dad'])
    assert close_code(dad, timeout=1) == 4403
    assert time.monotonic() - started < 1
    assert mum.recv_until(lambda m: m['type'] == 'presence', timeout=1)['members'] == ['Mum']


def test_a_revoked_device_cannot_write_while_its_socket_closes(server, admin, family, devices):
    mum, dad = devices
    admin.revoke_link(family['id'], family['dad'])
    for number in range(5):
        dad.add(f'late{number}', now_ms() - HOUR)
    dad.send({'type': 'config', 'data': [{'category': 'x', 'buttons': [{'label': 'y'}]}]})
    assert close_code(dad) == 4403
    mum.recv_until(lambda m: m['type'] == 'presence' and m['members'] == ['Mum'])
    mum.expect_silence(0.2)
    assert stored_entries(server, family['id']) == []
    assert admin.family(family['id'])['config'][0]['category'] == 'sleep'


def test_archiving_a_family_closes_every_socket(admin, family, devices):
    started = time.monotonic()
    admin.update_family(family['id'], archived=True)
    assert [close_code(device, timeout=1) for device in devices] == [4403, 4403]
    assert time.monotonic() - started < 1


def test_a_link_that_expires_while_connected_is_closed(server, admin, family):
    expires_at = now_ms() + 1000
    device = Device(server, family['id'], admin.create_link(family['id'], 'Temp', expires_at=expires_at)['token'])
    assert close_code(device, timeout=4) == 4403
    assert now_ms() - expires_at < 2000


def test_a_message_over_64_kib_closes_the_socket_with_1009(server, family, devices):
    mum, dad = devices
    mum.ws.send(json.dumps({'type': 'entry', 'action': 'add', 'entry': entry('big', value='x' * 70_000)}))
    assert close_code(mum) == 1009
    assert dad.recv_until(lambda m: m['type'] == 'presence')['members'] == ['Dad']
    assert stored_entries(server, family['id']) == []


def test_a_message_near_64_kib_is_read_intact(server, family, devices):
    mum, dad = devices
    value = 'Ñight 🌙 fëed, ' * 290  # 4,060 characters, many of them more than one byte
    mum.send({'type': 'entry', 'action': 'add', 'entry': entry('near', value=value), 'padding': 'p' * 50_000})
    assert dad.entry_echo('near')['entry']['value'] == value
    assert [e['value'] for e in stored_entries(server, family['id'])] == [value]


def test_a_binary_frame_is_refused(devices):
    mum, _ = devices
    mum.ws.send_binary(b'\x00\x01')
    assert close_code(mum) == 1003


def test_a_device_that_stops_reading_does_not_delay_the_others(server, admin, family, devices):
    mum, dad = devices
    stuck_token = admin.create_link(family['id'], 'Stuck')['token']
    stuck = websocket.create_connection(f"{server.ws_url}?family={family['id']}", cookie=f'bt_link={stuck_token}',
                                        origin=server.base_url, sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    mum.recv_until(lambda m: m['type'] == 'presence' and 'Stuck' in m['members'])
    dad.recv_until(lambda m: m['type'] == 'presence' and 'Stuck' in m['members'])
    slowest, gone = 0.0, False
    for number in range(4000):
        started = time.monotonic()
        mum.send({'type': 'entry', 'action': 'add', 'entry': entry(f'n{number}', value='z' * 4000)})
        while True:  # Mum's echo, then Dad's copy, each promptly, while Stuck reads nothing
            message = mum.recv_until(lambda m: m['type'] in ('entry', 'presence'), timeout=2)
            gone = gone or (message['type'] == 'presence' and 'Stuck' not in message['members'])
            if message['type'] == 'entry':
                break
        dad.entry_echo(f'n{number}', timeout=2)
        slowest = max(slowest, time.monotonic() - started)
        if gone:
            break
    stuck.close()
    assert gone, 'the stuck device was never closed'
    assert slowest < 0.5


def test_a_device_that_reads_slowly_gets_every_message_in_order(server, admin, family, devices):
    mum, _ = devices
    token = admin.create_link(family['id'], 'Slow')['token']
    slow = websocket.create_connection(f"{server.ws_url}?family={family['id']}", cookie=f'bt_link={token}',
                                       origin=server.base_url, sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    for number in range(200):  # ~600 KB: most of it waits in Slow's queue while the socket is full
        mum.send({'type': 'entry', 'action': 'add', 'entry': entry(f's{number}', value='v' * 3000)})
        if number % 10 == 0:
            slow.ping(b'still here')  # its pongs go in between the queued frames
    mum.entry_echo('s199', timeout=10)
    received = []
    while len(received) < 200:
        message = json.loads(slow.recv())
        if message['type'] == 'entry':
            received.append(message['entry']['id'])
    assert received == [f's{number}' for number in range(200)]
    slow.close()


def test_a_device_flushing_a_long_outbox_does_not_get_the_others_closed(server, family, devices):
    mum, dad = devices
    for number in range(1000):  # back to back, as an outbox flush after a night offline
        mum.add(f'o{number}', now_ms() - HOUR)
    for device in (dad, mum):
        device.recv_until(lambda m: m['type'] == 'entry' and m['entry']['id'] == 'o999', timeout=20)
    assert len(stored_entries(server, family['id'])) == 1000
    mum.send({'type': 'ping'})
    mum.recv_until(lambda m: m['type'] == 'pong')


def raw_websocket(server, family_id, token):
    """A WebSocket that completes the handshake and then never reads or answers pings."""
    key = base64.b64encode(os.urandom(16)).decode()
    conn = socket.create_connection(('127.0.0.1', server.port), timeout=5)
    conn.sendall((f'GET /ws?family={family_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n'
                  f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n'
                  f'Cookie: bt_link={token}\r\n\r\n').encode())
    assert conn.recv(12) == b'HTTP/1.1 101'
    return conn


def test_a_silent_peer_is_dropped_and_leaves_presence(tmp_path):
    server = Server(tmp_path, WS_PING_INTERVAL='0.3')
    try:
        admin = AdminClient_for(server)
        family = admin.create_family()
        mum = Device(server, family['id'], admin.create_link(family['id'], 'Mum')['token'])
        silent = raw_websocket(server, family['id'], admin.create_link(family['id'], 'Silent')['token'])
        mum.recv_until(lambda m: m['type'] == 'presence' and m['members'] == ['Mum', 'Silent'])
        started = time.monotonic()
        # Mum answers the server's pings while she waits (websocket-client does so inside recv).
        mum.recv_until(lambda m: m['type'] == 'presence' and m['members'] == ['Mum'], timeout=5)
        assert 0.6 < time.monotonic() - started < 3
        silent.close()
    finally:
        server.stop()


# Operations -------------------------------------------------------------------------------------

def test_sigterm_says_goodbye_to_every_socket_and_exits_cleanly(server, admin, family):
    mum = Device(server, family['id'], family['mum'])
    dad = Device(server, family['id'], family['dad'])
    write(mum, 'add', entry('before-shutdown'))
    admin.ok('GET', '/admin/families')  # read apart: the pool's threads hold connections of their own
    started = time.monotonic()
    server.proc.send_signal(15)
    assert [close_code(mum), close_code(dad)] == [1001, 1001]
    assert server.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 5
    # every connection closed: the last one to close removed the WAL and its index
    assert not os.path.exists(server.db_path + '-wal') and not os.path.exists(server.db_path + '-shm')
    with sqlite3.connect(server.db_path) as conn:
        assert conn.execute('SELECT id FROM entries').fetchall() == [('before-shutdown',)]


def test_logs_are_json_lines_without_tokens_or_names(server, admin):
    secrets_told = ['Secret Family Name', 'secret note', 'Secret Label', 'secret entry value']
    family = admin.create_family(secrets_told[0], notes=secrets_told[1])
    token = admin.create_link(family['id'], secrets_told[2])['token']
    revoked = admin.create_link(family['id'], 'Other')['token']
    urllib_get(f'{server.base_url}/t/{token}')
    device = Device(server, family['id'], token)
    write(device, 'add', entry('logged', value=secrets_told[3]))
    admin.revoke_link(family['id'], revoked)
    urllib_get(f'{server.base_url}/t/{revoked}')
    device.close()
    server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith('{')]
    assert any(line.get('path') == '/t/[redacted]' and line['status'] == 303 for line in lines)
    assert any(line.get('path') == '/t/[redacted]' and line['status'] == 410 for line in lines)
    assert all({'time', 'level', 'msg'} <= set(line) for line in lines)
    text = server.log()
    for secret in [token, revoked, *secrets_told]:
        assert secret not in text


def urllib_get(url):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_metrics_count_what_happened(server, admin, family, devices):
    mum, _ = devices
    write(mum, 'add', entry('counted'))
    AdminClient(server).call('POST', '/admin/login', {'username': 'jane', 'password': 'wrong'})
    import urllib.request
    with urllib.request.urlopen(server.base_url + '/metrics', timeout=5) as answer:
        text = answer.read().decode()
    values = dict(line.rsplit(' ', 1) for line in text.splitlines())
    assert values['babytrackd_open_sockets'] == '2'
    assert values['babytrackd_entries_accepted_total'] == '1'
    assert values['babytrackd_login_failures_total'] == '1'
    assert int(values['babytrackd_requests_4xx_total']) >= 1
    assert int(values['babytrackd_resident_memory_bytes']) > 1_000_000


def test_writes_reach_the_database_file_itself_within_seconds(server, family, devices):
    """SQLite's checkpoint inside commits is off; the server copies the WAL over from a thread."""
    mum, _ = devices
    before = os.path.getsize(server.db_path)
    for number in range(100):  # ~600 WAL pages, fewer than SQLite's own checkpoint would wait for
        mum.add(f'c{number}', now_ms(), value='c' * 2000)
    mum.entry_echo('c99')
    wait_for(lambda: os.path.getsize(server.db_path) > before + 150_000, message='the database file to hold the writes')


def test_the_wal_stays_bounded_while_writes_never_pause(server, family, devices):
    """The WAL restarts only once all of it is in the database; writes that never pause fall back on SQLite's checkpoint."""
    mum, dad = devices
    wal, biggest = server.db_path + '-wal', 0
    for batch in range(60):  # 3,000 writes: ~90 MB of WAL if nothing ever restarted it; two links, each within its budget
        for number in range(50):
            (mum if number % 2 else dad).add(f'w{batch}-{number}', now_ms(), value='x' * 200)
        mum.entry_echo(f'w{batch}-49', timeout=10)
        biggest = max(biggest, os.path.getsize(wal))
    assert biggest < 32 * 1024 * 1024


def test_backup_while_writing_holds_every_acknowledged_entry_and_restores(server, admin, family, tmp_path):
    import subprocess
    import sys
    import threading
    device = Device(server, family['id'], family['mum'])
    acknowledged, stop = [], threading.Event()

    def keep_writing():
        number = 0
        while not stop.is_set():
            acknowledged.append(write(device, 'add', entry(f'w{number}'))['entry']['id'])
            number += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        wait_for(lambda: len(acknowledged) >= 50, message='50 acknowledged writes')
        before_backup = list(acknowledged)
        copy = tmp_path / 'copy.db'
        done = subprocess.run([sys.executable, 'babytrackd.py', 'backup', str(copy)], capture_output=True, text=True,
                              env=dict(server.env, BABYTRACKD_NO_PATCH=''), cwd=os.path.dirname(__file__), timeout=30)
        assert done.returncode == 0, done.stderr
    finally:
        stop.set()
        writer.join(timeout=10)
    assert len(acknowledged) > len(before_backup)  # the writes really were flowing during the backup
    with sqlite3.connect(copy) as conn:
        assert conn.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
        saved = {row[0] for row in conn.execute('SELECT id FROM entries')}
    assert set(before_backup) <= saved
    # Restore as the README says: the copy waits beside the database as .restore; restart.
    write(device, 'add', entry('after-backup'))
    os.replace(copy, server.db_path + '.restore')
    assert server.stop() == 0
    server.start()
    served = {e['id'] for e in AdminClient_for(server).family(family['id'])['entries']}
    assert served == saved and 'after-backup' not in served
    assert any(name.startswith('babytrack.db.before-restore-') for name in os.listdir(server.directory))
    assert not os.path.exists(server.db_path + '.restore')


def test_a_damaged_restore_copy_is_refused(tmp_path):
    (tmp_path / 'babytrack.db.restore').write_bytes(b'SQLite format 3\x00' + b'garbage' * 200)
    with pytest.raises(AssertionError, match='integrity check'):
        Server(tmp_path)


def test_daily_snapshots_keep_the_newest(bt, monkeypatch, tmp_path):
    monkeypatch.setattr(bt, 'DB_PATH', str(tmp_path / 'babytrack.db'))
    monkeypatch.setattr(bt, 'BACKUP_KEEP', 2)
    folder = tmp_path / 'backups'
    folder.mkdir()
    for day in ('2020-01-01', '2020-01-02'):
        (folder / f'babytrack-{day}.db').write_bytes(b'')
    (folder / 'manual.db').write_bytes(b'')  # a copy taken by hand is neither rotated nor counted
    bt.create_family('Snapshotted')
    bt.daily_snapshot()
    kept = sorted(os.listdir(folder))
    assert len(kept) == 3 and kept[0] == 'babytrack-2020-01-02.db' and kept[1].startswith('babytrack-20')
    assert kept[2] == 'manual.db'

    with sqlite3.connect(folder / kept[1]) as conn:
        assert conn.execute('SELECT name FROM families').fetchall() == [('Snapshotted',)]
    assert bt.latest_backup() == str(folder / kept[1])


def test_health_is_503_when_the_database_cannot_be_read(bt, web):
    bt.db.close()
    assert web.get('/health', status=503).json == {'ok': False, 'reason': 'the database cannot be read'}


def test_fly_toml_agrees_with_the_app(bt):
    import tomllib
    with open(os.path.join(os.path.dirname(__file__), 'fly.toml'), 'rb') as raw:
        fly = tomllib.load(raw)
    env, service = fly['env'], fly['http_service']
    assert env['PORT'] == str(bt.PORT) == '8080' and service['internal_port'] == 8080
    assert env['DB_PATH'].startswith(fly['mounts']['destination'] + '/')
    assert env['BASE_URL'].startswith('https://') and service['force_https'] is True
    assert service['checks'][0]['path'] == '/health'
    assert service['concurrency']['type'] == 'connections'
    assert fly['metrics'] == {'port': 8080, 'path': '/metrics'}
    assert fly['kill_signal'] == 'SIGTERM' and fly['kill_timeout'] > 5
    assert fly['vm'][0]['memory'] == '256mb' and fly['primary_region'] == 'syd'
    with open(os.path.join(os.path.dirname(__file__), 'Procfile')) as procfile:
        assert procfile.read().strip() == 'web: python -m babytrackd'
