"""babytrackd: a self-hosted baby-sleep tracking server for one consultant and her client families.

The consultant (admin) logs in to server-rendered pages under /admin, creates families, hands
each family time-limited share links, and reads each family's day as an hourly grid. Parents open
their link and get an offline-first web app (static/app/) that syncs every tap to the family's
other devices over a WebSocket (/ws). One process, one SQLite file, one module.

Run:    python -m babytrackd            (serves on :8080 with ./babytrack.db)
        python -m babytrackd backup PATH | vacuum | hash-password
Tests:  pytest -q

Configuration comes from the environment, read once at import:

    PORT (8080)  HOST (0.0.0.0)  DB_PATH (babytrack.db)  ADMIN_USER (jane)  ADMIN_PASS (unset)
    BASE_URL (http://localhost:PORT)  DEFAULT_TZ (UTC)  BCRYPT_ROUNDS (12)  WS_PING_INTERVAL (25)
    LOG_LEVEL (info)  LOG_FORMAT (text)  BACKUP_KEEP (7)  WS_WRITE_BURST (2000)  WS_WRITE_RATE (20)
    FAMILY_MAX_ENTRIES (200000)  WS_SOCKETS_PER_LINK (8)  WS_SEND_BUFFER (4 MiB)  MAX_CONNECTIONS (2000)
    METRICS_TOKEN (unset)  TRUST_PROXY_HEADER (unset)

Limits: request line + headers 16 KiB within 10 s, bodies 64 KiB (imports 5 MiB), WebSocket messages
64 KiB, unsent bytes per socket WS_SEND_BUFFER, one writer connection to SQLite. The sync protocol is
in PROTOCOL.md. sqlite3 and bcrypt block the event loop while they run: queries stay small and
indexed, long reads (the dashboard's aggregates, exports), bcrypt and backups run apart or in slices.

Chapters (each uses only those above it):
    Configuration, Schema and migrations, Storage, Domain, Sync, Summaries, Auth, Hub, HTTP,
    Operations, Command line.
"""

# gevent must patch the standard library before anything imports socket, ssl or threading:
# otherwise blocking calls would stall every greenlet in the process. The test suite imports this
# module for WebTest next to a browser driver that needs real threads, so it opts out.
# Nothing here speaks TLS (fly.io's proxy ends it), yet http.client (which bottle imports) and
# hmac (which secrets imports) would load OpenSSL through ssl and _hashlib: 8 MB of a 256 MB
# machine. A None in sys.modules makes those imports fail softly; hashlib falls back to its own SHA-256.
import os
import sys
from gevent import monkey
if not os.environ.get('BABYTRACKD_NO_PATCH'):
    sys.modules.setdefault('ssl', None)
    sys.modules.setdefault('_hashlib', None)
    monkey.patch_all(ssl=False, subprocess=False, dns=False)  # it spawns nothing and looks up no names

import argparse
import bisect
import contextlib
import csv
import datetime as dt
import functools
import gc
import hashlib
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import random
import re
import resource
import secrets
import signal
import socket
import sqlite3
import struct
import threading
import time
import uuid
import zoneinfo
from collections import deque
from itertools import chain
from urllib.parse import urlsplit

import bcrypt
import bottle
import gevent
import gevent.event
import gevent.pool
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.websocket import Header, WebSocket

VERSION = '1.0.0'
HERE = os.path.dirname(os.path.abspath(__file__))

###############################################################################
# Configuration ################################################################
###############################################################################

PORT = int(os.environ.get('PORT', '8080'))
HOST = os.environ.get('HOST', '0.0.0.0')
DB_PATH = os.environ.get('DB_PATH', 'babytrack.db')
ADMIN_USER = os.environ.get('ADMIN_USER', 'jane')
ADMIN_PASS = os.environ.get('ADMIN_PASS') or None
BASE_URL = os.environ.get('BASE_URL', f'http://localhost:{PORT}').rstrip('/')
DEFAULT_TZ = os.environ.get('DEFAULT_TZ', 'UTC')
BCRYPT_ROUNDS = int(os.environ.get('BCRYPT_ROUNDS', '12'))
WS_PING_INTERVAL = float(os.environ.get('WS_PING_INTERVAL', '25'))
LOG_LEVEL = os.environ.get('LOG_LEVEL', 'info').lower()
LOG_FORMAT = os.environ.get('LOG_FORMAT', 'text').lower()
BACKUP_KEEP = int(os.environ.get('BACKUP_KEEP', '7'))
WS_WRITE_BURST = int(os.environ.get('WS_WRITE_BURST', '2000'))
WS_WRITE_RATE = float(os.environ.get('WS_WRITE_RATE', '20'))
FAMILY_MAX_ENTRIES = int(os.environ.get('FAMILY_MAX_ENTRIES', '200000'))
WS_SOCKETS_PER_LINK = int(os.environ.get('WS_SOCKETS_PER_LINK', '8'))
WS_SEND_BUFFER = int(os.environ.get('WS_SEND_BUFFER', str(4 * 1024 * 1024)))
MAX_CONNECTIONS = int(os.environ.get('MAX_CONNECTIONS', '2000'))
METRICS_TOKEN = os.environ.get('METRICS_TOKEN') or None
TRUST_PROXY_HEADER = os.environ.get('TRUST_PROXY_HEADER') or None

SECURE_COOKIES = BASE_URL.startswith('https://')
# On fly.io every connection comes from the proxy; the client's address is in Fly-Client-IP.
# Only trust that header where fly.io sets it, or anyone could forge their way past the limiter.
BEHIND_FLY_PROXY = bool(os.environ.get('FLY_APP_NAME'))

ADMIN_COOKIE = 'bt_admin'
LINK_COOKIE = 'bt_link'
SESSION_DAYS = 14
MAX_BODY = 64 * 1024
MAX_MESSAGE = 64 * 1024
MAX_CONFIG = 16 * 1024
HEAD_MAX, HEAD_SECONDS, IDLE_SECONDS = 16 * 1024, 10, 60  # a request's line + headers; a keep-alive's wait
LOGIN_FAILURES, LOGIN_WINDOW = 5, 15 * 60
CLOCK_SKEW_MS = 5 * 60 * 1000
DAY_MS = 24 * 3600 * 1000
MIN_TS = 946684800000  # 2000-01-01T00:00:00Z
MAX_TS = 253402300799999  # 9999-12-31T23:59:59.999Z

DEFAULT_CONFIG = [
    {'category': 'sleep', 'stateful': True, 'buttons': [
        {'label': 'sleeping', 'timing': True, 'counted': True}, {'label': 'awake', 'timing': True, 'counted': False}]},
    {'category': 'feed', 'buttons': [{'label': 'breast left'}, {'label': 'breast right'}, {'label': 'bottle'}]},
    {'category': 'nappy', 'buttons': [{'label': 'wet'}, {'label': 'dirty'}, {'label': 'wet + dirty'}]},
]

log = logging.getLogger('babytrackd')


def now_ms():
    """Return the server clock in integer milliseconds since the epoch."""
    return int(time.time() * 1000)


###############################################################################
# Schema and migrations ########################################################
###############################################################################

# Append only: each string moves the schema one version on (PRAGMA user_version).
MIGRATIONS = [
    """
    CREATE TABLE admins (
      id TEXT PRIMARY KEY,
      username TEXT UNIQUE NOT NULL,
      password_hash TEXT NOT NULL,
      created_at INTEGER NOT NULL
    );
    CREATE TABLE families (
      id TEXT PRIMARY KEY,
      name TEXT NOT NULL,
      notes TEXT,
      created_at INTEGER NOT NULL,
      archived INTEGER DEFAULT 0,
      tz TEXT NOT NULL DEFAULT 'UTC'
    );
    CREATE TABLE access_links (
      token TEXT PRIMARY KEY,
      family_id TEXT NOT NULL REFERENCES families(id),
      label TEXT,
      expires_at INTEGER,
      created_at INTEGER NOT NULL,
      revoked_at INTEGER
    );
    CREATE TABLE admin_sessions (
      token TEXT PRIMARY KEY,
      admin_id TEXT NOT NULL REFERENCES admins(id),
      expires_at INTEGER NOT NULL,
      csrf TEXT NOT NULL
    );
    CREATE TABLE entries (
      id TEXT PRIMARY KEY,
      family_id TEXT NOT NULL REFERENCES families(id),
      ts INTEGER NOT NULL,
      type TEXT NOT NULL,
      value TEXT NOT NULL,
      deleted INTEGER DEFAULT 0,
      updated_at INTEGER NOT NULL,
      seq INTEGER NOT NULL,
      by TEXT
    );
    CREATE TABLE configs (
      family_id TEXT PRIMARY KEY REFERENCES families(id),
      data TEXT NOT NULL,
      updated_at INTEGER NOT NULL
    );
    CREATE INDEX idx_entries_family ON entries(family_id);
    CREATE INDEX idx_entries_updated ON entries(family_id, updated_at);
    CREATE INDEX idx_entries_ts ON entries(family_id, ts);
    CREATE UNIQUE INDEX idx_entries_seq ON entries(seq);
    CREATE INDEX idx_entries_family_seq ON entries(family_id, seq);
    CREATE INDEX idx_links_family ON access_links(family_id);
    """,
    # 2: the sleep program (night window, plan, coaching notes), the change log (back-filled with
    # one row per entry), login failures that survive a restart; idx_entries_family goes (every query
    # on family_id has a composite index), and spans seek each category's entries directly.
    """
    DROP INDEX idx_entries_family;
    CREATE INDEX idx_entries_type ON entries(family_id, type, ts);
    ALTER TABLE families ADD COLUMN night_start TEXT NOT NULL DEFAULT '19:00';
    ALTER TABLE families ADD COLUMN night_end TEXT NOT NULL DEFAULT '07:00';
    ALTER TABLE families ADD COLUMN plan TEXT;
    CREATE TABLE notes (
      id TEXT PRIMARY KEY,
      family_id TEXT NOT NULL REFERENCES families(id),
      date TEXT NOT NULL,
      text TEXT NOT NULL,
      created_at INTEGER NOT NULL
    );
    CREATE INDEX idx_notes_family ON notes(family_id, created_at);
    CREATE TABLE changes (
      seq INTEGER PRIMARY KEY,
      entry_id TEXT NOT NULL,
      family_id TEXT NOT NULL REFERENCES families(id),
      ts INTEGER NOT NULL,
      type TEXT NOT NULL,
      value TEXT NOT NULL,
      deleted INTEGER NOT NULL,
      updated_at INTEGER NOT NULL,
      by TEXT,
      at INTEGER NOT NULL
    );
    CREATE INDEX idx_changes_entry ON changes(entry_id, seq);
    CREATE INDEX idx_changes_family ON changes(family_id, seq);
    INSERT INTO changes (seq, entry_id, family_id, ts, type, value, deleted, updated_at, by, at)
      SELECT seq, id, family_id, ts, type, value, deleted, updated_at, by, updated_at FROM entries;
    CREATE TABLE login_failures (
      address TEXT NOT NULL,
      at INTEGER NOT NULL
    );
    CREATE INDEX idx_login_failures ON login_failures(address, at);
    """,
    # 3: one index fewer to update on every write: the next seq is the change log's largest (an entry's seq is
    # always its newest change's). Any entry without its change row gets one first, so that stays true.
    """
    INSERT OR IGNORE INTO changes (seq, entry_id, family_id, ts, type, value, deleted, updated_at, by, at)
      SELECT seq, id, family_id, ts, type, value, deleted, updated_at, by, updated_at FROM entries e
      WHERE NOT EXISTS (SELECT 1 FROM changes WHERE seq = e.seq);
    DROP INDEX idx_entries_seq;
    """,
]


def migrate(db):
    """Bring the schema up to the newest version, one migration per transaction; an older file is first
    copied (SQLite's backup) to backups/before-migration-<version>.db beside it."""
    version = db.execute('PRAGMA user_version').fetchone()[0]
    path = db.execute('PRAGMA database_list').fetchone()[2]
    if 0 < version < len(MIGRATIONS) and path:
        copy = os.path.join(os.path.dirname(path), 'backups', f'before-migration-{version}.db')
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        with contextlib.closing(sqlite3.connect(copy + '.part')) as target:
            db.backup(target)
        os.replace(copy + '.part', copy)
        log.info('upgrading the database from schema %s to %s; the old file is kept as %s',
                 version, len(MIGRATIONS), copy)
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        db.executescript(f'BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;')


###############################################################################
# Storage ######################################################################
###############################################################################

db = None  # the one connection every greenlet shares; see open_db()


def open_db(path=None):
    """Open (creating if needed) the SQLite file, migrate it and make it the module's connection."""
    global db
    conn = sqlite3.connect(path or DB_PATH, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    # journal_size_limit: a burst of writes leaves no huge WAL behind
    conn.executescript("""PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
                          PRAGMA busy_timeout = 5000; PRAGMA journal_size_limit = 16777216;""")
    migrate(conn)
    db = conn
    return conn


# SQLite's answers that mean the disk will not take a write now (full, read-only, I/O error, locked
# past busy_timeout): the client is told to retry, and /health says so until a write succeeds.
STORAGE_ERRORS = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN,
                  sqlite3.SQLITE_BUSY}
STORAGE_RETRY = 5  # seconds a client is asked to wait after a storage fault
STORAGE_MESSAGE = f'The server cannot save right now; nothing was changed. Please try again in {STORAGE_RETRY} seconds.'
storage = {'fault': None, 'faults': 0}  # the last write's storage error (None once a write succeeds); a count


def storage_error(error):
    """Tell whether a sqlite3 error means the disk will not take a write now."""
    return getattr(error, 'sqlite_errorcode', 0) & 0xff in STORAGE_ERRORS


class transaction:
    """`with transaction():` wraps writes in BEGIN IMMEDIATE/COMMIT; never yield inside one.
    It keeps `storage` current: a storage fault sets it, a committed change clears it.
    Inside one, the same greenlet's `with transaction():` joins it (an import writes a chunk as one commit)."""
    owner = None  # the greenlet that began the open transaction: another one's BEGIN still fails

    def __enter__(self):
        self.joined = db.in_transaction and transaction.owner is gevent.getcurrent()
        if not self.joined:
            try:
                db.execute('BEGIN IMMEDIATE')
            except sqlite3.Error as error:
                self.noted(error)
                raise
            transaction.owner, self.changes = gevent.getcurrent(), db.total_changes
        return db

    def __exit__(self, kind, value, trace):
        if self.joined:
            return
        try:
            if kind is None:
                db.execute('COMMIT')
                if db.total_changes > self.changes:
                    storage['fault'] = None
        except sqlite3.Error as error:
            value = error
            raise
        finally:
            if db.in_transaction:  # an error, or a COMMIT that failed (disk full): undo it all
                db.execute('ROLLBACK')
            self.noted(value)

    @staticmethod
    def noted(error):
        """Remember a storage fault for /health and count it for /metrics."""
        if isinstance(error, sqlite3.Error) and storage_error(error):
            storage['fault'], storage['faults'] = str(error), storage['faults'] + 1


def one(sql, *args):
    """Return the first row of a query as a dict, or None."""
    row = db.execute(sql, args).fetchone()
    return dict(row) if row else None


def rows(sql, *args):
    """Return every row of a query as a list of dicts."""
    return [dict(r) for r in db.execute(sql, args)]


def apart(function, *args, idle=True):
    """Return function(*args), run in gevent's threadpool while the loop serves sockets; `idle`: at idle CPU
    priority, so it only runs when the loop leaves a CPU free (README "Performance", and its one hazard)."""
    def run():
        with contextlib.suppress(AttributeError, OSError):  # Linux, this thread; elsewhere or sandboxed: as it was
            os.sched_setscheduler(0, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
        return function(*args)
    return gevent.get_hub().threadpool.apply(run)


readers = []  # every worker thread's read connection, closed at shutdown
reader = threading.local()  # this worker thread's: key (path, inode) and conn


def read_apart(sql, args):
    """Return a read-only query's rows, run apart on the worker thread's own connection (SQLite drops the GIL)."""
    path = db.execute('PRAGMA database_list').fetchone()[2]

    def run():
        key = (path, os.stat(path).st_ino)  # another file at the path (a test's, a restore's) is another database
        if getattr(reader, 'key', None) != key:  # kept: opening one costs ~0.3 ms (the schema is read again)
            if getattr(reader, 'conn', None):
                readers.remove(reader.conn)
                reader.conn.close()
            reader.key, reader.conn = key, sqlite3.connect(path, check_same_thread=False)
            reader.conn.row_factory = sqlite3.Row  # tuples that can also be read by column name
            reader.conn.execute('PRAGMA cache_size = -1024')  # 1 MiB each, at most one per pool thread
            readers.append(reader.conn)
        return reader.conn.execute(sql, args).fetchall()
    return apart(run)


###############################################################################
# Domain #######################################################################
###############################################################################

class Invalid(ValueError):
    """Input a person or device sent that we refuse; the message is shown to them."""


def require(condition, message):
    """Raise Invalid(message) unless condition holds."""
    if not condition:
        raise Invalid(message)


def refuse_constant(name):
    raise ValueError(f'{name} is not JSON')


JSON_DECODER = json.JSONDecoder(parse_constant=refuse_constant)  # made once: json.loads makes one per call


def parse_json(text):
    """Parse JSON text, refusing what browsers and SQLite would not read: NaN, Infinity, lone surrogates."""
    data = JSON_DECODER.decode(text)
    if '\\u' in text:  # text decoded from UTF-8 holds no surrogates; only an escape can make one
        json.dumps(data, ensure_ascii=False).encode()  # UnicodeEncodeError, a ValueError, on a lone surrogate
    return data


def check_text(value, name, low, high):
    """Return value if it is a string of low..high characters, else raise Invalid."""
    if not isinstance(value, str):  # not require(): this runs for every text of every synced entry
        raise Invalid(f'{name} must be text')
    try:
        value.encode()
    except UnicodeEncodeError:
        raise Invalid(f'{name} must be valid Unicode (no lone surrogates)') from None
    if len(value) < low:
        raise Invalid(f'{name} must not be empty')
    if len(value) > high:
        raise Invalid(f'{name} must be at most {high:,} characters')
    return value


def check_filled(value, name, high):
    """Return value if it is text of at most `high` characters, not all blank, else raise Invalid."""
    require(check_text(value, name, 1, high).strip(), f'{name} must not be empty')
    return value


def check_int(value, name):
    """Return value if it is an integer (not a bool), else raise Invalid."""
    require(isinstance(value, int) and not isinstance(value, bool), f'{name} must be an integer')
    return value


def check_bool(value, name):
    """Return value if it is true or false, else raise Invalid."""
    require(isinstance(value, bool), f'{name} must be true or false')
    return value


@functools.cache
def zone_names():
    """Return the set of IANA zone names (read from disk once)."""
    return frozenset(zoneinfo.available_timezones())


@functools.lru_cache(maxsize=16)
def zone_options(selected):
    """Return the <option>s of a time zone select box, `selected` chosen: ~600 of them, built once per choice."""
    return ''.join(f'<option{" selected" if zone == selected else ""}>{bottle.html_escape(zone)}</option>'
                   for zone in sorted(zone_names()))


def check_tz(value):
    """Return value if it names an IANA time zone, else raise Invalid."""
    require(isinstance(value, str) and value in zone_names(), 'tz must be an IANA time zone name such as Europe/London')
    return value


def check_clock(value, name):
    """Return value if it is a wall-clock time 'HH:MM' (00:00-23:59), else raise Invalid."""
    require(isinstance(value, str) and re.fullmatch(r'([01][0-9]|2[0-3]):[0-5][0-9]', value),
            f'{name} must be a time HH:MM such as 19:00')
    return value


def day_minute(clock):
    """Return the minute of the day that a wall-clock time 'HH:MM' names."""
    return int(clock[:2]) * 60 + int(clock[3:])


def family_dict(row):
    """Shape a families row for the API."""
    return {'id': row['id'], 'name': row['name'], 'notes': row['notes'] or '',
            'archived': bool(row['archived']), 'tz': row['tz'], 'created_at': row['created_at'],
            'night_start': row['night_start'], 'night_end': row['night_end']}


def get_family(family_id):
    """Return the family as a dict, or None."""
    row = one('SELECT * FROM families WHERE id = ?', family_id)
    return family_dict(row) if row else None


def list_families(include_archived=False):
    """Return families, newest first, with their last activity (read apart: one index probe per family)."""
    return [dict(family_dict(r), last_activity=r['last_activity']) for r in read_apart("""
        SELECT f.*, (SELECT MAX(updated_at) FROM entries e WHERE e.family_id = f.id) AS last_activity
        FROM families f WHERE ? OR NOT f.archived ORDER BY f.created_at DESC""", (include_archived,))]


FAMILY_FIELDS = {  # what a family's field may hold, in the order they are checked
    'name': lambda value: check_filled(value, 'name', 200).strip(),
    'notes': lambda value: check_text(value, 'notes', 0, 10_000),
    'archived': lambda value: int(check_bool(value, 'archived')),
    'tz': check_tz,
    'night_start': lambda value: check_clock(value, 'night_start'),
    'night_end': lambda value: check_clock(value, 'night_end'),
}


def family_fields(changes):
    """Return the valid family fields among name, notes, archived, tz and the night window, else raise Invalid."""
    unknown = set(changes) - FAMILY_FIELDS.keys()
    if unknown:
        raise Invalid(f'unknown field: {sorted(unknown)[0]}')
    return {name: check(changes[name]) for name, check in FAMILY_FIELDS.items() if name in changes}


def create_family(name, notes='', tz=None):
    """Validate and store a new family; return it."""
    fields = family_fields({'name': name, 'notes': notes or '', 'tz': tz or DEFAULT_TZ})
    family_id = secrets.token_urlsafe(6)  # 8 url-safe characters
    with transaction():
        db.execute('INSERT INTO families (id, name, notes, created_at, archived, tz) VALUES (?, ?, ?, ?, 0, ?)',
                   (family_id, fields['name'], fields['notes'], now_ms(), fields['tz']))
    return get_family(family_id)


def update_family(family_id, changes):
    """Apply the allowed changes (name, notes, archived, tz, night window) to a family; return it."""
    fields = family_fields(changes)
    if {'night_start', 'night_end'} & fields.keys():
        night = {**get_family(family_id), **fields}
        require(night['night_start'] != night['night_end'], 'night_start and night_end must not be equal')
    if fields:
        assignments = ', '.join(f'{column} = ?' for column in fields)
        with transaction():
            db.execute(f'UPDATE families SET {assignments} WHERE id = ?', (*fields.values(), family_id))
    return get_family(family_id)


def link_dict(row):
    """Shape an access_links row for the API."""
    return {'token': row['token'], 'url': f"{BASE_URL}/t/{row['token']}", 'label': row['label'],
            'expires_at': row['expires_at'], 'created_at': row['created_at']}


def create_link(family_id, label=None, expires_at=None):
    """Validate and store a new share link for the family; return it."""
    if label is not None:
        label = check_text(label, 'label', 0, 100).strip() or None
    if expires_at is not None:
        require(check_int(expires_at, 'expires_at') > now_ms(), 'expires_at must be in the future')
        require(expires_at <= MAX_TS, 'expires_at must be before the year 10000')
    token = secrets.token_urlsafe(24)  # 32 url-safe characters
    with transaction():
        db.execute('INSERT INTO access_links (token, family_id, label, expires_at, created_at) VALUES (?, ?, ?, ?, ?)',
                   (token, family_id, label, expires_at, now_ms()))
    return link_dict(one('SELECT * FROM access_links WHERE token = ?', token))


def list_links(family_id):
    """Return the family's links that were not revoked, newest first."""
    return [link_dict(r) for r in db.execute("""SELECT * FROM access_links WHERE family_id = ? AND revoked_at IS NULL
                                                ORDER BY created_at DESC""", (family_id,))]


def revoke_link(family_id, token):
    """Mark the link revoked; return False when the family has no such live link."""
    with transaction():
        return bool(db.execute("""UPDATE access_links SET revoked_at = ? WHERE token = ? AND family_id = ?
                                  AND revoked_at IS NULL""", (now_ms(), token, family_id)).rowcount)


def check_link(token):
    """Return (link, None) for a working link, else (None, (status, reason, message))."""
    row = one("""SELECT l.*, f.name AS family_name, f.archived, f.tz, f.night_start, f.night_end FROM access_links l
                 JOIN families f ON f.id = l.family_id WHERE l.token = ?""", token) if token else None
    if not row:
        return None, (404, 'unknown', 'This link is not valid. Ask your consultant for a new one.')
    if row['revoked_at']:
        return None, (410, 'revoked', 'This link was turned off by your consultant.')
    if row['expires_at'] is not None and row['expires_at'] <= now_ms():
        return None, (410, 'expired', 'This link has expired. Ask your consultant for a new one.')
    if row['archived']:
        return None, (410, 'archived', 'Tracking for this family has ended.')
    return row, None


def get_config(family_id):
    """Return the family's button groups, or the default when none were saved."""
    row = one('SELECT data FROM configs WHERE family_id = ?', family_id)
    return json.loads(row['data']) if row else DEFAULT_CONFIG


def get_plan(family_id):
    """Return the family's plan {wake, naps, bedtime}, or None."""
    row = one('SELECT plan FROM families WHERE id = ?', family_id)
    return json.loads(row['plan']) if row and row['plan'] else None


def validate_config(data):
    """Return data if it is a valid list of button groups, else raise Invalid."""
    try:  # Python's json reads NaN, Infinity and lone surrogates; browsers' would not
        size = len(json.dumps(data, allow_nan=False, ensure_ascii=False).encode())
    except (ValueError, RecursionError):
        raise Invalid('config must be plain JSON: no NaN, Infinity or lone surrogates') from None
    require(size <= MAX_CONFIG, 'config must be at most 16 KiB')
    require(isinstance(data, list), 'config must be a list of button groups')
    require(len(data) <= 20 and sum(1 for g in data if isinstance(g, dict) and g.get('stateful')) <= 4,
            'config may have at most 20 groups, 4 of them stateful')
    seen = set()
    for number, group in enumerate(data, start=1):
        require(isinstance(group, dict), f'group {number} must be an object')
        category = check_text(group.get('category'), f'group {number} category', 1, 64)
        require(category not in seen, f'category "{category}" appears twice')
        seen.add(category)
        check_bool(group.get('stateful', False), f'group {number} stateful')
        buttons = group.get('buttons')
        require(isinstance(buttons, list) and buttons, f'group {number} must have a list of buttons')
        for place, button in enumerate(buttons, start=1):
            where = f'group {number} button {place}'
            require(isinstance(button, dict), f'{where} must be an object')
            check_text(button.get('label'), f'{where} label', 1, 64)
            for flag in ('timing', 'counted'):
                check_bool(button.get(flag, False), f'{where} {flag}')
    return data


def save_config(family_id, data):
    """Validate and store the family's button groups; return them."""
    validate_config(data)
    with transaction():
        db.execute('INSERT OR REPLACE INTO configs (family_id, data, updated_at) VALUES (?, ?, ?)',
                   (family_id, json.dumps(data), now_ms()))
    return data


def validate_plan(plan):
    """Return the plan (wake, 0-5 naps each starting before it ends, bedtime; all HH:MM) or None, else raise Invalid."""
    if plan is None:
        return None
    require(isinstance(plan, dict), 'plan must be an object with wake, naps and bedtime, or null')
    unknown = set(plan) - {'wake', 'naps', 'bedtime'}
    if unknown:
        raise Invalid(f'unknown plan field: {sorted(unknown)[0]}')
    clean = {'wake': check_clock(plan.get('wake'), 'wake'), 'naps': [],
             'bedtime': check_clock(plan.get('bedtime'), 'bedtime')}
    naps = plan.get('naps', [])
    require(isinstance(naps, list) and len(naps) <= 5, 'naps must be a list of at most 5 naps')
    for number, nap in enumerate(naps, start=1):
        require(isinstance(nap, dict) and not set(nap) - {'start', 'end'},
                f'nap {number} must be {{"start": "HH:MM", "end": "HH:MM"}}')
        start = check_clock(nap.get('start'), f'nap {number} start')
        end = check_clock(nap.get('end'), f'nap {number} end')
        require(start < end, f'nap {number} must start before it ends')
        clean['naps'].append({'start': start, 'end': end})
    return clean


def save_plan(family_id, plan):
    """Validate and store the family's plan (None clears it); return it."""
    plan = validate_plan(plan)
    with transaction():
        db.execute('UPDATE families SET plan = ? WHERE id = ?', (json.dumps(plan) if plan else None, family_id))
    return plan


def create_note(family_id, date, text):
    """Validate and store a coaching note for a date; return it."""
    try:
        if not 1900 <= dt.date.fromisoformat(date).year <= 9000 or len(date) != 10:  # same range as the pages
            raise ValueError
    except (TypeError, ValueError):
        raise Invalid('date must be a day such as 2026-01-31') from None
    check_filled(text, 'text', 4000)
    note = {'id': secrets.token_urlsafe(6), 'date': date, 'text': text, 'created_at': now_ms()}
    with transaction():
        db.execute('INSERT INTO notes (id, family_id, date, text, created_at) VALUES (?, ?, ?, ?, ?)',
                   (note['id'], family_id, date, text, note['created_at']))
    return note


def list_notes(family_id, since=0):
    """Return the family's coaching notes written at or after `since` (ms), newest first."""
    return rows("""SELECT id, date, text, created_at FROM notes
                   WHERE family_id = ? AND created_at >= ? ORDER BY created_at DESC, id DESC""", family_id, since)


def delete_note(family_id, note_id):
    """Delete the family's note; return False when it has no such note."""
    with transaction():
        return bool(db.execute('DELETE FROM notes WHERE id = ? AND family_id = ?', (note_id, family_id)).rowcount)


def entry_dict(row):
    """Shape an entries row for the wire."""
    return {'id': row['id'], 'ts': row['ts'], 'type': row['type'], 'value': row['value'],
            'deleted': bool(row['deleted']), 'updated_at': row['updated_at'], 'seq': row['seq'], 'by': row['by']}


def live_entries(family_id, limit=None):
    """Return the family's entries that are not deleted, newest ts first."""
    return [entry_dict(r) for r in db.execute("""SELECT * FROM entries WHERE family_id = ? AND NOT deleted
        ORDER BY ts DESC, id LIMIT ?""", (family_id, -1 if limit is None else limit))]


# SQLite writes the wire form itself: a 20,000-entry catch-up then costs one query, not 20,000 dicts.
ENTRY_JSON = """json_object('id', id, 'ts', ts, 'type', type, 'value', value,
    'deleted', json(CASE WHEN deleted THEN 'true' ELSE 'false' END), 'updated_at', updated_at, 'seq', seq, 'by', by)"""


def entries_json(family_id, since, until, after=None, page=200):
    """Yield, as the inside of a JSON array in pages of `page` rows, the live entries (since=0) or
    every change after seq `since`, up to seq `until`, in seq order. Each page is read when asked
    for, so a large family never sits in memory whole; a change made meanwhile has a seq past `until`.
    With `after` (ms; a first load's window, PROTOCOL.md): live entries at or after it, then each
    stateful category's latest live entry before it (the state carried into the window)."""
    last, comma = since, ''
    while found := db.execute(f"""SELECT seq, {ENTRY_JSON} FROM entries WHERE family_id = ? AND seq > ? AND seq <= ?
                                   AND (? OR (NOT deleted AND ts >= ?)) ORDER BY seq LIMIT ?""",
                              (family_id, last, until, since > 0, after or 0, page)).fetchall():
        yield comma + ','.join(row[1] for row in found)
        last, comma = found[-1][0], ','
    if after is not None and not since:
        for category in (group['category'] for group in get_config(family_id) if group.get('stateful')):
            state = db.execute(f"""SELECT {ENTRY_JSON} FROM entries WHERE family_id = ? AND type = ? AND NOT deleted
                                   AND ts < ? AND seq <= ? ORDER BY ts DESC, id DESC LIMIT 1""",
                               (family_id, category, after, until)).fetchone()
            if state:
                yield comma + state[0]
                comma = ','


def entries_between(family_id, start, end):
    """Return, as a JSON array, the live entries with start <= ts < end, oldest first."""
    return '[' + ','.join(row[0] for row in db.execute(f"""SELECT {ENTRY_JSON} FROM entries
        WHERE family_id = ? AND NOT deleted AND ts >= ? AND ts < ? ORDER BY ts, id""", (family_id, start, end))) + ']'


def family_cursor(family_id):
    """Return the highest seq the family's entries carry (0 when none)."""
    return db.execute('SELECT COALESCE(MAX(seq), 0) FROM entries WHERE family_id = ?', (family_id,)).fetchone()[0]


def recent_changes(family_id, limit=50):
    """Return the family's latest changes, newest first, tombstones included."""
    return [entry_dict(r) for r in db.execute('SELECT * FROM entries WHERE family_id = ? ORDER BY seq DESC LIMIT ?',
                                              (family_id, limit))]


def change_dict(row):
    """Shape a change-log row: one version of an entry, with the server time it was accepted (`at`)."""
    return dict(row, deleted=bool(row['deleted']))


def entry_history(family_id, entry_id, before=2 ** 63 - 1, limit=-1):
    """Return the newest `limit` versions before seq `before` of one of the family's entries, oldest first
    (empty for another family's)."""
    return [change_dict(r) for r in reversed(db.execute(
        """SELECT seq, ts, type, value, deleted, updated_at, by, at FROM changes
           WHERE entry_id = ? AND family_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?""",
        (entry_id, family_id, before, limit)).fetchall())]


def deleted_entries(family_id, now, days=30, before=2 ** 63 - 1, limit=-1):
    """Return `limit` of the entries deleted in the last `days` days before seq `before`, newest first, with
    `restore_seq`: their last live version."""
    return [dict(entry_dict(r), restore_seq=r['restore_seq']) for r in db.execute("""
        SELECT e.*, (SELECT MAX(seq) FROM changes WHERE entry_id = e.id AND NOT deleted) AS restore_seq
        FROM entries e JOIN changes c ON c.seq = e.seq WHERE e.family_id = ? AND e.deleted AND c.at >= ? AND e.seq < ?
        ORDER BY e.seq DESC LIMIT ?""", (family_id, now - days * DAY_MS, before, limit))]


###############################################################################
# Sync #########################################################################
###############################################################################

ID_PATTERN = re.compile(r'[A-Za-z0-9_-]{1,64}')
ENTRY_FIELDS = ('ts', 'type', 'value', 'deleted')


def validate_entry_fields(entry, now, need_all):
    """Return the valid wire fields of an entry message (id, ts, type, value, deleted, updated_at)."""
    if not isinstance(entry, dict):
        raise Invalid('entry must be an object')
    if not isinstance(entry.get('id'), str) or not ID_PATTERN.fullmatch(entry['id']):
        raise Invalid('entry id must be 1-64 characters of A-Z a-z 0-9 _ -')
    fields = {'id': entry['id']}
    if 'ts' in entry:
        fields['ts'] = check_int(entry['ts'], 'ts')
        if not MIN_TS <= fields['ts'] <= now + DAY_MS:
            raise Invalid('ts must be between 2000-01-01 and one day from now')
    if 'type' in entry:
        fields['type'] = check_text(entry['type'], 'type', 1, 64)
    if 'value' in entry:
        fields['value'] = check_text(entry['value'], 'value', 0, 4096)
    if 'deleted' in entry:
        fields['deleted'] = check_bool(entry['deleted'], 'deleted')
    if entry.get('updated_at') is not None:
        fields['updated_at'] = check_int(entry['updated_at'], 'updated_at')
        if fields['updated_at'] < 0:
            raise Invalid('updated_at must not be negative')
    missing = [name for name in ('ts', 'type', 'value') if need_all and name not in fields]
    if missing:
        raise Invalid(f'entry needs {", ".join(missing)}')
    return fields


def wins(new, old):
    """Tell whether state `new` beats stored state `old` (last write wins, then a fixed tie-break).

    On equal updated_at the larger (deleted, ts, type, value) tuple wins, so every arrival order
    of the same writes ends in the same state.
    """
    key = lambda e: (e['updated_at'], bool(e['deleted']), e['ts'], e['type'], e['value'])
    return key(new) > key(old)


entry_counts = {}  # family id -> (entries, the family's highest seq then): counted once, not on every write


def check_family_room(family_id, seq, top, new, room=False):
    """Refuse a new entry past FAMILY_MAX_ENTRIES unless an import checked its `room`; `seq` is the one it takes,
    `top` the family's highest now. Its count is kept while `top` is one we gave; after any other writer, a new
    entry recounts."""
    count, seen = entry_counts.get(family_id, (None, None))
    if count is None or seen != top:
        if not new:
            return
        count = db.execute('SELECT COUNT(*) FROM entries WHERE family_id = ?', (family_id,)).fetchone()[0]
    if new and not room and count >= FAMILY_MAX_ENTRIES:
        raise Invalid(f'this family has reached its limit of {FAMILY_MAX_ENTRIES} entries')
    entry_counts[family_id] = (count + new, seq)


change_counts = {}  # family id -> (change-log rows, its highest seq then, where the last trim stopped): as entry_counts


def trim_changes(family_id, seq, top):
    """Keep a family's change log within 2 x FAMILY_MAX_ENTRIES rows before row `seq` joins it (`top`: the family's
    highest seq now): past that, drop its oldest versions that no entry holds now, a hundredth of the bound at a
    time so the next writes drop none."""
    count, seen, low = change_counts.get(family_id, (None, None, 0))
    if count is None or seen != top:
        count, low = db.execute('SELECT COUNT(*) FROM changes WHERE family_id = ?', (family_id,)).fetchone()[0], 0
    # at most FAMILY_MAX_ENTRIES versions are current, so there is always enough to drop; the search goes on from
    # where the last one stopped (not past every current version again), and from the start when a version
    # below that was superseded since
    for start in (low, 0) if count >= 2 * FAMILY_MAX_ENTRIES else ():
        want = count + 1 - 2 * FAMILY_MAX_ENTRIES + FAMILY_MAX_ENTRIES // 50
        dropped = [row[0] for row in db.execute("""
            DELETE FROM changes WHERE seq IN (SELECT seq FROM changes c WHERE family_id = ? AND seq > ?
              AND NOT EXISTS (SELECT 1 FROM entries WHERE id = c.entry_id AND seq = c.seq)
              ORDER BY seq LIMIT ?) RETURNING seq""",
            (family_id, start, want))]
        count, low = count - len(dropped), max(dropped, default=low)
        if len(dropped) == want:
            break
    change_counts[family_id] = (count + 1, seq, low)


def apply_entry(family_id, action, message, by, now=None, room=False):
    """Apply one client write under the sync rules; return (outcome, action, entry), or raise Invalid to refuse it.
    outcome is 'accepted' (broadcast to the family), 'repeat' or 'stale' (answer the sender alone).
    room: the family's room was checked already (an import's)."""
    now = now_ms() if now is None else now
    if action == 'delete':
        fields = validate_entry_fields({'id': message.get('id'), 'updated_at': message.get('updated_at')}, now, False)
        fields['deleted'] = True
    elif action in ('add', 'update'):
        fields = validate_entry_fields(message.get('entry'), now, action == 'add')
    else:
        raise Invalid('action must be add, update or delete')
    updated_at = fields.get('updated_at', now)
    if updated_at > now + CLOCK_SKEW_MS:
        updated_at = now  # clock guard: a device far ahead of us is pulled back to our clock
    with transaction():
        stored = one('SELECT * FROM entries WHERE id = ?', fields['id'])
        if stored and stored['family_id'] != family_id:
            raise Invalid('entry id is already in use')
        if stored is None and not {'ts', 'type', 'value'} <= fields.keys():
            raise Invalid('no such entry')
        stored = entry_dict(stored) if stored else None
        old = {name: stored[name] for name in ENTRY_FIELDS} if stored else {'deleted': False}
        new = {**old, **{name: fields[name] for name in ENTRY_FIELDS if name in fields}}
        if stored and new == old:
            return 'repeat', action, stored
        new['updated_at'] = updated_at
        if stored and not wins(new, stored):
            return 'stale', 'update', stored
        # every entry's seq is its newest change's, so the change log's rowids give both numbers
        seq, top = db.execute("""SELECT (SELECT COALESCE(MAX(seq), 0) + 1 FROM changes),
                                        (SELECT MAX(seq) FROM changes WHERE family_id = ?)""", (family_id,)).fetchone()
        check_family_room(family_id, seq, top, new=stored is None, room=room)
        row = (seq, fields['id'], family_id, *(new[name] for name in ENTRY_FIELDS), new['updated_at'], by)
        db.execute("""INSERT INTO entries (seq, id, family_id, ts, type, value, deleted, updated_at, by)
                      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET ts = excluded.ts,
                        type = excluded.type, value = excluded.value, deleted = excluded.deleted,
                        updated_at = excluded.updated_at, seq = excluded.seq, by = excluded.by""", row)
        # the change log, in the same transaction; an entry's seq only grows, so its rows' seqs are unique too
        trim_changes(family_id, seq, top)
        db.execute("""INSERT INTO changes (seq, entry_id, family_id, ts, type, value, deleted, updated_at, by, at)
                      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", (*row, now))
    kind = 'add' if stored is None else 'delete' if new['deleted'] else 'update'
    return 'accepted', kind, {'id': fields['id'], **new, 'seq': seq, 'by': by}


def restore_entry(family_id, entry_id, seq, by, now=None):
    """Make version `seq` of an entry current again, written by `by`: apply_entry's answer, or None."""
    version = one('SELECT * FROM changes WHERE seq = ? AND entry_id = ? AND family_id = ?',
                  seq, entry_id, family_id) if 0 < seq < 2 ** 63 else None
    if version is None:
        return None
    now = now_ms() if now is None else now
    current = one('SELECT updated_at FROM entries WHERE id = ?', entry_id)['updated_at']
    # now, or just after the current version when a device's clock ran ahead of ours: a restore always wins
    entry = {'id': entry_id, 'ts': version['ts'], 'type': version['type'], 'value': version['value'],
             'deleted': bool(version['deleted']), 'updated_at': max(now, current + 1)}
    return apply_entry(family_id, 'update', {'entry': entry}, by, now)


# Import (README "History, restore and import"): babytrackd's own CSV and JSON exports, and Huckleberry's CSV export.
IMPORT_MAX = 5 * 1024 * 1024
HUCKLEBERRY_COLUMNS = {'Type', 'Start', 'End', 'Start Condition', 'Start Location', 'End Condition'}
BREAST_SIDES = re.compile(r'(\d+):(\d+)(?::\d+)?\s*([LR])\b', re.IGNORECASE)  # '0:10R', '00:04L', '0:10L, 0:05R'
IMPORT_CHUNK, IMPORT_TURN = 200, 0.005  # entries per transaction; seconds an import may hold the loop between turns
last_turn = [0.0]


def take_turn():
    """Give the event loop a turn if an import has held it IMPORT_TURN seconds (never inside a transaction)."""
    if time.perf_counter() - last_turn[0] >= IMPORT_TURN:
        gevent.idle()  # sleep(0) could run this greenlet again before the loop looks at sockets
        last_turn[0] = time.perf_counter()


def import_id(family_id, *source):
    """Derive an entry id from the family and its source row: importing the same file again finds the same ids."""
    return 'imp-' + hashlib.sha256('\x1f'.join(map(str, (family_id, *source))).encode()).hexdigest()[:40]


def local_ms(text, tz, name, fold=0):
    """Return the milliseconds of local 'YYYY-MM-DD HH:MM[:SS]' in zone tz (a time that happens twice: fold 0 first)."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise Invalid(f'{name} must look like 2026-11-03 19:42, not "{text[:40]}"') from None
    return int(moment.replace(tzinfo=moment.tzinfo or zoneinfo.ZoneInfo(tz), fold=fold).timestamp() * 1000)


def huckleberry_entries(row, tz):
    """Return the (ts, type, value) entries of one Huckleberry row, or a name to count it under as skipped."""
    kind, conditions = row['Type'].strip(), f"{row['Start Condition']} {row['End Condition']}"
    if kind not in ('Sleep', 'Feed', 'Diaper'):
        return kind or '(no type)'
    start = local_ms(row['Start'], tz, 'Start')
    if kind == 'Sleep':
        if not row['End'].strip():
            return [(start, 'sleep', 'sleeping')]  # still asleep when exported
        end = local_ms(row['End'], tz, 'End')
        if end < start:  # the end fell in the repeated hour of an autumn night: its second pass
            end = local_ms(row['End'], tz, 'End', fold=1)
        return [(start, 'sleep', 'sleeping'), (end, 'sleep', 'awake')]
    if kind == 'Feed':
        if 'bottle' in row['Start Location'].lower():
            return [(start, 'feed', 'bottle')]
        found, at = [], start
        for hours, minutes, side in BREAST_SIDES.findall(conditions):  # each side in turn, as listed
            if int(hours) or int(minutes):
                found.append((at, 'feed', 'breast left' if side.upper() == 'L' else 'breast right'))
                at += (int(hours) * 60 + int(minutes)) * 60000
        return found or 'Feed (no side or bottle)'
    said = conditions.lower()  # a Diaper: 'Pee', 'Poo:small', 'Pee + Poo', 'Both, pee:medium poo:medium', 'Dry'
    wet, dirty = 'pee' in said or 'both' in said, 'poo' in said or 'both' in said
    if not (wet or dirty):
        return 'Diaper (dry)'
    return [(start, 'nappy', 'wet + dirty' if wet and dirty else 'wet' if wet else 'dirty')]


def huckleberry_rows(text, family):
    """Yield (where, None, entries or a skip name) for each row of a Huckleberry export."""
    for where, row in csv_rows(text, HUCKLEBERRY_COLUMNS):
        try:
            made = huckleberry_entries(row, family['tz'])
        except Invalid as error:
            raise Invalid(f'{where}: {error}') from None
        # logged as it happened (updated_at = ts); the id stays the same however the notes change later
        yield where, None, made if isinstance(made, str) else (  # made one at a time: a feed cell can list 20,000
            {'id': import_id(family['id'], 'huckleberry', row['Type'].strip(), ts, value), 'ts': ts, 'type': kind,
             'value': value, 'updated_at': ts} for ts, kind, value in made)


def json_export(text):
    """Return the "entries" list of babytrackd's JSON export, or raise Invalid."""
    try:
        document = parse_json(text)  # once per import: the survey's list is the store's (a thread would not help: GIL)
    except (ValueError, RecursionError) as error:
        raise Invalid(f'Line {getattr(error, "lineno", 1)}: this is not valid JSON.') from None
    listed = document.get('entries') if isinstance(document, dict) else None
    if not isinstance(listed, list):
        raise Invalid('Line 1: this JSON is not a babytrackd export (it has no "entries" list).')
    return listed


def export_rows(source):
    """Yield (where, source id, fields) for each entry of babytrackd's JSON (its entries list) or CSV export."""
    if isinstance(source, list):  # 'deleted' for a tombstone
        for number, item in enumerate(source, start=1):
            if not isinstance(item, dict):
                raise Invalid(f'Entry {number}: not an object.')
            fields = {name: item.get(name) for name in ('ts', 'type', 'value', 'updated_at')}
            yield f'Entry {number}', item.get('id', ''), 'deleted' if item.get('deleted') else fields
        return
    unquote = lambda text: text[1:] if text[:1] == "'" and text[1:2] in tuple("=+-@\t\r'") else text  # see the export
    for where, row in csv_rows(source, {'id', 'ts', 'type', 'value'}):
        try:
            ts, updated_at = int(row['ts']), int(row.get('updated_at') or row['ts'])
        except ValueError:
            raise Invalid(f'{where}: ts and updated_at must be whole numbers of milliseconds.') from None
        yield where, row['id'].strip(), {'ts': ts, 'updated_at': updated_at, 'type': unquote(row['type']),
                                         'value': unquote(row['value'])}


def csv_rows(text, columns):
    """Yield ('Line N', {column: cell}) for each non-blank record; its header must name `columns`."""
    reader = csv.reader(io.StringIO(text, newline=''))
    try:
        header = [name.strip() for name in next(reader, [])]
        if not columns <= set(header):
            raise Invalid('Line 1: this is neither a babytrackd export nor a Huckleberry CSV export '
                          '(its first line should name the columns).')
        for cells in reader:
            take_turn()  # blank records too
            if any(cell.strip() for cell in cells):
                yield f'Line {reader.line_num}', dict(zip(header, cells + [''] * len(header)))
    except csv.Error as error:  # e.g. a cell over csv's field limit (128 KiB)
        raise Invalid(f'Line {reader.line_num}: this CSV cannot be read ({error}).') from None


def import_entries(family, source, now, skipped):
    """Yield an import file's entries, validated; count skipped rows by kind; Invalid names the line."""
    # Holds a CSV file as its text, read twice (check, then store), rather than as ~800,000 entries.
    first = re.match(r'[^\r\n]*', source.lstrip())[0] if isinstance(source, str) else ''
    huckleberry = HUCKLEBERRY_COLUMNS <= {name.strip().strip('"') for name in first.split(',')}
    rows = huckleberry_rows(source, family) if huckleberry else export_rows(source)
    for where, source_id, made in rows:
        take_turn()
        if isinstance(made, str):
            skipped[made] = skipped.get(made, 0) + 1
            continue
        for entry in made if source_id is None else [made]:
            take_turn()
            try:
                if source_id is not None:  # an export of this family keeps its ids; another family's get derived ones
                    source_id = validate_entry_fields({'id': source_id}, now, False)['id']
                    ours = one('SELECT 1 FROM entries WHERE id = ? AND family_id = ?', source_id, family['id'])
                    entry['id'] = source_id if ours else import_id(family['id'], 'babytrackd', source_id)
                yield validate_entry_fields(entry, now, True)
            except Invalid as error:
                raise Invalid(f'{where}: {error}') from None


def check_import_room(family_id, new):
    """Refuse an import whose `new` entries would take the family past FAMILY_MAX_ENTRIES."""
    held = db.execute('SELECT COUNT(*) FROM entries WHERE family_id = ?', (family_id,)).fetchone()[0]
    if held + new > FAMILY_MAX_ENTRIES:
        raise Invalid(f'This file would take the family past its limit of {FAMILY_MAX_ENTRIES:,} entries.')


def survey_import(family, data, now):
    """Read a whole import file, storing nothing: return (its source, {entries, skipped, from, to}, new entries)."""
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError:
        raise Invalid('The file is not UTF-8 text: export it again as CSV or JSON.') from None
    source = json_export(text) if text.lstrip().startswith('{') else text
    found, new = {'entries': 0, 'skipped': {}, 'from': None, 'to': None}, 0
    for entry in import_entries(family, source, now, found['skipped']):
        found['entries'] += 1
        found['from'], found['to'] = min(found['from'] or entry['ts'], entry['ts']), max(found['to'] or 0, entry['ts'])
        new += one('SELECT 1 AS held FROM entries WHERE id = ?', entry['id']) is None  # again: adds nothing
    check_import_room(family['id'], new)
    return source, found, new


###############################################################################
# Summaries ####################################################################
###############################################################################

def wall_clock(date, clock, tz):
    """Return the milliseconds of 'HH:MM' on `date` in zone `tz` (a time the clock skips reads as the old offset)."""
    moment = dt.datetime.combine(date, dt.time(*map(int, clock.split(':'))), zoneinfo.ZoneInfo(tz))
    return int(moment.timestamp() * 1000)


def day_window(date, tz):
    """Return (start_ms, end_ms) of the local day `date` (a datetime.date) in zone `tz`."""
    if not 1900 <= date.year <= 9000:  # keeps the date arithmetic here and on the pages in range
        raise Invalid('date must be between the years 1900 and 9000')
    return wall_clock(date, '00:00', tz), wall_clock(date + dt.timedelta(days=1), '00:00', tz)


def local_time(ms, tz):
    """Return the moment `ms` on the wall clock of zone `tz`."""
    return dt.datetime.fromtimestamp(ms / 1000, zoneinfo.ZoneInfo(tz))


def local_today(tz, now=None):
    """Return today's date in zone `tz`."""
    return local_time(now_ms() if now is None else now, tz).date()


def counted_labels(config):
    """Return {category: labels whose time counts} for the config's stateful categories."""
    return {group['category']: {b['label'] for b in group['buttons'] if b.get('counted')}
            for group in config if group.get('stateful')}


def spans_between(windows, threaded=False):
    """Return the states inside each window (family_id, category, start, stop), in window order, as
    (family_id, category, label, since, start, end); `since` is when the state began, before `start`
    for the one that carries in. A state lasts until the next entry of its category. `threaded`: the
    query runs apart from the loop (worth it for many windows, not for a few: the hand-over costs ~1 ms)."""
    if not windows:
        return []
    # Pairing each change with the next here costs less than half of SQLite's LEAD() (measured: readme-perf.md).
    sql = f"""
        WITH windows(n, family_id, type, start, stop) AS (VALUES {', '.join(['(?, ?, ?, ?, ?)'] * len(windows))})
        SELECT w.n, w.family_id, w.type, e.value, e.ts, w.start, w.stop FROM windows w
        JOIN entries e ON e.family_id = w.family_id AND e.type = w.type AND NOT e.deleted AND e.ts < w.stop
          AND e.ts >= COALESCE((SELECT ts FROM entries p WHERE p.family_id = w.family_id AND p.type = w.type
                                AND NOT p.deleted AND p.ts < w.start ORDER BY ts DESC LIMIT 1), w.start)
        ORDER BY w.n, e.ts, e.id"""
    args = [value for n, window in enumerate(windows) for value in (n, *window)]
    found = read_apart(sql, args) if threaded else db.execute(sql, args).fetchall()
    spans = []
    for row, ((n, family_id, category, label, since, start, stop), following) in enumerate(
            zip(found, found[1:] + [(None,) * 7])):
        begin, finish = max(since, start), following[4] if following[0] == n else stop
        if finish > begin:
            spans.append((family_id, category, label, since, begin, finish))
        if threaded and row % 500 == 499:
            gevent.idle()  # many windows: the sockets get a turn between slices of the pairing
    return spans


def state_spans(family_id, config, start, end, now):
    """Return spans_between's spans of the stateful categories in [start, min(end, now)), as dicts marked `counted`."""
    counted = counted_labels(config)
    return [{'category': category, 'label': label, 'start': begin, 'end': finish, 'since': since,
             'counted': label in counted[category]}
            for _, category, label, since, begin, finish
            in spans_between([(family_id, category, start, min(end, now)) for category in counted])]


def day_summary(family, date, now=None):
    """Return the summary of one local day for a family (README "The consultant's pages")."""
    now, tz, config = now_ms() if now is None else now, family['tz'], get_config(family['id'])
    start, end = day_window(date, tz)
    hours = [{'hour': local_time(slot, tz).hour, 'start': slot, 'events': []} for slot in range(start, end, 3600_000)]
    categories, wet, dirty = {group['category']: {'count': 0} for group in config}, 0, 0
    for entry in map(entry_dict, db.execute("""SELECT * FROM entries WHERE family_id = ? AND NOT deleted
                                               AND ts >= ? AND ts < ? ORDER BY ts, id""", (family['id'], start, end))):
        hours[(entry['ts'] - start) // 3600_000]['events'].append(entry)
        categories.setdefault(entry['type'], {'count': 0})['count'] += 1
        if entry['type'] == 'nappy':
            wet, dirty = wet + ('wet' in entry['value'].lower()), dirty + ('dirty' in entry['value'].lower())
    spans = state_spans(family['id'], config, start, end, now)
    for category in counted_labels(config):
        categories[category]['minutes'] = round(sum(s['end'] - s['start'] for s in spans
                                                    if s['category'] == category and s['counted']) / 60000)
    totals = {'sleep_minutes': categories.get('sleep', {}).get('minutes', 0),
              'feeds': categories.get('feed', {}).get('count', 0), 'wet': wet, 'dirty': dirty}
    return {'date': date.isoformat(), 'tz': tz, 'hours': hours, 'totals': totals,
            'categories': categories, 'spans': spans}


def families_today(families, now):
    """Return {family_id: {totals, states: [(label, since) still open]}} for today in each family's
    zone, from one span query and one count query for them all, both run apart from the loop."""
    if not families:
        return {}
    configs = dict(db.execute('SELECT family_id, data FROM configs').fetchall())
    counted = {f['id']: counted_labels(json.loads(configs[f['id']]) if f['id'] in configs else DEFAULT_CONFIG)
               for f in families}
    zones = {tz: day_window(local_today(tz, now), tz) for tz in {f['tz'] for f in families}}
    days = {f['id']: zones[f['tz']] for f in families}
    today = {family_id: {'states': [], 'totals': {'sleep_minutes': 0, 'feeds': 0, 'wet': 0, 'dirty': 0}}
             for family_id in days}
    spans = spans_between([(family_id, category, start, now) for family_id, (start, _) in days.items()
                           for category in counted[family_id]], threaded=True)
    gevent.idle()
    for family_id, category, label, since, begin, finish in spans:
        if category == 'sleep' and label in counted[family_id][category]:
            today[family_id]['totals']['sleep_minutes'] += finish - begin
        if finish == now:
            today[family_id]['states'].append((label, since))
    for family_id, feeds, wet, dirty in read_apart(f"""
            WITH days(family_id, start, stop) AS (VALUES {', '.join(['(?, ?, ?)'] * len(days))})
            SELECT d.family_id, SUM(e.type = 'feed'), SUM(e.type = 'nappy' AND e.value LIKE '%wet%'),
                   SUM(e.type = 'nappy' AND e.value LIKE '%dirty%')
            FROM days d JOIN entries e ON e.family_id = d.family_id AND e.type IN ('feed', 'nappy')
              AND e.ts >= d.start AND e.ts < d.stop AND NOT e.deleted
            GROUP BY d.family_id""", [value for family_id, window in days.items() for value in (family_id, *window)]):
        today[family_id]['totals'].update(feeds=feeds, wet=wet, dirty=dirty)
    for day in today.values():
        day['totals']['sleep_minutes'] = round(day['totals']['sleep_minutes'] / 60000)
    return today


def clock_minutes(ms, start, tz):
    """Return the minute of the wall clock where `ms` falls on the local day that began at `start` (1440 at its end)."""
    offset = lambda t: local_time(t, tz).utcoffset().total_seconds() / 60
    return round((ms - start) / 60000 + offset(ms) - offset(start), 1)


def sleep_chart(family, last, now=None, days=14):
    """Return the `days` local days up to date `last`: each day's sleep spans and feeds on the wall clock."""
    now, tz = now_ms() if now is None else now, family['tz']
    dates = [last - dt.timedelta(days=back) for back in range(days - 1, -1, -1)]
    windows = [day_window(date, tz) for date in dates]
    first, end = windows[0][0], windows[-1][1]
    sleeps = [(s['start'], s['end']) for s in state_spans(family['id'], get_config(family['id']), first, end, now)
              if s['category'] == 'sleep' and s['counted']]
    feeds = [ts for (ts,) in db.execute("""SELECT ts FROM entries WHERE family_id = ? AND type = 'feed' AND NOT deleted
                                           AND ts >= ? AND ts < ? ORDER BY ts""", (family['id'], first, end))]
    chart = []
    for date, (start, stop) in zip(dates, windows):
        # a day of 24 hours has no change of offset in it: its wall clock is the time since it began
        clock = ((lambda ms: round((ms - start) / 60000, 1)) if stop - start == DAY_MS
                 else lambda ms: clock_minutes(ms, start, tz))
        inside = [(max(begin, start), min(finish, stop)) for begin, finish in sleeps if begin < stop and finish > start]
        chart.append({'date': date, 'minutes': round(sum(finish - begin for begin, finish in inside) / 60000),
                      'sleep': [(clock(begin), max(0, clock(finish) - clock(begin))) for begin, finish in inside],
                      'feeds': [clock(ts) for ts in feeds if start <= ts < stop]})
    return chart


def when(ms, tz, now):
    """Name a moment on the family's clock: '19:42', 'yesterday 19:42' or 'Mon 3 Nov 19:42'."""
    return when_in_minute(ms, tz, now // 60000)  # the same answer all minute long: a reloaded page reuses it


@functools.lru_cache(maxsize=4096)
def when_in_minute(ms, tz, minute):
    """when(), for a `now` anywhere in `minute` (a day never begins inside a minute)."""
    moment, today = local_time(ms, tz), local_today(tz, minute * 60000)
    days = {today: '', today - dt.timedelta(days=1): 'yesterday ', today + dt.timedelta(days=1): 'tomorrow '}
    other = f'{moment:%a} {moment.day} {moment:%b} ' + (f'{moment.year} ' if moment.year != today.year else '')
    return days.get(moment.date(), other) + f'{moment:%H:%M}'


def ago(ms, now):
    """Say how long ago `ms` was: 'just now', '12 min ago', '3 h ago', '2 days ago'."""
    minutes = (now - ms) // 60000
    return ('just now' if minutes < 1 else f'{minutes} min ago' if minutes < 60 else f'{minutes // 60} h ago'
            if minutes < 1440 else '1 day ago' if minutes < 2880 else f'{minutes // 1440} days ago')


def hm(minutes):
    """Say a duration in minutes: '45 min', '6 h', '9 h 5 min'."""
    return f'{minutes} min' if minutes < 60 else f'{minutes // 60} h' + (f' {minutes % 60} min' if minutes % 60 else '')


def night_bounds(family, date):
    """Return (day start, night start, night end) of `date`: its day is [day start, night start), then its night."""
    tz, following = family['tz'], date + dt.timedelta(days=1)
    start_date = following if family['night_start'] <= family['night_end'] else date  # it starts after midnight
    return (wall_clock(date, family['night_end'], tz), wall_clock(start_date, family['night_start'], tz),
            wall_clock(following, family['night_end'], tz))


def night_report(family, days=14, end=None, now=None):
    """Return the family's days and nights up to `end`, oldest first (README "The sleep program"), from one query."""
    now, tz, hour = now_ms() if now is None else now, family['tz'], 3600 * 1000
    if end is None:
        end = local_today(tz, now)
        end -= dt.timedelta(days=night_bounds(family, end)[0] > now)  # today's day has not begun yet
    if not 1900 <= end.year <= 9000:
        raise Invalid('end must be between the years 1900 and 9000')
    dates = [end - dt.timedelta(days=back) for back in range(days - 1, -1, -1)]
    bounds = [night_bounds(family, date) for date in dates]
    start, stop = min(bounds[0][0], bounds[0][1] - 3 * hour), bounds[-1][2] + 3 * hour
    counted, runs = counted_labels(get_config(family['id'])).get('sleep', set()), []  # [since, end, asleep, closed]
    for ts, value, until in db.execute("""
            SELECT ts, value, LEAD(ts) OVER (ORDER BY ts, id) FROM entries
            WHERE family_id = ? AND type = 'sleep' AND NOT deleted AND ts < ?
              AND ts >= COALESCE((SELECT ts FROM entries WHERE family_id = ? AND type = 'sleep' AND NOT deleted
                                  AND ts < ? ORDER BY ts DESC LIMIT 1), ?)
            ORDER BY ts, id""", (family['id'], stop, family['id'], start, start)):
        if ts >= now:
            break
        span = [ts, min(now, until or now), value in counted, until is not None and until <= now]
        if runs and runs[-1][2] == span[2]:  # a state tapped twice is one run
            runs[-1][1:] = span[1:]
        elif span[1] > ts:
            runs.append(span)
    starts, plan, report = [run[0] for run in runs], get_plan(family['id']), []
    bed_days = bool(plan) and plan['bedtime'] <= family['night_end']  # a bedtime after midnight: the next date's
    off_plan = lambda ms, date, clock: round((ms - wall_clock(date, plan[clock], tz)) / 60000) if plan and ms else None
    for date, (day_start, night_start, night_end) in zip(dates, bounds):
        near = range(max(0, bisect.bisect_right(starts, day_start) - 1),
                     bisect.bisect_left(starts, night_end + 3 * hour))
        slept = [i for i in near if runs[i][2] and runs[i][0] < night_end and runs[i][1] > night_start]
        bed = next((i for i in slept if runs[i][0] >= night_start - 3 * hour), None)
        bedtime = runs[bed][0] if bed is not None else None
        night = [min(runs[i][1], night_end) - max(runs[i][0], night_start) for i in slept]
        last = runs[slept[-1]] if slept else None
        morning = last[1] if last and last[3] and last[1] <= night_end + 3 * hour else None
        wakings = [runs[i][1] - runs[i][0] for i in near if i and not runs[i][2] and runs[i][3]  # runs alternate: an
                   and night_start < runs[i][0] and runs[i][1] < night_end]  # awake one has a sleep on each side
        naps = [i for i in near if runs[i][2] and day_start <= runs[i][0] < night_start and i != bed]
        report.append({
            'date': date.isoformat(),
            'day': {'start': day_start, 'end': night_start, 'naps': len(naps),
                    'nap_minutes': round(sum(min(runs[i][1], night_start) - runs[i][0] for i in naps) / 60000),
                    'wake_windows': [round((runs[i - 1][1] - runs[i - 1][0]) / 60000) for i in naps + [bed] if i]},
            'night': {'start': night_start, 'end': night_end, 'bedtime': bedtime, 'morning_wake': morning,
                      'sleep_minutes': round(sum(night) / 60000), 'wakings': len(wakings),
                      'awake_minutes': round(sum(wakings) / 60000),
                      'longest_stretch_minutes': round(max(night, default=0) / 60000), 'complete': night_end <= now},
            'plan_diff': {'bedtime_minutes': off_plan(bedtime, date + dt.timedelta(days=bed_days), 'bedtime'),
                          'wake_minutes': off_plan(morning, date + dt.timedelta(days=1), 'wake')}})
    return {'days': report}


flags_cache = {}  # family id -> (what its flags were worked out from, its flags)


def cached_flags(families, now):
    """Return family_flags, working out again only the families whose inputs changed (a write, a link,
    the plan, the night window, the buttons) or all of them in a new minute (the flags that time brings)."""
    inputs = {row[0]: (*row[1:], now // 60000) for row in read_apart("""
        SELECT f.id, (SELECT MAX(seq) FROM changes WHERE family_id = f.id), f.plan, f.night_start, f.night_end,
               f.archived, f.tz, (SELECT updated_at FROM configs WHERE family_id = f.id),
               (SELECT group_concat(token || ':' || IFNULL(expires_at, '') || ':' || IFNULL(revoked_at, ''))
                FROM access_links WHERE family_id = f.id)
        FROM families f""", ())}
    stale = [f for f in families if flags_cache.get(f['id'], (None,))[0] != inputs[f['id']]]
    if stale:
        fresh = family_flags(stale, now)
        flags_cache.update({f['id']: (inputs[f['id']], fresh.get(f['id'], [])) for f in stale})
    return {f['id']: flags_cache[f['id']][1] for f in families}


def family_flags(families, now):
    """Return {family id: [(code, words)...]}: the triage flags of the active ones (README "Triage"), one query for
    all, run apart from the loop."""
    active, windows, nights = {f['id']: f for f in families if not f['archived']}, [], {}
    for family in active.values():  # each one's last complete night, on its own clock (worked out once per clock)
        clock = (family['tz'], family['night_start'], family['night_end'])
        if clock not in nights:
            yesterday = local_today(family['tz'], now) - dt.timedelta(days=1)
            nights[clock] = next(bounds[1:] for date in (yesterday, yesterday - dt.timedelta(days=1))
                                 if (bounds := night_bounds(family, date))[2] <= now)
        windows.append([family['id'], *nights[clock]])
    found = read_apart("""
        WITH windows AS MATERIALIZED (  -- each family's last complete night, and its counted sleep labels
          SELECT w.value ->> 0 AS family_id, w.value ->> 1 AS start, w.value ->> 2 AS stop,
                 CASE WHEN c.data IS NULL THEN :default_counted ELSE (SELECT json_group_array(b.value ->> 'label')
                   FROM json_each(c.data) g, json_each(g.value, '$.buttons') b WHERE g.value ->> 'category' = 'sleep'
                     AND g.value ->> 'stateful' AND b.value ->> 'counted') END AS counted
          FROM json_each(:windows) w LEFT JOIN configs c ON c.family_id = w.value ->> 0),
        turns AS (  -- its sleep entries, and the one carried in (none: one row of NULLs), each with the next one's time
          SELECT w.family_id, w.counted, w.start, e.ts, e.value IN (SELECT value FROM json_each(w.counted)) AS asleep,
                 LAG(e.value IN (SELECT value FROM json_each(w.counted))) OVER run AS before,
                 LEAD(e.ts, 1, w.stop) OVER run AS until
          FROM windows w LEFT JOIN entries e ON e.family_id = w.family_id AND e.type = 'sleep' AND NOT e.deleted
            AND e.ts < w.stop AND e.ts >= COALESCE((SELECT x.ts FROM entries x WHERE x.family_id = w.family_id
              AND x.type = 'sleep' AND NOT x.deleted AND x.ts < w.start ORDER BY x.ts DESC LIMIT 1), w.start)
          WINDOW run AS (PARTITION BY w.family_id ORDER BY e.ts, e.id)),
        nights AS (  -- a waking begins where asleep turns awake, unless the night ends before the next sleep
          SELECT family_id, counted, SUM(CASE WHEN asleep THEN until - MAX(ts, start) END) AS asleep_ms,
                 SUM(ts > start AND before AND NOT asleep)
                   - IFNULL(MAX(CASE WHEN ts > start AND before AND NOT asleep THEN ts END)
                            > IFNULL(MAX(CASE WHEN ts > start AND NOT before AND asleep THEN ts END), 0), 0) AS wakings
          FROM turns GROUP BY family_id),
        expiring AS (
          SELECT family_id, label, MIN(expires_at) AS expires_at FROM access_links
          WHERE revoked_at IS NULL AND expires_at > :now AND expires_at <= :now + 72 * 3600000 GROUP BY family_id)
        SELECT n.family_id, f.plan, n.asleep_ms, n.wakings, x.label, x.expires_at,
          EXISTS (SELECT 1 FROM access_links l WHERE l.family_id = n.family_id AND l.revoked_at IS NULL
                  AND (l.expires_at IS NULL OR l.expires_at > :now)) AS linked,
          (SELECT e.ts FROM entries e WHERE e.family_id = n.family_id AND NOT e.deleted AND e.ts <= :now
           ORDER BY e.ts DESC LIMIT 1) AS last_entry,
          (SELECT json_array(e.ts, e.value IN (SELECT value FROM json_each(n.counted)))
           FROM entries e WHERE e.family_id = n.family_id AND e.type = 'sleep' AND NOT e.deleted AND e.ts <= :now
           ORDER BY e.ts DESC LIMIT 1) AS state
        FROM nights n JOIN families f ON f.id = n.family_id LEFT JOIN expiring x ON x.family_id = n.family_id""",
        {'windows': json.dumps(windows), 'now': now,
         'default_counted': json.dumps(sorted(counted_labels(DEFAULT_CONFIG)['sleep']))})
    flags = {}
    for row in found:
        family, said = active[row['family_id']], []
        if row['linked'] and (row['last_entry'] or 0) <= now - DAY_MS:
            hours = (now - row['last_entry']) // 3600000 if row['last_entry'] else None
            said.append(('quiet', 'No entries yet' if hours is None else f'No entries for {hours} h' if hours < 48
                         else f'No entries for {hours // 24} days'))
        plan, minutes = json.loads(row['plan'] or 'null'), round((row['asleep_ms'] or 0) / 60000)
        # the longest night that is short: an hour under the plan's, or with no plan just under 10 h
        short = (day_minute(plan['wake']) - day_minute(plan['bedtime'])) % 1440 - 60 if plan else 599
        if minutes and minutes <= short:  # a night with no sleep logged at all is for `quiet` and `state_stuck` to say
            said.append(('short_night', f'Short night: {hm(minutes)}'))
        if (row['wakings'] or 0) >= 3:
            said.append(('many_wakings', f"{row['wakings']} wakings last night"))
        if row['expires_at']:
            moment, today = local_time(row['expires_at'], family['tz']), local_today(family['tz'], now)
            day = {today: 'today', today + dt.timedelta(days=1): 'tomorrow'}.get(moment.date(), f'{moment:%A}')
            said.append(('link_expiring', f"Link for {row['label']} expires {day}" if row['label']
                         else f'An unlabelled link expires {day}'))
        since, asleep = json.loads(row['state']) if row['state'] else (now, 0)
        hours = (now - since) // 3600000
        if hours >= 14:
            said.append(('state_stuck', f"{'Asleep' if asleep else 'Awake'} for {hours} h — a forgotten tap?"))
        flags[row['family_id']] = said
    return flags


###############################################################################
# Auth #########################################################################
###############################################################################

def hash_password(password, rounds=BCRYPT_ROUNDS):
    """Return the bcrypt hash of a password (run apart; bcrypt drops the GIL, so at normal priority)."""
    return apart(bcrypt.hashpw, password.encode()[:72], bcrypt.gensalt(rounds), idle=False).decode()


def password_matches(password, password_hash):
    """Tell whether the password matches the bcrypt hash (run apart)."""
    try:
        # bcrypt reads 72 bytes at most; bcrypt 5 refuses longer passwords rather than cut them
        return apart(bcrypt.checkpw, password.encode()[:72], password_hash.encode(), idle=False)
    except ValueError:
        return False


def hash_cost(password_hash):
    """Return a bcrypt hash's cost (the NN of $2b$NN$...), within what bcrypt accepts."""
    part = password_hash.split('$')[2:3]
    return min(max(int(part[0]), 4), 31) if part and re.fullmatch('[0-9]{1,18}', part[0]) else BCRYPT_ROUNDS


# A hash to check against when the username is unknown, made with the admin hash's own cost (an
# ADMIN_PASS given as a hash may have another than BCRYPT_ROUNDS), so both failures take the same time.
_DUMMY_HASH = None


def ensure_admin(username=ADMIN_USER, password=ADMIN_PASS):
    """Make `username` the one admin, with `password` if given (a new one ends sessions); return one made up, if any."""
    admin, generated = one('SELECT * FROM admins WHERE username = ?', username), None
    password_hash = admin['password_hash'] if admin else None  # kept when unchanged: sessions stay
    if not (password or admin):
        password = generated = secrets.token_urlsafe(12)
    if password and not (admin and (password == password_hash or password_matches(password, password_hash))):
        password_hash = password if password.startswith('$2') else hash_password(password)
    with transaction():
        if not admin or password_hash != admin['password_hash']:
            db.execute('DELETE FROM admin_sessions')
        db.execute('DELETE FROM admins WHERE username != ?', (username,))
        db.execute("""INSERT INTO admins (id, username, password_hash, created_at) VALUES (?, ?, ?, ?)
                      ON CONFLICT(username) DO UPDATE SET password_hash = excluded.password_hash""",
                   (uuid.uuid4().hex, username, password_hash, now_ms()))
    return generated


def authenticate(username, password):
    """Return the admin row for matching credentials, else None (same cost either way)."""
    global _DUMMY_HASH
    admin = one('SELECT * FROM admins WHERE username = ?', username) if isinstance(username, str) else None
    if not isinstance(password, str):
        return None
    if admin is None:
        stored = one('SELECT password_hash FROM admins')
        rounds = hash_cost(stored['password_hash']) if stored else BCRYPT_ROUNDS
        if not _DUMMY_HASH or hash_cost(_DUMMY_HASH) != rounds:
            _DUMMY_HASH = hash_password(secrets.token_hex(8), rounds)
    matches = password_matches(password, admin['password_hash'] if admin else _DUMMY_HASH)
    return admin if admin and matches else None


def session_key(token):
    """Return what the database stores for a session token (its hash, so a copy of the file grants nothing)."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(admin_id):
    """Start an admin session; return its cookie token."""
    token, now = secrets.token_urlsafe(32), now_ms()
    with transaction():
        db.execute('DELETE FROM admin_sessions WHERE expires_at < ?', (now,))
        db.execute('INSERT INTO admin_sessions (token, admin_id, expires_at, csrf) VALUES (?, ?, ?, ?)',
                   (session_key(token), admin_id, now + SESSION_DAYS * DAY_MS, secrets.token_urlsafe(24)))
    return token


def get_session(token):
    """Return the live session for a cookie token (with the admin's username), or None."""
    return one("""SELECT s.*, a.username FROM admin_sessions s JOIN admins a ON a.id = s.admin_id
                  WHERE s.token = ? AND s.expires_at > ?""", session_key(token), now_ms()) if token else None


def end_session(token):
    """End an admin session."""
    if token:
        with transaction():
            db.execute('DELETE FROM admin_sessions WHERE token = ?', (session_key(token),))


class RateLimiter:
    """Counts failures per client address in a sliding window, kept in SQLite so a restart forgets nothing."""

    def __init__(self, limit, window):
        self.limit, self.window = limit, window

    def retry_after(self, key, now=None):
        """Return the whole seconds until the address may try again (0 when it may now)."""
        now = time.time() if now is None else now
        oldest = one('SELECT at FROM login_failures WHERE address = ? AND at > ? ORDER BY at DESC LIMIT 1 OFFSET ?',
                     key, (now - self.window) * 1000, self.limit - 1)
        return max(1, math.ceil(oldest['at'] / 1000 + self.window - now)) if oldest else 0

    def fail(self, key, now=None):
        """Record one failure for the address, forgetting every failure whose window has passed."""
        at = int((time.time() if now is None else now) * 1000)
        with transaction():
            db.execute('DELETE FROM login_failures WHERE at <= ?', (at - self.window * 1000,))
            db.execute('INSERT INTO login_failures (address, at) VALUES (?, ?)', (key, at))

    def forgive(self, key):
        """Take back the address's latest failure (the attempt it stood for succeeded)."""
        with transaction():
            db.execute("""DELETE FROM login_failures WHERE rowid = (
                            SELECT rowid FROM login_failures WHERE address = ? ORDER BY at DESC LIMIT 1)""", (key,))


login_limiter = RateLimiter(LOGIN_FAILURES, LOGIN_WINDOW)


def log_in(address, username, password):
    """Return (a new session token, None) for the admin's credentials, else (None, (status, message, headers))."""
    if seconds := login_limiter.retry_after(address):
        minutes = math.ceil(seconds / 60)
        return None, (429, f"Too many failed logins. Try again in {minutes} minute{'s' if minutes > 1 else ''}.",
                      {'Retry-After': str(seconds)})
    login_limiter.fail(address)  # counted before bcrypt runs, so parallel guesses count too
    admin = authenticate(username, password)
    if admin is None:
        stats['login_failures'] += 1
        return None, (401, 'Wrong username or password.', {})
    login_limiter.forgive(address)
    return create_session(admin['id']), None


###############################################################################
# Hub ##########################################################################
###############################################################################

# The server side of PROTOCOL.md. Each socket is a Peer, registered per family in the Hub; it gets
# `init` (read page by page as the socket drains), and every other device gets `presence`. Each
# accepted write is committed first, then broadcast to the family, the sender included (its
# acknowledgement). A frame goes straight to the socket when nothing waits and the kernel takes it
# whole; else it waits in the peer's queue for its one writer greenlet, so one slow phone never
# delays the others nor fills the memory (past WS_SEND_BUFFER, or 30 s without progress: 1013).
# The hub ticks every second: pings (each peer at its own moment, so a thousand never answer at
# once), silence, expired links and closes the peer did not answer.
# gevent-websocket reads frames without a size cap, answers control frames from the reading
# greenlet and drops close codes; this chapter reads and writes frames itself to fix all three.

OP_TEXT, OP_BINARY, OP_CLOSE = WebSocket.OPCODE_TEXT, WebSocket.OPCODE_BINARY, WebSocket.OPCODE_CLOSE
OP_PING, OP_PONG = WebSocket.OPCODE_PING, WebSocket.OPCODE_PONG
CLOSE_GOING_AWAY, CLOSE_PROTOCOL, CLOSE_UNSUPPORTED = 1001, 1002, 1003
CLOSE_BAD_DATA, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN, CLOSE_REVOKED = 1007, 1009, 1013, 4403
WS_STALL_SECONDS = 30  # unsent data that makes no progress this long: the peer is not reading


class CloseConnection(Exception):
    """A peer broke the framing rules: close with args (code, reason)."""


def encode(message):
    """Return a message as compact JSON, as the server writes every message."""
    return json.dumps(message, separators=(',', ':'))


def frame(opcode, payload=b'', fin=True):
    """Return one unmasked WebSocket frame (with fin=False, not the message's last)."""
    return Header.encode_header(fin, opcode, b'', len(payload), 0) + payload


def unmask(payload, mask):
    """Undo a client frame's XOR mask, as one big-integer operation (gevent-websocket loops per byte)."""
    size = len(payload)
    key = int.from_bytes((mask * (size // 4 + 1))[:size], 'big')
    return (int.from_bytes(payload, 'big') ^ key).to_bytes(size, 'big')


def utf8(data, reason):
    """Return data decoded as UTF-8, else close the connection (1007) with the reason."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CloseConnection(CLOSE_BAD_DATA, reason) from None


class Peer:
    """One live WebSocket: its link, its send queue and, while the socket is backed up, its writer."""

    __slots__ = ('ws', 'sock', 'family_id', 'token', 'label', 'expires_at', 'queue', 'writer', 'unsent',
                 'progress_at', 'held', 'last_heard', 'ping_at', 'closing_since', 'closed')

    def __init__(self, ws, link):
        self.ws, self.sock = ws, ws.handler.socket
        self.family_id, self.token = link['family_id'], link['token']
        self.label, self.expires_at = link['label'] or 'device', link['expires_at']
        self.queue, self.writer, self.closing_since, self.closed = deque(), None, None, False
        self.unsent, self.progress_at, self.held = 0, None, None  # bytes queued; last write; see send_parts
        self.last_heard = time.monotonic()
        self.ping_at = self.last_heard + random.uniform(0, WS_PING_INTERVAL)  # spread: no ping storms

    def _write(self, wait=True):
        """Write the queued frames in order until none are left: the writer greenlet waits for the socket,
        the sender (not `wait`) writes what it takes at once. An empty queue means nothing is half sent."""
        try:
            while self.queue:
                sent = self.sock.send(self.queue[0], 0, timeout=self.sock.timeout if wait else 0.0)
                self.unsent -= sent
                self.progress_at = time.monotonic()
                if sent < len(self.queue[0]):
                    self.queue[0] = memoryview(self.queue[0])[sent:]  # no copy of a large frame per write
                else:
                    self.queue.popleft()
        except BlockingIOError:  # without `wait`: the writer greenlet takes over
            self.progress_at = time.monotonic()
        except OSError:
            self.shutdown()

    def send(self, message):
        """Send a message as one text frame (see send_frame)."""
        self.send_frame(frame(OP_TEXT, encode(message).encode()))

    def send_frame(self, data, part=False):
        """Send one frame: at once while the socket takes it, else queued for a writer greenlet; a peer
        past WS_SEND_BUFFER is closed. While a message goes out in parts, other messages wait in `held`."""
        if self.closing_since is not None:
            return
        if self.unsent + len(data) > WS_SEND_BUFFER:
            self.too_slow()
            return
        self.unsent += len(data)
        if self.held is not None and not part and not data[0] & 0x08:  # only control frames may split a message
            self.held.append(data)
            return
        self.queue.append(data)
        if len(self.queue) == 1:  # the usual case: nothing waits, so write now, never blocking the sender
            self._write(wait=False)
        if self.queue and not self.closed and (self.writer is None or self.writer.dead):
            self.writer = gevent.spawn(self._write)

    def too_slow(self):
        """Drop what waits (but the frame being written) and close with 1013: the peer cannot keep up."""
        stats['slow_closed'] += 1
        while len(self.queue) > 1:
            self.queue.pop()
        self.held = [] if self.held is not None else None
        self.unsent = sum(map(len, self.queue))
        self.close(CLOSE_TRY_AGAIN, 'too slow')

    def send_parts(self, parts):
        """Send one text message made of parts: whole when small, else in fragments of about 64 KiB,
        each once the socket has taken the one before, so a large message never waits in memory whole."""
        self.held, opcode, pending = [], OP_TEXT, b''
        for part in parts:
            pending += part.encode()
            if len(pending) < MAX_MESSAGE:
                continue
            if self.writer is not None:
                self.writer.join()  # ends when the queue is empty, or when the socket is shut down
            if self.closing_since is not None:
                break
            self.send_frame(frame(opcode, pending, fin=False), part=True)
            opcode, pending = 0, b''  # continuation frames from here on
            gevent.sleep(0)  # a long init never holds up the other sockets
        held, self.held = self.held, None
        self.send_frame(frame(opcode, pending))
        self.unsent -= sum(map(len, held))
        for data in held:
            self.send_frame(data)

    def close(self, code, reason=''):
        """Send a close frame with its code; the socket is shut down when the peer answers or after a second."""
        if self.closing_since is None:
            self.send_frame(frame(OP_CLOSE, struct.pack('!H', code) + reason.encode()[:120]))
            self.closing_since = time.monotonic()

    def shutdown(self):
        """End the connection at once, waking the reading greenlet."""
        if self.closed:
            return
        self.closed = True
        self.closing_since = self.closing_since or time.monotonic()
        if self.writer is not None and gevent.getcurrent() is not self.writer:
            self.writer.kill(block=False)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def receive(self):
        """Return the next text message, or None once the connection is over (closed as it must be)."""
        try:
            text = self.read_message()
        except CloseConnection as error:
            stats['messages_refused'] += 1
            self.close(*error.args)
            with gevent.Timeout(1, False):  # read until the peer closes, so our close frame is not lost to a reset
                while self.sock.recv(65536):
                    pass
            return None
        except (OSError, WebSocketError):  # the peer vanished: EOF or reset
            return None
        if text is None:
            self.close(1000)
        return text

    def read_message(self):
        """Return the next text message, or None when the peer has gone; raise CloseConnection on abuse."""
        parts, size, opcode = [], 0, None
        stream = self.ws.stream
        while True:
            try:
                header = Header.decode_header(stream)
            except ProtocolError as error:  # fragmented or oversized control frame
                raise CloseConnection(CLOSE_PROTOCOL, str(error)[:100]) from None
            if header.flags or not header.mask:
                raise CloseConnection(CLOSE_PROTOCOL, 'frames must be masked, without extensions')
            size += header.length if header.opcode in (OP_TEXT, OP_BINARY, 0) else 0  # pings never add up
            if size > MAX_MESSAGE:
                raise CloseConnection(CLOSE_TOO_BIG, 'message over 64 KiB')
            payload = stream.read(header.length) if header.length else b''
            if len(payload) != header.length:
                return None
            payload = unmask(payload, header.mask)
            self.last_heard = time.monotonic()
            if header.opcode == OP_CLOSE:  # RFC 6455 7.4: no code, or one that may be sent, then UTF-8
                code = int.from_bytes(payload[:2], 'big') if payload else 1000  # a lone byte reads as a code under 1000
                if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
                    raise CloseConnection(CLOSE_PROTOCOL, 'close code not allowed')
                utf8(payload[2:], 'close reason must be UTF-8')
                return None
            if header.opcode == OP_PING:
                self.send_frame(frame(OP_PONG, payload))
            if header.opcode in (OP_PING, OP_PONG):
                continue
            if header.opcode in (OP_TEXT, OP_BINARY):
                if opcode is not None:
                    raise CloseConnection(CLOSE_PROTOCOL, 'new message inside a fragmented one')
                opcode = header.opcode
            elif header.opcode != 0 or opcode is None:
                raise CloseConnection(CLOSE_PROTOCOL, 'unexpected frame')
            parts.append(payload)
            if header.fin:
                break
        if opcode == OP_BINARY:
            raise CloseConnection(CLOSE_UNSUPPORTED, 'binary messages are not accepted')
        return utf8(b''.join(parts), 'messages must be UTF-8 text')


class Hub:
    """Live sockets per family: broadcast, presence, heartbeat and revocation."""

    def __init__(self):
        self.families = {}  # family id -> set of Peer

    def start(self):
        """Start the once-a-second heartbeat (twice a ping interval, when that is shorter)."""
        def beat():
            while True:
                gevent.sleep(min(1.0, WS_PING_INTERVAL / 2))
                try:
                    self.tick(time.monotonic(), now_ms())
                except Exception:
                    log.exception('hub tick failed')
        gevent.spawn(beat)

    def peers(self, family_id=None):
        """Return a copy of the family's peers (or every peer), safe to iterate while others change."""
        if family_id is not None:
            return list(self.families.get(family_id, ()))
        return [peer for group in self.families.values() for peer in group]

    def members(self, family_id):
        """Return the labels of the links with a live socket in the family, one per link."""
        labels = {peer.token: peer.label for peer in self.peers(family_id) if peer.closing_since is None}
        return sorted(labels.values(), key=str.lower)

    def join(self, ws, link):
        """Register a new socket; return its Peer."""
        peer = Peer(ws, link)
        self.families.setdefault(peer.family_id, set()).add(peer)
        stats['sockets_opened'] += 1
        return peer

    def leave(self, peer):
        """Unregister a socket and tell the family who is left."""
        group = self.families.get(peer.family_id)
        if group and peer in group:
            group.discard(peer)
            if not group:
                del self.families[peer.family_id]
            self.broadcast(peer.family_id, {'type': 'presence', 'members': self.members(peer.family_id)})
        if peer.closing_since is not None and not peer.closed and peer.writer is not None:
            peer.writer.join(timeout=1)  # let the queued close frame go out first
        peer.shutdown()

    def broadcast(self, family_id, message):
        """Send one message to every socket of the family (encoded and framed once)."""
        data = frame(OP_TEXT, encode(message).encode())
        for peer in self.peers(family_id):
            peer.send_frame(data)
        stats['messages_out'] += len(self.families.get(family_id, ()))

    def close_where(self, test, code, reason):
        """Close every peer for which test(peer) is true."""
        for peer in self.peers():
            if test(peer):
                peer.close(code, reason)

    def close_link(self, token):
        """Close the sockets opened with a link."""
        self.close_where(lambda peer: peer.token == token, CLOSE_REVOKED, 'link revoked')

    def close_family(self, family_id):
        """Close every socket of a family."""
        self.close_where(lambda peer: peer.family_id == family_id, CLOSE_REVOKED, 'family archived')

    def close_all(self):
        """Close every socket (shutdown)."""
        self.close_where(lambda peer: True, CLOSE_GOING_AWAY, 'server restarting')

    def tick(self, now_mono, now_wall):
        """Expire links, ping, drop the silent and finish unanswered closes (a turn for the loop every 200 peers:
        a timer, which always comes back, where gevent.idle() waits for a loop with nothing else to do)."""
        for number, peer in enumerate(self.peers(), 1):
            if number % 200 == 0:
                gevent.sleep(0.001)
            if peer.closing_since is not None:
                if now_mono - peer.closing_since > 1:
                    peer.shutdown()
            elif peer.queue and now_mono - peer.progress_at > WS_STALL_SECONDS:  # pongs are no progress
                log.info('socket closed after 30 s without reading family=%s', peer.family_id)
                peer.too_slow()
            elif peer.expires_at is not None and peer.expires_at <= now_wall:
                peer.close(CLOSE_REVOKED, 'link expired')
            elif now_mono - peer.last_heard > 3 * WS_PING_INTERVAL:
                log.info('socket dropped after silence family=%s', peer.family_id)
                peer.shutdown()
            elif now_mono >= peer.ping_at:
                peer.ping_at = now_mono + WS_PING_INTERVAL
                peer.send_frame(frame(OP_PING))


hub = Hub()
stats = dict.fromkeys(['requests_2xx', 'requests_3xx', 'requests_4xx', 'requests_5xx', 'sockets_opened',
                       'messages_in', 'messages_out', 'entries_accepted', 'messages_refused',
                       'login_failures', 'slow_closed'], 0)


def parse_message(text):
    """Return a client message as a dict, or raise Invalid."""
    try:
        message = parse_json(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack allows
        raise Invalid('message is not valid JSON') from None
    if not isinstance(message, dict):
        raise Invalid('message must be a JSON object')
    return message


class Busy(Invalid):
    """A message refused for a while, not for what it says: Busy(reason, retry_after). The answer names
    no id, so the device keeps it and sends it again after `retry_after` seconds."""


write_budgets = {}  # link token -> (messages left, when): outlives the link's sockets, so reconnecting refills nothing


def spend_write(token):
    """Take one writing message from the link's budget (a token bucket); return 0, or the seconds to wait."""
    now = time.monotonic()
    left, then = write_budgets.get(token, (WS_WRITE_BURST, now))
    left = min(WS_WRITE_BURST, left + (now - then) * WS_WRITE_RATE)
    if left < 1:
        write_budgets[token] = (left, now)
        return math.ceil((1 - left) / WS_WRITE_RATE)
    if len(write_budgets) > 10_000:  # forget the links whose bucket is full again: that is what a new one is
        for other, (was, at) in list(write_budgets.items()):
            if was + (now - at) * WS_WRITE_RATE >= WS_WRITE_BURST:
                del write_budgets[other]
    write_budgets[token] = (left - 1, now)
    return 0


def publish_entry(family_id, outcome, action, entry):
    """Send a write apply_entry accepted to the family's devices; tell whether it was accepted."""
    if outcome == 'accepted':
        stats['entries_accepted'] += 1
        hub.broadcast(family_id, {'type': 'entry', 'action': action, 'entry': entry})
    return outcome == 'accepted'


def handle_message(peer, message):
    """Act on one client message: store, then broadcast or answer the sender."""
    kind = message.get('type')
    if kind in ('entry', 'config') and (wait := spend_write(peer.token)):
        raise Busy('too many messages', wait)
    if kind == 'ping':
        peer.send({'type': 'pong'})
    elif kind == 'entry':
        outcome, action, entry = apply_entry(peer.family_id, message.get('action'), message, peer.label)
        reply = {'type': 'entry', 'action': action, 'entry': entry}
        if outcome == 'accepted':  # not publish_entry: its second dict per write left RSS 4 MB higher after a burst
            stats['entries_accepted'] += 1
            hub.broadcast(peer.family_id, reply)
        else:  # `stale` tells the app its write lost, so it can let the outbox item go
            peer.send(dict(reply, stale=True) if outcome == 'stale' else reply)
    elif kind == 'config':
        hub.broadcast(peer.family_id, {'type': 'config', 'data': save_config(peer.family_id, message.get('data'))})
    else:
        raise Invalid('type must be entry, config or ping')


def refusal(error, message):
    """Return the error message for a refused client message, naming its entry id when it had one."""
    if isinstance(error, Busy):
        reason, retry_after = error.args
        return {'type': 'error', 'error': reason, 'retry_after': retry_after}
    reply = {'type': 'error', 'error': str(error)}
    message = message or {}
    entry = message.get('entry')
    entry_id = message.get('id', entry.get('id') if isinstance(entry, dict) else None)
    if isinstance(entry_id, str) and ID_PATTERN.fullmatch(entry_id):
        reply['id'] = entry_id
    return reply


def serve_socket(ws, link, since, after=None):
    """Run one device's connection from init to goodbye (`after`: the first load's window start, ms)."""
    peer = hub.join(ws, link)
    family_id = peer.family_id
    log.info('socket open family=%s', family_id)
    try:
        if check_link(peer.token)[1]:  # revoked or archived while the handshake was in flight
            peer.close(CLOSE_REVOKED, 'link revoked')
        members, cursor = hub.members(family_id), family_cursor(family_id)
        rest = encode({'config': get_config(family_id), 'members': members, 'cursor': cursor,
                       'plan': get_plan(family_id), 'notes': list_notes(family_id, now_ms() - 60 * DAY_MS)})
        presence = frame(OP_TEXT, encode({'type': 'presence', 'members': members}).encode())
        for other in hub.peers(family_id):
            if other is not peer:
                other.send_frame(presence)
        entries = entries_json(family_id, since, cursor, after)  # read page by page while the init goes out
        peer.send_parts(chain(['{"type":"init","entries":['], entries, [f'],{rest[1:]}']))
        while (text := peer.receive()) is not None:
            if peer.closing_since is not None:
                continue  # we said goodbye (revoked, expired, archived): read until it answers, act on nothing
            stats['messages_in'] += 1
            message = None
            try:
                message = parse_message(text)
                handle_message(peer, message)
            except Invalid as error:
                stats['messages_refused'] += 1
                peer.send(refusal(error, message))
            except sqlite3.Error as error:  # nothing was stored, so nothing is acknowledged
                if not storage_error(error):
                    raise
                stats['messages_refused'] += 1
                peer.send(refusal(Busy('storage unavailable', STORAGE_RETRY), message))
            gevent.sleep(0)  # let the writers send this before a device flushing its outbox goes on
    finally:
        hub.leave(peer)
        ws.closed = True  # we sent our own close frame; gevent-websocket must not send another
        log.info('socket closed family=%s', family_id)


###############################################################################
# HTTP #########################################################################
###############################################################################

app = bottle.Bottle()
bottle.TEMPLATE_PATH[:] = [os.path.join(HERE, 'views')]
bottle.BaseRequest.MEMFILE_MAX = MAX_BODY
request, response = bottle.request, bottle.response
STATIC_ROOT = os.path.join(HERE, 'static')
SECURITY_HEADERS = {
    'Content-Security-Policy': "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    'X-Frame-Options': 'DENY',
    'Referrer-Policy': 'no-referrer',
    'X-Content-Type-Options': 'nosniff',
}


@app.install
def refuse_invalid(callback):
    """Plugin: turn a domain Invalid into a 400 with its message."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except Invalid as error:
            raise bottle.HTTPError(400, str(error)) from None
    return wrapper


def wants_json():
    """Tell whether this request should be answered with JSON rather than a page."""
    return 'application/json' in request.get_header('Accept', '') or sends_json()


def sends_json():
    """Tell whether the request body is JSON."""
    return request.content_type.split(';')[0].strip().lower() == 'application/json'


def json_body():
    """Return the request's JSON object body, or abort with 415 / 400."""
    if not sends_json():
        bottle.abort(415, 'Send JSON with Content-Type: application/json.')
    raw = request.body.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        bottle.abort(413, 'Request body is over 64 KiB.')
    try:
        data = parse_json(raw.decode('utf-8-sig') or 'null')  # UnicodeDecodeError is a ValueError
    except (ValueError, RecursionError):
        bottle.abort(400, 'Body is not valid JSON.')
    if not isinstance(data, dict):
        bottle.abort(400, 'Body must be a JSON object.')
    return data


def form_body():
    """Return an HTML form's fields once its CSRF token is checked (403); anything else gets 415."""
    if request.content_type.split(';')[0].strip().lower() not in ('application/x-www-form-urlencoded',
                                                                 'multipart/form-data'):
        bottle.abort(415, 'Send this as an HTML form.')
    session = request.environ.get('babytrackd.session')
    if session and not secrets.compare_digest(request.forms.get('csrf', '').encode(), session['csrf'].encode()):
        bottle.abort(403, 'This form has expired. Reload the page and try again.')
    return {key: request.forms.getunicode(key) for key in request.forms}


def proxy_header():
    """Return the header our own proxy puts the client's address in (TRUST_PROXY_HEADER, fly.io's), or None."""
    return TRUST_PROXY_HEADER or ('Fly-Client-IP' if BEHIND_FLY_PROXY else None)


def client_address():
    """Return the client's address: the trusted proxy's header when it carries one, else the socket's peer."""
    forwarded = proxy_header() and request.get_header(proxy_header())
    if forwarded:
        return forwarded.split(',')[-1].strip()  # in a list, the last address is the one our proxy added
    return request.environ.get('REMOTE_ADDR') or '-'  # not bottle's remote_addr: it trusts X-Forwarded-For


def same_origin(environ):
    """Tell whether the request's Origin (when it sends one) is this server."""
    origin = environ.get('HTTP_ORIGIN')
    if not origin:
        return True
    if origin == 'null':  # what browsers send under Referrer-Policy: no-referrer; Sec-Fetch-Site cannot be forged
        return environ.get('HTTP_SEC_FETCH_SITE') == 'same-origin'
    return urlsplit(origin).netloc in (environ.get('HTTP_HOST'), urlsplit(BASE_URL).netloc)


def page(name, **values):
    """Render a template with what every page needs."""
    session = request.environ.get('babytrackd.session')
    return bottle.template(name, csrf=session['csrf'] if session else '',
                           username=session['username'] if session else None, **values)


def redirect(path, code=303):
    """bottle.redirect with a relative Location: never built from Host or X-Forwarded-Host."""
    answer = response.copy(cls=bottle.HTTPResponse)
    answer.status, answer.body = code, ''
    answer.set_header('Location', path)
    raise answer


def error_handler(error):
    """Answer every error as JSON or a small page; never a traceback."""
    if storage_error(error.exception):  # disk full, read-only, I/O error: nothing was saved
        response.status = 503
        response.set_header('Retry-After', str(STORAGE_RETRY))
        message = STORAGE_MESSAGE
    elif error.status_code >= 500:  # Bottle has written the traceback to wsgi.errors, our log
        message = 'Something went wrong on the server. Please try again.'
    else:
        message = error.body if isinstance(error.body, str) and error.body else error.status_line
    if wants_json() or request.path.startswith(('/ws', '/app/me', '/app/entries', '/health')):
        response.content_type = 'application/json'
        return json.dumps({'error': message})
    return page('message', title=response.status_line, message=message)


app.default_error_handler = error_handler


@app.hook('before_request')
def before_request():
    """Refuse oversized bodies early; find the admin session."""
    importing = request.path.endswith('/import')  # its file comes in a form: up to 5 MiB and the form around it
    if request.content_length > (IMPORT_MAX + MAX_BODY if importing else MAX_BODY):
        bottle.abort(413, 'The file is over 5 MiB.' if importing else 'Request body is over 64 KiB.')
    request.environ['babytrackd.session'] = (get_session(request.get_cookie(ADMIN_COOKIE))
                                             if request.path.startswith('/admin') else None)


@app.hook('after_request')
def after_request():
    """Add the security headers to every answer."""
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith('/admin'):
        response.set_header('Cache-Control', 'no-store')
    if SECURE_COOKIES:  # BASE_URL is https
        response.set_header('Strict-Transport-Security', 'max-age=31536000')


def admin_required(callback):
    """Decorator: the route needs a logged-in admin (JSON 401, or the login page)."""
    def wrapper(*args, **kwargs):
        if request.environ.get('babytrackd.session'):
            return callback(*args, **kwargs)
        if wants_json():
            bottle.abort(401, 'Log in first.')
        if request.method != 'GET':
            redirect('/admin', 303)
        return page('login', error=None, username_value='')
    return wrapper


def family_route(method, path):
    """Route an admin request about the family in `path`: a logged-in admin first, then the family (404) as `family`."""
    def register(callback):
        def route(family_id, **ids):
            if (family := get_family(family_id)) is None:
                bottle.abort(404, 'No such family.')
            return callback(family, **ids)
        app.route(path, method, admin_required(route))
        return callback
    return register


# -- health and parents' routes -------------------------------------------------

@app.get('/health')
def health():
    """Answer 200 while the database can be read and the last write went through."""
    try:
        db.execute('SELECT COUNT(*) FROM admins').fetchone()
    except sqlite3.Error:
        return bottle.HTTPResponse({'ok': False, 'reason': 'the database cannot be read'}, 503)
    if storage['fault']:
        return bottle.HTTPResponse({'ok': False, 'reason': f'writes fail: {storage["fault"]}'}, 503,
                                   {'Retry-After': str(STORAGE_RETRY)})
    return {'ok': True, 'version': VERSION}


@app.get('/t/<token>')
def link_open(token):
    """Check a share link, set its cookie and send the device to the app."""
    link, problem = check_link(token)
    if problem:
        return bottle.HTTPResponse(page('message', title='This link does not work', message=problem[2]), problem[0])
    max_age = (link['expires_at'] - now_ms()) // 1000 if link['expires_at'] else 400 * 86400
    response.set_cookie(LINK_COOKIE, token, path='/', httponly=True, samesite='lax',
                        secure=SECURE_COOKIES, max_age=max_age)
    redirect('/app/', 303)


@app.get('/app')
def app_redirect():
    redirect('/app/', 301)


def link_required(callback):
    """Decorator: the route needs the cookie of a working link, passed as `link` (else JSON saying why not)."""
    def wrapper():
        token = request.get_cookie(LINK_COOKIE)
        if not token:
            bottle.abort(401, 'Open the link your consultant sent you.')
        link, problem = check_link(token)
        if problem:
            return bottle.HTTPResponse({'error': problem[2], 'reason': problem[1]}, problem[0])
        return callback(link)
    return wrapper


@app.get('/app/me')
@link_required
def app_me(link):
    """Tell the parents' app which family its link cookie opens (or why it no longer does)."""
    return {'family': {'id': link['family_id'], 'name': link['family_name'], 'tz': link['tz'],
                       'night_start': link['night_start'], 'night_end': link['night_end']},
            'label': link['label'], 'expires_at': link['expires_at']}


@app.get('/app/entries')
@link_required
def app_entries(link):
    """Older days for the parents' app (PROTOCOL.md, "Connecting"): live entries in [before - days, before)."""
    before, days = request.query.get('before', ''), request.query.get('days', '')
    if not re.fullmatch('[0-9]{1,15}', before) or not re.fullmatch('[0-9]{1,2}', days) or not 1 <= int(days) <= 31:
        bottle.abort(400, 'before must be a time in ms and days a whole number from 1 to 31.')
    response.content_type = 'application/json'
    return f'{{"entries":{entries_between(link["family_id"], int(before) - int(days) * 86400000, int(before))}}}'


@app.get(['/app/', '/app/<path:path>'])
def app_file(path='index.html'):
    """Serve a file of the parents' app (/app/ is its shell); each is revalidated on every load."""
    answer = bottle.static_file(path, root=os.path.join(STATIC_ROOT, 'app'))
    answer.set_header('Cache-Control', 'no-cache')
    return answer


@app.get('/static/<path:path>')
def static(path):
    """Serve the admin pages' CSS and scripts."""
    return bottle.static_file(path, root=STATIC_ROOT)


def ws_link(environ):
    """Return (link, None) when this /ws handshake may upgrade, else (None, (status, message))."""
    if not same_origin(environ):
        return None, (403, 'Origin not allowed.')
    req = bottle.BaseRequest(environ)
    link, problem = check_link(req.get_cookie(LINK_COOKIE))
    if problem:
        return None, (401 if problem[1] == 'unknown' else 403, problem[2])
    if req.query.get('family') != link['family_id']:
        return None, (403, 'This link is for another family.')
    if not re.fullmatch('[0-9]{1,18}', req.query.get('since', '0')):
        return None, (400, 'since must be a whole number.')
    if sum(peer.token == link['token'] for peer in hub.peers(link['family_id'])) >= WS_SOCKETS_PER_LINK:
        return None, (429, f'This link is open on {WS_SOCKETS_PER_LINK} devices already. Close one and try again.')
    days = req.query.get('days')
    if days is not None and not (re.fullmatch('[0-9]{1,3}', days) and 1 <= int(days) <= 366):
        return None, (400, 'days must be a whole number from 1 to 366.')
    return link, None


def pre_start_hook(handler):
    """gevent-websocket asks this before upgrading: True means answer as plain HTTP."""
    environ = handler.environ
    if environ.get('PATH_INFO') != '/ws':
        return True
    environ['babytrackd.link'], environ['babytrackd.problem'] = ws_link(environ)
    return environ['babytrackd.problem'] is not None


@app.get('/ws')
def ws_sync():
    """The sync socket (see the Hub chapter); refused handshakes answer plain HTTP."""
    ws, link = request.environ.get('wsgi.websocket'), request.environ.get('babytrackd.link')
    if ws is None or link is None:
        status, message = request.environ.get('babytrackd.problem') or (426, 'This address only speaks WebSocket.')
        raise bottle.HTTPError(status, message, **({'Retry-After': '30'} if status == 429 else {}))
    since, days, tz = int(request.query.get('since', '0')), request.query.get('days'), link['tz']
    after = None if since or days is None else day_window(local_today(tz) - dt.timedelta(days=int(days) - 1), tz)[0]
    serve_socket(ws, link, since, after)
    return ''


# -- admin routes ---------------------------------------------------------------

@app.post('/admin/login')
def admin_login():
    """Log the admin in (JSON or the login form), rate-limited per client address."""
    is_form = not sends_json()
    if is_form and not same_origin(request.environ):
        bottle.abort(403, 'Log in from this site.')
    data = form_body() if is_form else json_body()
    token, refused = log_in(client_address(), data.get('username'), data.get('password'))
    if refused and is_form:  # the login page again, with what was typed
        return bottle.HTTPResponse(page('login', error=refused[1], username_value=data.get('username') or ''),
                                   refused[0], refused[2])
    if refused:
        raise bottle.HTTPError(refused[0], refused[1], **refused[2])
    response.set_cookie(ADMIN_COOKIE, token, path='/admin', httponly=True,
                        samesite='strict', secure=SECURE_COOKIES, max_age=SESSION_DAYS * 86400)
    if is_form:
        redirect('/admin', 303)
    return {'ok': True}


@app.post('/admin/logout')
def admin_logout():
    """End the session and clear its cookie."""
    if not sends_json():
        form_body()  # checks the CSRF token
    end_session(request.get_cookie(ADMIN_COOKIE))
    response.delete_cookie(ADMIN_COOKIE, path='/admin')
    if wants_json():
        return {'ok': True}
    redirect('/admin', 303)


@app.get('/admin')
@admin_required
def admin_dashboard(error=None, typed=None):
    """The consultant's dashboard (shown again by the Add client form with its mistake and what was typed)."""
    show_archived, now = request.query.get('archived') == '1', now_ms()
    families = list_families(show_archived)
    gevent.idle()  # each step takes a slice of its own, the rows and the page too: sleep(0) would not let sockets in
    today = families_today(families, now)  # its queries run apart: the loop serves sockets meanwhile
    gevent.idle()
    flags = cached_flags(families, now)
    gevent.idle()
    families = [dict(family, today=today[family['id']]['totals'],
                     seen=ago(family['last_activity'], now) if family['last_activity'] else 'no entries yet',
                     states=[f"{label} since {when(since, family['tz'], now)}"
                             for label, since in today[family['id']]['states']],
                     flags=[words for _, words in flags.get(family['id'], [])])
                for family in families]
    families.sort(key=lambda f: not f['flags'])  # flagged families first, each with its flags in words
    form = {'name': '', 'notes': '', 'tz': DEFAULT_TZ, **(typed or {})}
    gevent.idle()
    return page('dashboard', families=families, show_archived=show_archived, hm=hm, zone_options=zone_options,
                error=error, form=form, turn=gevent.idle)


@app.get('/admin/families')
@admin_required
def admin_families_list():
    """List families with today's totals."""
    if not wants_json():
        redirect('/admin' + ('?archived=1' if request.query.get('archived') == '1' else ''), 303)
    now, families = now_ms(), list_families(request.query.get('archived') == '1')
    today, flags = families_today(families, now), cached_flags(families, now)
    return {'families': [dict(f, today=today[f['id']]['totals'], flags=[code for code, _ in flags.get(f['id'], [])])
                         for f in families]}


@app.post('/admin/families')
@admin_required
def admin_families_create():
    """Create a family."""
    data = json_body()
    return bottle.HTTPResponse(create_family(data.get('name'), data.get('notes'), data.get('tz')), 201)


# What an admin change does, whichever route asked: store it, then the family's devices hear of it at once.

def change_family(family_id, changes):
    """Apply changes to a family and return it; archiving closes its sockets (its links stop working at once)."""
    family = update_family(family_id, changes)
    if family['archived']:
        hub.close_family(family_id)
    return family


def revoke_and_close(family_id, token):
    """Revoke a link and close its sockets; return False when the family has no such live link."""
    if revoked := revoke_link(family_id, token):
        hub.close_link(token)
    return revoked


def push_config(family_id, groups):
    """Store the family's button groups and push them to its devices; return them."""
    hub.broadcast(family_id, {'type': 'config', 'data': save_config(family_id, groups)})
    return groups


def push_plan(family_id, plan):
    """Store the family's plan (None clears it) and push it to its devices; return it."""
    plan = save_plan(family_id, plan)
    hub.broadcast(family_id, {'type': 'plan', 'plan': plan})
    return plan


def push_note(family_id, date, text):
    """Write a coaching note and push it to the family's devices; return it."""
    note = create_note(family_id, date, text)
    hub.broadcast(family_id, {'type': 'note', 'note': note})
    return note


def drop_note(family_id, note_id):
    """Delete a coaching note and tell the family's devices; return False when it has no such note."""
    if deleted := delete_note(family_id, note_id):
        hub.broadcast(family_id, {'type': 'note', 'note': {'id': note_id, 'deleted': True}})
    return deleted


@family_route('GET', '/admin/families/<family_id>')
def admin_family_show(family):
    """A family's detail (JSON) or page."""
    limit = request.query.get('limit')
    if limit is not None and not (re.fullmatch('[0-9]{1,18}', limit) and 0 < int(limit) <= 100_000):
        bottle.abort(400, 'limit must be a whole number from 1 to 100000.')
    if wants_json():
        return dict(family, links=list_links(family['id']), config=get_config(family['id']),
                    plan=get_plan(family['id']), entries=live_entries(family['id'], int(limit) if limit else None))
    return page('family', **family_page(family, request.query.get('date')))


@family_route('PATCH', '/admin/families/<family_id>')
def admin_family_update(family):
    """Change a family's name, notes, time zone or archived flag."""
    return change_family(family['id'], json_body())


@family_route('PUT', '/admin/families/<family_id>/config')
def admin_config_put(family):
    """Store the family's button groups and push them to its devices."""
    data = json_body()
    if 'data' not in data:
        bottle.abort(400, 'Send {"data": [button groups]}.')
    return {'data': push_config(family['id'], data['data'])}


@family_route('PUT', '/admin/families/<family_id>/plan')
def admin_plan_put(family):
    """Store the family's plan ({"plan": null} clears it) and push it to its devices."""
    data = json_body()
    return push_plan(family['id'], data['plan'] if 'plan' in data else data) or {'plan': None}


@family_route('GET', '/admin/families/<family_id>/notes')
def admin_notes_list(family):
    """The family's coaching notes, newest first."""
    if not wants_json():
        redirect(f"/admin/families/{family['id']}#notes", 303)
    return {'notes': list_notes(family['id'])}


@family_route('POST', '/admin/families/<family_id>/notes')
def admin_notes_create(family):
    """Write a coaching note and push it to the family's devices."""
    data = json_body()
    return bottle.HTTPResponse(push_note(family['id'], data.get('date'), data.get('text')), 201)


@family_route('DELETE', '/admin/families/<family_id>/notes/<note_id>')
def admin_notes_delete(family, note_id):
    """Delete a coaching note and tell the family's devices."""
    if not drop_note(family['id'], note_id):
        bottle.abort(404, 'No such note.')
    return bottle.HTTPResponse(status=204)


def parse_date(text, tz):
    """Return the date YYYY-MM-DD (today in tz when empty), or abort with 400."""
    try:
        return dt.date.fromisoformat(text) if text else local_today(tz)
    except ValueError:
        bottle.abort(400, 'date must look like 2026-01-31.')


@family_route('GET', '/admin/families/<family_id>/summary')
def admin_family_summary(family):
    """The family's day: hourly events and totals."""
    return day_summary(family, parse_date(request.query.get('date'), family['tz']))


@family_route('GET', '/admin/families/<family_id>/report')
def admin_family_report(family):
    """The family's nights and days, oldest first (`days` 1-60, up to `end`)."""
    days, end = request.query.get('days', '14'), request.query.get('end')
    if not (re.fullmatch('[0-9]{1,18}', days) and 1 <= int(days) <= 60):
        bottle.abort(400, 'days must be a whole number from 1 to 60.')
    return night_report(family, int(days), parse_date(end, family['tz']) if end else None)


@family_route('POST', '/admin/families/<family_id>/links')
def admin_links_create(family):
    """Create a share link."""
    data = json_body()
    return bottle.HTTPResponse(create_link(family['id'], data.get('label'), data.get('expires_at')), 201)


@family_route('DELETE', '/admin/families/<family_id>/links/<token>')
def admin_links_revoke(family, token):
    """Revoke a share link and close its sockets."""
    if not revoke_and_close(family['id'], token):
        bottle.abort(404, 'No such link.')
    return bottle.HTTPResponse(status=204)


# The button editor's fields: g1.category, g1.stateful, g1.order, g1.remove, g1.b2.label, g1.b2.counted ...
EDITOR_FIELD = re.compile(r'g(\d{1,2})\.(?:b(\d{1,2})\.)?(category|stateful|label|timing|counted|order|remove)')
GROUP_ROW = {'category': '', 'stateful': False, 'order': '', 'remove': False}
BUTTON_ROW = {'label': '', 'timing': False, 'counted': False, 'order': '', 'remove': False}


def editor_rows(config):
    """Return the button editor's rows for a config, with an empty button in each group and a new group to fill in."""
    def buttons(group):
        return [dict(BUTTON_ROW, label=b.get('label', ''), timing=bool(b.get('timing')), counted=bool(b.get('counted')),
                     order=str(n)) for n, b in enumerate(group['buttons'] + [{}], 1)]
    return [dict(GROUP_ROW, category=group['category'], stateful=bool(group.get('stateful')), order=str(g),
                 buttons=buttons(group))
            for g, group in enumerate(config + [{'category': '', 'buttons': [{}]}], 1)]


def editor_typed(data):
    """Return the button editor's rows as they were typed (none when the form was another one)."""
    groups = {}
    for key, value in data.items():
        if match := EDITOR_FIELD.fullmatch(key):
            g, b, field = match.groups()
            row = groups.setdefault(int(g), dict(GROUP_ROW, buttons={}))
            if b is not None:
                row = row['buttons'].setdefault(int(b), dict(BUTTON_ROW))
            row[field] = value if field in ('category', 'label', 'order') else True  # a checkbox: sent only when ticked
    return [dict(row, buttons=[row['buttons'][b] for b in sorted(row['buttons'])]) for _, row in sorted(groups.items())]


def editor_config(groups):
    """Return the button groups that the editor's rows describe, in their order, or raise Invalid."""
    def ordered(items, what):
        for order in (item['order'].strip() for item in items):
            if order and not re.fullmatch(r'-?\d{1,6}', order):
                raise Invalid(f'The order of {what} must be a whole number, not "{order}".')
        return sorted(items, key=lambda item: int(item['order'].strip() or 10**6))  # stable: ties keep their place
    config = []
    for group in ordered(groups, 'a group'):
        name, stateful = group['category'].strip(), group['stateful']
        in_order = ordered(group['buttons'], f'a button in "{name}"')
        buttons = [{'label': b['label'].strip(), **{f: b[f] for f in ('timing', 'counted') if b[f] or stateful}}
                   for b in in_order if b['label'].strip() and not b['remove']]
        if group['remove'] or not (name or buttons):  # removed, or an empty row left as it was
            continue
        if not name:
            raise Invalid(f'The group with the button "{buttons[0]["label"]}" needs a name (or tick Remove).')
        if not buttons:
            raise Invalid(f'The group "{name}" needs at least one button (or tick Remove).')
        config.append({'category': name, **({'stateful': True} if stateful else {}), 'buttons': buttons})
    return validate_config(config)


def plan_fields(plan):
    """Return the plan form's fields wake, bedtime and nap1_start ... nap5_end (empty without a plan)."""
    fields = {'wake': plan['wake'] if plan else '', 'bedtime': plan['bedtime'] if plan else ''}
    for n, nap in enumerate(((plan or {}).get('naps', []) + [{'start': '', 'end': ''}] * 5)[:5], 1):
        fields.update({f'nap{n}_start': nap['start'], f'nap{n}_end': nap['end']})
    return fields


def planned_minutes(plan):
    """Return the plan's sleep as (first minute, minutes) on the wall clock: bedtime to wake, then the naps."""
    if not plan:
        return []
    wake, bed = day_minute(plan['wake']), day_minute(plan['bedtime'])
    night = [(0, wake), (bed, 1440 - bed)] if bed > wake else [(bed, wake - bed)]
    return [(start, length) for start, length in night if length] + [
        (day_minute(n['start']), day_minute(n['end']) - day_minute(n['start'])) for n in plan['naps']]


def within(spans, start, length):
    """Return the parts of (first minute, minutes) spans inside [start, start + length), from that start."""
    return [(max(a, start) - start, min(a + n, start + length) - max(a, start))
            for a, n in spans if a < start + length and a + n > start]


def nights_table(family, end, now):
    """Return the family page's Nights table: the 14 nights to `end` (None: the latest), newest first, in words."""
    clock = lambda ms: f"{local_time(ms, family['tz']):%H:%M}" if ms else '—'
    off = lambda minutes: ('' if minutes is None else 'on plan' if minutes == 0
                           else f"{'late' if minutes > 0 else 'early'} {hm(abs(minutes))}")
    table = []
    for row in reversed(night_report(family, 14, end, now)['days']):
        night, day, diff = row['night'], row['day'], row['plan_diff']
        sleep = ({'sleep': hm(night['sleep_minutes']), 'wakings': night['wakings'], 'awake': hm(night['awake_minutes']),
                  'longest': hm(night['longest_stretch_minutes'])} if night['sleep_minutes'] > 0
                 else dict.fromkeys(('sleep', 'wakings', 'awake', 'longest'), '—'))
        table.append({'date': dt.date.fromisoformat(row['date']), 'complete': night['complete'],
                      'bedtime': clock(night['bedtime']), 'bedtime_diff': off(diff['bedtime_minutes']),
                      'wake': clock(night['morning_wake']), 'wake_diff': off(diff['wake_minutes']),
                      **sleep, 'naps': day['naps'], 'nap_time': hm(day['nap_minutes']) if day['naps'] else '—',
                      'windows': [hm(minutes) for minutes in day['wake_windows']]})
    return table


def family_page(family, date_text, errors=None, typed=None):
    """Return what the family page shows for one date (a refused form: its message and what was typed)."""
    tz, now = family['tz'], now_ms()
    date = parse_date(date_text, tz)
    summary, config = day_summary(family, date, now), get_config(family['id'])
    gevent.idle()  # the summary, the 14-day chart, the nights and the page each take a slice of their own
    chart = sleep_chart(family, date, now)
    gevent.idle()
    nights = nights_table(family, date if date_text and date < local_today(tz, now) else None, now)
    gevent.idle()
    slept = [(s['start'], s['end'] - s['start']) for s in summary['spans'] if s['category'] == 'sleep' and s['counted']]
    for hour in summary['hours']:  # the sleep inside each hour, as (first minute, minutes)
        hour['sleep'] = [(start / 60000, length / 60000) for start, length in within(slept, hour['start'], 3600_000)]
    plan, notes = get_plan(family['id']), list_notes(family['id'])
    form = {'name': family['name'], 'notes': family['notes'], 'tz': tz, 'night_start': family['night_start'],
            'night_end': family['night_end'], 'label': '', 'expires': 'never', 'expires_on': '',
            'config': json.dumps(config, indent=2), **plan_fields(plan), 'date': str(date), 'text': '',
            **(typed or {})}
    return {'family': family, 'date': date, 'prev': date - dt.timedelta(days=1), 'next': date + dt.timedelta(days=1),
            'summary': summary, 'chart': chart, 'nights': nights, 'config': config, 'form': form,
            'links': list_links(family['id']), 'online': {p.token for p in hub.peers(family['id'])},
            'changes': recent_changes(family['id']), 'errors': errors or {}, 'zone_options': zone_options, 'now': now,
            'plan': plan, 'planned': planned_minutes(plan), 'within': within, 'notes': notes,
            'day_notes': [n for n in notes if n['date'] == str(date)],
            'editor': editor_typed(typed or {}) or editor_rows(config),
            'hm': hm, 'clock': lambda ms: f'{local_time(ms, tz):%H:%M}', 'when': lambda ms: when(ms, tz, now)}


# -- admin pages: forms and exports ---------------------------------------------

@app.post('/admin/families/new')
@admin_required
def admin_family_add():
    """The dashboard's Add client form."""
    data = form_body()
    try:
        family = create_family(data.get('name', ''), data.get('notes'), data.get('tz'))
    except Invalid as error:
        response.status = 400
        return admin_dashboard(str(error), data)
    redirect(f"/admin/families/{family['id']}", 303)


def family_form(path, section, gone=None):
    """Route a family page form's POST to act(family, form, **the path's other parts), then 303 back to its
    section; on Invalid, on act returning False (what it changes was already gone: say `gone`) or on a storage
    fault, show the page again as typed. The JSON API has its own routes for all of this."""
    def route(act):
        @family_route('POST', f'/admin/families/<family_id>/{path}')
        def handler(family, **names):
            data = form_body()
            try:
                if act(family, data, **names) is False:  # a second click, an old page
                    raise Invalid(gone)
            except Invalid as error:
                response.status, message = 400, str(error)
            except sqlite3.Error as error:
                if not storage_error(error):
                    raise
                response.status, message = 503, STORAGE_MESSAGE
                response.set_header('Retry-After', str(STORAGE_RETRY))
            else:
                redirect(f"/admin/families/{family['id']}#{section}", 303)
            return page('family', **family_page(family, None, {section: message}, data))
        return act
    return route


@family_form('edit', 'details')
def admin_family_edit(family, data):
    """The family page's details form (name, notes, time zone, night window) and its Archive / Unarchive button."""
    change_family(family['id'], {key: data[key] == '1' if key == 'archived' else data[key]  # the button: 1 / 0
                                 for key in FAMILY_FIELDS if key in data})


@family_form('links/new', 'links')
def admin_links_form(family, data):
    """The family page's new-link form: a label and an expiry (never, 1 or 2 weeks, or a last day)."""
    expires_at = now_ms() + int(data['expires']) * DAY_MS if data.get('expires') in ('7', '14') else None
    if data.get('expires') == 'date':
        try:
            expires_at = day_window(dt.date.fromisoformat(data.get('expires_on', '')), family['tz'])[1]
        except ValueError:
            raise Invalid('Pick the last day the link should work.') from None
        if expires_at <= now_ms():
            raise Invalid('The last day must be today or later.')
    create_link(family['id'], data.get('label', ''), expires_at)


@family_form('links/<token>/revoke', 'links', gone='That link was already revoked.')
def admin_links_revoke_form(family, data, token):
    """The family page's Revoke button: the link stops working and its sockets close."""
    return revoke_and_close(family['id'], token)


@family_form('config', 'config')
def admin_config_form(family, data):
    """The family page's button editor: the JSON is checked, stored and pushed to the family's devices."""
    try:
        groups = json.loads(data.get('config', ''))
    except ValueError as error:
        raise Invalid(f'This is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno}).') from None
    except RecursionError:
        raise Invalid('This JSON is nested too deeply.') from None
    push_config(family['id'], groups)


@family_form('buttons', 'buttons')
def admin_buttons_form(family, data):
    """The family page's button editor (no JSON): checked like the JSON, stored and pushed to the family's devices."""
    push_config(family['id'], editor_config(editor_typed(data)))


@family_form('plan', 'plan')
def admin_plan_form(family, data):
    """The family page's plan form: wake, up to five naps (empty rows skipped) and bedtime; Clear removes the plan."""
    push_plan(family['id'], None if 'clear' in data else {
        'wake': data.get('wake', ''), 'bedtime': data.get('bedtime', ''),
        'naps': [{'start': data.get(f'nap{n}_start', ''), 'end': data.get(f'nap{n}_end', '')} for n in range(1, 6)
                 if data.get(f'nap{n}_start') or data.get(f'nap{n}_end')]})


@family_form('notes/new', 'notes')
def admin_notes_form(family, data):
    """The family page's note form: a date and the text; the note reaches the family's devices at once."""
    push_note(family['id'], data.get('date', ''), data.get('text', ''))


@family_form('notes/<note_id>/delete', 'notes', gone='That note was already deleted.')
def admin_notes_delete_form(family, data, note_id):
    """The Delete button beside a coaching note."""
    return drop_note(family['id'], note_id)


def export_slices(family_id, size=250):
    """Yield the family's live entries (oldest first), then None, then its change log (oldest first), `size` rows
    at a time from one snapshot, serving others between slices; the snapshot is a connection of its own, so no
    statement stays open on the shared one across a yield. Each row's columns are in its JSON export's order."""
    with contextlib.closing(sqlite3.connect(db.execute('PRAGMA database_list').fetchone()[2])) as snapshot:
        snapshot.row_factory = sqlite3.Row
        snapshot.execute('BEGIN')  # one snapshot for both lists
        for sql in ("""SELECT id, ts, NULL AS time, type, value, deleted, updated_at, seq, by FROM entries
                       WHERE family_id = ? AND NOT deleted ORDER BY ts, id DESC""",
                    """SELECT seq, entry_id, ts, type, value, deleted, updated_at, by, at FROM changes
                       WHERE family_id = ? ORDER BY seq"""):
            found = snapshot.execute(sql, (family_id,))
            while part := found.fetchmany(size):
                yield part
                gevent.idle()
            yield None


@family_route('GET', '/admin/families/<family_id>/export.<kind:re:csv|json>')
def admin_family_export(family, kind):
    """The family's live entries, oldest first: stable ids, ISO times in the family's zone and raw ms (streamed)."""
    slices = export_slices(family['id'])
    entries = iter(lambda: next(slices), None)
    stamp = lambda ts: local_time(ts, family['tz']).isoformat(timespec='seconds')
    response.set_header('Content-Disposition', f'attachment; filename="babytrack-{family["id"]}.{kind}"')
    if kind == 'json':
        response.content_type = 'application/json'
        entry = lambda row: {**row, 'time': stamp(row['ts']), 'deleted': False}

        def listed(parts, shape):
            for number, part in enumerate(parts):  # commas between the objects, none after the last
                yield ',' * (number > 0) + ','.join(json.dumps(shape(row)) for row in part)
        head = json.dumps({'family': family, 'exported_at': now_ms(), 'entries': []})[:-2]  # ends '"entries": ['
        changes = filter(None, slices)  # what follows the entries: the change log, then a None
        return chain([head], listed(entries, entry), ['], "changes": ['], listed(changes, change_dict), [']}'])
    # a text starting with = + - @ (or the quote that marks one) would run as a formula in a spreadsheet
    safe = lambda text: f"'{text}" if str(text)[:1] in tuple("=+-@\t\r'") else text

    def lines(part):
        out = io.StringIO()
        csv.writer(out).writerows((safe(e['id']), stamp(e['ts']), e['ts'], safe(e['type']), safe(e['value']),
                                   safe(e['by']), e['updated_at'], e['seq']) for e in part)
        return out.getvalue()
    response.content_type = 'text/csv; charset=utf-8'
    return chain(['id,time,ts,type,value,by,updated_at,seq\r\n'], map(lines, entries))


# -- admin pages: history, restore and import -------------------------------------

PAGE_ROWS = 500  # versions or tombstones on one page; older ones are a link (`?before=`) away


def page_before():
    """Return the `before` (a seq) of a paged list: where an older page starts, past every seq when absent."""
    before = request.query.get('before')
    if before is not None and not re.fullmatch('[0-9]{1,18}', before):
        bottle.abort(400, 'before must be a whole number.')
    return 2 ** 63 - 1 if before is None else int(before)


@family_route('GET', '/admin/families/<family_id>/entries/<entry_id>/history')
def admin_entry_history(family, entry_id):
    """The newest PAGE_ROWS versions of one entry before `before` (a seq), oldest first, each restorable."""
    changes = entry_history(family['id'], entry_id, page_before(), PAGE_ROWS + 1)
    if not changes:
        bottle.abort(404, 'No such entry in this family.')
    older = changes[1]['seq'] if len(changes) > PAGE_ROWS else None  # the next page: versions before the first shown
    changes = changes[-PAGE_ROWS:]
    if wants_json():
        return {'changes': changes, 'older': older}
    now, current = now_ms(), one('SELECT seq FROM entries WHERE id = ?', entry_id)['seq']
    return page('family_history', family=family, entry_id=entry_id, changes=changes, current=current, older=older,
                when=lambda ms: when(ms, family['tz'], now))


@family_route('POST', '/admin/families/<family_id>/entries/<entry_id>/restore')
def admin_entry_restore(family, entry_id):
    """Make an older version current again (by = the admin), pushed to the family's devices like any change."""
    family_id, data = family['id'], json_body() if sends_json() else form_body()
    seq = data.get('seq')  # a number in JSON, digits in a form
    seq = int(seq) if isinstance(seq, str) and re.fullmatch('[0-9]{1,18}', seq) else check_int(seq, 'seq')
    answer = restore_entry(family_id, entry_id, seq, request.environ['babytrackd.session']['username'])
    if answer is None:
        bottle.abort(404, 'This entry has no such version in this family.')
    publish_entry(family_id, *answer)
    if sends_json():
        return {'entry': answer[2]}
    back = 'deleted' if data.get('back') == 'deleted' else f'entries/{entry_id}/history'
    redirect(f'/admin/families/{family_id}/{back}', 303)


@family_route('GET', '/admin/families/<family_id>/deleted')
def admin_family_deleted(family):
    """PAGE_ROWS of the entries deleted in the last 30 days before `before` (a seq), newest first, each restorable."""
    now = now_ms()
    entries = deleted_entries(family['id'], now, before=page_before(), limit=PAGE_ROWS + 1)
    older = entries[PAGE_ROWS - 1]['seq'] if len(entries) > PAGE_ROWS else None
    entries = entries[:PAGE_ROWS]
    if wants_json():
        return {'entries': entries, 'older': older}
    return page('family_deleted', family=family, entries=entries, older=older,
                when=lambda ms: when(ms, family['tz'], now))


# Files a preview shows wait here for its Import button: at most IMPORT_HELD of them (the oldest goes first),
# for IMPORT_HELD_SECONDS, so uploads can hold at most IMPORT_HELD * IMPORT_MAX bytes of memory.
IMPORT_HELD, IMPORT_HELD_SECONDS = 3, 30 * 60
held_imports = {}  # key -> (family id, expires (monotonic), file bytes)


def hold_import(family_id, data):
    """Keep an uploaded file for its preview's Import button; return its key."""
    now = time.monotonic()
    for key, (_, expires, _) in list(held_imports.items()):
        if expires < now or len(held_imports) >= IMPORT_HELD:
            del held_imports[key]
    key = secrets.token_urlsafe(16)
    held_imports[key] = (family_id, now + IMPORT_HELD_SECONDS, data)
    return key


def uploaded_file(family_id, form):
    """Return the import file's bytes: the multipart field `file` (413 past IMPORT_MAX), or a held preview's."""
    if form.get('held'):
        family, expires, data = held_imports.get(form['held'], (None, 0, None))
        if family != family_id or expires < time.monotonic():  # another family's page leaves it to its own
            raise Invalid('This preview has expired. Choose the file again.')
        del held_imports[form['held']]
        return data
    upload = request.POST.get('file')
    if upload is None or upload == '':
        raise Invalid('Choose a file to import.')
    data = upload.file.read(IMPORT_MAX + 1) if isinstance(upload, bottle.FileUpload) else upload.encode()
    if len(data) > IMPORT_MAX:
        bottle.abort(413, 'The file is over 5 MiB.')
    return data


def store_import(family, source, new):
    """Write a surveyed import's entries as a device's are, IMPORT_CHUNK to a commit, each chunk pushed after it;
    return how many were accepted. All or nothing: its room is checked again with the first chunk, then kept."""
    entries, added = import_entries(family, source, now_ms(), {}), 0
    chunks = iter(lambda: list(itertools.islice(entries, IMPORT_CHUNK)), [])  # read (its turns taken) outside a commit
    for number, chunk in enumerate(chunks):
        with transaction():
            if number == 0:
                check_import_room(family['id'], new)
            written = [apply_entry(family['id'], 'add', {'entry': entry}, 'import', room=True) for entry in chunk]
        for answer in written:
            added += publish_entry(family['id'], *answer)
        gevent.idle()
    return added


@family_route('POST', '/admin/families/<family_id>/import')
def admin_family_import(family):
    """Read a babytrackd export or a Huckleberry CSV (multipart field `file`): preview it, or store it."""
    as_json = wants_json()
    if as_json and not same_origin(request.environ):  # a browser's cross-site form cannot send the Accept header,
        bottle.abort(403, 'Import from this server\'s own pages.')  # but a cross-site script could post multipart
    form = {key: request.forms.getunicode(key) for key in request.forms} if as_json else form_body()
    try:
        data = uploaded_file(family['id'], form)
        source, found, new = survey_import(family, data, now_ms())
        if form.get('preview') != '1':
            found['added'] = store_import(family, source, new)
    except Invalid as error:
        if as_json:
            raise
        response.status = 400
        return page('family', **family_page(family, None, {'import': str(error)}))
    if as_json:
        return found
    held = hold_import(family['id'], data) if form.get('preview') == '1' else None
    day = lambda ms: f'{local_time(ms, family["tz"]):%-d %b %Y}'
    skipped = ', '.join(f'{count:,} {name}' for name, count in sorted(found['skipped'].items()))
    return page('family_import_preview', family=family, found=found, skipped=skipped, held=held, day=day)


###############################################################################
# Operations ###################################################################
###############################################################################

TOKEN_IN_PATH = re.compile(r'^(/t/|/admin/families/[^/]+/links/)[^/]+')
SNAPSHOT = re.compile(r'babytrack-\d{4}-\d{2}-\d{2}\.db')  # a manual copy beside them is not rotated


class JsonLines(logging.Formatter):
    """One JSON object per log line."""

    def format(self, record):
        line = {'time': self.formatTime(record), 'level': record.levelname.lower(), 'msg': record.getMessage(),
                **getattr(record, 'fields', {})}
        if record.exc_info:
            line['error'] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging():
    """Send our log lines to stderr as text or JSON, at LOG_LEVEL."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if LOG_FORMAT == 'json' else
                         logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    log.handlers[:] = [handler]
    log.setLevel({'warn': 'WARNING'}.get(LOG_LEVEL, LOG_LEVEL.upper()))
    log.propagate = False


def logged(wsgi_app):
    """WSGI middleware: one log line and one status count per request, tokens redacted."""
    def middleware(environ, start_response):
        started, request_id, seen = time.perf_counter(), secrets.token_hex(8), {}

        def start(status, headers, exc_info=None):
            seen['status'] = status[:3]
            return start_response(status, headers, exc_info)

        try:
            return wsgi_app(environ, start)
        finally:
            status = '101' if environ.get('wsgi.websocket') else seen.get('status', '500')
            stats[f'requests_{status[0]}xx'] = stats.get(f'requests_{status[0]}xx', 0) + 1
            path = TOKEN_IN_PATH.sub(r'\1[redacted]', environ.get('PATH_INFO', ''))
            fields = {'request_id': request_id, 'method': environ.get('REQUEST_METHOD'), 'path': path,
                      'status': int(status), 'duration_ms': round((time.perf_counter() - started) * 1000, 2)}
            log.info('%(method)s %(path)s %(status)s %(duration_ms)sms id=%(request_id)s', fields,
                     extra={'fields': fields})
    return middleware


def rss_bytes():
    """Return this process's resident memory in bytes (Linux)."""
    try:
        with open('/proc/self/statm') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return 0


def metrics_allowed():
    """Tell whether this request may read /metrics: it carries METRICS_TOKEN, or comes from this
    machine or a private network and not through our public proxy (fly.io's, or TRUST_PROXY_HEADER's)."""
    if METRICS_TOKEN and secrets.compare_digest(request.get_header('Authorization', '').encode(),
                                                f'Bearer {METRICS_TOKEN}'.encode()):
        return True
    if proxy_header() and request.get_header(proxy_header()):
        return False
    if BEHIND_FLY_PROXY:
        return True  # fly.io's scraper, over its private network
    try:
        peer = ipaddress.ip_address(request.environ.get('REMOTE_ADDR', ''))
    except ValueError:
        return False
    peer = getattr(peer, 'ipv4_mapped', None) or peer  # ::ffff:127.0.0.1 when listening on ::
    return peer.is_loopback or peer.is_private


@app.get('/metrics')
def metrics():
    """Prometheus text format, for a scraper on this machine or a private network (see metrics_allowed)."""
    if not metrics_allowed():
        bottle.abort(404, 'Not found.')
    response.content_type = 'text/plain; version=0.0.4'
    lines = [f'babytrackd_{name}_total {value}' for name, value in sorted(stats.items())] + [
        f'babytrackd_open_sockets {len(hub.peers())}', f'babytrackd_storage_faults_total {storage["faults"]}',
        f'babytrackd_resident_memory_bytes {rss_bytes()}']
    if backup := latest_backup():
        lines.append(f'babytrackd_backup_age_seconds {int(time.time() - os.path.getmtime(backup))}')
    return '\n'.join(lines) + '\n'


def on_own_connection(path, work):
    """Return work(conn) on a connection of its own to the database at `path`, closed after."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return work(conn)


def backup_to(path):
    """Write a consistent copy of the live database to `path` (SQLite's online backup, off the loop)."""
    apart(on_own_connection, DB_PATH, lambda source: on_own_connection(path, source.backup))
    return path


def backup_dir():
    """Return where automatic snapshots live: `backups/` beside the database."""
    return os.path.join(os.path.dirname(os.path.abspath(DB_PATH)), 'backups')


def latest_backup():
    """Return the newest automatic snapshot's path, or None."""
    folder = backup_dir()
    names = sorted(n for n in os.listdir(folder) if SNAPSHOT.fullmatch(n)) if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


def daily_snapshot():
    """Take today's snapshot when there is none yet, and keep only the newest BACKUP_KEEP."""
    folder = backup_dir()
    os.makedirs(folder, exist_ok=True)
    name = os.path.join(folder, f"babytrack-{dt.date.today().isoformat()}.db")
    if not os.path.exists(name):
        backup_to(name + '.part')
        os.replace(name + '.part', name)
        log.info('snapshot written %s', os.path.basename(name))
    for old in sorted(n for n in os.listdir(folder) if SNAPSHOT.fullmatch(n))[:-BACKUP_KEEP]:
        os.remove(os.path.join(folder, old))


def maintenance_loop():
    """Hourly: snapshot when due, let SQLite refresh its query statistics."""
    while True:
        try:
            if BACKUP_KEEP > 0:
                daily_snapshot()
            db.execute('PRAGMA optimize')
        except (OSError, sqlite3.Error):
            log.exception('maintenance failed')
        gevent.sleep(3600)


def probe_storage():
    """Try a write that needs new pages, so /health recovers once the disk takes writes again even
    when no device is writing (fly.io routes no requests to a machine whose check fails)."""
    faults = storage['faults']
    try:
        with transaction():
            db.execute('INSERT INTO login_failures (address, at) VALUES (zeroblob(16384), 0)')
            db.execute('DELETE FROM login_failures WHERE at = 0')
    except sqlite3.Error:
        storage['faults'] = faults  # the same fault, not a new one


def checkpoint_loop():
    """Once a second after writes, copy the WAL into the database from a thread, then copy on the loop the
    few frames written meanwhile (about a ms), so the next write starts the WAL over. The WAL starts over
    only when a write begins with all of it copied: under steady writes the thread alone never got there,
    and SQLite's own checkpoint inside a commit (serve() keeps it as the bound, 4,000 frames: writes
    faster than ~500 a second still reach it) held the loop 4-15 ms every second or so."""
    done, probed = db.total_changes, 0
    while True:
        gevent.sleep(1)
        if storage['fault'] and time.monotonic() - probed >= STORAGE_RETRY:
            probe_storage()
            probed = time.monotonic()
        if db.total_changes != done:
            done = db.total_changes
            try:
                read_apart('PRAGMA wal_checkpoint(PASSIVE)', ())  # a worker's kept connection: fewer turns of the GIL
                if db.total_changes - done < 100:  # a starved thread leaves more: the bound's checkpoint copies it
                    db.execute('PRAGMA wal_checkpoint(PASSIVE)')
            except (sqlite3.Error, OSError):  # OSError: read_apart's stat of a file moved away
                log.exception('checkpoint failed')


def swap_in_restore(path):
    """Before opening: put a waiting PATH.restore in place of the database, keeping the old file aside."""
    waiting = path + '.restore'
    if not os.path.exists(waiting):
        return
    try:
        verdict = on_own_connection(waiting, lambda check: check.execute('PRAGMA integrity_check').fetchone()[0])
    except sqlite3.DatabaseError:  # not a database at all
        verdict = None
    if verdict != 'ok':
        raise SystemExit(f'{waiting} failed its integrity check; nothing was restored')
    aside = f"{path}.before-restore-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ('', '-wal', '-shm'):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    os.replace(waiting, path)
    log.warning('restored the database from %s; the previous file is %s', os.path.basename(waiting),
                os.path.basename(aside))


class Refused(ValueError):
    """A request refused before its body is read: `answer` is the whole HTTP response."""

    def __init__(self, status, message):
        super().__init__(message)
        body = json.dumps({'error': message}).encode()
        head = (f'HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n'
                'Connection: close\r\n\r\n')
        self.status, self.answer = status[:3], head.encode() + body


class HeadReader:
    """Reads a request's headers for http.client, refusing them past `budget` bytes in all (431)."""

    def __init__(self, rfile, budget):
        self.rfile, self.budget = rfile, budget

    def readline(self, limit=-1):
        line = self.rfile.readline(self.budget + 1)
        self.budget -= len(line)
        if self.budget < 0:
            raise Refused('431 Request Header Fields Too Large', 'Request line and headers are over 16 KiB.')
        return line


class Handler(WebSocketHandler):
    """gevent-websocket's handler, hardened. TCP_NODELAY: pywsgi writes headers and body separately,
    and without it each response waits ~40 ms for the client's delayed ACK. A connection past the cap
    is answered 503 at once. A request's line and headers get 10 s and 16 KiB, a keep-alive connection
    60 s to begin the next request; neither deadline runs while the application (or a WebSocket) does.
    Transfer-Encoding is refused (411) before any body is read: our bodies are small and sized."""

    def handle(self):
        if len(self.server.pool) > self.server.max_connections:
            with contextlib.suppress(OSError):
                self.socket.sendall(Refused('503 Service Unavailable', 'Too many connections; try again soon.').answer)
            self.rfile.close()
            return
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def handle_one_request(self):
        if self.requestline is not None:  # a request was served: wait for the next one to begin
            try:
                began = gevent.with_timeout(IDLE_SECONDS, self.rfile.peek, 1, timeout_value=b'')
            except OSError:
                began = b''
            if not began:
                return None
        with gevent.Timeout(HEAD_SECONDS, socket.timeout('request head too slow')) as self.deadline:
            return super().handle_one_request()

    def MessageClass(self, fp, *args):
        return super().MessageClass(HeadReader(fp, HEAD_MAX - len(self.requestline)), *args)

    def read_request(self, raw_requestline):
        try:
            super().read_request(raw_requestline)
        finally:
            self.deadline.close()
        if 'Transfer-Encoding' in self.headers:
            raise Refused('411 Length Required', 'Send a Content-Length; Transfer-Encoding is not accepted.')
        return True

    def _handle_client_error(self, error):
        """gevent's hook for a request it cannot read: our refusals answer for themselves."""
        if isinstance(error, socket.timeout):
            error = Refused('408 Request Timeout', 'The request line and headers took over 10 s.')
        elif isinstance(error, http.client.HTTPException):  # more than 100 headers
            error = Refused('431 Request Header Fields Too Large', 'Too many headers.')
        if isinstance(error, Refused):
            return error.status, error.answer
        return super()._handle_client_error(error)


def file_descriptors_for(connections):
    """Raise the open-files limit to fit `connections` (and the database's files); return the
    connection cap it allows, so the process never runs out of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 64
    if soft < wanted and (hard == resource.RLIM_INFINITY or soft < hard):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < wanted:
        log.warning('at most %s connections: the open-files limit is %s', soft - 64, soft)
    return min(connections, soft - 64)


def on_this_machine(host):
    """Tell whether a host name or address means this machine (localhost, 127.0.0.0/8, ::1)."""
    try:
        return host == 'localhost' or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def announce():
    """Tell the operator on the console where to log in, where the data lives and what to set next."""
    snapshots = (f'daily snapshots in {backup_dir()}/ (the newest {BACKUP_KEEP} kept)' if BACKUP_KEEP > 0
                 else 'daily snapshots off (BACKUP_KEEP=0)')
    lines = [f'log in at {BASE_URL}/admin as {ADMIN_USER}', f'database {os.path.abspath(DB_PATH)}; {snapshots}']
    if not os.environ.get('BASE_URL'):
        lines.append('for a real deployment set BASE_URL to its public https:// address (share links, Secure cookies)')
    if not ADMIN_PASS:
        lines.append('set ADMIN_PASS to choose the admin password '
                     f'(or a hash from: {sys.executable} -m babytrackd hash-password)')
    print('\n'.join(f'babytrackd: {line}' for line in lines), flush=True)
    if not SECURE_COOKIES and not on_this_machine(urlsplit(BASE_URL).hostname or ''):
        log.warning('BASE_URL %s is not https: cookies will not be Secure, and logins cross the network in clear',
                    BASE_URL)
    if TRUST_PROXY_HEADER and not on_this_machine(HOST):
        log.warning('TRUST_PROXY_HEADER is set but HOST %s is reachable from outside: a client connecting directly '
                    'can forge %s; listen on 127.0.0.1 behind the proxy', HOST, TRUST_PROXY_HEADER)


def serve():
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    server = WSGIServer((HOST, PORT), logged(app), handler_class=Handler, log=None, error_log=log,
                        spawn=gevent.pool.Pool())  # unbounded: Handler refuses past the cap at once
    server.pre_start_hook = pre_start_hook
    server.max_connections = file_descriptors_for(MAX_CONNECTIONS)
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    server.start()
    gc.freeze()  # what start-up made lives for good: keep it out of every later collection's scan
    hub.start()
    if os.environ.get('BABYTRACKD_TEST_MAX_PAGES'):  # tests fill the "disk" with this, and free it with SIGUSR1
        db.execute(f"PRAGMA max_page_count = {int(os.environ['BABYTRACKD_TEST_MAX_PAGES'])}")
        gevent.signal_handler(signal.SIGUSR1, lambda: db.execute('PRAGMA max_page_count = 1073741823'))
    db.execute('PRAGMA wal_autocheckpoint = 4000')  # 16 MB: reached only when the thread cannot keep up
    background = [gevent.spawn(maintenance_loop), gevent.spawn(checkpoint_loop)]
    log.info('babytrackd %s listening on %s:%s', VERSION, HOST, server.server_port)
    announce()
    stopping.wait()
    gevent.killall(background)
    shutdown(server)


def shutdown(server):
    """Stop accepting, say goodbye to every socket, finish requests, checkpoint and close the database."""
    log.info('shutting down')
    server.close()  # stop accepting
    hub.close_all()
    deadline = time.monotonic() + 2
    while hub.peers() and time.monotonic() < deadline:
        gevent.sleep(0.05)
    for peer in hub.peers():
        peer.shutdown()
    server.stop(timeout=3)
    gevent.get_hub().threadpool.join()  # a checkpoint or backup still running in a thread
    for conn in readers:  # the last connection to close takes the -wal and -shm files with it
        conn.close()
    if db.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0]:
        log.warning('the last checkpoint was busy; SQLite replays the WAL at the next start')
    db.close()
    log.info('stopped')


###############################################################################
# Command line #################################################################
###############################################################################

def main(argv=None):
    """serve (default) | backup PATH | vacuum | hash-password"""
    parser = argparse.ArgumentParser(prog='babytrackd', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command')
    commands.add_parser('serve', help='run the server (the default)')
    commands.add_parser('backup', help='write a consistent copy of the database while it serves').add_argument('path')
    commands.add_parser('vacuum', help='rebuild the database file to reclaim space')
    commands.add_parser('hash-password', help='print a bcrypt hash for ADMIN_PASS (reads the password from stdin)')
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == 'hash-password':
        print(hash_password(sys.stdin.readline().rstrip('\n')))
        return 0
    if args.command == 'backup':
        print(f'backup written to {backup_to(args.path)}')
        return 0
    swap_in_restore(DB_PATH)
    open_db()
    if args.command == 'vacuum':
        db.execute('VACUUM')
        print('vacuum done')
        return 0
    if generated := ensure_admin():
        print(f'babytrackd: created admin "{ADMIN_USER}" with password: {generated}\n'
              '            (shown once; set ADMIN_PASS to choose your own)', flush=True)
    serve()
    return 0


if __name__ == '__main__':
    sys.exit(main())
