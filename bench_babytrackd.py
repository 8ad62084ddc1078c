"""Benchmark babytrackd against a real server process on loopback; print a table and write JSON.

    python bench_babytrackd.py [--json bench_results.json] [--load-seconds 60] [--sockets 1000]
    python bench_babytrackd.py --practice [--json practice_results.json]

--practice measures Jane's pages on a realistic practice (200 families in four time zones, 30 days
of ~48 entries a day each, one dense day of 1,000 entries) and how much they stall the parents.

Not part of the test suite: it measures, it does not pass or fail (targets are printed beside
each figure). The client side runs on gevent with a lean WebSocket client (class Client, every socket
read by one Receiver), the same client code for the babytrackd broadcast and for the floor (a bare
gevent-websocket echo server on the same stack); latency is measured paced and back to back, the
same way for both (see run()), with this process in the background (in_background()).
The catch-up uses websocket-client, without its pure-Python UTF-8 check (~1 s on 3 MB).
"""

from gevent import monkey
monkey.patch_all()

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import random
import select
import shutil
import signal
import site
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from urllib.parse import urlsplit

import bcrypt
import gevent
import gevent.event
import gevent.socket
import websocket

from conftest import log_changes

HERE = os.path.dirname(os.path.abspath(__file__))
PASSWORD = 'bench-password'
# The throughput runs send thousands of messages a second from one link: far over the per-link
# write budget that protects a real server (PROTOCOL.md, "Budgets and limits"), so the bench raises it.
WRITE_BUDGET = {'WS_WRITE_BURST': '1000000000', 'WS_WRITE_RATE': '1000000000'}


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def rss_kb(pid):
    with open(f'/proc/{pid}/status') as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Server:
    """babytrackd in its own process on a prepared database."""

    def __init__(self, db_path, no_pth=False):
        self.port = free_port()
        self.base = f'http://127.0.0.1:{self.port}'
        env = dict(os.environ, PORT=str(self.port), HOST='127.0.0.1', DB_PATH=db_path, BACKUP_KEEP='0',
                   ADMIN_PASS=bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode(),
                   BASE_URL=f'http://127.0.0.1:{self.port}', LOG_LEVEL='error', **WRITE_BUDGET)
        env.pop('BABYTRACKD_NO_PATCH', None)
        python = [sys.executable]
        if no_pth:  # site-packages on the path, but none of their .pth start-up hooks
            python, env['PYTHONPATH'] = [sys.executable, '-S'], os.pathsep.join(site.getsitepackages())
        started = time.perf_counter()
        self.proc = subprocess.Popen(python + ['-m', 'babytrackd'], cwd=HERE, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=1)
                connection.request('GET', '/health')
                if connection.getresponse().status == 200:
                    break
            except OSError:
                gevent.sleep(0.002)
        self.start_seconds = time.perf_counter() - started
        self.cookie = self.login()

    def login(self):
        connection = http.client.HTTPConnection('127.0.0.1', self.port)
        connection.request('POST', '/admin/login', json.dumps({'username': 'jane', 'password': PASSWORD}),
                           {'Content-Type': 'application/json'})
        answer = connection.getresponse()
        answer.read()
        return answer.getheader('Set-Cookie').split(';')[0]

    def rss_kb(self):
        return rss_kb(self.proc.pid)

    def cpu_seconds(self):
        """The server process's CPU time so far (user + system)."""
        with open(f'/proc/{self.proc.pid}/stat') as stat:
            fields = stat.read().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')

    def time_get(self, path, runs=20, accept='application/json'):
        """Median milliseconds of `runs` GETs over one keep-alive connection (and in self.cpu_ms, the
        server's CPU milliseconds per GET: on a busy machine, wall time also counts other processes)."""
        connection = http.client.HTTPConnection('127.0.0.1', self.port)
        timings, cpu = [], self.cpu_seconds()
        for _ in range(runs + 2):
            started = time.perf_counter()
            connection.request('GET', path, headers={'Cookie': self.cookie, 'Accept': accept})
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200, (path, answer.status)
            timings.append((time.perf_counter() - started) * 1000)
        self.cpu_ms = (self.cpu_seconds() - cpu) * 1000 / len(timings)
        return statistics.median(timings[2:])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def prepare_database(path, families, entries_in_big_family):
    """Create families, links and a year of entries straight in SQLite (through the module's schema)."""
    os.environ['DB_PATH'] = path
    os.environ['BABYTRACKD_NO_PATCH'] = '1'  # this process patched itself above
    import babytrackd
    babytrackd.open_db(path)
    made = []
    for number in range(families):
        family = babytrackd.create_family(f'Family {number}', tz='Australia/Sydney')
        links = [babytrackd.create_link(family['id'], f'device {d}')['token'] for d in range(5)]
        made.append((family['id'], links))
    big = made[0][0]
    now = int(time.time() * 1000)
    start = now - 365 * 24 * 3600 * 1000
    step = (now - start) // entries_in_big_family
    kinds = [('sleep', 'sleeping'), ('sleep', 'awake'), ('feed', 'bottle'), ('nappy', 'wet + dirty')]
    rows = []
    for number in range(entries_in_big_family):
        kind, value = kinds[number % 4]
        ts = start + number * step
        rows.append((uuid.uuid4().hex, big, ts, kind, value, 0, ts, number + 1, 'device 0'))
    with babytrackd.transaction():
        babytrackd.db.executemany('INSERT INTO entries (id, family_id, ts, type, value, deleted, updated_at, seq, by) '
                                  'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', rows)
        log_changes(babytrackd.db)
    babytrackd.db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    babytrackd.db.close()
    return made


class Arrivals:
    """When each message id reached each device; wait_for blocks (no busy loop) until `count` have."""

    def __init__(self):
        self.times, self.waiting = {}, {}

    def record(self, key, at):
        times = self.times.setdefault(key, [])
        times.append(at)
        waiter = self.waiting.get(key)
        if waiter and len(times) >= waiter[0]:
            waiter[1].set()

    def wait_for(self, key, count, timeout=10):
        if len(self.times.get(key, ())) < count:
            self.waiting[key] = (count, gevent.event.Event())
            if not self.waiting[key][1].wait(timeout):
                raise TimeoutError(f'{key}: {len(self.times.get(key, ()))} of {count} arrived')
            del self.waiting[key]
        return self.times[key]


class Receiver:
    """Every Client's socket in one epoll set, read by one greenlet. A wake-up reads each socket that has data
    and stamps it as read, before any parsing: five messages that arrived together cost one wake-up of this
    process, not five greenlet switches each stamped after the parsing of those before it (five phones read
    in parallel). The floor and the broadcast both go through it."""

    def __init__(self):
        self.epoll = monkey.get_original('select', 'epoll')()
        self.clients, self.greenlet = {}, None

    def add(self, client):
        self.clients[client.sock.fileno()] = client
        self.epoll.register(client.sock.fileno(), select.EPOLLIN)
        self.greenlet = self.greenlet or gevent.spawn(self.run)

    def remove(self, client):
        if self.clients.pop(client.sock.fileno(), None):
            self.epoll.unregister(client.sock.fileno())

    def run(self):
        while True:
            gevent.socket.wait_read(self.epoll.fileno())
            read = []
            for fd, _ in self.epoll.poll(0):
                client = self.clients[fd]
                try:
                    chunk = client.sock.recv(65536)  # not more: CPython allocates the whole size (1 MiB: an mmap)
                except OSError:
                    chunk = b''
                read.append((client, chunk, time.perf_counter()))
            for client, chunk, at in read:
                client.buffer += chunk
                if chunk:
                    self.deliver(client, at)
                else:
                    self.remove(client)

    def deliver(self, client, at):
        """Hand each whole message in the client's buffer to its on_message; a client that fails (closed, or
        a message it cannot take) is dropped alone, the others keep being read."""
        try:
            while (text := client.parse()) is not None:
                if client.on_message:
                    client.on_message(client, text, at)
        except ConnectionError:
            self.remove(client)
        except Exception as error:  # a bug of the bench's own, on one socket: say it, and read the others on
            phase(f'a client stops: {error!r}')
            self.remove(client)


RECEIVER = Receiver()


class Client:
    """One device: a lean WebSocket client (a raw socket, masked frames out, frames in), read by the Receiver.
    websocket-client costs ~100 us a message in pure Python, which would drown the server's own time: the
    floor and the broadcast both use this."""

    def __init__(self, url, cookie=None, origin=None, on_message=None):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f'GET {parts.path}{"?" + parts.query if parts.query else ""} HTTP/1.1',
                 f'Host: {parts.netloc}', 'Upgrade: websocket', 'Connection: Upgrade',
                 f'Sec-WebSocket-Key: {key}', 'Sec-WebSocket-Version: 13']
        lines += [f'Cookie: {cookie}'] if cookie else []
        lines += [f'Origin: {origin}'] if origin else []
        self.sock.sendall(('\r\n'.join(lines) + '\r\n\r\n').encode())
        self.buffer, self.parts = b'', []
        while b'\r\n\r\n' not in self.buffer:
            self.read_more()
        head, self.buffer = self.buffer.split(b'\r\n\r\n', 1)
        assert head.startswith(b'HTTP/1.1 101'), head[:40]
        while (first := self.parse()) is None:  # the init (a large one comes in fragments)
            self.read_more()
        self.first, self.on_message = first, on_message
        self.sock.settimeout(None)  # the time-out was for the handshake; per read it costs a Timeout object
        RECEIVER.add(self)
        RECEIVER.deliver(self, time.perf_counter())  # whatever came in with the init

    def send(self, text):
        payload, mask = text.encode(), os.urandom(4)
        size = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | size]) if size < 126 else
                                bytes([0x80 | 126]) + struct.pack('!H', size) if size < 65536 else
                                bytes([0x80 | 127]) + struct.pack('!Q', size))
        key = int.from_bytes((mask * (size // 4 + 1))[:size], 'big')
        self.sock.sendall(head + mask + (int.from_bytes(payload, 'big') ^ key).to_bytes(size, 'big'))

    def read_more(self):
        """Wait for more bytes during the handshake (the Receiver reads them after)."""
        chunk = self.sock.recv(65536)  # not more: CPython allocates the whole size (1 MiB: an mmap)
        if not chunk:
            raise ConnectionError('closed')
        self.buffer += chunk

    def parse(self):
        """Return the next whole text message in the buffer (answering pings on the way), or None until more
        has arrived."""
        while True:
            buffer = self.buffer
            if len(buffer) < 2:
                return None
            size, start = buffer[1] & 0x7f, 2
            if size >= 126:
                start = 4 if size == 126 else 10
                if len(buffer) < start:
                    return None
                size = int.from_bytes(buffer[2:start], 'big')
            if len(buffer) < start + size:
                return None
            first, payload, self.buffer = buffer[0], buffer[start:start + size], buffer[start + size:]
            if first & 0x0f == 0x9:  # ping: answer with a masked pong
                self.sock.sendall(bytes([0x8a, 0x80 | len(payload)]) + b'\0\0\0\0' + payload)
                continue
            if first & 0x0f == 0x8:
                raise ConnectionError('closed by the server')
            self.parts.append(payload)
            if first & 0x80:  # FIN: the message is whole
                text, self.parts = b''.join(self.parts).decode(), []
                return text

    def close(self):
        RECEIVER.remove(self)
        self.sock.close()


def echo_server(port):
    """The floor: a bare gevent-websocket echo server on the same stack (TCP_NODELAY, pywsgi)."""
    from gevent.pywsgi import WSGIServer
    from geventwebsocket.handler import WebSocketHandler

    class Handler(WebSocketHandler):
        def handle(self):
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().handle()

    def app(environ, start_response):
        ws = environ['wsgi.websocket']
        ws.send('{"type":"init"}')
        while True:
            message = ws.receive()
            if message is None:
                return []
            ws.send(message)

    WSGIServer(('127.0.0.1', port), app, handler_class=Handler, log=None).serve_forever()


class Floor:
    """The bare echo server in its own process, and one Client of it."""

    def __init__(self):
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, '--echo-server', str(port)])
        self.arrivals = Arrivals()
        for _ in range(200):
            try:
                self.client = Client(f'ws://127.0.0.1:{port}/', on_message=self.record)
                break
            except OSError:
                gevent.sleep(0.01)

    def record(self, client, text, at):
        self.arrivals.record(json.loads(text)['id'], at)

    def sample(self, number):
        """Milliseconds from send to the echo."""
        key = f'f{number}'
        started = time.perf_counter()
        self.client.send(json.dumps({'type': 'entry', 'id': key, 'value': 'x' * 40}))
        return (self.arrivals.wait_for(key, 1)[0] - started) * 1000

    def close(self):
        self.client.close()
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def in_background():
    """Run this (client) process as a batch task: its wake-ups wait for the server to block instead of preempting
    it. The bench's devices share the server's two cores, a family's phones do not: preempted, the server's five
    sends of one broadcast took 0.35 ms paced (its own timestamps), 0.10 ms when not, and the figure measured the
    client's wake-ups five times over and the floor's once. Servers started before keep the normal policy."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        batch = True
    except (AttributeError, OSError) as error:  # not Linux, or a sandbox that refuses it
        phase(f'the client stays at the normal policy ({error}): latency includes its own wake-ups')
        batch = False
    try:
        yield
    finally:
        if batch:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def broadcast_ms(sender, arrivals, key, timeout=10):
    """Milliseconds from one device's write to its arrival on all 5 devices of its family."""
    now = int(time.time() * 1000)
    started = time.perf_counter()
    sender.send(json.dumps({'type': 'entry', 'action': 'add', 'entry': {
        'id': key, 'ts': now, 'type': 'feed', 'value': 'bottle', 'updated_at': now}}))
    return (max(arrivals.wait_for(key, 5, timeout)) - started) * 1000


def phase(text):
    print(f'... {text}', file=sys.stderr, flush=True)


def run(args):
    results = {}
    workdir = tempfile.mkdtemp(prefix='babytrackd-bench-')
    db_path = os.path.join(workdir, 'babytrack.db')
    families = prepare_database(db_path, args.sockets // 5, args.entries)
    server = Server(db_path, args.no_pth)
    ws_base = f'ws://127.0.0.1:{server.port}/ws'
    try:
        results['start_seconds'] = server.start_seconds
        gevent.sleep(0.5)
        results['rss_idle_mb'] = server.rss_kb() / 1024

        phase('catch-up')
        # Catch-up of the big family: everything, then a cursor 100 changes behind.
        big_id, big_links = families[0]
        cookie = f'bt_link={big_links[0]}'
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            ws = websocket.create_connection(f'{ws_base}?family={big_id}', cookie=cookie, origin=server.base,
                                             skip_utf8_validation=True)
            init = json.loads(ws.recv())
            timings.append((time.perf_counter() - started) * 1000)
            ws.close()
        results['catch_up_all_ms'] = statistics.median(timings)
        results['catch_up_entries'] = len(init['entries'])
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            ws = websocket.create_connection(f"{ws_base}?family={big_id}&since={init['cursor'] - 100}",
                                             cookie=cookie, origin=server.base, skip_utf8_validation=True)
            behind = json.loads(ws.recv())
            timings.append((time.perf_counter() - started) * 1000)
            ws.close()
        assert len(behind['entries']) == 100
        results['catch_up_100_ms'] = statistics.median(timings)

        phase('pages')
        # Pages and summaries.
        last_day = time.strftime('%Y-%m-%d')
        results['summary_ms'] = server.time_get(f'/admin/families/{big_id}/summary?date={last_day}')
        results['dashboard_ms'] = server.time_get('/admin', accept='text/html')
        results['dashboard_families'] = len(families)
        results['detail_page_ms'] = server.time_get(f'/admin/families/{big_id}', accept='text/html')

        phase('connecting sockets')
        # 1,000 sockets: 5 devices in each family.
        arrivals = Arrivals()
        gevent.sleep(0.5)
        before_sockets = server.rss_kb() / 1024

        def record(client, text, at):
            message = json.loads(text)
            if message.get('type') == 'entry':
                arrivals.record(message['entry']['id'], at)
        clients = {}
        for family_id, links in families:
            clients[family_id] = [Client(f'{ws_base}?family={family_id}', cookie=f'bt_link={token}',
                                         origin=server.base, on_message=record) for token in links]
        gevent.sleep(2)  # settled: every init and presence message sent and read
        connected = sum(len(c) for c in clients.values())
        results['sockets'] = connected
        results['rss_sockets_mb'] = server.rss_kb() / 1024
        results['kb_per_socket'] = (results['rss_sockets_mb'] - before_sockets) * 1024 / connected

        phase('broadcast latency')
        # Broadcast latency: one write at a time, until all 5 devices of the family have it; the
        # floor is one echo. Measured two ways, each the same for both: paced (a sample every
        # --pace ms, broadcast and floor taking turns, so each server has sat idle a while before
        # its sample, as it mostly is between taps, though far shorter than real gaps) and back to
        # back (each loop as fast as it goes, both processes kept hot).
        rng = random.Random(1)
        family_ids = list(clients)
        floor = Floor()

        def broadcast(number):
            return broadcast_ms(rng.choice(clients[rng.choice(family_ids)]), arrivals, f'b{number}')

        with in_background():
            paced, paced_floor, slot = [], [], time.perf_counter()
            for number in range(args.samples):
                for samples, measure in ((paced, broadcast), (paced_floor, floor.sample)):
                    slot += args.pace / 1000
                    gevent.sleep(max(0.0, slot - time.perf_counter()))
                    samples.append(measure(number))
            hot = [broadcast(args.samples + number) for number in range(args.samples)]
            hot_floor = [floor.sample(args.samples + number) for number in range(args.samples)]
        floor.close()
        for name, samples in (('broadcast', paced), ('floor', paced_floor), ('broadcast_hot', hot),
                              ('floor_hot', hot_floor)):
            results[f'{name}_p50_ms'] = percentile(samples, 0.5)
            results[f'{name}_p99_ms'] = percentile(samples, 0.99)
            results[f'{name}_max_ms'] = max(samples)
        results['broadcast_to_floor_p99'] = results['broadcast_p99_ms'] / results['floor_p99_ms']
        results['broadcast_to_floor_hot_p99'] = results['broadcast_hot_p99_ms'] / results['floor_hot_p99_ms']

        phase('writes per second')
        # Acknowledged writes per second: one device pipelined, then 10 devices in 10 families at once.
        def pipelined(client, count, prefix):
            now = int(time.time() * 1000)
            for number in range(count):
                client.send(json.dumps({'type': 'entry', 'action': 'add', 'entry': {
                    'id': f'{prefix}{number}', 'ts': now, 'type': 'feed', 'value': 'bottle', 'updated_at': now}}))
            last = f'{prefix}{count - 1}'
            arrivals.wait_for(last, 5, timeout=60)
        count = args.writes
        started = time.perf_counter()
        pipelined(clients[family_ids[1]][0], count, 'p')
        results['writes_per_s_one_device'] = count / (time.perf_counter() - started)
        started = time.perf_counter()
        gevent.joinall([gevent.spawn(pipelined, clients[family_ids[2 + n]][0], count // 10, f'm{n}-')
                        for n in range(10)])
        results['writes_per_s_ten_devices'] = count / (time.perf_counter() - started)

        phase('load')
        # Load: every socket connected, 100 writes a second, RSS sampled.
        if args.load_seconds:
            samples, errors, sent = [], 0, 0
            load_started = time.perf_counter()
            next_sample = load_started
            while time.perf_counter() - load_started < args.load_seconds:
                family_id = rng.choice(family_ids)
                now = int(time.time() * 1000)
                try:
                    rng.choice(clients[family_id]).send(json.dumps({'type': 'entry', 'action': 'add', 'entry': {
                        'id': f'l{sent}', 'ts': now, 'type': 'nappy', 'value': 'wet', 'updated_at': now}}))
                    sent += 1
                except Exception:
                    errors += 1
                if time.perf_counter() >= next_sample:
                    samples.append(server.rss_kb() / 1024)
                    next_sample += 5
                gevent.sleep(max(0.0, load_started + sent / 100 - time.perf_counter()))
            gevent.sleep(1)
            delivered = sum(1 for n in range(sent) if len(arrivals.times.get(f'l{n}', ())) == 5)
            results['load_seconds'] = args.load_seconds
            results['load_writes'] = sent
            results['load_errors'] = errors + (sent - delivered)
            results['load_rss_first_mb'] = samples[1] if len(samples) > 1 else samples[0]
            results['load_rss_last_mb'] = samples[-1]
            results['load_rss_change_pct'] = 100 * (samples[-1] - results['load_rss_first_mb']) / results['load_rss_first_mb']
        for group in clients.values():
            for client in group:
                client.close()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the databases: up to 120 MB a run
    results['machine'] = f'{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}'
    results['no_pth'] = args.no_pth
    probe = subprocess.Popen([sys.executable] + (['-S'] if args.no_pth else []) + ['-c', 'import time; time.sleep(1)'])
    time.sleep(0.5)
    results['python_alone_mb'] = rss_kb(probe.pid) / 1024
    probe.wait()
    return results


PRACTICE_ZONES = ['Australia/Sydney', 'Europe/London', 'America/New_York', 'America/Los_Angeles']


def prepare_practice(path, families=200, days=30, per_day=48, dense=1000):
    """Write the practice straight into SQLite: families in four zones, `days` local days of about
    `per_day` entries each up to now, and in the first family a dense day (yesterday) of `dense`."""
    os.environ['DB_PATH'] = path
    os.environ['BABYTRACKD_NO_PATCH'] = '1'  # this process patched itself above
    import datetime as dt
    import zoneinfo
    import babytrackd
    db = babytrackd.open_db(path)
    now, rng, hour = int(time.time() * 1000), random.Random(7), 3600 * 1000
    kinds = [('sleep', 'sleeping'), ('feed', 'bottle'), ('nappy', 'wet'),
             ('sleep', 'awake'), ('feed', 'breast left'), ('nappy', 'wet + dirty')]
    made, entries = [], []
    for number in range(families):
        family_id, zone = f'family{number:03d}', zoneinfo.ZoneInfo(PRACTICE_ZONES[number % 4])
        today = dt.datetime.fromtimestamp(now / 1000, zone).date()
        midnights = [int(dt.datetime.combine(today - dt.timedelta(days=back), dt.time(), zone).timestamp() * 1000)
                     for back in range(days + 1)]
        db.execute('INSERT INTO families (id, name, notes, created_at, archived, tz) VALUES (?, ?, ?, ?, 0, ?)',
                   (family_id, f'Family {number}', '', now - number * 1000, zone.key))
        links = [uuid.uuid4().hex for _ in range(5)]
        db.executemany('INSERT INTO access_links (token, family_id, label, created_at) VALUES (?, ?, ?, ?)',
                       [(token, family_id, f'device {d}', now) for d, token in enumerate(links)])
        made.append((family_id, links))
        for start in midnights[:days]:
            stamps = [start + slot * 24 * hour // per_day + rng.randrange(20 * 60 * 1000) for slot in range(per_day)]
            entries += [(family_id, ts, *kinds[slot % len(kinds)]) for slot, ts in enumerate(stamps) if ts <= now]
        if number == 0:  # the dense day: yesterday, one entry every 86.4 s
            dense_date, start = today - dt.timedelta(days=1), midnights[1]
            entries += [(family_id, start + n * (midnights[0] - start) // dense, *kinds[n % len(kinds)])
                        for n in range(dense)]
    entries.sort(key=lambda e: e[1])
    with babytrackd.transaction():
        db.executemany("""INSERT INTO entries (id, family_id, ts, type, value, deleted, updated_at, seq, by)
                          VALUES (?, ?, ?, ?, ?, 0, ?, ?, 'device 0')""",
                       [(uuid.uuid4().hex, family_id, ts, kind, value, ts, seq)
                        for seq, (family_id, ts, kind, value) in enumerate(entries, start=1)])
        log_changes(db)
    db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    db.close()
    return made, len(entries), dense_date.isoformat()


def run_practice(args):
    """Jane's pages on the practice, and the broadcast p99 with the server idle and while one client
    reloads the dashboard back to back (same run, same family, same client code)."""
    workdir = tempfile.mkdtemp(prefix='babytrackd-practice-')
    db_path = os.path.join(workdir, 'babytrack.db')
    phase('writing the practice')
    started = time.perf_counter()
    families, count, dense_date = prepare_practice(db_path)
    results = {'practice_entries': count, 'practice_families': len(families), 'load_average': os.getloadavg()[0],
               'practice_seconds': time.perf_counter() - started}
    server = Server(db_path, args.no_pth)
    try:
        phase('pages')
        for key, path, accept in (('dashboard', '/admin', 'text/html'), ('list', '/admin/families', 'application/json'),
                                  ('family_page', f'/admin/families/{families[1][0]}', 'text/html'),
                                  ('dense_summary', f'/admin/families/{families[0][0]}/summary?date={dense_date}',
                                   'application/json')):
            results[f'practice_{key}_ms'] = server.time_get(path, runs=40, accept=accept)
            results[f'practice_{key}_cpu_ms'] = server.cpu_ms

        phase('broadcast p99: idle, then under a dashboard reloaded back to back')
        arrivals = Arrivals()

        def record(client, text, at):
            message = json.loads(text)
            if message.get('type') == 'entry':
                arrivals.record(message['entry']['id'], at)
        family_id, links = families[1]
        devices = [Client(f'ws://127.0.0.1:{server.port}/ws?family={family_id}', cookie=f'bt_link={token}',
                          origin=server.base, on_message=record) for token in links]
        gevent.sleep(1)
        samples = args.practice_samples
        with in_background():
            idle = [broadcast_ms(devices[n % 5], arrivals, f'i{n}') for n in range(samples)]
            reloader = subprocess.Popen([sys.executable, __file__, '--reload-dashboard', str(server.port), server.cookie],
                                        stdout=subprocess.PIPE, text=True)  # at the batch policy too, as started here
            try:
                if reloader.stdout.readline() != 'reloading\n':  # its first reload is done
                    raise RuntimeError('the reloading browser stopped before its first reload (its error is above)')
                gevent.sleep(0.2)
                window = time.perf_counter()
                loaded = [broadcast_ms(devices[n % 5], arrivals, f'r{n}', timeout=60) for n in range(samples)]
                window = (window, time.perf_counter())
            finally:
                reloader.send_signal(signal.SIGTERM)
                said = reloader.communicate(timeout=60)[0]
        if reloader.returncode:
            raise RuntimeError('the reloading browser stopped with an error (above)')
        reloads = [ms for started, ms in json.loads(said) if window[0] <= started <= window[1]]  # the same clock
        if not reloads:
            raise RuntimeError('no reload of the dashboard began while the loaded samples were taken')
        for device in devices:
            device.close()
        results['practice_idle_p99_ms'] = percentile(idle, 0.99)
        results['practice_loaded_p99_ms'] = percentile(loaded, 0.99)
        results['practice_p99_ratio'] = results['practice_loaded_p99_ms'] / results['practice_idle_p99_ms']
        results['practice_reloads'] = len(reloads)
        results['practice_reload_ms'] = statistics.median(reloads)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def reload_dashboard(port, cookie):
    """Jane's browser, in a process of its own (a greenlet in the bench's would hold up the devices' reads ~0.3-0.8 ms
    per reload, parsing the page): reload the dashboard back to back until SIGTERM, then print each reload's start
    (perf_counter, the same clock in every process) and milliseconds as JSON."""
    stopping, reloads = gevent.event.Event(), []
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    connection = http.client.HTTPConnection('127.0.0.1', port)
    while not stopping.is_set():
        started = time.perf_counter()
        connection.request('GET', '/admin', headers={'Cookie': cookie, 'Accept': 'text/html'})
        answer = connection.getresponse()
        if answer.status != 200 or b'<table class="clients">' not in answer.read():  # not the login page
            raise RuntimeError(f'GET /admin answered {answer.status} without the clients table')
        reloads.append((started, (time.perf_counter() - started) * 1000))
        if len(reloads) == 1:
            print('reloading', flush=True)
    print(json.dumps(reloads), flush=True)


def long_reliability_runs(seeds):
    """The reliability tests at bench length: hundreds of convergence seeds, more crash rounds."""
    phase(f'convergence with {seeds} seeds, crash with {max(3, seeds // 20)} rounds')
    env = dict(os.environ, BABYTRACKD_SEEDS=str(seeds), BABYTRACKD_CRASH_ROUNDS=str(max(3, seeds // 20)))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'test_reliability.py',
                           '-k', 'converge or crash'], cwd=HERE, env=env, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or ['no output'])[-1]
    return {'reliability_seeds': seeds, 'reliability_seconds': time.perf_counter() - started,
            'reliability_failed': 0 if done.returncode == 0 else 1, 'reliability_summary': summary}


TARGETS = [
    ('start_seconds', 'start-up to first /health 200', 's', '<= 1', lambda v: v <= 1),
    ('rss_idle_mb', 'RSS idle', 'MB', '<= 35', lambda v: v <= 35),
    ('rss_sockets_mb', 'RSS with all sockets', 'MB', '<= 80', lambda v: v <= 80),
    ('kb_per_socket', 'memory per socket', 'KB', '', None),
    ('broadcast_p50_ms', 'broadcast p50 (send -> all 5 devices), paced', 'ms', '', None),
    ('broadcast_p99_ms', 'broadcast p99, paced', 'ms', '<= 2', lambda v: v <= 2),
    ('floor_p50_ms', 'floor p50 (bare echo, same client), paced', 'ms', '', None),
    ('floor_p99_ms', 'floor p99, paced', 'ms', '', None),
    ('broadcast_to_floor_p99', 'broadcast p99 / floor p99, paced', 'x', '<= 3', lambda v: v <= 3),
    ('broadcast_max_ms', 'slowest broadcast, paced', 'ms', '', None),
    ('broadcast_hot_p50_ms', 'broadcast p50, back to back', 'ms', '', None),
    ('broadcast_hot_p99_ms', 'broadcast p99, back to back', 'ms', '<= 2', lambda v: v <= 2),
    ('floor_hot_p50_ms', 'floor p50, back to back', 'ms', '', None),
    ('floor_hot_p99_ms', 'floor p99, back to back', 'ms', '', None),
    ('broadcast_to_floor_hot_p99', 'broadcast p99 / floor p99, back to back', 'x', '<= 3', lambda v: v <= 3),
    ('broadcast_hot_max_ms', 'slowest broadcast, back to back', 'ms', '', None),
    ('writes_per_s_one_device', 'acknowledged writes/s, one device pipelined', '/s', '>= 2000', lambda v: v >= 2000),
    ('writes_per_s_ten_devices', 'acknowledged writes/s, 10 devices', '/s', '>= 2000', lambda v: v >= 2000),
    ('catch_up_all_ms', 'catch-up since=0 (time to parsed init)', 'ms', '<= 300', lambda v: v <= 300),
    ('catch_up_100_ms', 'catch-up 100 changes behind', 'ms', '', None),
    ('summary_ms', 'day summary, 20k-entry family (median of 20)', 'ms', '<= 20', lambda v: v <= 20),
    ('dashboard_ms', 'dashboard page (median of 20)', 'ms', '<= 50', lambda v: v <= 50),
    ('detail_page_ms', 'family detail page, 20k entries (median of 20)', 'ms', '<= 50', lambda v: v <= 50),
    ('load_rss_change_pct', 'RSS change under load', '%', 'within 10', lambda v: abs(v) <= 10),
    ('load_errors', 'errors under load', '', '0', lambda v: v == 0),
    ('reliability_failed', 'long convergence + crash runs failed', '', '0', lambda v: v == 0),
]


PRACTICE_TARGETS = [
    ('practice_dashboard_ms', 'dashboard HTML, 200 families (median of 40)', 'ms', '<= 20', lambda v: v <= 20),
    ('practice_list_ms', 'GET /admin/families JSON (median of 40)', 'ms', '<= 20', lambda v: v <= 20),
    ('practice_family_page_ms', 'family page HTML, day grid + 14-day chart', 'ms', '<= 20 (10)', lambda v: v <= 20),
    ('practice_dense_summary_ms', 'summary of the 1,000-entry day', 'ms', '<= 10', lambda v: v <= 10),
    ('practice_dashboard_cpu_ms', 'dashboard, server CPU per request', 'ms', '', None),
    ('practice_list_cpu_ms', 'GET /admin/families, server CPU per request', 'ms', '', None),
    ('practice_family_page_cpu_ms', 'family page, server CPU per request', 'ms', '', None),
    ('practice_dense_summary_cpu_ms', '1,000-entry day summary, server CPU per request', 'ms', '', None),
    ('practice_idle_p99_ms', 'broadcast p99 (send -> all 5 devices), idle', 'ms', '', None),
    ('practice_loaded_p99_ms', 'broadcast p99, dashboard reloaded back to back', 'ms', '', None),
    ('practice_p99_ratio', 'broadcast p99 loaded / idle', 'x', '<= 4', lambda v: v <= 4),
    ('practice_reload_ms', 'dashboard reload while broadcasting (median)', 'ms', '', None),
]


def print_practice(results, before):
    """Print the practice table: measure | before | after | target."""
    print(f"practice: {results['practice_families']} families, {results['practice_entries']:,} entries "
          f"(written in {results['practice_seconds']:.1f} s); {results['machine']}; load average "
          f"{results['load_average']:.1f} at the start")
    print(f"{'measure':<50} {'before':>10} {'after':>10}  {'target':<11} ok")
    for key, label, unit, target, test in PRACTICE_TARGETS:
        then = f'{before[key]:10.2f}' if key in before else f"{'':>10}"
        verdict = '' if test is None else ('yes' if test(results[key]) else 'NO')
        if key in results:
            print(f'{label:<50} {then} {results[key]:10.2f}{unit:<2} {target:<11} {verdict}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--json', default='bench_results.json')
    parser.add_argument('--sockets', type=int, default=1000)
    parser.add_argument('--entries', type=int, default=20_000)
    parser.add_argument('--samples', type=int, default=2000)
    parser.add_argument('--pace', type=float, default=2.0, help='ms between paced latency samples')
    parser.add_argument('--writes', type=int, default=5000)
    parser.add_argument('--load-seconds', type=int, default=60)
    parser.add_argument('--convergence-seeds', type=int, default=300,
                        help='seeds for the long convergence and crash runs of test_reliability.py (0: skip)')
    parser.add_argument('--no-pth', action='store_true',
                        help="start the server without site-packages' .pth hooks (some machines add MBs there)")
    parser.add_argument('--practice', action='store_true', help="only the practice: Jane's pages on 290k entries")
    parser.add_argument('--practice-samples', type=int, default=1000, help='broadcast samples idle and loaded')
    parser.add_argument('--before', help="a --practice run's JSON to print beside this one as 'before'")
    parser.add_argument('--echo-server', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--reload-dashboard', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        return echo_server(args.echo_server)
    if args.reload_dashboard:
        return reload_dashboard(int(args.reload_dashboard[0]), args.reload_dashboard[1])
    print('the bench raises the write budget for its servers: '
          + ', '.join(f'{name}={value}' for name, value in WRITE_BUDGET.items()))
    if args.practice:
        results = run_practice(args)
        results['machine'] = f'{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}'
        before = {}
        if args.before:
            with open(args.before) as earlier:
                before = json.load(earlier)
        print_practice(results, before)
        with open(args.json, 'w') as out:
            json.dump(results, out, indent=2)
        return print(f'results written to {args.json}')
    results = run(args)
    if args.convergence_seeds:
        results.update(long_reliability_runs(args.convergence_seeds))
    print(f"babytrackd benchmark on {results['machine']}; a bare python process here: "
          f"{results['python_alone_mb']:.1f} MB{' (no .pth hooks)' if results['no_pth'] else ''}")
    print(f"{'measure':<50} {'value':>10}  {'target':<10} ok")
    for key, label, unit, target, test in TARGETS:
        if key in results:
            value = results[key]
            verdict = '' if test is None else ('yes' if test(value) else 'NO')
            print(f'{label:<50} {value:>10.2f}{unit:<3} {target:<10} {verdict}')
    print(f"sockets: {results['sockets']}, catch-up entries: {results['catch_up_entries']}, "
          f"dashboard families: {results['dashboard_families']}")
    if 'reliability_summary' in results:
        print(f"reliability at {results['reliability_seeds']} seeds: {results['reliability_summary']} "
              f"({results['reliability_seconds']:.0f} s)")
    with open(args.json, 'w') as out:
        json.dump(results, out, indent=2)
    print(f'results written to {args.json}')


if __name__ == '__main__':
    main()
