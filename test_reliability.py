"""Reliability tests for the sync protocol (PROTOCOL.md; issue 6): crashes, convergence, fuzzing.

Everything runs against a real `python -m babytrackd` process over real sockets (conftest.py):
- Crash: phones write continuously while the server is killed with SIGKILL at a seeded random
  moment and restarted on the same file; nothing a phone saw is lost or doubled, every outbox drains.
- Convergence: seeded simulations of phones with skewed clocks, offline outboxes, repeated and
  reordered sends, lost acknowledgements and cursor resumes. Every answer is checked against a
  model of the rules, and in the end every phone shows what the server holds.
- Fuzzing (Hypothesis): WebSocket messages, admin JSON bodies and raw frames of every wrong shape.

Longer runs: BABYTRACKD_SEEDS (convergence seeds, default 30), BABYTRACKD_CRASH_ROUNDS (default 3),
BABYTRACKD_CRASH_SEED, BABYTRACKD_FUZZ_EXAMPLES (default 150) and BABYTRACKD_FUZZ_RANDOM=1 (fresh random
examples instead of the same ones every run).
"""

import base64
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import threading
import time
import urllib.error
import urllib.request

import pytest
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import AdminClient, Device, Server, wait_for

SEEDS = int(os.environ.get('BABYTRACKD_SEEDS', '30'))
CRASH_ROUNDS = int(os.environ.get('BABYTRACKD_CRASH_ROUNDS', '3'))
CRASH_SEED = int(os.environ.get('BABYTRACKD_CRASH_SEED', '20240611'))
FUZZ_EXAMPLES = int(os.environ.get('BABYTRACKD_FUZZ_EXAMPLES', '150'))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get('BABYTRACKD_FUZZ_RANDOM'),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

SECOND, MINUTE, HOUR, DAY = 1000, 60_000, 3_600_000, 86_400_000
MIN_TS = 946684800000          # 2000-01-01, PROTOCOL.md §3 rule 6
CLOCK_GUARD = 5 * MINUTE       # rule 3
FIELDS = ('ts', 'type', 'value', 'deleted')
ID_PATTERN = re.compile(r'[A-Za-z0-9_-]{1,64}')
BUTTONS = {'feed': ['breast left', 'breast right', 'bottle'], 'sleep': ['sleeping', 'awake'],
           'nappy': ['wet', 'dirty', 'wet + dirty']}


def now_ms():
    return int(time.time() * 1000)


# What the server holds --------------------------------------------------------------------------

def wire(row):
    """An entries row as the wire shows it."""
    return {'id': row['id'], 'ts': row['ts'], 'type': row['type'], 'value': row['value'],
            'deleted': bool(row['deleted']), 'updated_at': row['updated_at'], 'seq': row['seq'], 'by': row['by']}


def read_database(path, sql, *args):
    """Run one query on the server's SQLite file (running or not); return the rows as dicts."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, args)]


def stored_entries(server, family_id):
    """id -> wire entry for every row of the family, tombstones included."""
    found = read_database(server.db_path, 'SELECT * FROM entries WHERE family_id = ? ORDER BY seq', family_id)
    return {row['id']: wire(row) for row in found}


def live(entries):
    return {entry_id: e for entry_id, e in entries.items() if not e['deleted']}


def fields_of(e):
    return {name: bool(e.get(name, False)) if name == 'deleted' else e[name] for name in FIELDS}


def beats(new, old):
    """Last write wins on updated_at; on a tie the larger (deleted, ts, type, value) wins (README)."""
    if new['updated_at'] != old['updated_at']:
        return new['updated_at'] > old['updated_at']
    key = lambda e: (bool(e['deleted']), e['ts'], e['type'], e['value'])
    return key(new) > key(old)


def is_text(value, low, high):
    """A string of low..high characters that is real Unicode (no lone surrogates)."""
    if not isinstance(value, str) or not low <= len(value) <= high:
        return False
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool)


def assert_entries_are_valid(server, family_id):
    """Every stored row of the family satisfies PROTOCOL.md §3 rule 6."""
    seqs = set()
    for e in stored_entries(server, family_id).values():
        assert ID_PATTERN.fullmatch(e['id']), e
        assert is_count(e['ts']) and MIN_TS <= e['ts'] <= now_ms() + DAY, e
        assert is_text(e['type'], 1, 64) and is_text(e['value'], 0, 4096), e
        assert is_count(e['updated_at']) and 0 <= e['updated_at'] <= now_ms() + CLOCK_GUARD, e
        assert is_count(e['seq']) and e['seq'] not in seqs, e
        seqs.add(e['seq'])


def config_is_valid(data):
    """PROTOCOL.md §3 rule 6: a JSON array of groups (category string, buttons: objects with a label string), <= 16 KiB."""
    try:
        encoded = json.dumps(data, ensure_ascii=False).encode('utf-8')
    except (UnicodeEncodeError, RecursionError):
        return False
    return (len(encoded) <= 16 * 1024 and isinstance(data, list) and all(
        isinstance(group, dict) and is_text(group.get('category'), 0, 10 ** 6)
        and isinstance(group.get('buttons'), list)
        and all(isinstance(button, dict) and is_text(button.get('label'), 0, 10 ** 6) for button in group['buttons'])
        for group in data))


def assert_config_is_valid(server, family_id):
    found = read_database(server.db_path, 'SELECT data FROM configs WHERE family_id = ?', family_id)
    for row in found:
        assert config_is_valid(json.loads(row['data'])), row


def assert_log_has_no_traceback(server):
    tracebacks = [line[:2000] for line in server.log().splitlines() if 'Traceback' in line]
    assert not tracebacks, tracebacks


# Devices ----------------------------------------------------------------------------------------

def read_until_pong(device, timeout=5):
    """Return every message up to the next pong (send a ping first: a barrier behind all earlier news)."""
    messages, deadline = [], time.monotonic() + timeout
    while True:
        device.ws.settimeout(max(0.01, deadline - time.monotonic()))
        message = device.recv()
        if message['type'] == 'pong':
            return messages
        messages.append(message)
        if time.monotonic() > deadline:
            raise AssertionError('no pong in time')


def catch_up(device):
    """Everything the server queued for this device so far."""
    device.send({'type': 'ping'})
    return read_until_pong(device)


def health_status(server):
    try:
        with urllib.request.urlopen(server.base_url + '/health', timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def open_family(admin, name, *labels):
    """A family and one share link token per label."""
    family = admin.create_family(name)
    return family['id'], [admin.create_link(family['id'], label)['token'] for label in labels]


def update_message(e):
    return {'type': 'entry', 'action': 'update', 'entry': {'id': e['id'], **fields_of(e), 'updated_at': e['updated_at']}}


# 1. Crash ---------------------------------------------------------------------------------------

class Writer(threading.Thread):
    """A phone in its own thread: taps continuously, keeps the app's outbox, and after a crash
    reconnects with its cursor and sends its outbox again.

    An outbox item leaves only on an entry from the server with its id whose updated_at is at least
    the item's or whose fields are the item's (the app's rule, static/app/app.js applyRemote).
    """

    WINDOW = 8  # unacknowledged taps in flight

    def __init__(self, server, family_id, token, label, seed, writing, up, stop):
        super().__init__(daemon=True, name=f'writer-{label}')
        self.server, self.family_id, self.token, self.label = server, family_id, token, label
        self.rng = random.Random(seed)
        self.writing, self.up, self.stop = writing, up, stop
        self.device = None
        self.seen = {}        # id -> the newest copy the server sent (by seq)
        self.outbox = {}      # id -> latest local state not yet acknowledged
        self.mine = {}        # id -> latest local state of every entry this phone made
        self.versions = {}    # id -> how many versions this phone made (the first goes out as an add)
        self.cursor = None
        self.acknowledged = 0
        self.errors = []
        self.failure = None

    def run(self):
        try:
            while not self.stop.is_set():
                if self.device is None:
                    if self.up.wait(0.05):
                        self.connect()
                else:
                    self.step()
        except BaseException as error:  # surfaced by the test through check()
            self.failure = error

    def check(self):
        if self.failure is not None:
            raise AssertionError(f'{self.name} failed: {self.failure!r}') from self.failure

    def connect(self):
        try:
            device = Device(self.server, self.family_id, self.token, since=self.cursor)
        except (OSError, websocket.WebSocketException):
            return  # killed again while connecting: wait for the next start
        for e in device.init['entries']:
            self.take({'type': 'entry', 'entry': e})
        assert device.init['cursor'] >= (self.cursor or 0), (device.init['cursor'], self.cursor)
        self.cursor = device.init['cursor']
        self.device = device
        for item in list(self.outbox.values()):
            if not self.send(item):
                return

    def send(self, item):
        try:
            self.device.send(update_message(item) if self.versions[item['id']] > 1 else
                             {'type': 'entry', 'action': 'add', 'entry': {k: v for k, v in item.items() if k != 'deleted'}})
            return True
        except (OSError, websocket.WebSocketException):
            self.drop()
            return False

    def drop(self):
        device, self.device = self.device, None
        with contextlib.suppress(Exception):
            device.ws.close(timeout=0.1)

    def tap(self):
        """A new entry mostly; sometimes an edit or a delete of one of this phone's own entries."""
        now, roll = now_ms(), self.rng.random()
        own = [entry_id for entry_id, e in self.mine.items() if not e['deleted']]
        if not own or roll < 0.7:
            kind = self.rng.choice(sorted(BUTTONS))
            e = {'id': f'{self.label}-{len(self.mine)}', 'ts': now - self.rng.randrange(HOUR), 'type': kind,
                 'value': self.rng.choice(BUTTONS[kind]), 'deleted': False}
        elif roll < 0.9:  # a value never used before, so an older echo can never pass for this edit
            e = dict(self.mine[self.rng.choice(own)], value=f'edit {sum(self.versions.values())}')
        else:
            e = dict(self.mine[self.rng.choice(own)], deleted=True)
        prev = self.mine.get(e['id'])
        e['updated_at'] = max(now, prev['updated_at'] + 1 if prev else 0)
        self.mine[e['id']] = self.outbox[e['id']] = e
        self.versions[e['id']] = self.versions.get(e['id'], 0) + 1
        return e

    def step(self):
        if self.writing.is_set() and len(self.outbox) < self.WINDOW:
            if not self.send(self.tap()):
                return
        try:
            self.device.ws.settimeout(0.02)
            message = self.device.recv()
        except websocket.WebSocketTimeoutException:
            return
        except (OSError, websocket.WebSocketException):
            self.drop()
            return
        self.take(message)

    def take(self, message):
        if message['type'] == 'error':
            self.errors.append(message)
        if message['type'] != 'entry':
            return
        e = message['entry']
        item = self.outbox.get(e['id'])
        if item is not None and (e['updated_at'] >= item['updated_at'] or fields_of(e) == fields_of(item)
                                 or message.get('stale')):
            del self.outbox[e['id']]
            self.acknowledged += 1
        old = self.seen.get(e['id'])
        if old is None or e['seq'] >= old['seq']:
            self.seen[e['id']] = e
        self.cursor = max(self.cursor or 0, e['seq'])


def assert_nothing_seen_was_lost(server, family_id, writers):
    """Read the SQLite file of the dead server: every entry a phone saw is there, once, at that version or later."""
    assert read_database(server.db_path, 'PRAGMA integrity_check') == [{'integrity_check': 'ok'}]
    counts = read_database(server.db_path, 'SELECT COUNT(*) AS n, COUNT(DISTINCT id) AS ids, COUNT(DISTINCT seq) AS seqs '
                                           'FROM entries WHERE family_id = ?', family_id)[0]
    assert counts['n'] == counts['ids'] == counts['seqs'], counts
    stored = stored_entries(server, family_id)
    made = {entry_id for writer in writers for entry_id in writer.mine}
    assert set(stored) <= made, set(stored) - made
    for writer in writers:
        for entry_id, seen in writer.seen.items():
            row = stored.get(entry_id)
            assert row is not None, f'{entry_id} was acknowledged, then lost in the crash'
            assert row['seq'] > seen['seq'] or row == seen, (seen, row)
    return stored


def test_a_crash_loses_and_doubles_no_acknowledged_tap_and_every_outbox_drains(tmp_path):
    rng = random.Random(CRASH_SEED)
    server = Server(tmp_path, WS_WRITE_BURST=10 ** 9)  # about crashes, not budgets: longer runs must not be paced
    writing, up, stop = threading.Event(), threading.Event(), threading.Event()
    writers = []
    try:
        admin = AdminClient(server)
        admin.login()
        family_id, tokens = open_family(admin, 'Crash', 'Mum', 'Dad', 'Nan', 'Auditor')
        writers = [Writer(server, family_id, token, label, rng.random(), writing, up, stop)
                   for token, label in zip(tokens, ['Mum', 'Dad', 'Nan'])]
        up.set()
        writing.set()
        for writer in writers:
            writer.start()

        def acknowledged():
            for writer in writers:
                writer.check()
            return sum(writer.acknowledged for writer in writers)

        def writers_are(condition):
            return lambda: acknowledged() >= 0 and all(condition(writer) for writer in writers)

        for _ in range(CRASH_ROUNDS):
            wait_for(writers_are(lambda w: w.device), 10, message='every phone online')
            kill_after = acknowledged() + rng.randint(10, 150)
            wait_for(lambda: acknowledged() >= kill_after, 20, message=f'{kill_after} acknowledged taps')
            up.clear()
            server.stop(signal.SIGKILL)
            wait_for(writers_are(lambda w: not w.device), 5, message='every phone to notice the crash')
            writing.clear()
            before = assert_nothing_seen_was_lost(server, family_id, writers)
            server.start()
            auditor = Device(server, family_id, tokens[3])  # before any phone is back: nothing moves
            assert {e['id']: e for e in auditor.init['entries']} == live(before)
            auditor.close()
            writing.set()
            up.set()

        writing.clear()
        wait_for(writers_are(lambda w: w.device and not w.outbox), 20, message='every outbox to drain')
        stop.set()
        for writer in writers:
            writer.join(5)
            assert not writer.is_alive()
            writer.check()
        for writer in writers:
            for message in catch_up(writer.device):
                writer.take(message)
        final = stored_entries(server, family_id)
        for writer in writers:
            assert writer.errors == []
            # Every phone shows what the server holds: every live entry, and the tombstone of every entry
            # it ever saw (one deleted before the phone's first connection is not in a first init).
            assert writer.seen == {i: e for i, e in final.items() if not e['deleted'] or i in writer.seen}
            for entry_id, mine in writer.mine.items():
                assert fields_of(final[entry_id]) == fields_of(mine)
        fresh = Device(server, family_id, tokens[3])
        assert {e['id']: e for e in fresh.init['entries']} == live(final)
        fresh.close()
        assert sum(len(writer.mine) for writer in writers) == len(final)
        assert_log_has_no_traceback(server)
    finally:
        stop.set()
        up.set()
        for writer in writers:
            writer.join(5)
            if writer.device:
                writer.drop()
        server.stop()


# 2. Convergence ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    """One server and a logged-in admin for the convergence and fuzz tests (each uses its own families)."""
    server = Server(tmp_path_factory.mktemp('reliability'), WS_WRITE_BURST=10 ** 9)  # longer fuzz runs: no pacing
    admin = AdminClient(server)
    admin.login()
    yield server, admin
    try:
        assert_log_has_no_traceback(server)
    finally:
        server.stop()


class Phone:
    """A parent's phone as the app models it: what the server sent (newer seq replaces older), an
    outbox holding each entry's latest local state, a cursor, and a skewed clock."""

    def __init__(self, sim, label, token, skew, tick=1):
        self.sim, self.label, self.token, self.skew, self.tick = sim, label, token, skew, tick
        self.device = None
        self.seen = {}
        self.outbox = {}      # id -> {'entry': full local state, 'base': the server's copy it was made from}
        self.cursor = None    # None until the first init: that one asks for the live entries only
        self.made = 0

    def clock(self):
        return (now_ms() + self.skew) // self.tick * self.tick

    def view(self, entry_id):
        item = self.outbox.get(entry_id)
        return item['entry'] if item else self.seen.get(entry_id)

    def take(self, message):
        if message['type'] == 'error' and message.get('id') in self.outbox:
            del self.outbox[message['id']]  # refused for good: the app drops it (README: refusals name the entry)
        if message['type'] != 'entry':
            return
        e = message['entry']
        item = self.outbox.get(e['id'])
        if item is not None:
            if (e['updated_at'] >= item['entry']['updated_at'] or fields_of(e) == fields_of(item['entry'])
                    or message.get('stale')):  # the server's answer to our write: it lost
                del self.outbox[e['id']]
            else:
                item['base'] = e
        old = self.seen.get(e['id'])
        if old is None or e['seq'] >= old['seq']:
            self.seen[e['id']] = e
        self.cursor = max(self.cursor or 0, e['seq'])

    def connect(self):
        self.device = Device(self.sim.server, self.sim.family_id, self.token, since=self.cursor)
        for e in self.device.init['entries']:
            self.take({'type': 'entry', 'entry': e})
        assert self.device.init['cursor'] >= (self.cursor or 0)
        self.cursor = self.device.init['cursor']

    def disconnect(self):
        self.device.close()
        self.device = None

    def edit(self, rng):
        """A tap, an edit (time, value, button, undo a delete) or a delete, as the app makes them."""
        known = sorted(set(self.seen) | set(self.outbox))
        roll = rng.random()
        if not known or roll < 0.4:
            kind = rng.choice(sorted(BUTTONS))
            e = {'id': f'{self.sim.prefix}-{self.label}-{self.made}', 'ts': self.clock() - rng.randrange(6 * HOUR),
                 'type': kind, 'value': rng.choice(BUTTONS[kind]), 'deleted': False}
            self.made += 1
        else:
            prev = self.view(rng.choice(known))
            e = {'id': prev['id'], **fields_of(prev)}
            if roll < 0.75:
                change = rng.choice(['ts', 'value', 'type', 'undelete' if prev['deleted'] else 'value'])
                if change == 'ts':
                    e['ts'] = min(max(MIN_TS, e['ts'] + rng.randint(-HOUR, HOUR)), now_ms() + HOUR)
                elif change == 'type':
                    e['type'] = rng.choice(sorted(BUTTONS))
                    e['value'] = rng.choice(BUTTONS[e['type']])
                elif change == 'undelete':
                    e['deleted'] = False
                else:
                    e['value'] = rng.choice(BUTTONS.get(e['type'], ['x']) + [f'note {rng.randrange(9)}'])
            else:
                e['deleted'] = True
        prev = self.view(e['id'])
        e['updated_at'] = max(self.clock(), prev['updated_at'] + 1 if prev else 0)  # as static/app/app.js does
        item = self.outbox.get(e['id'])
        self.outbox[e['id']] = {'entry': e, 'base': item['base'] if item else self.seen.get(e['id'])}

    def message_for(self, item, rng):
        """Any wire form the contract allows: add, full update (an upsert), partial update, delete."""
        e, base, roll = item['entry'], item['base'], rng.random()
        only_deleted = base is None or all(base[name] == e[name] for name in ('ts', 'type', 'value'))
        if e['deleted'] and only_deleted and roll < 0.5:  # a delete carries no other change
            return {'type': 'entry', 'action': 'delete', 'id': e['id'], 'updated_at': e['updated_at']}
        if base is None and not e['deleted'] and roll < 0.5:
            return {'type': 'entry', 'action': 'add',
                    'entry': {'id': e['id'], 'ts': e['ts'], 'type': e['type'], 'value': e['value'], 'updated_at': e['updated_at']}}
        if base is not None and roll < 0.6:
            changed = {name: e[name] for name in FIELDS if fields_of(base)[name] != e[name]}
            return {'type': 'entry', 'action': 'update', 'entry': {'id': e['id'], **changed, 'updated_at': e['updated_at']}}
        return {'type': 'entry', 'action': 'update', 'entry': dict(e)}

    def outbox_messages(self, rng):
        """The outbox in a shuffled order, some messages twice."""
        items = list(self.outbox.values())
        rng.shuffle(items)
        messages = []
        for item in items:
            message = self.message_for(item, rng)
            messages.append(message)
            if rng.random() < 0.2:
                messages.insert(rng.randrange(len(messages) + 1), message)
        return messages


class Simulation:
    """Phones of one family doing random things; the server's answers are checked against a model."""

    def __init__(self, server, admin, seed, phones=4):
        self.server, self.rng, self.prefix = server, random.Random(seed), f's{seed}'
        labels = [f'P{n}' for n in range(phones)]
        self.family_id, tokens = open_family(admin, f'Sim {seed}', *labels, 'Watcher')
        # One phone always pulled back by the clock guard, one far behind, and the rest on one
        # skewed clock that ticks in whole seconds: their edits tie on updated_at all the time.
        shared = self.rng.randint(-10 * MINUTE, 4 * MINUTE)
        clocks = [(self.rng.randint(6 * MINUTE, 10 * MINUTE), 1), (-self.rng.randint(5 * MINUTE, 10 * MINUTE), SECOND)]
        clocks += [(shared + self.rng.randrange(300), SECOND) for _ in range(phones - 2)]
        self.phones = [Phone(self, label, token, *clock) for label, token, clock in zip(labels, tokens, clocks)]
        self.watcher = Phone(self, 'Watcher', tokens[-1], 0)  # always online, never writes
        self.watcher.connect()
        self.model = {}  # id -> the entry the server must hold
        self.top = 0     # highest seq the family has
        for phone in self.phones:
            if self.rng.random() < 0.7:
                phone.connect()

    def online(self, with_outbox=False):
        return [p for p in self.phones if p.device and (p.outbox or not with_outbox)]

    def run(self, steps):
        rng = self.rng
        for _ in range(steps):
            roll = rng.random()
            if roll < 0.45:
                phone = rng.choice(self.phones)
                for _ in range(rng.randint(1, 3)):
                    phone.edit(rng)
                if phone.device and rng.random() < 0.6:
                    self.flush(phone)
            elif roll < 0.6 and self.online():
                self.flush(rng.choice(self.online()))
            elif roll < 0.72 and self.online():
                rng.choice(self.online()).disconnect()
            elif roll < 0.84 and len(self.online()) < len(self.phones):
                self.reconnect(rng.choice([p for p in self.phones if not p.device]))
            elif roll < 0.9 and self.online(with_outbox=True):
                self.vanish(rng.choice(self.online(with_outbox=True)))
            elif self.online():
                phone = rng.choice(self.online())
                for message in catch_up(phone.device):
                    phone.take(message)
            self.watch()

    def watch(self):
        for message in catch_up(self.watcher.device):
            self.watcher.take(message)

    def reconnect(self, phone):
        """Resume from the cursor: the phone then knows exactly what the server holds (rule 5)."""
        phone.connect()
        for entry_id, e in self.model.items():
            if not e['deleted']:
                assert phone.seen.get(entry_id) == e, (phone.label, entry_id)
            else:
                assert phone.seen.get(entry_id) in (None, e), (phone.label, entry_id)
        assert set(phone.seen) <= set(self.model)

    def flush(self, phone):
        """Send the outbox between two pings; the answers between the pongs are one per message, in order."""
        messages = phone.outbox_messages(self.rng)
        if not messages:
            return
        device, sent_at = phone.device, now_ms()
        device.send({'type': 'ping'})
        for message in messages:
            device.send(message)
        device.send({'type': 'ping'})
        for message in read_until_pong(device):
            phone.take(message)
        answers = [m for m in read_until_pong(device) if m['type'] in ('entry', 'error')]
        answered_at = now_ms()
        assert len(answers) == len(messages), (messages, answers)
        for message, answer in zip(messages, answers):
            self.expect(phone, message, answer, sent_at, answered_at)
            phone.take(answer)

    def expect(self, phone, message, answer, sent_at, answered_at):
        """Check one answer against rules 1-4 and the README's choices; move the model on."""
        action = message['action']
        sent = message['entry'] if action != 'delete' else {'id': message['id'], 'deleted': True,
                                                             'updated_at': message['updated_at']}
        entry_id, own, stored = sent['id'], sent['updated_at'], self.model.get(sent['id'])
        if answer['type'] == 'error':
            assert stored is None and not {'ts', 'type', 'value'} <= set(sent), (message, answer)
            assert answer.get('id') == entry_id and 'no such entry' in answer['error'], answer
            return
        got = answer['entry']
        assert got['id'] == entry_id, (message, answer)
        if stored is None:
            candidate = {'ts': sent['ts'], 'type': sent['type'], 'value': sent['value'], 'deleted': sent.get('deleted', False)}
        else:
            candidate = {name: sent.get(name, stored[name]) for name in FIELDS}
        if stored is not None and candidate == fields_of(stored):  # rule 1: a repeat, whatever its updated_at
            assert answer == {'type': 'entry', 'action': action, 'entry': stored}, (message, answer)
            return
        if got['seq'] > self.top:  # accepted
            assert fields_of(got) == candidate and got['by'] == phone.label, (message, answer)
            assert answer['action'] == ('add' if stored is None else 'delete' if candidate['deleted'] else 'update')
            assert_clock_guard(got['updated_at'], own, sent_at, answered_at)
            assert stored is None or beats(got, stored), (message, answer, stored)  # rule 2
            self.model[entry_id], self.top = got, got['seq']
        else:  # stale: nothing changes, the sender gets the stored entry back
            assert stored is not None and answer == {'type': 'entry', 'action': 'update', 'entry': stored,
                                                     'stale': True}, (message, answer)
            if own <= sent_at:  # the server kept our updated_at: LWW must really have said no
                assert not beats({**candidate, 'updated_at': own}, stored), (message, answer)
            else:  # pulled back to the server clock, which the stored one still beats
                assert stored['updated_at'] >= sent_at, (message, answer)

    def vanish(self, phone):
        """Send the outbox and drop the connection without reading a single answer (lost acknowledgements)."""
        self.watch()
        messages = phone.outbox_messages(self.rng)
        for message in messages:
            phone.device.send(message)
        with contextlib.suppress(OSError):
            phone.device.ws.sock.shutdown(socket.SHUT_WR)
            phone.device.ws.sock.close()
        phone.device = None
        # The server handles a socket's messages in order, then leaves: presence without the phone.
        deadline = time.monotonic() + 5
        while True:
            self.watcher.device.ws.settimeout(max(0.01, deadline - time.monotonic()))
            message = self.watcher.device.recv()
            self.watcher.take(message)
            if message['type'] == 'presence' and phone.label not in message['members']:
                break
        by_id = {}
        for message in messages:
            by_id.setdefault(message['id'] if message['action'] == 'delete' else message['entry']['id'], message)
        stored = stored_entries(self.server, self.family_id)
        assert set(self.model) <= set(stored)
        for entry_id, row in stored.items():
            old = self.model.get(entry_id)
            if row == old:
                continue
            message = by_id[entry_id]
            sent = message['entry'] if message['action'] != 'delete' else {'deleted': True}
            candidate = {name: sent.get(name, old[name] if old else False) for name in FIELDS}
            assert row['seq'] > self.top and row['by'] == phone.label and fields_of(row) == candidate, (message, row)
            self.model[entry_id] = row
        self.top = max([self.top] + [e['seq'] for e in stored.values()])

    def settle(self, rounds=8):
        """Every phone online, outboxes sent until empty, then everyone reads the news."""
        for phone in self.phones:
            if not phone.device:
                self.reconnect(phone)
        for _ in range(rounds):
            if not any(phone.outbox for phone in self.phones):
                break
            for phone in self.rng.sample(self.phones, len(self.phones)):
                self.flush(phone)
        for phone in self.phones + [self.watcher]:
            for message in catch_up(phone.device):
                phone.take(message)

    def close(self):
        for phone in self.phones + [self.watcher]:
            if phone.device:
                phone.disconnect()


def assert_clock_guard(stored, own, sent_at, answered_at):
    """Rule 3: an updated_at more than 5 minutes ahead of the server clock is pulled back to it; any other is kept.

    The server read its clock somewhere between sent_at and answered_at, so near the edge either is right.
    A fast phone whose pulled-back write then loses gets `stale: true` with the stored entry and lets
    its outbox item go (README), so its outbox drains at once rather than after minutes of resending.
    """
    if own <= sent_at + CLOCK_GUARD:
        assert stored == own, (stored, own)
    elif own > answered_at + CLOCK_GUARD:
        assert sent_at <= stored <= answered_at, (stored, own, sent_at, answered_at)
    else:  # on the edge: the server's clock decided
        assert stored == own or sent_at <= stored <= answered_at, (stored, own, sent_at, answered_at)


@pytest.mark.parametrize('seed', range(SEEDS))
def test_phones_converge_despite_skewed_clocks_offline_outboxes_and_resends(shared, seed):
    server, admin = shared
    sim = Simulation(server, admin, seed)
    try:
        sim.run(steps=40)
        sim.settle()
        assert [phone.outbox for phone in sim.phones] == [{} for _ in sim.phones], 'outboxes never drained'
        final = stored_entries(server, sim.family_id)
        assert final == sim.model
        assert sim.watcher.seen == final  # online from the start: tombstones too
        for phone in sim.phones:
            assert live(phone.seen) == live(final), phone.label
            assert all(final[entry_id] == e for entry_id, e in phone.seen.items()), phone.label
        for since in (None, 0):
            fresh = Device(server, sim.family_id, sim.watcher.token, since=since)
            assert {e['id']: e for e in fresh.init['entries']} == live(final)
            fresh.close()
        assert_entries_are_valid(server, sim.family_id)
    finally:
        sim.close()


# 3. Fuzzing -------------------------------------------------------------------------------------

class FuzzFamily:
    """A family with an attacker, and a healthy writer and listener that must keep working."""

    def __init__(self, server, admin):
        self.server = server
        self.family_id, (self.attacker_token, writer, listener) = open_family(admin, 'Fuzz', 'Fuzz', 'Writer', 'Listener')
        self.writer = Device(server, self.family_id, writer)
        self.listener = Device(server, self.family_id, listener)
        self.attacker = None
        self.checks = 0

    def attack(self):
        """The attacker's socket, reopened when an earlier example got it closed."""
        if self.attacker is None:
            self.attacker = Device(self.server, self.family_id, self.attacker_token)
        return self.attacker

    def lose_attacker(self):
        with contextlib.suppress(Exception):
            self.attacker.close()
        self.attacker = None

    def assert_still_serving(self):
        """The healthy phones still sync, /health says 200, and nothing invalid was stored."""
        self.checks += 1
        entry_id = f'alive-{self.checks}'
        self.writer.add(entry_id, now_ms() - MINUTE, updated_at=now_ms())
        assert self.listener.entry_echo(entry_id)['entry']['by'] == 'Writer'
        self.writer.entry_echo(entry_id)
        assert health_status(self.server) == 200
        assert_entries_are_valid(self.server, self.family_id)
        assert_config_is_valid(self.server, self.family_id)


@pytest.fixture(scope='module')
def fuzz(shared):
    server, admin = shared
    family = FuzzFamily(server, admin)
    yield family
    for device in (family.writer, family.listener, family.attacker):
        if device:
            device.close()


def one_of_these(values):
    """sampled_from without the values in the strategy's repr (some are 60 KB long)."""
    return st.integers(0, len(values) - 1).map(lambda index: values[index])


NOW = now_ms()
EDGE_TEXT = ['', ' ', '\x00', 'a\x00b', '\u202efeed', 'bottle\u200f', '\u200e\u202b', '\ufeff', '\uffff', '\U0001f37c',
             '\U0001f37c' * 64, '\U0001f37c' * 65, 'x' * 64, 'x' * 65, 'v' * 4096, 'v' * 4097, '\ud800', '\udfff',
             'a\udc80b', '\ud83d\ude00', '\r\n', '<script>alert(1)</script>', 'null', '0', 'e\u0301']
EDGE_INTS = [0, -1, 1, MIN_TS - 1, MIN_TS, NOW, NOW + DAY + HOUR, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63,
             2 ** 64, 10 ** 30, -2 ** 63]
texts = st.text(max_size=12) | one_of_these(EDGE_TEXT) | st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
ints = st.integers() | st.sampled_from(EDGE_INTS)
scalars = st.none() | st.booleans() | ints | st.floats() | texts
any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                        max_leaves=6)
DROP = object()  # in a list of changes: remove the field
wrong_values = (any_json | one_of_these(EDGE_TEXT) | ints
                | st.sampled_from([float('nan'), float('inf'), float('-inf'), 1.5e12, -0.0, 1e308]))
wrong = wrong_values | st.just(DROP)


def merged(base, extra):
    return {**base, **extra}


def changed(base, changes):
    """base with some fields replaced by wrong values or dropped."""
    result = dict(base)
    for name, value in changes:
        if value is DROP:
            result.pop(name, None)
        else:
            result[name] = value
    return result


# Messages start valid, then zero to two fields go wrong: most of the space is near the valid ones.
good_ids = st.sampled_from(['fz-1', 'fz-2', 'fz-3']) | st.from_regex(r'[A-Za-z0-9_-]{1,64}', fullmatch=True)
good_entries = st.fixed_dictionaries(
    {'id': good_ids, 'ts': st.integers(NOW - 30 * DAY, NOW), 'type': st.sampled_from(sorted(BUTTONS)) | st.text(min_size=1, max_size=64),
     'value': st.sampled_from(BUTTONS['feed']) | st.text(max_size=20), 'updated_at': st.integers(NOW - DAY, NOW + 10 * MINUTE) | st.none()},
    optional={'deleted': st.booleans()})
entries = st.builds(changed, good_entries, st.lists(st.tuples(st.sampled_from(FIELDS + ('id', 'updated_at')), wrong), max_size=2))
message_changes = st.lists(st.tuples(st.sampled_from(['type', 'action', 'entry', 'id', 'updated_at']) | texts, wrong), max_size=2)


def entry_message(action, entry, changes, extra):
    shape = {'id': entry.get('id'), 'updated_at': entry.get('updated_at')} if action == 'delete' else {'entry': entry}
    return changed({'type': 'entry', 'action': action, **shape, **extra}, changes)


good_configs = st.lists(st.fixed_dictionaries(
    {'category': st.text(min_size=1, max_size=20), 'buttons': st.lists(st.fixed_dictionaries(
        {'label': st.text(min_size=1, max_size=20)}, optional={'timing': st.booleans(), 'counted': st.booleans()}), min_size=1, max_size=3)},
    optional={'stateful': st.booleans()}), min_size=1, max_size=3, unique_by=lambda group: group['category'])


def config_message(groups, where, changes):
    """A config with one group or button (or the whole list) gone wrong."""
    groups = [dict(group, buttons=[dict(button) for button in group['buttons']]) for group in groups]
    if where == 'group':
        groups[0] = changed(groups[0], changes)
    elif where == 'button':
        groups[0]['buttons'][0] = changed(groups[0]['buttons'][0], changes)
    return {'type': 'config', 'data': groups}


ws_objects = st.one_of(
    st.builds(entry_message, st.sampled_from(['add', 'update', 'delete']), entries, message_changes,
              st.dictionaries(st.sampled_from(['seq', 'by', 'family', '__proto__']) | texts, wrong_values, max_size=1)),
    st.builds(config_message, good_configs, st.sampled_from(['none', 'group', 'button']),
              st.lists(st.tuples(st.sampled_from(['category', 'buttons', 'label', 'stateful', 'timing', 'counted']) | texts, wrong),
                       min_size=1, max_size=2)),
    st.builds(changed, st.just({'type': 'config'}), st.lists(st.tuples(st.sampled_from(['data']) | texts, wrong), max_size=2)),
    st.builds(changed, st.just({'type': 'ping'}), st.lists(st.tuples(st.sampled_from(['type']) | texts, wrong), max_size=2)),
    any_json)
RAW_TEXTS = ['', ' ', 'null', '{', '{"type":', '}{', '[]', '"entry"', 'NaN', '{"type":"ping"}{"type":"ping"}',
             '{"type":"ping",}', "{'type':'ping'}", '\x00', '{"type":"ping"}\x00', '[' * 3000, '{"a":' * 2000,
             '1' * 5000, '1e999999', '-0', '\ufeff{"type":"ping"}', '{"type":"entry","action":"add","entry":' + '[' * 5000,
             '{"type":"entry","action":"add","entry":{"id":"fz-1","ts":1e400,"type":"feed","value":"x"}}',
             '{"type":"config","data":[{"category":"\\ud800","buttons":[{"label":"x"}]}]}',
             '{"type":"entry","action":"add","entry":{"id":"fz-2","ts":%d,"type":"feed","value":"\\udfff"}}' % NOW]
ws_texts = one_of_these(RAW_TEXTS) | st.text(max_size=40)


def encode(obj, ascii_only):
    """JSON text for the wire; lone surrogates can only travel as \\u escapes."""
    if not ascii_only:
        try:
            return json.dumps(obj, ensure_ascii=False).encode('utf-8').decode('utf-8')
        except UnicodeEncodeError:
            pass
    return json.dumps(obj)


ws_messages = ws_texts | st.builds(encode, ws_objects, st.booleans())


def has_surrogate(obj):
    if isinstance(obj, str):
        return not is_text(obj, 0, len(obj))
    if isinstance(obj, list):
        return any(has_surrogate(item) for item in obj)
    if isinstance(obj, dict):
        return any(has_surrogate(key) or has_surrogate(value) for key, value in obj.items())
    return False


def field_is_valid(name, value, now):
    """PROTOCOL.md §3 rule 6 for one entry field; None when it sits on a moving edge (ts near now + 1 day)."""
    if name == 'ts':
        if not is_count(value):
            return False
        if abs(value - (now + DAY)) < 30 * SECOND:
            return None
        return MIN_TS <= value <= now + DAY
    if name == 'type':
        return is_text(value, 1, 64)
    if name == 'value':
        return is_text(value, 0, 4096)
    if name == 'deleted':
        return isinstance(value, bool)
    if name == 'updated_at':
        return value is None or (is_count(value) and value >= 0)
    return True


def finite_float(text):
    number = float(text)
    if number in (float('inf'), float('-inf')):
        raise ValueError('out of range')
    return number


def not_json(name):
    raise ValueError(f'{name} is not JSON')


def strict_json(text):
    """RFC 8259 JSON: no NaN, no Infinity (Python's json takes both; browsers take neither)."""
    return json.loads(text, parse_float=finite_float, parse_constant=not_json)


def verdict(text, now):
    """What PROTOCOL.md says the answer to this text must be.

    'error': an error message; 'pong'; 'entry': an entry, or an error that depends on what the server
    holds ('no such entry', an id of another family); 'either': valid per the contract but the server
    may be stricter (configs) or it is on an edge.
    """
    try:
        message = strict_json(text)
    except (ValueError, RecursionError):
        return 'error'
    if not isinstance(message, dict) or has_surrogate(message):
        return 'error'
    kind = message.get('type')
    if kind == 'ping':
        return 'pong'
    if kind == 'config':
        return 'either' if config_is_valid(message.get('data')) else 'error'
    action = message.get('action')
    if kind != 'entry' or not isinstance(action, str) or action not in ('add', 'update', 'delete'):
        return 'error'
    if action == 'delete':
        entry = {'id': message.get('id'), 'updated_at': message.get('updated_at')}
    else:
        entry = message.get('entry')
        if not isinstance(entry, dict):
            return 'error'
    if not isinstance(entry.get('id'), str) or not ID_PATTERN.fullmatch(entry['id']):
        return 'error'
    checks = [field_is_valid(name, entry[name], now) for name in FIELDS + ('updated_at',) if name in entry]
    if False in checks or (action == 'add' and not {'ts', 'type', 'value'} <= set(entry)):
        return 'error'
    return 'either' if None in checks else 'entry'


def answer_to(device, timeout=3):
    """The server's answer to one message (presence news skipped), which must be strict JSON."""
    deadline = time.monotonic() + timeout
    while True:
        device.ws.settimeout(max(0.01, deadline - time.monotonic()))
        answer = strict_json(device.ws.recv())
        if answer['type'] in ('entry', 'error', 'config', 'pong'):
            return answer


@FUZZ
@given(batch=st.lists(ws_messages, min_size=1, max_size=4))
def check_wrong_messages(fuzz, batch):
    try:
        answer_wrong_messages(fuzz, batch)
    except BaseException:
        fuzz.lose_attacker()  # a fresh socket for the next (shrinking) example
        raise
    fuzz.assert_still_serving()


def answer_wrong_messages(fuzz, batch):
    attacker = fuzz.attack()
    catch_up(attacker)
    for text in batch:
        expected = verdict(text, now_ms())
        attacker.ws.send(text)
        answer = answer_to(attacker)
        if expected == 'error':
            assert answer['type'] == 'error', (text, answer)
        elif expected == 'pong':
            assert answer['type'] == 'pong', (text, answer)
        elif expected == 'entry':
            assert answer['type'] == 'entry' or any(
                words in answer['error'] for words in ('no such entry', 'already in use')), (text, answer)
        else:
            assert answer['type'] in ('entry', 'config', 'error'), (text, answer)
        if answer['type'] == 'entry':  # what the server answered is what it stored
            entry = answer['entry']
            assert stored_entries(fuzz.server, fuzz.family_id).get(entry['id']) == entry, (text, answer)
    catch_up(attacker)  # the socket stays open after refusals


def test_wrong_messages_get_an_error_store_nothing_invalid_and_others_keep_syncing(fuzz):
    check_wrong_messages(fuzz)
    fresh = Device(fuzz.server, fuzz.family_id, fuzz.attacker_token)
    assert {e['id']: e for e in fresh.init['entries']} == live(stored_entries(fuzz.server, fuzz.family_id))
    fresh.close()


@pytest.mark.parametrize('text', [
    '[' * 60_000,                                                              # nested past the stack
    '{"type":"entry","action":"add","entry":' + '[' * 5000 + ']' * 5000 + '}',
    '{"type":"entry","action":"add","entry":{"id":"lone-1","ts":%d,"type":"feed","value":"\\ud800"}}' % NOW,
    '{"type":"entry","action":"add","entry":{"id":"lone-2","ts":%d,"type":"\\udfff","value":"x"}}' % NOW,
    '{"type":"config","data":[{"category":"\\ud83d","buttons":[{"label":"x"}]}]}',
], ids=['deep array', 'deep entry', 'lone surrogate value', 'lone surrogate type', 'lone surrogate config'])
def test_unstorable_messages_get_an_error_and_the_socket_stays_open(fuzz, text):
    attacker = fuzz.attack()
    catch_up(attacker)
    attacker.ws.send(text)
    assert answer_to(attacker)['type'] == 'error'
    catch_up(attacker)
    fuzz.assert_still_serving()


# Admin JSON API

@pytest.fixture(scope='module')
def http_family(shared):
    server, admin = shared
    return admin.create_family('HTTP fuzz')['id']


def send_raw(admin, method, path, body, content_type='application/json'):
    """Send raw bytes as a request body; return (status, content type, body bytes)."""
    request = urllib.request.Request(admin.server.base_url + path, data=body, method=method, headers={
        'Accept': 'application/json', 'Content-Type': content_type})
    try:
        with admin.opener.open(request, timeout=10) as answer:
            return answer.status, answer.headers.get('Content-Type', ''), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get('Content-Type', ''), error.read()


ROUTES = ['POST /admin/families', 'PATCH /admin/families/{id}', 'PUT /admin/families/{id}/config',
          'POST /admin/families/{id}/links']
http_texts = st.text(max_size=12) | one_of_these(EDGE_TEXT + ['x' * 200, 'x' * 201, 'n' * 10_001]) | st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
http_ints = st.integers(-2 ** 63, 2 ** 63 - 1) | st.sampled_from([e for e in EDGE_INTS if -2 ** 63 <= e < 2 ** 63])
http_scalars = st.none() | st.booleans() | http_ints | st.floats(allow_nan=False, allow_infinity=False) | http_texts
http_json = st.recursive(http_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(http_texts, inner, max_size=3),
                         max_leaves=6)
http_configs = st.lists(st.fixed_dictionaries({'category': http_texts | http_ints, 'buttons': st.lists(
    st.fixed_dictionaries({'label': http_texts}, optional={'counted': st.booleans() | http_scalars}) | http_json, max_size=3)},
    optional={'stateful': st.booleans() | http_scalars}) | http_json, max_size=3) | http_json
http_objects = st.builds(merged, st.fixed_dictionaries({}, optional={
    'name': http_texts | http_scalars, 'notes': http_texts | http_scalars,
    'tz': st.sampled_from(['UTC', 'Europe/London', 'Australia/Sydney', 'Mars/Olympus', 'utc', '']) | http_scalars,
    'archived': st.booleans() | http_scalars, 'data': http_configs, 'label': http_texts | http_scalars,
    'expires_at': st.integers(NOW + HOUR, NOW + 30 * DAY) | http_ints | http_scalars}),
    st.dictionaries(http_texts, http_json, max_size=2))
RAW_BODIES = [b'', b'{', b'{"name": ', b'}{', b'null', b'[]', b'"x"', b'\xff\xfe', b'{"name": "a"}{"name": "b"}',
              b"{'name': 'x'}", b'{"name": "\xe9"}', b'\x00', b'1' * 5000, b'{"name": -0}', b'{"name": "\\u0000"}']
http_bodies = one_of_these(RAW_BODIES) | st.binary(max_size=30) | st.builds(
    lambda obj: json.dumps(obj).encode(), http_objects | http_json)


@FUZZ
@given(route=st.sampled_from(ROUTES), body=http_bodies,
       content_type=st.sampled_from(['application/json'] * 6 + ['application/json; charset=utf-8', 'text/plain']))
def check_wrong_bodies(shared, http_family, route, body, content_type):
    server, admin = shared
    method, path = route.split(' ')
    status, answer_type, raw = send_raw(admin, method, path.format(id=http_family), body, content_type)
    assert status < 500, (route, body, status, raw)
    assert answer_type.startswith('application/json'), (route, body, status, answer_type)
    answer = strict_json(raw)
    if status >= 400:
        assert set(answer) == {'error'} and isinstance(answer['error'], str) and answer['error'], answer
        return
    assert 200 <= status < 300 and isinstance(answer, dict), (status, answer)
    if 'families' in route and 'links' not in route and 'config' not in route:
        assert is_text(answer['name'], 1, 200) and answer['name'] == answer['name'].strip(), answer
        assert is_text(answer['notes'], 0, 10_000) and isinstance(answer['archived'], bool), answer
    if 'config' in route:
        assert_config_is_valid(server, http_family)
    if 'links' in route:
        assert re.fullmatch(r'[A-Za-z0-9_-]{32}', answer['token']), answer


def test_admin_api_answers_wrong_bodies_with_a_4xx_json_error_never_a_500(shared, http_family):
    check_wrong_bodies(shared, http_family)
    assert health_status(shared[0]) == 200


UNSTORABLE_BODIES = [
    pytest.param('POST /admin/families', b'{"name": "\\ud800"}', id='lone surrogate name'),
    pytest.param('PATCH /admin/families/{id}', b'{"notes": "a\\udfffb"}', id='lone surrogate notes'),
    pytest.param('POST /admin/families/{id}/links', b'{"label": "\\ud800"}', id='lone surrogate label'),
    pytest.param('PUT /admin/families/{id}/config', b'{"data": [{"category": "\\ud800", "buttons": [{"label": "x"}]}]}',
                 id='lone surrogate config (then the family page would be a 500)'),
    pytest.param('POST /admin/families', b'[' * 5000, id='nested past the stack'),
    pytest.param('POST /admin/families/{id}/links', b'{"expires_at": 9223372036854775808}', id='expires_at past 64 bits'),
    pytest.param('PUT /admin/families/{id}/config', b'{"data": [{"category": "c", "buttons": [{"label": "x", "n": NaN}]}]}',
                 id='NaN in a config (sent on to every device: not JSON)'),
]


@pytest.mark.parametrize('route, body', UNSTORABLE_BODIES)
def test_admin_api_refuses_what_it_cannot_store(shared, http_family, route, body):
    server, admin = shared
    refuse_and_keep_the_page(server, admin, http_family, route, body)


def refuse_and_keep_the_page(server, admin, family_id, route, body):
    method, path = route.split(' ')
    status, _, raw = send_raw(admin, method, path.format(id=family_id), body)
    assert 400 <= status < 500 and 'error' in json.loads(raw), (status, raw)
    page = urllib.request.Request(server.base_url + f'/admin/families/{family_id}', headers={'Accept': 'text/html'})
    with admin.opener.open(page, timeout=10) as answer:
        assert answer.status == 200


# Raw frames

def frame(opcode, payload=b'', fin=True, rsv=0, mask=True, length=None):
    """One client frame, honest or not: any opcode, reserved bits, unmasked, or a length that lies."""
    length = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack('!H', length)
    else:
        head += bytes([bit | 127]) + struct.pack('!Q', length)
    if mask:
        key = b'\x37\xfa\x21\x3d'
        payload = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
        head += key
    return head + payload


class RawSocket:
    """A WebSocket opened by hand (a real handshake), then spoken to frame by frame."""

    def __init__(self, server, family_id, token):
        key = base64.b64encode(os.urandom(16)).decode()
        self.conn = socket.create_connection(('127.0.0.1', server.port), timeout=5)
        self.conn.sendall((f'GET /ws?family={family_id} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n'
                           f'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n'
                           f'Sec-WebSocket-Version: 13\r\nCookie: bt_link={token}\r\n\r\n').encode())
        self.buffer = b''
        while b'\r\n\r\n' not in self.buffer:
            self.buffer += self.read_some()
        head, self.buffer = self.buffer.split(b'\r\n\r\n', 1)
        assert head.startswith(b'HTTP/1.1 101'), head

    def read_some(self):
        data = self.conn.recv(65536)
        if not data:
            raise EOFError
        return data

    def read_exactly(self, size):
        while len(self.buffer) < size:
            self.buffer += self.read_some()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_frame(self):
        """(opcode, payload) of the server's next frame (server frames are not masked)."""
        first, second = self.read_exactly(2)
        length = second & 0x7f
        if length == 126:
            length = struct.unpack('!H', self.read_exactly(2))[0]
        elif length == 127:
            length = struct.unpack('!Q', self.read_exactly(8))[0]
        return first & 0x0f, self.read_exactly(length)

    def close_code(self, timeout=5):
        """Read until the server's close frame; its code, or None when the connection just ended."""
        self.conn.settimeout(timeout)
        try:
            while True:
                opcode, payload = self.read_frame()
                if opcode == 8:
                    return struct.unpack('!H', payload[:2])[0] if len(payload) >= 2 else 1005
        except (EOFError, ConnectionError):
            return None

    def texts_until(self, test, timeout=5):
        """Read frames until a text message passes test; return [(opcode, payload)] read on the way."""
        self.conn.settimeout(timeout)
        frames = []
        while True:
            opcode, payload = self.read_frame()
            frames.append((opcode, payload))
            if opcode == 1 and test(json.loads(payload)):
                return frames

    def close(self):
        with contextlib.suppress(OSError):
            self.conn.close()


PING = b'{"type":"ping"}'
ABUSE = [
    ('binary frame', frame(2, b'\x00\x01'), 1003),
    ('length header claims 2**40 bytes', frame(1, length=2 ** 40), 1009),
    ('length header claims 2**63 bytes', frame(1, length=2 ** 63), 1009),
    ('fragments adding up past 64 KiB', frame(1, b'{"x":"' + b'a' * 30_000, fin=False) + frame(0, b'a' * 30_000, fin=False)
     + frame(0, b'a' * 6_000 + b'"}'), 1009),
    ('invalid UTF-8', frame(1, b'{"type":"ping","x":"\xff"}'), 1007),
    ('UTF-8 encoded surrogate', frame(1, b'"\xed\xa0\x80"'), 1007),
    ('overlong UTF-8', frame(1, b'"\xc0\xaf"'), 1007),
    ('UTF-8 cut short at the end', frame(1, PING + b'\xe2\x82'), 1007),
    ('unmasked frame', frame(1, PING, mask=False), 1002),
    ('reserved bit 1', frame(1, PING, rsv=4), 1002),
    ('reserved bit 2', frame(1, PING, rsv=2), 1002),
    ('reserved bit 3', frame(1, PING, rsv=1), 1002),
    ('fragmented control frame', frame(9, b'hi', fin=False), 1002),
    ('control frame over 125 bytes', frame(9, b'x' * 126), 1002),
    ('continuation without a start', frame(0, PING), 1002),
    ('new message inside a fragmented one', frame(1, b'{"type":', fin=False) + frame(1, b'"ping"}'), 1002),
    ('reserved opcode 3', frame(3, b'x'), 1002),
    ('reserved control opcode 11', frame(11, b'x'), 1002),
    ('close frame', frame(8, struct.pack('!H', 1000)), 1000),
]


@pytest.mark.parametrize('frames, code', [case[1:] for case in ABUSE], ids=[case[0] for case in ABUSE])
def test_abusive_frames_close_only_that_socket_with_the_right_code(fuzz, frames, code):
    raw = RawSocket(fuzz.server, fuzz.family_id, fuzz.attacker_token)
    try:
        raw.texts_until(lambda m: m['type'] == 'init')
        raw.conn.sendall(frames)
        assert raw.close_code() == code
    finally:
        raw.close()
    fuzz.assert_still_serving()


@pytest.mark.parametrize('frames, pong', [
    (frame(1, b'{"type":', fin=False) + frame(9, b'hi') + frame(0, b'"ping"}'), b'hi'),
    (frame(1, b'{"type":"ping","x":"\xe2', fin=False) + frame(0, b'\x82\xac"}'), None),
    (frame(1, b'', fin=False) + frame(0, b'', fin=False) + frame(10, b'') + frame(0, PING), None),
], ids=['ping between fragments', 'UTF-8 split across fragments', 'empty fragments and a pong between'])
def test_fragmented_messages_with_control_frames_between_are_understood(fuzz, frames, pong):
    raw = RawSocket(fuzz.server, fuzz.family_id, fuzz.attacker_token)
    try:
        raw.texts_until(lambda m: m['type'] == 'init')
        raw.conn.sendall(frames)
        got = raw.texts_until(lambda m: m['type'] == 'pong')
        if pong is not None:
            assert (10, pong) in got  # the ping inside the message is answered too
    finally:
        raw.close()
    fuzz.assert_still_serving()


random_frames = st.builds(
    frame, opcode=st.sampled_from([0, 1, 1, 1, 2, 8, 9, 10]) | st.integers(0, 15),
    payload=st.binary(max_size=40) | st.sampled_from([PING, b'{"type":"entry"}', b'\xff', b'{"type":"ping"}\xe2\x82']),
    fin=st.booleans(), rsv=st.sampled_from([0] * 6) | st.integers(0, 7), mask=st.sampled_from([True] * 6 + [False]),
    length=st.none() | st.none() | st.integers(0, 200) | st.sampled_from([126, 65535, 65536, 2 ** 32, 2 ** 63]))


@settings(FUZZ, max_examples=max(10, FUZZ_EXAMPLES // 3))
@given(frames=st.lists(random_frames, min_size=1, max_size=5))
def check_random_frames(fuzz, frames):
    raw = RawSocket(fuzz.server, fuzz.family_id, fuzz.attacker_token)
    try:
        raw.texts_until(lambda m: m['type'] == 'init')
        with contextlib.suppress(OSError):  # the server may already have closed on an early frame
            raw.conn.sendall(b''.join(frames))
            raw.conn.shutdown(socket.SHUT_WR)
        assert raw.close_code() in (None, 1000, 1002, 1003, 1007, 1009)
    finally:
        raw.close()
    fuzz.assert_still_serving()


def test_random_frames_never_hurt_the_server_or_the_family(fuzz):
    check_random_frames(fuzz)
