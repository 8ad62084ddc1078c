"""babytrackd: a self-hosted baby-sleep tracking server for one consultant and her client families.

The consultant (admin) logs in to server-rendered pages under /admin, creates families, hands
each family time-limited share links, and reads each family's day as an hourly grid. Parents open
their link and get an offline-first web app (static/app/) that syncs every tap to the family's
other devices over a WebSocket (/ws). One process, one SQLite file, one module.

Run:    python babytrackd.py            (serves on :8080 with ./babytrack.db)
        python babytrackd.py backup PATH | vacuum | hash-password
Tests:  pytest -q

Configuration comes from the environment, read once at import:

    PORT (8080)  HOST (0.0.0.0)  DB_PATH (babytrack.db)  ADMIN_USER (jane)  ADMIN_PASS (unset)
    BASE_URL (http://localhost:PORT)  DEFAULT_TZ (UTC)  BCRYPT_ROUNDS (12)  WS_PING_INTERVAL (25)
    LOG_LEVEL (info)  LOG_FORMAT (text)  BACKUP_KEEP (7)

Limits: request bodies 64 KiB, WebSocket messages 64 KiB, one writer connection to SQLite.
sqlite3 and bcrypt block the event loop while they run: queries stay small and indexed, bcrypt
and backups run in gevent's threadpool.

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
import csv
import datetime as dt
import functools
import gc
import hashlib
import io
import json
import logging
import random
import re
import secrets
import signal
import socket
import sqlite3
import struct
import time
import uuid
import zoneinfo
from collections import deque
from urllib.parse import urlsplit

import bcrypt
import bottle
import gevent
import gevent.event
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
SEND_QUEUE = 256
LOGIN_FAILURES, LOGIN_WINDOW = 5, 15 * 60
CLOCK_SKEW_MS = 5 * 60 * 1000
DAY_MS = 24 * 3600 * 1000
MIN_TS = 946684800000  # 2000-01-01T00:00:00Z
MAX_TS = 253402300799999  # 9999-12-31T23:59:59.999Z

DEFAULT_CONFIG = [
    {'category': 'sleep', 'stateful': True, 'buttons': [
        {'label': 'sleeping', 'timing': True, 'counted': True},
        {'label': 'awake', 'timing': True, 'counted': False}]},
    {'category': 'feed', 'buttons': [
        {'label': 'breast left'}, {'label': 'breast right'}, {'label': 'bottle'}]},
    {'category': 'nappy', 'buttons': [
        {'label': 'wet'}, {'label': 'dirty'}, {'label': 'wet + dirty'}]},
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
    # one row per entry), login failures that survive a restart, and no indexes that no query uses.
    """
    DROP INDEX idx_entries_family;
    DROP INDEX idx_entries_updated;
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
]


def migrate(db):
    """Bring the schema up to the newest version, one migration per transaction."""
    version = db.execute('PRAGMA user_version').fetchone()[0]
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
    conn.execute('PRAGMA journal_mode = WAL')
    conn.execute('PRAGMA synchronous = NORMAL')
    conn.execute('PRAGMA foreign_keys = ON')
    conn.execute('PRAGMA busy_timeout = 5000')
    conn.execute('PRAGMA journal_size_limit = 16777216')  # a burst of writes leaves no huge WAL behind
    migrate(conn)
    db = conn
    return conn


class transaction:
    """`with transaction():` wraps writes in BEGIN IMMEDIATE/COMMIT; never yield inside one."""

    def __enter__(self):
        db.execute('BEGIN IMMEDIATE')
        return db

    def __exit__(self, kind, value, trace):
        db.execute('ROLLBACK' if kind else 'COMMIT')


def one(sql, *args):
    """Return the first row of a query as a dict, or None."""
    row = db.execute(sql, args).fetchone()
    return dict(row) if row else None


def rows(sql, *args):
    """Return every row of a query as a list of dicts."""
    return [dict(r) for r in db.execute(sql, args)]


###############################################################################
# Domain #######################################################################
###############################################################################

class Invalid(ValueError):
    """Input a person or device sent that we refuse; the message is shown to them."""


def refuse_constant(name):
    raise ValueError(f'{name} is not JSON')


JSON_DECODER = json.JSONDecoder(parse_constant=refuse_constant)  # made once: json.loads makes one per call


def parse_json(text):
    """Parse JSON text (strictly decoded UTF-8), refusing what Python's json reads but browsers and
    SQLite do not: NaN, Infinity, lone surrogates."""
    data = JSON_DECODER.decode(text)
    if '\\u' in text:  # text decoded from UTF-8 holds no surrogates; only an escape can make one
        json.dumps(data, ensure_ascii=False).encode()  # UnicodeEncodeError, a ValueError, on a lone surrogate
    return data


def check_text(value, name, low, high):
    """Return value if it is a string of low..high characters, else raise Invalid."""
    if not isinstance(value, str):
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


def check_int(value, name):
    """Return value if it is an integer (not a bool), else raise Invalid."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f'{name} must be an integer')
    return value


def check_bool(value, name):
    """Return value if it is true or false, else raise Invalid."""
    if not isinstance(value, bool):
        raise Invalid(f'{name} must be true or false')
    return value


@functools.cache
def zone_names():
    """Return the set of IANA zone names (read from disk once)."""
    return frozenset(zoneinfo.available_timezones())


def time_zones():
    """Return the IANA zone names, sorted, for a select box."""
    return sorted(zone_names())


def check_tz(value):
    """Return value if it names an IANA time zone, else raise Invalid."""
    if not isinstance(value, str) or value not in zone_names():
        raise Invalid('tz must be an IANA time zone name such as Europe/London')
    return value


def family_dict(row):
    """Shape a families row for the API."""
    return {'id': row['id'], 'name': row['name'], 'notes': row['notes'] or '',
            'archived': bool(row['archived']), 'tz': row['tz'], 'created_at': row['created_at']}


def get_family(family_id):
    """Return the family as a dict, or None."""
    row = one('SELECT * FROM families WHERE id = ?', family_id)
    return family_dict(row) if row else None


def list_families(include_archived=False):
    """Return families, newest first, with their last activity."""
    found = rows("""
        SELECT f.*, (SELECT MAX(updated_at) FROM entries e WHERE e.family_id = f.id) AS last_activity
        FROM families f WHERE ? OR NOT f.archived ORDER BY f.created_at DESC""", include_archived)
    return [dict(family_dict(r), last_activity=r['last_activity']) for r in found]


def family_fields(changes):
    """Return the valid family fields among name, notes, archived and tz, else raise Invalid."""
    unknown = set(changes) - {'name', 'notes', 'archived', 'tz'}
    if unknown:
        raise Invalid(f'unknown field: {sorted(unknown)[0]}')
    fields = {}
    if 'name' in changes:
        fields['name'] = check_text(changes['name'], 'name', 1, 200).strip()
        if not fields['name']:
            raise Invalid('name must not be empty')
    if 'notes' in changes:
        fields['notes'] = check_text(changes['notes'], 'notes', 0, 10_000)
    if 'archived' in changes:
        fields['archived'] = int(check_bool(changes['archived'], 'archived'))
    if 'tz' in changes:
        fields['tz'] = check_tz(changes['tz'])
    return fields


def create_family(name, notes='', tz=None):
    """Validate and store a new family; return it."""
    fields = family_fields({'name': name, 'notes': notes or '', 'tz': tz or DEFAULT_TZ})
    family_id = secrets.token_urlsafe(6)  # 8 url-safe characters
    with transaction():
        db.execute('INSERT INTO families (id, name, notes, created_at, archived, tz) VALUES (?, ?, ?, ?, 0, ?)',
                   (family_id, fields['name'], fields['notes'], now_ms(), fields['tz']))
    return get_family(family_id)


def update_family(family_id, changes):
    """Apply the allowed changes (name, notes, archived, tz) to a family; return it."""
    fields = family_fields(changes)
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
        check_int(expires_at, 'expires_at')
        if expires_at <= now_ms():
            raise Invalid('expires_at must be in the future')
        if expires_at > MAX_TS:
            raise Invalid('expires_at must be before the year 10000')
    token = secrets.token_urlsafe(24)  # 32 url-safe characters
    with transaction():
        db.execute('INSERT INTO access_links (token, family_id, label, expires_at, created_at) VALUES (?, ?, ?, ?, ?)',
                   (token, family_id, label, expires_at, now_ms()))
    return link_dict(one('SELECT * FROM access_links WHERE token = ?', token))


def list_links(family_id):
    """Return the family's links that were not revoked, newest first."""
    found = rows('SELECT * FROM access_links WHERE family_id = ? AND revoked_at IS NULL ORDER BY created_at DESC',
                 family_id)
    return [link_dict(r) for r in found]


def revoke_link(family_id, token):
    """Mark the link revoked; return False when the family has no such live link."""
    with transaction():
        done = db.execute('UPDATE access_links SET revoked_at = ? WHERE token = ? AND family_id = ? AND revoked_at IS NULL',
                          (now_ms(), token, family_id)).rowcount
    return bool(done)


def check_link(token):
    """Return (link, None) for a working link, else (None, (status, reason, message))."""
    row = one("""SELECT l.*, f.name AS family_name, f.archived, f.tz FROM access_links l
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


def validate_config(data):
    """Return data if it is a valid list of button groups, else raise Invalid."""
    try:  # Python's json reads NaN, Infinity and lone surrogates; browsers' would not
        size = len(json.dumps(data, allow_nan=False, ensure_ascii=False).encode())
    except (ValueError, RecursionError):
        raise Invalid('config must be plain JSON: no NaN, Infinity or lone surrogates') from None
    if size > MAX_CONFIG:
        raise Invalid('config must be at most 16 KiB')
    if not isinstance(data, list):
        raise Invalid('config must be a list of button groups')
    if len(data) > 20 or sum(1 for g in data if isinstance(g, dict) and g.get('stateful')) > 4:
        raise Invalid('config may have at most 20 groups, 4 of them stateful')
    seen = set()
    for number, group in enumerate(data, start=1):
        if not isinstance(group, dict):
            raise Invalid(f'group {number} must be an object')
        category = check_text(group.get('category'), f'group {number} category', 1, 64)
        if category in seen:
            raise Invalid(f'category "{category}" appears twice')
        seen.add(category)
        check_bool(group.get('stateful', False), f'group {number} stateful')
        buttons = group.get('buttons')
        if not isinstance(buttons, list) or not buttons:
            raise Invalid(f'group {number} must have a list of buttons')
        for place, button in enumerate(buttons, start=1):
            if not isinstance(button, dict):
                raise Invalid(f'group {number} button {place} must be an object')
            check_text(button.get('label'), f'group {number} button {place} label', 1, 64)
            for flag in ('timing', 'counted'):
                check_bool(button.get(flag, False), f'group {number} button {place} {flag}')
    return data


def save_config(family_id, data):
    """Validate and store the family's button groups; return them."""
    validate_config(data)
    with transaction():
        db.execute("""INSERT INTO configs (family_id, data, updated_at) VALUES (?, ?, ?)
                      ON CONFLICT(family_id) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at""",
                   (family_id, json.dumps(data), now_ms()))
    return data


def entry_dict(row):
    """Shape an entries row for the wire."""
    return {'id': row['id'], 'ts': row['ts'], 'type': row['type'], 'value': row['value'],
            'deleted': bool(row['deleted']), 'updated_at': row['updated_at'], 'seq': row['seq'],
            'by': row['by']}


def live_entries(family_id, limit=None):
    """Return the family's entries that are not deleted, newest ts first."""
    found = db.execute('SELECT * FROM entries WHERE family_id = ? AND NOT deleted ORDER BY ts DESC, id LIMIT ?',
                       (family_id, -1 if limit is None else limit))
    return [entry_dict(r) for r in found]


# SQLite writes the wire form itself: a 20,000-entry catch-up then costs one query, not 20,000 dicts.
ENTRY_JSON = """json_object('id', id, 'ts', ts, 'type', type, 'value', value,
    'deleted', json(CASE WHEN deleted THEN 'true' ELSE 'false' END), 'updated_at', updated_at, 'seq', seq, 'by', by)"""


def entries_json(family_id, since=0, after=None):
    """Return, as a JSON array, every change after seq `since`, or the live entries: all of them, or
    (CONTRACT section 12) those at or after ms `after` plus each stateful category's state then."""
    if since:
        found = db.execute(f'SELECT {ENTRY_JSON} FROM entries WHERE family_id = ? AND seq > ? ORDER BY seq',
                           (family_id, since))
    elif after is not None:
        found = db.execute(f"""SELECT {ENTRY_JSON} FROM entries WHERE family_id = ? AND NOT deleted AND ts >= ?
                               ORDER BY ts DESC, id""", (family_id, after)).fetchall()
        for group in get_config(family_id):
            if group.get('stateful'):
                found += db.execute(f"""SELECT {ENTRY_JSON} FROM entries
                                        WHERE family_id = ? AND type = ? AND NOT deleted AND ts < ?
                                        ORDER BY ts DESC, id DESC LIMIT 1""", (family_id, group['category'], after))
    else:
        found = db.execute(f'SELECT {ENTRY_JSON} FROM entries WHERE family_id = ? AND NOT deleted ORDER BY ts DESC, id',
                           (family_id,))
    return '[' + ','.join(row[0] for row in found) + ']'


def entries_between(family_id, start, end):
    """Return, as a JSON array, the live entries with start <= ts < end, oldest first."""
    found = db.execute(f"""SELECT {ENTRY_JSON} FROM entries WHERE family_id = ? AND NOT deleted AND ts >= ? AND ts < ?
                           ORDER BY ts, id""", (family_id, start, end))
    return '[' + ','.join(row[0] for row in found) + ']'


def family_cursor(family_id):
    """Return the highest seq the family's entries carry (0 when none)."""
    return db.execute('SELECT COALESCE(MAX(seq), 0) FROM entries WHERE family_id = ?', (family_id,)).fetchone()[0]


def recent_changes(family_id, limit=50):
    """Return the family's latest changes, newest first, tombstones included."""
    found = db.execute('SELECT * FROM entries WHERE family_id = ? ORDER BY seq DESC LIMIT ?', (family_id, limit))
    return [entry_dict(r) for r in found]


###############################################################################
# Sync #########################################################################
###############################################################################

ID_PATTERN = re.compile(r'[A-Za-z0-9_-]{1,64}')
ENTRY_FIELDS = ('ts', 'type', 'value', 'deleted')


def validate_entry_fields(entry, now, need_all):
    """Return the valid wire fields of an entry message (id, ts, type, value, deleted, updated_at)."""
    if not isinstance(entry, dict):
        raise Invalid('entry must be an object')
    entry_id = entry.get('id')
    if not isinstance(entry_id, str) or not ID_PATTERN.fullmatch(entry_id):
        raise Invalid('entry id must be 1-64 characters of A-Z a-z 0-9 _ -')
    fields = {'id': entry_id}
    if 'ts' in entry:
        ts = check_int(entry['ts'], 'ts')
        if not MIN_TS <= ts <= now + DAY_MS:
            raise Invalid('ts must be between 2000-01-01 and one day from now')
        fields['ts'] = ts
    if 'type' in entry:
        fields['type'] = check_text(entry['type'], 'type', 1, 64)
    if 'value' in entry:
        fields['value'] = check_text(entry['value'], 'value', 0, 4096)
    if 'deleted' in entry:
        fields['deleted'] = check_bool(entry['deleted'], 'deleted')
    if entry.get('updated_at') is not None:
        if check_int(entry['updated_at'], 'updated_at') < 0:
            raise Invalid('updated_at must not be negative')
        fields['updated_at'] = entry['updated_at']
    if need_all:
        missing = [name for name in ('ts', 'type', 'value') if name not in fields]
        if missing:
            raise Invalid(f'entry needs {", ".join(missing)}')
    return fields


def wins(new, old):
    """Tell whether state `new` beats stored state `old` (last write wins, then a fixed tie-break).

    On equal updated_at the larger (deleted, ts, type, value) tuple wins, so every arrival order
    of the same writes ends in the same state.
    """
    if new['updated_at'] != old['updated_at']:
        return new['updated_at'] > old['updated_at']
    key = lambda e: (bool(e['deleted']), e['ts'], e['type'], e['value'])
    return key(new) > key(old)


def apply_entry(family_id, action, message, by, now=None):
    """Apply one client write under the sync rules; return (outcome, action, entry).

    outcome is 'accepted' (broadcast to the family), 'repeat' or 'stale' (answer the sender alone).
    Raises Invalid for a message that must be refused.
    """
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
        stored = entry_dict(stored) if stored else None
        old = {name: stored[name] for name in ENTRY_FIELDS} if stored else {'deleted': False}
        new = {**old, **{name: fields[name] for name in ENTRY_FIELDS if name in fields}}
        if len(new) < len(ENTRY_FIELDS):
            raise Invalid('no such entry')
        if stored and new == old:
            return 'repeat', action, stored
        new['updated_at'] = updated_at
        if stored and not wins(new, stored):
            return 'stale', 'update', stored
        seq = db.execute('SELECT COALESCE(MAX(seq), 0) + 1 FROM entries').fetchone()[0]
        db.execute("""INSERT INTO entries (id, family_id, ts, type, value, deleted, updated_at, seq, by)
                      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                      ON CONFLICT(id) DO UPDATE SET ts = excluded.ts, type = excluded.type, value = excluded.value,
                        deleted = excluded.deleted, updated_at = excluded.updated_at, seq = excluded.seq, by = excluded.by""",
                   (fields['id'], family_id, new['ts'], new['type'], new['value'], int(new['deleted']),
                    new['updated_at'], seq, by))
    entry = {'id': fields['id'], **new, 'seq': seq, 'by': by}
    kind = 'add' if stored is None else 'delete' if new['deleted'] else 'update'
    return 'accepted', kind, entry


###############################################################################
# Summaries ####################################################################
###############################################################################

def day_window(date, tz):
    """Return (start_ms, end_ms) of the local day `date` (a datetime.date) in zone `tz`."""
    if not 1900 <= date.year <= 9000:  # keeps the date arithmetic here and on the pages in range
        raise Invalid('date must be between the years 1900 and 9000')
    zone = zoneinfo.ZoneInfo(tz)
    start = dt.datetime(date.year, date.month, date.day, tzinfo=zone)
    end = start.date() + dt.timedelta(days=1)
    end = dt.datetime(end.year, end.month, end.day, tzinfo=zone)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def local_time(ms, tz):
    """Return the moment `ms` on the wall clock of zone `tz`."""
    return dt.datetime.fromtimestamp(ms / 1000, zoneinfo.ZoneInfo(tz))


def local_today(tz, now=None):
    """Return today's date in zone `tz`."""
    return local_time(now_ms() if now is None else now, tz).date()


def state_spans(family_id, config, start, end, now):
    """Return the stateful categories' spans clipped to [start, min(end, now)).

    Each span: {category, label, start, end, since, counted}; `since` is when the state began,
    before `start` for the one that carries in. A state lasts until the next entry of its category.
    """
    stop = min(end, now)
    spans = []
    for group in config:
        if not group.get('stateful'):
            continue
        category = group['category']
        counted = {b['label'] for b in group['buttons'] if b.get('counted')}
        before = db.execute("""SELECT ts, value FROM entries WHERE family_id = ? AND type = ? AND NOT deleted
                               AND ts < ? ORDER BY ts DESC, id DESC LIMIT 1""", (family_id, category, start)).fetchall()
        inside = db.execute("""SELECT ts, value FROM entries WHERE family_id = ? AND type = ? AND NOT deleted
                               AND ts >= ? AND ts < ? ORDER BY ts, id""", (family_id, category, start, stop)).fetchall()
        changes = before + inside
        for (ts, value), following in zip(changes, changes[1:] + [(stop, None)]):
            begin, finish = max(ts, start), min(following[0], stop)
            if finish > begin:
                spans.append({'category': category, 'label': value, 'start': begin, 'end': finish,
                              'since': ts, 'counted': value in counted})
    return spans


def day_summary(family, date, now=None):
    """Return the summary of one local day for a family (CONTRACT section 6)."""
    now = now_ms() if now is None else now
    tz = family['tz']
    start, end = day_window(date, tz)
    config = get_config(family['id'])
    hours = [{'hour': local_time(slot, tz).hour, 'start': slot, 'events': []}
             for slot in range(start, end, 3600 * 1000)]
    day_entries = [entry_dict(r) for r in db.execute(
        'SELECT * FROM entries WHERE family_id = ? AND NOT deleted AND ts >= ? AND ts < ? ORDER BY ts, id',
        (family['id'], start, end))]
    categories = {group['category']: {'count': 0} for group in config}
    for entry in day_entries:
        hours[(entry['ts'] - start) // (3600 * 1000)]['events'].append(entry)
        categories.setdefault(entry['type'], {'count': 0})['count'] += 1
    spans = state_spans(family['id'], config, start, end, now)
    for group in config:
        if group.get('stateful'):
            counted_ms = sum(s['end'] - s['start'] for s in spans if s['category'] == group['category'] and s['counted'])
            categories[group['category']]['minutes'] = round(counted_ms / 60000)
    nappies = [e['value'].lower() for e in day_entries if e['type'] == 'nappy']
    totals = {'sleep_minutes': categories.get('sleep', {}).get('minutes', 0),
              'feeds': sum(1 for e in day_entries if e['type'] == 'feed'),
              'wet': sum(1 for v in nappies if 'wet' in v),
              'dirty': sum(1 for v in nappies if 'dirty' in v)}
    return {'date': date.isoformat(), 'tz': tz, 'hours': hours, 'totals': totals,
            'categories': categories, 'spans': spans}


def clock_minutes(ms, start, tz):
    """Return where `ms` falls on the wall clock of the local day that began at `start`, in minutes (1440 at its end)."""
    offset = lambda t: local_time(t, tz).utcoffset().total_seconds() / 60
    return round((ms - start) / 60000 + offset(ms) - offset(start), 1)


def sleep_chart(family, last, now=None, days=14):
    """Return the `days` local days up to date `last`: each day's sleep spans and feeds on the wall clock."""
    chart = []
    for back in range(days - 1, -1, -1):
        date = last - dt.timedelta(days=back)
        summary = day_summary(family, date, now)
        start, clock = summary['hours'][0]['start'], lambda ms: clock_minutes(ms, start, family['tz'])
        chart.append({'date': date, 'minutes': summary['totals']['sleep_minutes'],
                      'sleep': [(clock(s['start']), max(0, clock(s['end']) - clock(s['start'])))
                                for s in summary['spans'] if s['category'] == 'sleep' and s['counted']],
                      'feeds': [clock(e['ts']) for hour in summary['hours'] for e in hour['events'] if e['type'] == 'feed']})
    return chart


def when(ms, tz, now):
    """Name a moment on the family's clock: '19:42', 'yesterday 19:42' or 'Mon 3 Nov 19:42'."""
    moment, today = local_time(ms, tz), local_today(tz, now)
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


###############################################################################
# Auth #########################################################################
###############################################################################

def hash_password(password):
    """Return the bcrypt hash of a password (runs in the threadpool)."""
    salt = bcrypt.gensalt(BCRYPT_ROUNDS)
    return gevent.get_hub().threadpool.apply(bcrypt.hashpw, (password.encode()[:72], salt)).decode()


def password_matches(password, password_hash):
    """Tell whether the password matches the bcrypt hash (runs in the threadpool)."""
    try:
        # bcrypt reads 72 bytes at most; bcrypt 5 refuses longer passwords rather than cut them
        return gevent.get_hub().threadpool.apply(bcrypt.checkpw, (password.encode()[:72], password_hash.encode()))
    except ValueError:
        return False


# A hash to check against when the username is unknown, so both failures take the same time.
_DUMMY_HASH = None


def ensure_admin(username=ADMIN_USER, password=ADMIN_PASS):
    """Make `username` the one admin, with `password` when given (a new one ends every session);
    return a generated password when one was made."""
    generated, admin = None, one('SELECT * FROM admins WHERE username = ?', username)
    if password:
        if admin and (admin['password_hash'] == password or password_matches(password, admin['password_hash'])):
            password_hash = admin['password_hash']  # unchanged: sessions stay
        else:
            password_hash = password if password.startswith('$2') else hash_password(password)
    elif admin:
        password_hash = admin['password_hash']
    else:
        generated = secrets.token_urlsafe(12)
        password_hash = hash_password(generated)
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
        _DUMMY_HASH = _DUMMY_HASH or hash_password(secrets.token_hex(8))
        password_matches(password, _DUMMY_HASH)
        return None
    return admin if password_matches(password, admin['password_hash']) else None


def session_key(token):
    """Return what the database stores for a session token (its hash, so a copy of the file grants nothing)."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(admin_id):
    """Start an admin session; return its cookie token."""
    token = secrets.token_urlsafe(32)
    now = now_ms()
    with transaction():
        db.execute('DELETE FROM admin_sessions WHERE expires_at < ?', (now,))
        db.execute('INSERT INTO admin_sessions (token, admin_id, expires_at, csrf) VALUES (?, ?, ?, ?)',
                   (session_key(token), admin_id, now + SESSION_DAYS * DAY_MS, secrets.token_urlsafe(24)))
    return token


def get_session(token):
    """Return the live session for a cookie token (with the admin's username), or None."""
    if not token:
        return None
    return one("""SELECT s.*, a.username FROM admin_sessions s JOIN admins a ON a.id = s.admin_id
                  WHERE s.token = ? AND s.expires_at > ?""", session_key(token), now_ms())


def end_session(token):
    """End an admin session."""
    if token:
        with transaction():
            db.execute('DELETE FROM admin_sessions WHERE token = ?', (session_key(token),))


class RateLimiter:
    """Counts failures per client address in a sliding window."""

    def __init__(self, limit, window):
        self.limit, self.window, self.failures = limit, window, {}

    def _recent(self, key, now):
        times = self.failures.get(key)
        while times and times[0] <= now - self.window:
            times.popleft()
        if times is not None and not times:
            del self.failures[key]
        return times or ()

    def blocked(self, key, now=None):
        """Tell whether the address has used up its failures."""
        return len(self._recent(key, time.monotonic() if now is None else now)) >= self.limit

    def fail(self, key, now=None):
        """Record one failure for the address."""
        now = time.monotonic() if now is None else now
        if len(self.failures) > 10_000:  # many addresses: forget the ones whose window has passed
            for other in list(self.failures):
                self._recent(other, now)
        self._recent(key, now)
        self.failures.setdefault(key, deque()).append(now)

    def forgive(self, key):
        """Take back the address's latest failure (the attempt it stood for succeeded)."""
        if self.failures.get(key):
            self.failures[key].pop()


login_limiter = RateLimiter(LOGIN_FAILURES, LOGIN_WINDOW)


###############################################################################
# Hub ##########################################################################
###############################################################################

# The sync protocol (CONTRACT section 5), server side:
# - A device connects to /ws?family=ID&since=SEQ with its link cookie; it is registered, gets
#   `init` (entries since SEQ, config, members, cursor), and every other device gets `presence`.
# - Each accepted write is committed first, then broadcast to every socket of the family, the
#   sender included (its acknowledgement). Repeats and stale writes are answered to the sender.
# - A frame goes straight to the socket when nothing waits and the kernel takes it whole; else it
#   waits in the socket's bounded queue for its one writer greenlet, which ends once the queue is
#   empty. A device whose queue is full is closed (1013), so one slow phone never delays the others.
# - The hub ticks every second: it pings each peer every WS_PING_INTERVAL (each at its own moment,
#   so a thousand sockets never answer at once), drops peers silent for three intervals, closes
#   links that expired, and finishes closes the peer did not answer.
# gevent-websocket reads frames without a size cap, answers control frames from the reading
# greenlet and drops close codes; this chapter reads and writes frames itself to fix all three.

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = (WebSocket.OPCODE_TEXT, WebSocket.OPCODE_BINARY,
                                                 WebSocket.OPCODE_CLOSE, WebSocket.OPCODE_PING,
                                                 WebSocket.OPCODE_PONG)
CLOSE_GOING_AWAY, CLOSE_PROTOCOL, CLOSE_UNSUPPORTED = 1001, 1002, 1003
CLOSE_BAD_DATA, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN, CLOSE_REVOKED = 1007, 1009, 1013, 4403


class CloseConnection(Exception):
    """A peer broke the framing rules; close with this code and reason."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code, self.reason = code, reason


def frame(opcode, payload=b''):
    """Return one unmasked, final WebSocket frame."""
    return Header.encode_header(True, opcode, b'', len(payload), 0) + payload


def unmask(payload, mask):
    """Undo a client frame's XOR mask, as one big-integer operation (gevent-websocket loops per byte)."""
    size = len(payload)
    key = int.from_bytes((mask * (size // 4 + 1))[:size], 'big')
    return (int.from_bytes(payload, 'big') ^ key).to_bytes(size, 'big')


class Peer:
    """One live WebSocket: its link, its send queue and, while the socket is backed up, its writer."""

    __slots__ = ('ws', 'sock', 'family_id', 'token', 'label', 'expires_at', 'queue', 'writer',
                 'last_heard', 'ping_at', 'closing_since', 'closed')

    def __init__(self, ws, link):
        self.ws, self.sock = ws, ws.handler.socket
        self.family_id, self.token = link['family_id'], link['token']
        self.label, self.expires_at = link['label'] or 'device', link['expires_at']
        self.queue = deque()
        self.last_heard = time.monotonic()
        self.ping_at = self.last_heard + random.uniform(0, WS_PING_INTERVAL)  # spread: no ping storms
        self.closing_since = None
        self.closed = False
        self.writer = None

    def _write_loop(self):
        """Write the queued frames in order, waiting for the socket as needed; end when none are left.
        A frame leaves the queue once written, so an empty queue means nothing is half sent."""
        try:
            while self.queue:
                self.sock.sendall(self.queue[0])
                self.queue.popleft()
        except OSError:
            self.shutdown()

    def send(self, text):
        """Send a text message (see send_frame)."""
        self.send_frame(frame(OP_TEXT, text.encode()))

    def send_frame(self, data):
        """Send one frame: at once while the socket takes it, else queued for a writer greenlet.
        A peer whose queue is full cannot keep up: it is closed (1013), the others never wait for it."""
        if self.closing_since is not None:
            return
        if not self.queue:  # the usual case: write now, never blocking the sender
            try:
                sent = self.sock.send(data, 0, timeout=0.0)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.shutdown()
                return
            if sent == len(data):
                return
            data = data[sent:]
        elif len(self.queue) >= SEND_QUEUE:  # drop what waits (but the frame being written), say why
            stats['slow_closed'] += 1
            head = self.queue.popleft()
            self.queue.clear()
            self.queue.append(head)
            self.close(CLOSE_TRY_AGAIN, 'too slow')
            return
        self.queue.append(data)
        if self.writer is None or self.writer.dead:
            self.writer = gevent.spawn(self._write_loop)

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
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def drain(self, seconds=1):
        """Discard what the peer still sends until it closes, so our close frame is not lost to a reset."""
        with gevent.Timeout(seconds, False):
            while self.sock.recv(65536):
                pass

    def receive(self):
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
            size += header.length
            if size > MAX_MESSAGE:
                raise CloseConnection(CLOSE_TOO_BIG, 'message over 64 KiB')
            payload = stream.read(header.length) if header.length else b''
            if len(payload) != header.length:
                return None
            payload = unmask(payload, header.mask)
            self.last_heard = time.monotonic()
            if header.opcode == OP_CLOSE:
                return None
            if header.opcode == OP_PING:
                self.send_frame(frame(OP_PONG, payload))
                continue
            if header.opcode == OP_PONG:
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
        try:
            return b''.join(parts).decode('utf-8')
        except UnicodeDecodeError:
            raise CloseConnection(CLOSE_BAD_DATA, 'messages must be UTF-8 text') from None


class Hub:
    """Live sockets per family: broadcast, presence, heartbeat and revocation."""

    def __init__(self):
        self.families = {}  # family id -> set of Peer

    def start(self):
        """Start the once-a-second heartbeat."""
        gevent.spawn(self._tick_loop)

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
            self.presence(peer.family_id)
        if peer.closing_since is not None and not peer.closed and peer.writer is not None:
            peer.writer.join(timeout=1)  # let the queued close frame go out first
        peer.shutdown()

    def broadcast(self, family_id, message):
        """Send one message to every socket of the family (encoded and framed once)."""
        data = frame(OP_TEXT, json.dumps(message, separators=(',', ':')).encode())
        for peer in self.peers(family_id):
            peer.send_frame(data)
        stats['messages_out'] += len(self.families.get(family_id, ()))

    def presence(self, family_id):
        """Tell the family's sockets who is online."""
        self.broadcast(family_id, {'type': 'presence', 'members': self.members(family_id)})

    def close_where(self, test, code, reason):
        """Close every peer for which test(peer) is true."""
        for peer in self.peers():
            if test(peer):
                peer.close(code, reason)

    def close_link(self, token, reason='link revoked'):
        """Close the sockets opened with a link."""
        self.close_where(lambda peer: peer.token == token, CLOSE_REVOKED, reason)

    def close_family(self, family_id, reason='family archived'):
        """Close every socket of a family."""
        self.close_where(lambda peer: peer.family_id == family_id, CLOSE_REVOKED, reason)

    def close_all(self, code=CLOSE_GOING_AWAY, reason='server restarting'):
        """Close every socket (shutdown)."""
        self.close_where(lambda peer: True, code, reason)

    def tick(self, now_mono, now_wall):
        """Expire links, ping, drop the silent and finish unanswered closes."""
        for peer in self.peers():
            if peer.closing_since is not None:
                if now_mono - peer.closing_since > 1:
                    peer.shutdown()
            elif peer.expires_at is not None and peer.expires_at <= now_wall:
                peer.close(CLOSE_REVOKED, 'link expired')
            elif now_mono - peer.last_heard > 3 * WS_PING_INTERVAL:
                log.info('socket dropped after silence family=%s', peer.family_id)
                peer.shutdown()
            elif now_mono >= peer.ping_at:
                peer.ping_at = now_mono + WS_PING_INTERVAL
                peer.send_frame(frame(OP_PING))

    def _tick_loop(self):
        while True:
            gevent.sleep(min(1.0, WS_PING_INTERVAL / 2))
            try:
                self.tick(time.monotonic(), now_ms())
            except Exception:
                log.exception('hub tick failed')


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


def handle_message(peer, message):
    """Act on one client message: store, then broadcast or answer the sender."""
    kind = message.get('type')
    if kind == 'ping':
        peer.send('{"type":"pong"}')
    elif kind == 'entry':
        outcome, action, entry = apply_entry(peer.family_id, message.get('action'), message, peer.label)
        reply = {'type': 'entry', 'action': action, 'entry': entry}
        if outcome == 'accepted':
            stats['entries_accepted'] += 1
            hub.broadcast(peer.family_id, reply)
        else:  # `stale` tells the app its write lost, so it can let the outbox item go
            peer.send(json.dumps(dict(reply, stale=True) if outcome == 'stale' else reply, separators=(',', ':')))
    elif kind == 'config':
        data = save_config(peer.family_id, message.get('data'))
        hub.broadcast(peer.family_id, {'type': 'config', 'data': data})
    else:
        raise Invalid('type must be entry, config or ping')


def refusal(error, message):
    """Return the error message for a refused client message, naming its entry id when it had one."""
    reply = {'type': 'error', 'error': str(error)}
    entry = message.get('entry') if isinstance(message, dict) else None
    entry_id = message.get('id') if isinstance(message, dict) and 'id' in message else (
        entry.get('id') if isinstance(entry, dict) else None)
    if isinstance(entry_id, str) and ID_PATTERN.fullmatch(entry_id):
        reply['id'] = entry_id
    return json.dumps(reply)


def serve_socket(ws, link, since, after=None):
    """Run one device's connection from init to goodbye (`after`: the first load's window start, ms)."""
    peer = hub.join(ws, link)
    family_id = peer.family_id
    log.info('socket open family=%s', family_id)
    try:
        members = hub.members(family_id)
        rest = json.dumps({'config': get_config(family_id), 'members': members, 'cursor': family_cursor(family_id)},
                          separators=(',', ':'))
        peer.send(f'{{"type":"init","entries":{entries_json(family_id, since, after)},{rest[1:]}')
        presence = json.dumps({'type': 'presence', 'members': members})
        for other in hub.peers(family_id):
            if other is not peer:
                other.send(presence)
        while True:
            try:
                text = peer.receive()
            except CloseConnection as error:
                stats['messages_refused'] += 1
                peer.close(error.code, error.reason)
                peer.drain()
                break
            except (OSError, WebSocketError):  # the peer vanished: EOF or reset
                break
            if text is None:
                peer.close(1000)
                break
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
APP_ROOT = os.path.join(STATIC_ROOT, 'app')
SECURITY_HEADERS = {
    'Content-Security-Policy': "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    'X-Frame-Options': 'DENY',
    'Referrer-Policy': 'no-referrer',
    'X-Content-Type-Options': 'nosniff',
}


def refuse_invalid(callback):
    """Plugin: turn a domain Invalid into a 400 with its message."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except Invalid as error:
            raise bottle.HTTPError(400, str(error)) from None
    return wrapper


app.install(refuse_invalid)


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


def form_or_json():
    """Return the body as a dict, from JSON or an HTML form."""
    return json_body() if sends_json() else form_body()


def form_body():
    """Return an HTML form's fields once its CSRF token is checked (403); anything else gets 415."""
    if request.content_type.split(';')[0].strip().lower() not in ('application/x-www-form-urlencoded',
                                                                 'multipart/form-data'):
        bottle.abort(415, 'Send this as an HTML form.')
    session = request.environ.get('babytrackd.session')
    if session and not secrets.compare_digest(request.forms.get('csrf', '').encode(), session['csrf'].encode()):
        bottle.abort(403, 'This form has expired. Reload the page and try again.')
    return {key: request.forms.getunicode(key) for key in request.forms}


def client_address():
    """Return the client's address (fly.io's proxy header where we run behind it)."""
    if BEHIND_FLY_PROXY and request.get_header('Fly-Client-IP'):
        return request.get_header('Fly-Client-IP')
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


def error_handler(error):
    """Answer every error as JSON or a small page; never a traceback."""
    if error.status_code >= 500:  # Bottle has written the traceback to wsgi.errors, our log
        message = 'Something went wrong on the server. Please try again.'
    else:
        message = error.body if isinstance(error.body, str) and error.body else error.status_line
    if wants_json() or request.path.startswith(('/ws', '/app/me', '/app/entries', '/health')):
        response.content_type = 'application/json'
        return json.dumps({'error': message})
    return page('message', title=error.status_line, message=message)


app.default_error_handler = error_handler


@app.hook('before_request')
def before_request():
    """Refuse oversized bodies early; find the admin session."""
    if request.content_length > MAX_BODY:
        bottle.abort(413, 'Request body is over 64 KiB.')
    request.environ['babytrackd.session'] = (get_session(request.get_cookie(ADMIN_COOKIE))
                                             if request.path.startswith('/admin') else None)


@app.hook('after_request')
def after_request():
    """Add the security headers to every answer."""
    for name, value in SECURITY_HEADERS.items():
        response.set_header(name, value)
    if request.path.startswith('/admin'):
        response.set_header('Cache-Control', 'no-store')


def admin_required(callback):
    """Decorator: the route needs a logged-in admin (JSON 401, or the login page)."""
    def wrapper(*args, **kwargs):
        if request.environ.get('babytrackd.session'):
            return callback(*args, **kwargs)
        if wants_json():
            bottle.abort(401, 'Log in first.')
        if request.method != 'GET':
            bottle.redirect('/admin', 303)
        return page('login', error=None, username_value='')
    return wrapper


def family_or_404(family_id):
    """Return the family or abort with 404."""
    family = get_family(family_id)
    if family is None:
        bottle.abort(404, 'No such family.')
    return family


# -- health and parents' routes -------------------------------------------------

@app.get('/health')
def health():
    """Answer 200 while the database can be read."""
    try:
        db.execute('SELECT COUNT(*) FROM admins').fetchone()
    except sqlite3.Error:
        response.status = 503
        return {'ok': False}
    return {'ok': True, 'version': VERSION}


@app.get('/t/<token>')
def link_open(token):
    """Check a share link, set its cookie and send the device to the app."""
    link, problem = check_link(token)
    if problem:
        status, reason, message = problem
        response.status = status
        return page('message', title='This link does not work', message=message)
    max_age = (link['expires_at'] - now_ms()) // 1000 if link['expires_at'] else 400 * 86400
    response.set_cookie(LINK_COOKIE, token, path='/', httponly=True, samesite='lax',
                        secure=SECURE_COOKIES, max_age=max_age)
    bottle.redirect('/app/', 303)


@app.get('/app')
def app_redirect():
    bottle.redirect('/app/', 301)


@app.get('/app/')
def app_shell():
    """Serve the parents' app."""
    return app_file('index.html')


def cookie_link():
    """Return (link, None) for the request's link cookie, else (None, the answer refusing it)."""
    token = request.get_cookie(LINK_COOKIE)
    if not token:
        bottle.abort(401, 'Open the link your consultant sent you.')
    link, problem = check_link(token)
    if problem:
        status, reason, message = problem
        response.status = status
        return None, {'error': message, 'reason': reason}
    return link, None


@app.get('/app/me')
def app_me():
    """Tell the parents' app which family its link cookie opens (or why it no longer does)."""
    link, refused = cookie_link()
    if refused:
        return refused
    return {'family': {'id': link['family_id'], 'name': link['family_name'], 'tz': link['tz']},
            'label': link['label'], 'expires_at': link['expires_at']}


@app.get('/app/entries')
def app_entries():
    """Older days for the parents' app (CONTRACT section 12): live entries in [before - days, before)."""
    link, refused = cookie_link()
    if refused:
        return refused
    before, days = request.query.get('before', ''), request.query.get('days', '')
    if not re.fullmatch('[0-9]{1,15}', before) or not re.fullmatch('[0-9]{1,2}', days) or not 1 <= int(days) <= 31:
        bottle.abort(400, 'before must be a time in ms and days a whole number from 1 to 31.')
    response.content_type = 'application/json'
    return f'{{"entries":{entries_between(link["family_id"], int(before) - int(days) * 86400000, int(before))}}}'


@app.get('/app/<path:path>')
def app_file(path):
    """Serve a file of the parents' app; the shell is revalidated on every load."""
    answer = bottle.static_file(path, root=APP_ROOT)
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
        status = 401 if problem[1] == 'unknown' else 403
        return None, (status, problem[2])
    if req.query.get('family') != link['family_id']:
        return None, (403, 'This link is for another family.')
    since = req.query.get('since', '0')
    if not since.isdigit() or len(since) > 18:
        return None, (400, 'since must be a whole number.')
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
        bottle.abort(*request.environ.get('babytrackd.problem') or (426, 'This address only speaks WebSocket.'))
    since, days = int(request.query.get('since', '0')), request.query.get('days')
    tz = link['tz']
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
    data = form_or_json()
    username, password = data.get('username'), data.get('password')
    address = client_address()

    def refuse(status, message):
        if is_form:
            response.status = status
            return page('login', error=message, username_value=username if isinstance(username, str) else '')
        bottle.abort(status, message)

    if login_limiter.blocked(address):
        return refuse(429, 'Too many failed logins. Try again in 15 minutes.')
    login_limiter.fail(address)  # counted before bcrypt runs, so parallel guesses count too
    admin = authenticate(username, password)
    if admin is None:
        stats['login_failures'] += 1
        return refuse(401, 'Wrong username or password.')
    login_limiter.forgive(address)
    response.set_cookie(ADMIN_COOKIE, create_session(admin['id']), path='/admin', httponly=True,
                        samesite='strict', secure=SECURE_COOKIES, max_age=SESSION_DAYS * 86400)
    if is_form:
        bottle.redirect('/admin', 303)
    return {'ok': True}


@app.post('/admin/logout')
def admin_logout():
    """End the session and clear its cookie."""
    if not sends_json():
        form_or_json()  # checks the CSRF token
    end_session(request.get_cookie(ADMIN_COOKIE))
    response.delete_cookie(ADMIN_COOKIE, path='/admin')
    if wants_json():
        return {'ok': True}
    bottle.redirect('/admin', 303)


def family_today(family, now):
    """Return the family's summary of today, in its own time zone."""
    return day_summary(family, local_today(family['tz'], now), now)


@app.get('/admin')
@admin_required
def admin_dashboard(error=None, typed=None):
    """The consultant's dashboard (shown again by the Add client form with its mistake and what was typed)."""
    show_archived, now = request.query.get('archived') == '1', now_ms()
    families = []
    for family in list_families(show_archived):
        today = family_today(family, now)
        families.append(dict(family, today=today['totals'],
                             seen=ago(family['last_activity'], now) if family['last_activity'] else 'no entries yet',
                             states=[f"{s['label']} since {when(s['since'], family['tz'], now)}"
                                     for s in today['spans'] if s['end'] == now]))
    form = {'name': '', 'notes': '', 'tz': DEFAULT_TZ, **(typed or {})}
    return page('dashboard', families=families, show_archived=show_archived, hm=hm, zones=time_zones(),
                error=error, form=form)


@app.get('/admin/families')
@admin_required
def admin_families_list():
    """List families with today's totals."""
    if not wants_json():
        bottle.redirect('/admin' + ('?archived=1' if request.query.get('archived') == '1' else ''), 303)
    now = now_ms()
    return {'families': [dict(f, today=family_today(f, now)['totals'])
                         for f in list_families(request.query.get('archived') == '1')]}


@app.post('/admin/families')
@admin_required
def admin_families_create():
    """Create a family."""
    data = json_body()
    family = create_family(data.get('name'), data.get('notes') or '', data.get('tz') or None)
    response.status = 201
    return family


@app.get('/admin/families/<family_id>')
@admin_required
def admin_family_show(family_id):
    """A family's detail (JSON) or page."""
    family = family_or_404(family_id)
    limit = request.query.get('limit')
    if limit is not None and not (limit.isdigit() and 0 < int(limit) <= 100_000):
        bottle.abort(400, 'limit must be a whole number from 1 to 100000.')
    if wants_json():
        return dict(family, links=list_links(family_id), config=get_config(family_id),
                    entries=live_entries(family_id, int(limit) if limit else None))
    return page('family', **family_page(family, request.query.get('date')))


@app.route('/admin/families/<family_id>', method='PATCH')
@admin_required
def admin_family_update(family_id):
    """Change a family's name, notes, time zone or archived flag."""
    family_or_404(family_id)
    family = update_family(family_id, json_body())
    if family['archived']:
        hub.close_family(family_id)
    return family


@app.put('/admin/families/<family_id>/config')
@admin_required
def admin_config_put(family_id):
    """Store the family's button groups and push them to its devices."""
    family_or_404(family_id)
    data = json_body()
    if 'data' not in data:
        bottle.abort(400, 'Send {"data": [button groups]}.')
    save_config(family_id, data['data'])
    hub.broadcast(family_id, {'type': 'config', 'data': data['data']})
    return {'data': data['data']}


def parse_date(text, tz):
    """Return the date YYYY-MM-DD (today in tz when empty), or abort with 400."""
    if not text:
        return local_today(tz)
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        bottle.abort(400, 'date must look like 2026-01-31.')


@app.get('/admin/families/<family_id>/summary')
@admin_required
def admin_family_summary(family_id):
    """The family's day: hourly events and totals."""
    family = family_or_404(family_id)
    return day_summary(family, parse_date(request.query.get('date'), family['tz']))


@app.post('/admin/families/<family_id>/links')
@admin_required
def admin_links_create(family_id):
    """Create a share link."""
    family_or_404(family_id)
    data = json_body()
    link = create_link(family_id, data.get('label'), data.get('expires_at'))
    response.status = 201
    return link


@app.delete('/admin/families/<family_id>/links/<token>')
@admin_required
def admin_links_revoke(family_id, token):
    """Revoke a share link and close its sockets."""
    family_or_404(family_id)
    if not revoke_link(family_id, token):
        bottle.abort(404, 'No such link.')
    hub.close_link(token)
    response.status = 204
    return ''


def family_page(family, date_text, errors=None, typed=None):
    """Return what the family page shows for one date (a refused form: its message and what was typed)."""
    tz, now, hour_ms = family['tz'], now_ms(), 3600 * 1000
    date = parse_date(date_text, tz)
    summary, config = day_summary(family, date, now), get_config(family['id'])
    for hour in summary['hours']:  # the sleep inside each hour, as (first minute, minutes)
        begin, top = hour['start'], hour['start'] + hour_ms
        hour['sleep'] = [((max(s['start'], begin) - begin) / 60000, (min(s['end'], top) - max(s['start'], begin)) / 60000)
                         for s in summary['spans'] if s['category'] == 'sleep' and s['counted']
                         and s['start'] < top and s['end'] > begin]
    form = {'name': family['name'], 'notes': family['notes'], 'tz': tz, 'label': '', 'expires': 'never',
            'expires_on': '', 'config': json.dumps(config, indent=2), **(typed or {})}
    return {'family': family, 'date': date, 'prev': date - dt.timedelta(days=1), 'next': date + dt.timedelta(days=1),
            'summary': summary, 'chart': sleep_chart(family, date, now), 'config': config, 'form': form,
            'links': list_links(family['id']), 'online': {p.token for p in hub.peers(family['id'])},
            'changes': recent_changes(family['id']), 'errors': errors or {}, 'zones': time_zones(), 'now': now,
            'hm': hm, 'clock': lambda ms: f'{local_time(ms, tz):%H:%M}', 'when': lambda ms: when(ms, tz, now)}


# -- admin pages: forms and exports ---------------------------------------------

@app.post('/admin/families/new')
@admin_required
def admin_family_add():
    """The dashboard's Add client form."""
    data = form_body()
    try:
        family = create_family(data.get('name', ''), data.get('notes', ''), data.get('tz') or None)
    except Invalid as error:
        response.status = 400
        return admin_dashboard(str(error), data)
    bottle.redirect(f"/admin/families/{family['id']}", 303)


def family_form(family_id, section, act):
    """Run one form of the family page: act(family, form), then back to the page with 303;
    an Invalid shows the page again (400) with the message beside that form and what was typed."""
    family = family_or_404(family_id)
    data = form_body()  # the JSON API has its own routes for all of this
    try:
        act(family, data)
    except Invalid as error:
        response.status = 400
        return page('family', **family_page(family, None, {section: str(error)}, data))
    bottle.redirect(f'/admin/families/{family_id}#{section}', 303)


@app.post('/admin/families/<family_id>/edit')
@admin_required
def admin_family_edit(family_id):
    """The family page's details form (name, notes, time zone) and its Archive / Unarchive button."""
    def edit(family, data):
        changes = {key: data[key] for key in ('name', 'notes', 'tz') if key in data}
        if 'archived' in data:
            changes['archived'] = data['archived'] == '1'
        if update_family(family['id'], changes)['archived']:
            hub.close_family(family['id'])  # archiving: its links stop working at once
    return family_form(family_id, 'details', edit)


@app.post('/admin/families/<family_id>/links/new')
@admin_required
def admin_links_form(family_id):
    """The family page's new-link form: a label and an expiry (never, 1 or 2 weeks, or a last day)."""
    def create(family, data):
        expires_at = now_ms() + int(data['expires']) * DAY_MS if data.get('expires') in ('7', '14') else None
        if data.get('expires') == 'date':
            try:
                expires_at = day_window(dt.date.fromisoformat(data.get('expires_on', '')), family['tz'])[1]
            except ValueError:
                raise Invalid('Pick the last day the link should work.') from None
            if expires_at <= now_ms():
                raise Invalid('The last day must be today or later.')
        create_link(family['id'], data.get('label', ''), expires_at)
    return family_form(family_id, 'links', create)


@app.post('/admin/families/<family_id>/links/<token>/revoke')
@admin_required
def admin_links_revoke_form(family_id, token):
    """The family page's Revoke button: the link stops working and its sockets close."""
    def revoke(family, data):
        if not revoke_link(family['id'], token):
            raise Invalid('That link was already revoked.')
        hub.close_link(token)
    return family_form(family_id, 'links', revoke)


@app.post('/admin/families/<family_id>/config')
@admin_required
def admin_config_form(family_id):
    """The family page's button editor: the JSON is checked, stored and pushed to the family's devices."""
    def store(family, data):
        try:
            groups = json.loads(data.get('config', ''))
        except ValueError as error:
            raise Invalid(f'This is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno}).') from None
        except RecursionError:
            raise Invalid('This JSON is nested too deeply.') from None
        hub.broadcast(family['id'], {'type': 'config', 'data': save_config(family['id'], groups)})
    return family_form(family_id, 'config', store)


@app.get('/admin/families/<family_id>/export.<kind:re:csv|json>')
@admin_required
def admin_family_export(family_id, kind):
    """The family's live entries, oldest first: stable ids, ISO times in the family's zone and raw ms."""
    family = family_or_404(family_id)
    entries = [dict(e, time=local_time(e['ts'], family['tz']).isoformat(timespec='seconds'))
               for e in reversed(live_entries(family_id))]
    response.set_header('Content-Disposition', f'attachment; filename="babytrack-{family_id}.{kind}"')
    if kind == 'json':
        response.content_type = 'application/json'
        return json.dumps({'family': family, 'exported_at': now_ms(), 'entries': entries})
    out = io.StringIO()
    writer = csv.DictWriter(out, ['id', 'time', 'ts', 'type', 'value', 'by', 'updated_at', 'seq'], extrasaction='ignore')
    writer.writeheader()
    for entry in entries:  # a text starting with = + - @ would run as a formula in a spreadsheet
        writer.writerow({key: f"'{text}" if key in ('type', 'value', 'by') and str(text)[:1] in tuple('=+-@\t\r')
                         else text for key, text in entry.items()})
    response.content_type = 'text/csv; charset=utf-8'
    return out.getvalue()


###############################################################################
# Operations ###################################################################
###############################################################################

TOKEN_IN_PATH = re.compile(r'^(/t/|/admin/families/[^/]+/links/)[^/]+')
SNAPSHOT = re.compile(r'babytrack-\d{4}-\d{2}-\d{2}\.db')  # a manual copy beside them is not rotated


class JsonLines(logging.Formatter):
    """One JSON object per log line."""

    def format(self, record):
        line = {'time': self.formatTime(record), 'level': record.levelname.lower(), 'msg': record.getMessage()}
        line.update(getattr(record, 'fields', {}))
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


@app.get('/metrics')
def metrics():
    """Prometheus text format, for fly.io's scraper on the private network only."""
    if BEHIND_FLY_PROXY and request.get_header('Fly-Client-IP'):
        bottle.abort(404, 'Not found.')  # came in through the public proxy
    response.content_type = 'text/plain; version=0.0.4'
    lines = [f'babytrackd_{name}_total {value}' for name, value in sorted(stats.items())]
    lines.append(f'babytrackd_open_sockets {len(hub.peers())}')
    lines.append(f'babytrackd_resident_memory_bytes {rss_bytes()}')
    backup = latest_backup()
    if backup:
        lines.append(f'babytrackd_backup_age_seconds {int(time.time() - os.path.getmtime(backup))}')
    return '\n'.join(lines) + '\n'


def backup_to(path):
    """Write a consistent copy of the live database to `path` (SQLite's online backup, off the loop)."""
    def copy():
        source = sqlite3.connect(DB_PATH)
        target = sqlite3.connect(path)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
    gevent.get_hub().threadpool.apply(copy)
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


def checkpoint_loop():
    """Once a second after writes, copy the WAL into the database from a thread. SQLite's own
    checkpoint runs inside a commit, and its fsyncs held up the loop for ms: serve() leaves it only
    as the bound under writes that never pause (the WAL restarts only once all of it is copied)."""
    def checkpoint():
        conn = sqlite3.connect(DB_PATH)
        try:
            conn.execute('PRAGMA wal_checkpoint(PASSIVE)')
        finally:
            conn.close()
    done = db.total_changes
    while True:
        gevent.sleep(1)
        if db.total_changes != done:
            done = db.total_changes
            try:
                gevent.get_hub().threadpool.apply(checkpoint)
            except sqlite3.Error:
                log.exception('checkpoint failed')


def swap_in_restore(path):
    """Before opening: put a waiting PATH.restore in place of the database, keeping the old file aside."""
    waiting = path + '.restore'
    if not os.path.exists(waiting):
        return False
    check = sqlite3.connect(waiting)
    try:
        healthy = check.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
    except sqlite3.DatabaseError:
        healthy = False
    finally:
        check.close()
    if not healthy:
        raise SystemExit(f'{waiting} failed its integrity check; nothing was restored')
    aside = f"{path}.before-restore-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ('', '-wal', '-shm'):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    os.replace(waiting, path)
    log.warning('restored the database from %s; the previous file is %s', os.path.basename(waiting),
                os.path.basename(aside))
    return True


class Handler(WebSocketHandler):
    """gevent-websocket's handler with TCP_NODELAY: pywsgi writes headers and body separately,
    and without it each response waits ~40 ms for the client's delayed ACK."""

    def handle(self):
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()


def serve(host=HOST, port=PORT):
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    server = WSGIServer((host, port), logged(app), handler_class=Handler, log=None, error_log=log)
    server.pre_start_hook = pre_start_hook
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    server.start()
    gc.freeze()  # what start-up made lives for good: keep it out of every later collection's scan
    hub.start()
    db.execute('PRAGMA wal_autocheckpoint = 4000')  # 16 MB: reached only when the thread cannot keep up
    background = [gevent.spawn(maintenance_loop), gevent.spawn(checkpoint_loop)]
    log.info('babytrackd %s listening on %s:%s', VERSION, host, server.server_port)
    print(f'babytrackd: log in at {BASE_URL}/admin as {ADMIN_USER}', flush=True)
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
    backup = commands.add_parser('backup', help='write a consistent copy of the database while it serves')
    backup.add_argument('path')
    commands.add_parser('vacuum', help='rebuild the database file to reclaim space')
    commands.add_parser('hash-password', help='print a bcrypt hash for ADMIN_PASS (reads the password from stdin)')
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == 'hash-password':
        print(hash_password(sys.stdin.readline().rstrip('\n')))
        return 0
    if args.command == 'backup':
        backup_to(args.path)
        print(f'backup written to {args.path}')
        return 0
    swap_in_restore(DB_PATH)
    open_db()
    if args.command == 'vacuum':
        db.execute('VACUUM')
        print('vacuum done')
        return 0
    generated = ensure_admin()
    if generated:
        print(f'babytrackd: created admin "{ADMIN_USER}" with password: {generated}\n'
              '            (shown once; set ADMIN_PASS to choose your own)', flush=True)
    serve()
    return 0


if __name__ == '__main__':
    sys.exit(main())
