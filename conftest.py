"""Shared test fixtures: a real babytrackd process on a free loopback port, an admin client, devices."""

import http.cookiejar
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

os.environ.setdefault('BCRYPT_ROUNDS', '4')  # before any test imports babytrackd
os.environ['BABYTRACKD_NO_PATCH'] = '1'  # keep real threads in the test process (see babytrackd.py)

import pytest
import websocket

HERE = os.path.dirname(os.path.abspath(__file__))
ADMIN_PASSWORD = 'correct horse battery staple'


def free_port():
    """Return a TCP port that is free on loopback right now."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def log_changes(conn):
    """Give entries written straight into the database their change-log rows, as migration 2 does: the server
    takes the next seq from the change log, so every entry's seq must be there."""
    conn.execute("""INSERT INTO changes (seq, entry_id, family_id, ts, type, value, deleted, updated_at, by, at)
                    SELECT seq, id, family_id, ts, type, value, deleted, updated_at, by, updated_at FROM entries
                    WHERE seq > (SELECT COALESCE(MAX(seq), 0) FROM changes)""")


def wait_for(condition, timeout=5.0, interval=0.01, message='condition'):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for {message}')
        time.sleep(interval)


class Server:
    """A babytrackd process started as the Procfile does (`python -m babytrackd`) on its own SQLite file."""

    def __init__(self, directory, **env):
        self.directory = str(directory)
        self.db_path = os.path.join(self.directory, 'babytrack.db')
        self.log_path = os.path.join(self.directory, 'server.log')
        self.env = dict(os.environ, HOST='127.0.0.1', DB_PATH=self.db_path, ADMIN_PASS=ADMIN_PASSWORD,
                        BCRYPT_ROUNDS='4', LOG_FORMAT='json', LOG_LEVEL='info', BACKUP_KEEP='0')
        self.env.update({key: str(value) for key, value in env.items()})
        self.env.pop('BABYTRACKD_NO_PATCH', None)  # the server itself runs on gevent
        # where -m finds the module (the process works in `directory`), before any path the run was given
        self.env['PYTHONPATH'] = os.pathsep.join(filter(None, [HERE, os.environ.get('PYTHONPATH')]))
        self.proc = None
        self.start()

    def start(self):
        """Start (or restart) the process on a free port and wait for /health."""
        self.port = free_port()
        self.env['PORT'] = str(self.port)
        self.env.setdefault('BASE_URL', f'http://127.0.0.1:{self.port}')
        self.env['BASE_URL'] = self.env['BASE_URL'].rsplit(':', 1)[0] + f':{self.port}'
        self.base_url = f'http://127.0.0.1:{self.port}'
        self.ws_url = f'ws://127.0.0.1:{self.port}/ws'
        self.log_file = open(self.log_path, 'a')
        self.proc = subprocess.Popen([sys.executable, '-m', 'babytrackd'], cwd=self.directory,
                                     env=self.env, stdout=self.log_file, stderr=self.log_file)
        wait_for(self.healthy, timeout=15, message='the server to answer /health')

    def healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f'server exited with {self.proc.returncode}:\n{self.log()}')
        try:
            with urllib.request.urlopen(self.base_url + '/health', timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def log(self):
        with open(self.log_path) as lines:
            return lines.read()

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stop the process; return its exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


class AdminClient:
    """The consultant's JSON client: a cookie jar and verb-named helpers."""

    def __init__(self, server):
        self.server = server
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def call(self, method, path, body=None, headers=None):
        """Send a JSON request; return (status, parsed JSON or None)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server.base_url + path, data=data, method=method, headers={
            'Accept': 'application/json', 'Content-Type': 'application/json', **(headers or {})})
        try:
            with self.opener.open(request, timeout=10) as answer:
                status, raw = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        return status, (json.loads(raw) if raw else None)

    def ok(self, method, path, body=None, expect=(200, 201, 204)):
        status, answer = self.call(method, path, body)
        assert status in expect, (status, answer)
        return answer

    def login(self, password=ADMIN_PASSWORD):
        return self.ok('POST', '/admin/login', {'username': 'jane', 'password': password})

    def create_family(self, name='Baby Smith', **fields):
        return self.ok('POST', '/admin/families', {'name': name, **fields})

    def create_link(self, family_id, label=None, expires_at=None):
        return self.ok('POST', f'/admin/families/{family_id}/links', {'label': label, 'expires_at': expires_at})

    def revoke_link(self, family_id, token):
        return self.ok('DELETE', f'/admin/families/{family_id}/links/{token}')

    def family(self, family_id):
        return self.ok('GET', f'/admin/families/{family_id}')

    def update_family(self, family_id, **changes):
        return self.ok('PATCH', f'/admin/families/{family_id}', changes)

    def put_config(self, family_id, data):
        return self.ok('PUT', f'/admin/families/{family_id}/config', {'data': data})


class Device:
    """A parent's device: a real WebSocket client holding a link cookie."""

    def __init__(self, server, family_id, token, since=None, timeout=5):
        query = f'?family={family_id}' + (f'&since={since}' if since is not None else '')
        self.ws = websocket.create_connection(server.ws_url + query, cookie=f'bt_link={token}',
                                              origin=server.base_url, timeout=timeout)
        self.init = self.recv()
        assert self.init['type'] == 'init', self.init
        self.cursor = self.init['cursor']

    def send(self, message):
        self.ws.send(json.dumps(message))

    def recv(self):
        message = json.loads(self.ws.recv())
        for entry in [message.get('entry')] if message.get('type') == 'entry' else []:
            self.cursor = max(getattr(self, 'cursor', 0), entry['seq'])
        return message

    def recv_until(self, test, timeout=5):
        """Return the first message for which test(message) is true; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.recv()
            except websocket.WebSocketTimeoutException:
                break
            if test(message):
                return message
        raise AssertionError('timed out waiting for a message')

    def expect_silence(self, seconds=0.3):
        """Assert no message arrives for `seconds` (only for asserting something is NOT sent)."""
        self.ws.settimeout(seconds)
        try:
            message = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return
        raise AssertionError(f'unexpected message: {message}')

    def add(self, entry_id, ts, type='feed', value='bottle', updated_at=None):
        entry = {'id': entry_id, 'ts': ts, 'type': type, 'value': value,
                 'updated_at': updated_at if updated_at is not None else ts}
        self.send({'type': 'entry', 'action': 'add', 'entry': entry})

    def entry_echo(self, entry_id, timeout=5):
        return self.recv_until(lambda m: m['type'] == 'entry' and m['entry']['id'] == entry_id, timeout)

    def close(self):
        self.ws.close()


@pytest.fixture
def server(tmp_path):
    running = Server(tmp_path, WS_WRITE_BURST=100_000)  # some tests send thousands; test_budgets starts its own
    yield running
    running.stop()


@pytest.fixture
def admin(server):
    client = AdminClient(server)
    client.login()
    return client


@pytest.fixture
def bt(tmp_path, monkeypatch):
    """The babytrackd module on a fresh database file, with admin jane (in-process, for WebTest)."""
    import babytrackd
    babytrackd.open_db(str(tmp_path / 'babytrack.db'))
    babytrackd.ensure_admin('jane', ADMIN_PASSWORD)
    yield babytrackd
    babytrackd.db.close()


@pytest.fixture
def web(bt):
    """A WebTest client of the app, not logged in."""
    import webtest
    return webtest.TestApp(bt.app, extra_environ={'REMOTE_ADDR': '10.0.0.1'})


@pytest.fixture
def logged_in(web):
    """A WebTest client logged in as jane (JSON)."""
    web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD})
    return web


def close_code(device, timeout=5):
    """Read until the server's close frame; return its code (None when the socket just dropped)."""
    import struct
    device.ws.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            opcode, data = device.ws.recv_data(control_frame=True)
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack('!H', data[:2])[0] if len(data) >= 2 else 1005
    raise AssertionError('no close frame in time')
