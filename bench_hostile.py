"""Hostile clients against a real babytrackd on loopback: each attack of issue 15, bounded in count
and time; prints the server's RSS and answers. Run: python bench_hostile.py [--server PATH] [--quick]

Every attack targets 127.0.0.1 only, on a server this script starts on its own temporary database.
"""

import argparse
import base64
import http.cookiejar
import json
import os
import re
import resource
import select
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import bcrypt

from conftest import log_changes

HERE = os.path.dirname(os.path.abspath(__file__))
PASSWORD = 'hostile bench password'
ROWS = []


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class Target:
    """A babytrackd process on its own database, with a logged-in admin, one family and one link."""

    def __init__(self, script, directory, nofile=None, **env_overrides):
        self.port = free_port()
        self.base = f'http://127.0.0.1:{self.port}'
        self.db_path = os.path.join(directory, 'bench.db')
        env = dict(os.environ, HOST='127.0.0.1', PORT=str(self.port), DB_PATH=self.db_path, BACKUP_KEEP='0',
                   ADMIN_PASS=PASSWORD, BCRYPT_ROUNDS='4', LOG_LEVEL='error', BASE_URL=self.base)
        env.update({key: str(value) for key, value in env_overrides.items()})
        env.pop('BABYTRACKD_NO_PATCH', None)
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
        self.log = open(os.path.join(directory, 'server.log'), 'a')
        self.proc = subprocess.Popen([sys.executable, script], cwd=directory, env=env, stdout=self.log,
                                     stderr=self.log, preexec_fn=limit)
        deadline = time.monotonic() + 20
        while not self.health(timeout=1)[0] == 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit('the server did not start')
            time.sleep(0.1)
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        if 'https' not in env['BASE_URL']:
            self.call('POST', '/admin/login', {'username': 'jane', 'password': PASSWORD})
            self.family = self.call('POST', '/admin/families', {'name': 'Bench'})[1]['id']
            self.token = self.link()

    def link(self):
        return self.call('POST', f'/admin/families/{self.family}/links', {'label': 'bench'})[1]['token']

    def call(self, method, path, body=None):
        request = urllib.request.Request(self.base + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={'Accept': 'application/json', 'Content-Type': 'application/json'})
        try:
            with self.opener.open(request, timeout=30) as answer:
                raw = answer.read()
                return answer.status, json.loads(raw) if raw[:1] == b'{' else raw
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def health(self, timeout=5):
        """Return (status or error name, seconds)."""
        started = time.monotonic()
        try:
            with urllib.request.urlopen(self.base + '/health', timeout=timeout) as answer:
                return answer.status, time.monotonic() - started
        except urllib.error.HTTPError as error:
            return error.code, time.monotonic() - started
        except OSError as error:
            return type(error).__name__, time.monotonic() - started

    def rss_mb(self):
        with open(f'/proc/{self.proc.pid}/status') as status:
            for line in status:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def connect(target, source='127.0.0.1', timeout=10):
    conn = socket.create_connection(('127.0.0.1', target.port), timeout=timeout, source_address=(source, 0))
    return conn


def handshake(target, token, query='', rcvbuf=None):
    """Open /ws with a raw socket; return (status code, socket)."""
    conn = socket.socket()
    if rcvbuf:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    conn.settimeout(10)
    conn.connect(('127.0.0.1', target.port))
    key = base64.b64encode(os.urandom(16)).decode()
    conn.sendall((f'GET /ws?family={target.family}{query} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n'
                  f'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n'
                  f'Sec-WebSocket-Version: 13\r\nCookie: bt_link={token}\r\n\r\n').encode())
    head = b''
    while b'\r\n\r\n' not in head:
        part = conn.recv(1)
        if not part:
            break
        head += part
    return int(head.split()[1]) if head.startswith(b'HTTP/') else 0, conn


def client_frame(opcode, payload):
    """A masked client frame (mask of zeros: the payload goes as is)."""
    size = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack('!H', size))
    return head + b'\0\0\0\0' + payload


def read_status(conn, timeout=15):
    conn.settimeout(timeout)
    try:
        head = conn.recv(64)
    except OSError as error:
        return type(error).__name__
    return head.split(b'\r\n')[0].decode(errors='replace') if head else 'closed'


def row(attack, measure, value):
    ROWS.append((attack, measure, value))
    print(f'{attack:<44} {measure:<40} {value}', flush=True)


# -- attacks ---------------------------------------------------------------------------------

def memory(target, megabytes=20, sockets=6, watch=40):
    """A family with ~20 MB of entries; 6 sockets connect with since=0 and never read, but ping."""
    value = 'm' * 1000
    count = megabytes * 1000
    base = int(time.time() * 1000) - 86_400_000
    conn = sqlite3.connect(target.db_path, timeout=30)
    top = conn.execute('SELECT COALESCE(MAX(seq), 0) FROM changes').fetchone()[0]
    with conn:
        conn.executemany('INSERT INTO entries (id, family_id, ts, type, value, deleted, updated_at, seq, by) '
                         'VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)',
                         [(f'big{n}', target.family, base + n, 'feed', value, base + n, top + 1 + n, 'bench')
                          for n in range(count)])
        log_changes(conn)
    conn.close()
    before = target.rss_mb()
    links = [target.link() for _ in range(sockets)]
    peers = [handshake(target, token, '&since=0', rcvbuf=4096)[1] for token in links]
    time.sleep(5)
    grown = target.rss_mb()
    row('memory: 20 MB family, 6 sockets never read', 'RSS before -> 5 s after (MB)', f'{before:.0f} -> {grown:.0f}')
    row('', '/health while they wait', '%s in %.3f s' % target.health())
    started, open_ = time.monotonic(), list(peers)
    while open_ and time.monotonic() - started < watch:  # they keep pinging; nothing else is read
        for peer in list(open_):
            try:
                peer.sendall(client_frame(0x9, b'alive'))
            except OSError:
                open_.remove(peer)
        time.sleep(1)
    row('', f'sockets still open after {watch} s of pings', f'{len(open_)} of {sockets}')
    row('', 'RSS then (MB)', f'{target.rss_mb():.0f}')
    for peer in peers:
        peer.close()
    conn = sqlite3.connect(target.db_path, timeout=30)
    with conn:
        conn.execute("DELETE FROM entries WHERE id LIKE 'big%'")
    conn.close()


def sockets_per_link(target, count=300):
    """300 sockets on one link."""
    token = target.link()
    answers, peers = {}, []
    for _ in range(count):
        status, conn = handshake(target, token)
        answers[status] = answers.get(status, 0) + 1
        peers.append(conn)
    row('300 sockets on one link', 'answers', ', '.join(f'{n}x {s}' for s, n in sorted(answers.items())))
    for conn in peers:
        conn.close()


def chunked_body(target, mebibytes=50):
    """POST a 50 MiB chunked body; how much is read before the answer."""
    conn = connect(target)
    conn.sendall(b'POST /admin/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                 b'Transfer-Encoding: chunked\r\n\r\n')
    chunk = b'10000\r\n' + b'x' * 0x10000 + b'\r\n'
    sent, answer = 0, None
    conn.settimeout(5)
    try:
        while sent < mebibytes * 16 and answer is None:
            if select.select([conn], [], [], 0.5 if sent == 0 else 0)[0]:  # the server may answer at once
                answer = conn.recv(64)
                break
            conn.sendall(chunk)
            sent += 1
        if answer is None:
            conn.sendall(b'0\r\n\r\n')
            answer = conn.recv(64)
    except OSError as error:
        answer = type(error).__name__.encode()
    status = answer.split(b'\r\n')[0].decode(errors='replace')
    row('chunked body of 50 MiB', 'MiB sent before the answer; answer', f'{sent / 16:g}; {status}')
    conn.close()


def big_headers(target):
    """A request with 20 KiB of headers."""
    conn = connect(target)
    conn.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n' + b''.join(b'X-Pad-%d: %s\r\n' % (n, b'p' * 1000)
                                                            for n in range(20)) + b'\r\n')
    row('20 KiB of headers', 'answer', read_status(conn))
    conn.close()


def slow_headers(target, count=200, hold=12):
    """200 connections that never finish their headers (one byte every 2 s)."""
    conns = []
    for _ in range(count):
        conn = connect(target)
        conn.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n')
        conns.append(conn)
    started = time.monotonic()
    while time.monotonic() - started < hold:
        for conn in conns:
            try:
                conn.send(b'X')
            except OSError:
                pass
        time.sleep(2)
    alive = 0
    for conn in conns:
        conn.setblocking(False)
        try:
            conn.recv(1)  # an answer (408) or the end: not held any more
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    row(f'{count} connections never finishing headers', f'still open after {hold} s', f'{alive} of {count}')
    row('', '/health meanwhile', '%s in %.3f s' % target.health())
    for conn in conns:
        conn.close()


def huge_headers(target, count=15):
    """15 connections each sending 99 header lines of 63 KB (6 MiB), never finishing."""
    before = target.rss_mb()
    conns = [connect(target) for _ in range(count)]
    line = b'X-Pad: ' + b'h' * 63000 + b'\r\n'
    refused = 0
    for conn in conns:
        conn.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n')
        try:
            for _ in range(99):
                conn.sendall(line)
        except OSError:
            refused += 1
    time.sleep(1)
    row(f'{count} x 6 MiB of unfinished headers', 'RSS before -> while held (MB)',
        f'{before:.0f} -> {target.rss_mb():.0f}')
    row('', 'connections refused mid-headers', f'{refused} of {count}')
    for conn in conns:
        conn.close()


def connection_flood(target, count=1200):
    """1,200 idle connections against a process allowed 1,024 file descriptors."""
    conns, refused = [], 0
    for _ in range(count):
        try:
            conns.append(connect(target, timeout=2))
        except OSError:
            refused += 1
    time.sleep(0.5)
    closed = 0
    for conn in conns:
        conn.setblocking(False)
        try:
            closed += conn.recv(64)[:1] in (b'', b'H')
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    row(f'{count} idle connections (fd limit 1,024)', 'refused at once', f'{closed + refused} of {count}')
    row('', '/health meanwhile', '%s in %.3f s' % target.health(timeout=5))
    for conn in conns:
        conn.close()
    time.sleep(1)
    row('', '/health once they left', '%s in %.3f s' % target.health(timeout=5))


def login_timing(target, tries=4):
    """Wrong password for jane (admin hash of cost 10) against an unknown username, taking turns."""
    spent = {'jane': [], 'nobody': []}
    for attempt in range(tries):
        for number, username in enumerate(spent):
            conn = connect(target, source=f'127.0.0.{2 + attempt + 10 * number}')  # under the limiter
            body = json.dumps({'username': username, 'password': 'wrong'}).encode()
            started = time.monotonic()
            conn.sendall(b'POST /admin/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                         b'Connection: close\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body))
            conn.recv(64)
            spent[username].append(time.monotonic() - started)
            conn.close()
    median = {name: sorted(times)[len(times) // 2] * 1000 for name, times in spent.items()}
    row('login: wrong password, jane vs unknown user', 'median ms (admin hash cost 10)',
        f"{median['jane']:.1f} vs {median['nobody']:.1f}")


def many_pings(target, count=600):
    """600 pings of 120 bytes on one socket, then a message."""
    status, conn = handshake(target, target.token)
    for _ in range(count):
        conn.sendall(client_frame(0x9, b'p' * 120))
    conn.sendall(client_frame(0x1, b'{"type":"ping"}'))
    conn.settimeout(5)
    seen, close, pong = b'', None, False
    try:
        while not pong and close is None:
            part = conn.recv(65536)
            if not part:
                break
            seen += part
            while len(seen) >= 2:  # server frames: unmasked; lengths up to 64 bits
                size, at = seen[1] & 0x7f, 2
                if size == 126:
                    size, at = int.from_bytes(seen[2:4], 'big'), 4
                elif size == 127:
                    size, at = int.from_bytes(seen[2:10], 'big'), 10
                if len(seen) < at + size:
                    break
                opcode, payload, seen = seen[0] & 0x0f, seen[at:at + size], seen[at + size:]
                close = struct.unpack('!H', payload[:2])[0] if opcode == 0x8 else close
                pong = pong or (opcode == 0x1 and b'"pong"' in payload)
    except OSError:
        pass
    row('600 pings of 120 bytes', 'outcome', f'closed {close}' if close else
        ('pong to the next message' if pong else 'no answer'))
    conn.close()


def forged_host(target):
    """GET /app with a forged X-Forwarded-Host."""
    conn = connect(target)
    conn.sendall(b'GET /app HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n')
    conn.settimeout(5)
    head = conn.recv(4096).decode(errors='replace')
    location = next((line.split(':', 1)[1].strip() for line in head.split('\r\n') if line.lower().startswith('location:')), '-')
    row('redirect with X-Forwarded-Host: evil.example', 'Location', location)
    conn.close()


def csv_and_class(target):
    """An entry id starting with '-' in the CSV; an entry type with a space on the day grid."""
    token = target.link()
    status, conn = handshake(target, token)
    now = int(time.time() * 1000)
    for entry in ({'id': '-2-3', 'ts': now, 'type': 'feed', 'value': 'bottle', 'updated_at': now},
                  {'id': 'cls', 'ts': now, 'type': 'sleep big-red', 'value': 'x', 'updated_at': now}):
        conn.sendall(client_frame(0x1, json.dumps({'type': 'entry', 'action': 'add', 'entry': entry}).encode()))
    time.sleep(0.5)
    conn.close()
    status, csv = target.call('GET', f'/admin/families/{target.family}/export.csv')
    line = next((line for line in csv.decode().splitlines() if '2-3' in line), '-')
    row("CSV row of an entry with id '-2-3'", 'first cell', line.split(',')[0])
    request = urllib.request.Request(target.base + f'/admin/families/{target.family}', headers={'Accept': 'text/html'})
    with target.opener.open(request, timeout=10) as answer:
        page = answer.read().decode()
    row("entry type 'sleep big-red' on the day grid", 'becomes class names', 'yes' if re.search(r'class="[^"]*sleep big-red', page) else 'no')


def hsts(script, directory):
    target = Target(script, directory, BASE_URL='https://babytrack.example')
    with urllib.request.urlopen(target.base + '/health', timeout=5) as answer:
        row('BASE_URL https', 'Strict-Transport-Security', answer.headers.get('Strict-Transport-Security') or '-')
    target.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--server', default=os.path.join(HERE, 'babytrackd.py'), help='babytrackd.py to attack')
    parser.add_argument('--quick', action='store_true', help='skip the 40 s memory watch')
    parser.add_argument('--only', help='run only the attacks whose name contains this')
    args = parser.parse_args()
    script = os.path.abspath(args.server)
    print(f'attacking {script} on loopback\n')
    with tempfile.TemporaryDirectory() as directory:
        cost10 = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        target = Target(script, os.path.join(directory), ADMIN_PASS=cost10)
        try:
            for attack in (memory, sockets_per_link, many_pings, chunked_body, big_headers, huge_headers,
                           slow_headers, login_timing, forged_host, csv_and_class):
                if not args.only or args.only in attack.__name__:
                    attack(target, watch=5 if args.quick else 40) if attack is memory else attack(target)
        finally:
            target.stop()
        if not args.only or args.only in 'connection_flood':
            os.makedirs(os.path.join(directory, 'flood'))
            target = Target(script, os.path.join(directory, 'flood'), nofile=1024)
            try:
                connection_flood(target)
            finally:
                target.stop()
        if not args.only or args.only in 'hsts':
            os.makedirs(os.path.join(directory, 'https'))
            hsts(script, os.path.join(directory, 'https'))


if __name__ == '__main__':
    main()
