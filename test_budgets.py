"""Budgets and storage faults (PROTOCOL.md, "Budgets and limits"; issue 10): the write budget per
link, the family cap, storage faults, close frames as RFC 6455 §7.4 says, and a login limiter
that survives a restart. Every test runs a real server process over real sockets."""

import json
import os
import signal
import struct
import time
import urllib.error
import urllib.request

import pytest

from conftest import ADMIN_PASSWORD, AdminClient, Device, Server, wait_for
from test_reliability import RawSocket, frame, now_ms, read_database, stored_entries


def started(tmp_path, **env):
    """A server with these settings, an admin logged in, and a family with links for Mum and Dad."""
    server = Server(tmp_path, **env)
    admin = AdminClient(server)
    admin.login()
    family = admin.create_family('Baby Budget')
    for label in ('Mum', 'Dad'):
        family[label] = admin.create_link(family['id'], label)['token']
    return server, admin, family


@pytest.fixture
def running():
    servers = []
    yield lambda tmp_path, **env: servers.append(started(tmp_path, **env)) or servers[-1]
    for server, _, _ in servers:
        server.stop()


def add(device, entry_id, value='bottle'):
    """Send a new entry; return the server's answer to it (its echo, or an error)."""
    ts = now_ms() - 60_000
    device.send({'type': 'entry', 'action': 'add',
                 'entry': {'id': entry_id, 'ts': ts, 'type': 'feed', 'value': value, 'updated_at': ts}})
    return device.recv_until(lambda m: m['type'] == 'error' or m['type'] == 'entry' and m['entry']['id'] == entry_id)


def get(server, path):
    """GET a path; return (status, headers, body text)."""
    try:
        with urllib.request.urlopen(server.base_url + path, timeout=5) as answer:
            return answer.status, answer.headers, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


# Write budget -----------------------------------------------------------------------------------

def test_a_link_over_its_write_budget_is_told_to_wait_and_nothing_is_stored(running, tmp_path):
    server, _, family = running(tmp_path, WS_WRITE_BURST=4, WS_WRITE_RATE=0.2)  # one more every 5 s
    phone, tablet = Device(server, family['id'], family['Mum']), Device(server, family['id'], family['Mum'])
    assert add(phone, 'a1')['type'] == 'entry' and add(tablet, 'a2')['type'] == 'entry'
    phone.send({'type': 'config', 'data': [{'category': 'feed', 'buttons': [{'label': 'bottle'}]}]})
    phone.recv_until(lambda m: m['type'] == 'config')
    assert add(tablet, 'a3')['type'] == 'entry'  # four writes from two sockets of one link: the burst
    refused = add(phone, 'a4')
    assert refused == {'type': 'error', 'error': 'too many messages', 'retry_after': 5}  # no id: keep it, resend
    phone.send({'type': 'ping'})  # pings are free
    phone.recv_until(lambda m: m['type'] == 'pong')
    assert 'a4' not in stored_entries(server, family['id'])
    dad = Device(server, family['id'], family['Dad'])  # another link has its own budget
    assert add(dad, 'd1')['type'] == 'entry'

    phone.close()
    tablet.close()
    again = Device(server, family['id'], family['Mum'])  # reconnecting refills nothing
    assert add(again, 'a4')['error'] == 'too many messages'
    time.sleep(refused['retry_after'])  # what the app does: wait as told, then resend
    assert add(again, 'a4')['entry']['id'] == 'a4'
    assert set(stored_entries(server, family['id'])) == {'a1', 'a2', 'a3', 'a4', 'd1'}


# Family cap -------------------------------------------------------------------------------------

def test_a_family_at_its_cap_refuses_new_entries_by_id_but_updates_and_deletes_still_work(running, tmp_path):
    server, admin, family = running(tmp_path, FAMILY_MAX_ENTRIES=3)
    mum = Device(server, family['id'], family['Mum'])
    for entry_id in ('e1', 'e2', 'e3'):
        assert add(mum, entry_id)['type'] == 'entry'
    refused = add(mum, 'e4')
    assert refused == {'type': 'error', 'error': 'this family has reached its limit of 3 entries', 'id': 'e4'}

    mum.send({'type': 'entry', 'action': 'update', 'entry': {'id': 'e1', 'value': 'breast left', 'updated_at': now_ms()}})
    assert mum.entry_echo('e1')['entry']['value'] == 'breast left'
    mum.send({'type': 'entry', 'action': 'delete', 'id': 'e2', 'updated_at': now_ms()})
    assert mum.entry_echo('e2')['entry']['deleted'] is True
    assert add(mum, 'e4')['id'] == 'e4'  # after other writes it counts again: a tombstone still holds its row

    other = admin.create_family('Baby Other')  # the cap is per family
    token = admin.create_link(other['id'], 'Mum')['token']
    assert add(Device(server, other['id'], token), 'o1')['type'] == 'entry'
    stored = stored_entries(server, family['id'])
    assert set(stored) == {'e1', 'e2', 'e3'} and stored['e1']['value'] == 'breast left' and stored['e2']['deleted']


# Storage faults ---------------------------------------------------------------------------------

def test_a_full_disk_refuses_writes_without_losing_any_then_the_resend_is_stored(running, tmp_path):
    server, admin, family = running(tmp_path)
    mum = Device(server, family['id'], family['Mum'])
    acknowledged = [add(mum, f'before{n}')['entry']['id'] for n in range(20)]
    mum.close()
    server.stop()
    server.env['BABYTRACKD_TEST_MAX_PAGES'] = '1'  # the file may not grow by one page: a full disk
    server.start()

    mum = Device(server, family['id'], family['Mum'])
    refused = None
    for n in range(200):
        answer = add(mum, f'big{n}', value='x' * 4000)
        if answer['type'] == 'error':
            refused = answer, f'big{n}'
            break
        acknowledged.append(answer['entry']['id'])
    assert refused, 'the database never filled up'
    answer, waiting = refused
    assert answer == {'type': 'error', 'error': 'storage unavailable', 'retry_after': 5}  # no id: keep, resend

    status, headers, body = get(server, '/health')
    assert status == 503 and headers['Retry-After'] == '5'
    assert json.loads(body)['ok'] is False and 'full' in json.loads(body)['reason']
    assert 'babytrackd_storage_faults_total 1' in get(server, '/metrics')[2]
    big = [{'category': f'c{g}', 'buttons': [{'label': f'{n:02} ' + 'x' * 57} for n in range(18)]} for g in range(10)]
    status, answer = admin.call('PUT', f'/admin/families/{family["id"]}/config', {'data': big})  # the admin is told too
    assert status == 503 and 'try again' in answer['error']
    assert len(admin.ok('GET', '/admin/families')) == 1  # reads still served
    dad = Device(server, family['id'], family['Dad'])  # sockets still open and catch up
    assert {e['id'] for e in dad.init['entries']} == set(acknowledged)
    mum.send({'type': 'ping'})
    mum.recv_until(lambda m: m['type'] == 'pong')

    os.kill(server.proc.pid, signal.SIGUSR1)  # space is freed
    def resend():  # as the app does after retry_after (the signal may reach the server after the resend)
        answer = add(mum, waiting, value='x' * 4000)
        assert answer['type'] == 'entry' or answer.get('error') == 'storage unavailable', answer
        return answer['type'] == 'entry'
    wait_for(resend, timeout=10, interval=0.2, message='the resend to be stored')
    assert dad.entry_echo(waiting)
    assert get(server, '/health')[0] == 200
    server.stop()
    assert set(stored_entries(server, family['id'])) == set(acknowledged) | {waiting}


# Close frames -----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def shared_server(tmp_path_factory):
    server, _, family = started(tmp_path_factory.mktemp('close'))
    yield server, family
    server.stop()


def close_with(shared_server, payload):
    """Open a raw socket, send a close frame with this payload; return the server's close code."""
    server, family = shared_server
    raw = RawSocket(server, family['id'], family['Mum'])
    try:
        raw.texts_until(lambda m: m['type'] == 'init')
        raw.conn.sendall(frame(8, payload))
        return raw.close_code()
    finally:
        raw.close()


@pytest.mark.parametrize('code', [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_a_close_code_not_allowed_on_the_wire_gets_1002(shared_server, code):
    assert close_with(shared_server, struct.pack('!H', code)) == 1002


@pytest.mark.parametrize('payload, code', [
    (b'\x03', 1002),  # one byte: half a code
    (struct.pack('!H', 1000) + b'bye \xff', 1007),
    (struct.pack('!H', 1000) + b'\xed\xa0\x80', 1007),  # an encoded surrogate is not UTF-8
    (b'', 1000),
    (struct.pack('!H', 1000) + 'à bientôt'.encode(), 1000),
    (struct.pack('!H', 1001), 1000),
    (struct.pack('!H', 1013), 1000),
    (struct.pack('!H', 3000), 1000),
    (struct.pack('!H', 4999), 1000),
], ids=['one byte', 'reason not UTF-8', 'reason with a surrogate', 'empty', 'UTF-8 reason', '1001', '1013',
        '3000', '4999'])
def test_a_close_frame_is_answered_as_rfc_6455_says(shared_server, payload, code):
    assert close_with(shared_server, payload) == code


# Login limiter ----------------------------------------------------------------------------------

def test_the_login_limiter_survives_a_restart(tmp_path):
    server = Server(tmp_path)
    try:
        admin = AdminClient(server)
        for _ in range(5):
            assert admin.call('POST', '/admin/login', {'username': 'jane', 'password': 'wrong'})[0] == 401
        assert admin.call('POST', '/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD})[0] == 429
        server.stop()
        server.start()
        assert admin.call('POST', '/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD})[0] == 429
        assert len(read_database(server.db_path, 'SELECT * FROM login_failures')) == 5
    finally:
        server.stop()


def test_the_limiter_forgets_old_failures_as_it_goes_and_says_how_long_to_wait(bt):
    limiter = bt.RateLimiter(5, 900)
    for second in range(5):
        limiter.fail('1.2.3.4', now=second)
    assert limiter.retry_after('1.2.3.4', now=10) == 890
    assert limiter.retry_after('5.6.7.8', now=10) == 0
    limiter.fail('5.6.7.8', now=2000)  # every failure of 1.2.3.4 is past its window: gone from the table
    assert [row['address'] for row in bt.db.execute('SELECT address FROM login_failures')] == ['5.6.7.8']
    limiter.forgive('5.6.7.8')
    assert bt.db.execute('SELECT COUNT(*) FROM login_failures').fetchone()[0] == 0


def test_an_admin_form_that_hits_a_full_disk_says_so_and_changes_nothing(bt, logged_in):
    form = next(f for f in logged_in.get('/admin').forms.values() if f.action.endswith('/admin/families/new'))
    bt.db.execute('VACUUM')  # no free page left inside the file (migration 3's dropped index leaves one)
    bt.db.execute('PRAGMA max_page_count = 1')  # and the file may not grow: a full disk
    typed = {'csrf': form['csrf'].value, 'name': 'Olivia', 'notes': 'n' * 9_000, 'tz': 'UTC'}
    page = logged_in.post('/admin/families/new', typed, status=503, expect_errors=True)  # Bottle logs the fault
    assert page.headers['Retry-After'] == '5' and 'nothing was changed' in page.text and 'Traceback' not in page.text
    assert bt.list_families(True) == []
    assert logged_in.get('/health', status=503).json['reason'] == 'writes fail: database or disk is full'
    bt.db.execute('PRAGMA max_page_count = 1073741823')  # space freed: the same form goes through
    logged_in.post('/admin/families/new', typed, status=303)
    assert [f['name'] for f in bt.list_families(True)] == ['Olivia']
    assert logged_in.get('/health').json['ok'] is True


def test_health_recovers_by_itself_once_the_disk_takes_writes_again(running, tmp_path):
    """No device need write: on fly.io a machine whose check fails gets no requests to write with."""
    server, admin, family = running(tmp_path)
    server.stop()
    server.env['BABYTRACKD_TEST_MAX_PAGES'] = '1'
    server.start()
    mum = Device(server, family['id'], family['Mum'])
    for n in range(200):
        if add(mum, f'big{n}', value='x' * 4000)['type'] == 'error':
            break
    mum.close()
    assert get(server, '/health')[0] == 503
    os.kill(server.proc.pid, signal.SIGUSR1)  # space is freed; nobody writes
    wait_for(lambda: get(server, '/health')[0] == 200, timeout=15, message='/health to recover')
    assert 'babytrackd_storage_faults_total 1' in get(server, '/metrics')[2]
