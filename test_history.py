"""Tests for the change log, history, restore and import (issue 12).

The rules through WebTest on a real SQLite file; restore and import reaching devices, the upload
limit and a crash (SIGKILL during writes) against a real server process; the pages in Chromium.
"""

import datetime as dt
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zoneinfo

import pytest

from conftest import AdminClient, Device, Server, wait_for
from test_admin import SHOTS, browser, form_of  # noqa: F401 (browser is a fixture)
from test_reliability import Writer, open_family

HERE = os.path.dirname(os.path.abspath(__file__))
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
LONDON = 'Europe/London'


def at(text, tz=LONDON, fold=0):
    """Return the milliseconds of a wall-clock time 'YYYY-MM-DD HH:MM' in zone tz."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=zoneinfo.ZoneInfo(tz), fold=fold).timestamp() * 1000)


def write(bt, family, action, entry_id, by='Mum', now=None, **fields):
    """One device write through apply_entry; return (outcome, action, entry)."""
    message = {'id': entry_id, **fields} if action == 'delete' else {'entry': {'id': entry_id, **fields}}
    return bt.apply_entry(family['id'], action, message, by, now=now)


def versions(changes):
    return [(c['ts'], c['type'], c['value'], c['deleted'], c['by']) for c in changes]


def counts(bt):
    return bt.one('SELECT (SELECT COUNT(*) FROM entries) AS entries, (SELECT COUNT(*) FROM changes) AS changes')


# The change log, history and restore ------------------------------------------------------------

def test_every_accepted_write_is_logged_with_its_seq_and_repeats_and_stale_writes_are_not(bt, logged_in):
    family = bt.create_family('Olivia')
    now = bt.now_ms()
    write(bt, family, 'add', 'e1', ts=now - HOUR, type='feed', value='bottle', updated_at=now - 5000)
    assert write(bt, family, 'add', 'e1', ts=now - HOUR, type='feed', value='bottle', updated_at=now)[0] == 'repeat'
    write(bt, family, 'update', 'e1', 'Dad', value='breast left', updated_at=now - 4000)
    assert write(bt, family, 'update', 'e1', value='breast right', updated_at=now - 4500)[0] == 'stale'
    write(bt, family, 'delete', 'e1', updated_at=now - 3000)
    rows = bt.rows('SELECT * FROM changes ORDER BY seq')
    assert [(r['value'], r['deleted'], r['by'], r['updated_at']) for r in rows] == [
        ('bottle', 0, 'Mum', now - 5000), ('breast left', 0, 'Dad', now - 4000), ('breast left', 1, 'Mum', now - 3000)]
    assert all(r['at'] >= now for r in rows)
    assert [r['seq'] for r in rows] == sorted({r['seq'] for r in rows})  # unique and increasing
    assert bt.one("SELECT seq FROM entries WHERE id = 'e1'")['seq'] == rows[-1]['seq']


def test_history_after_add_update_delete_and_restore(bt, logged_in):
    family = bt.create_family('Olivia')
    now = bt.now_ms()
    write(bt, family, 'add', 'e1', ts=now - HOUR, type='feed', value='bottle', updated_at=now - 3000)
    write(bt, family, 'update', 'e1', 'Dad', value='breast left', updated_at=now - 2000)
    write(bt, family, 'delete', 'e1', updated_at=now - 1000)
    path = f"/admin/families/{family['id']}/entries/e1"
    changes = logged_in.get(path + '/history', headers={'Accept': 'application/json'}).json['changes']
    assert versions(changes) == [(now - HOUR, 'feed', 'bottle', False, 'Mum'),
                                 (now - HOUR, 'feed', 'breast left', False, 'Dad'),
                                 (now - HOUR, 'feed', 'breast left', True, 'Mum')]
    assert set(changes[0]) == {'seq', 'ts', 'type', 'value', 'deleted', 'updated_at', 'by', 'at'}

    entry = logged_in.post_json(path + '/restore', {'seq': changes[0]['seq']}).json['entry']
    assert (entry['value'], entry['deleted'], entry['by']) == ('bottle', False, 'jane')
    assert entry['seq'] > changes[-1]['seq'] and entry['updated_at'] >= now
    stored = bt.live_entries(family['id'])
    assert stored == [entry]
    after = logged_in.get(path + '/history', headers={'Accept': 'application/json'}).json['changes']
    assert versions(after) == versions(changes) + [(now - HOUR, 'feed', 'bottle', False, 'jane')]
    # the page: every version, who and when, a restore button on all but the current one and the deletion
    page = logged_in.get(path + '/history')
    assert page.text.count('Restore this version') == 2 and 'jane' in page.text and 'Dad' in page.text
    deletion = page.html.select('.versions li')[2]
    assert deletion.select_one('.badge').get_text() == 'deleted' and deletion.select_one('form') is None
    assert page.text.count('badge online">current') == 1
    again = logged_in.post_json(path + '/restore', {'seq': changes[0]['seq']}).json['entry']  # already current
    assert again == entry and len(bt.entry_history(family['id'], 'e1')) == 4


def test_restoring_wins_over_a_device_clock_that_ran_ahead(bt, logged_in):
    family = bt.create_family('Olivia')
    now = bt.now_ms()
    write(bt, family, 'add', 'e1', ts=now - HOUR, type='feed', value='bottle', updated_at=now)
    write(bt, family, 'update', 'e1', value='breast left', updated_at=now + 4 * MINUTE)  # within the clock guard
    first = bt.entry_history(family['id'], 'e1')[0]
    entry = logged_in.post_json(f"/admin/families/{family['id']}/entries/e1/restore", {'seq': first['seq']}).json['entry']
    assert entry['value'] == 'bottle' and entry['updated_at'] == now + 4 * MINUTE + 1


def test_another_familys_entry_or_version_is_404_and_changes_nothing(bt, logged_in):
    olivia, noah = bt.create_family('Olivia'), bt.create_family('Noah')
    now = bt.now_ms()
    write(bt, olivia, 'add', 'e1', ts=now, type='feed', value='bottle')
    write(bt, noah, 'add', 'n1', ts=now, type='feed', value='bottle')
    seq = bt.entry_history(olivia['id'], 'e1')[0]['seq']
    before = counts(bt)
    accept = {'Accept': 'application/json'}
    assert logged_in.get(f"/admin/families/{noah['id']}/entries/e1/history", headers=accept, status=404).json['error']
    logged_in.post_json(f"/admin/families/{noah['id']}/entries/e1/restore", {'seq': seq}, status=404)
    logged_in.post_json(f"/admin/families/{noah['id']}/entries/n1/restore", {'seq': seq}, status=404)  # not n1's
    logged_in.post_json(f"/admin/families/{olivia['id']}/entries/e1/restore", {'seq': 'one'}, status=400)
    logged_in.post_json(f"/admin/families/{olivia['id']}/entries/e1/restore", {'seq': 2 ** 64}, status=404)
    logged_in.get(f"/admin/families/{olivia['id']}/entries/nope/history", headers=accept, status=404)
    logged_in.get('/admin/families/nosuchid/deleted', headers=accept, status=404)
    assert counts(bt) == before


def test_deleted_lists_the_last_30_days_newest_first_and_restores(bt, logged_in):
    family = bt.create_family('Olivia')
    now = bt.now_ms()
    for number in range(4):
        write(bt, family, 'add', f'e{number}', ts=now - 40 * DAY, type='nappy', value='wet', now=now - 40 * DAY)
    write(bt, family, 'delete', 'e0', now=now - 31 * DAY, updated_at=now - 31 * DAY)  # too long ago
    write(bt, family, 'delete', 'e1', now=now - 29 * DAY, updated_at=now - 29 * DAY)
    write(bt, family, 'delete', 'e2', updated_at=now - 1000)
    answer = logged_in.get(f"/admin/families/{family['id']}/deleted", headers={'Accept': 'application/json'}).json
    assert [e['id'] for e in answer['entries']] == ['e2', 'e1']
    assert all(e['deleted'] for e in answer['entries'])
    page = logged_in.get(f"/admin/families/{family['id']}/deleted")
    form = form_of(page, '/entries/e1/restore')
    assert form.submit(status=303).headers['Location'].endswith(f"/admin/families/{family['id']}/deleted")
    assert {e['id'] for e in bt.live_entries(family['id'])} == {'e1', 'e3'}
    assert bt.live_entries(family['id'])[0]['by'] == 'jane' or bt.live_entries(family['id'])[1]['by'] == 'jane'
    assert 'e1/history' not in logged_in.get(f"/admin/families/{family['id']}/deleted").text


def test_family_page_entries_open_their_history(bt, logged_in):
    family = bt.create_family('Olivia')
    now = bt.now_ms()
    write(bt, family, 'add', 'e1', ts=now - MINUTE, type='feed', value='bottle')
    page = logged_in.get(f"/admin/families/{family['id']}")
    history = f"/admin/families/{family['id']}/entries/e1/history"
    assert page.html.select(f'#day a[href="{history}"]') and page.html.select(f'#activity a[href="{history}"]')


def test_restore_form_needs_the_csrf_token(bt, logged_in):
    family = bt.create_family('Olivia')
    write(bt, family, 'add', 'e1', ts=bt.now_ms(), type='feed', value='bottle')
    write(bt, family, 'delete', 'e1')
    seq = bt.entry_history(family['id'], 'e1')[0]['seq']
    logged_in.post(f"/admin/families/{family['id']}/entries/e1/restore", {'seq': seq, 'csrf': 'wrong'}, status=403)
    assert bt.live_entries(family['id']) == []


def test_export_json_carries_the_change_log_and_vacuum_keeps_it(bt, logged_in, tmp_path):
    family = bt.create_family('Olivia')
    now = bt.now_ms()
    write(bt, family, 'add', 'e1', ts=now, type='feed', value='bottle', updated_at=now - 10)
    write(bt, family, 'update', 'e1', value='breast left', updated_at=now)
    exported = logged_in.get(f"/admin/families/{family['id']}/export.json").json
    assert [(c['entry_id'], c['value']) for c in exported['changes']] == [('e1', 'bottle'), ('e1', 'breast left')]
    log = bt.rows('SELECT * FROM changes ORDER BY seq')
    bt.db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    done = subprocess.run([sys.executable, os.path.join(HERE, 'babytrackd.py'), 'vacuum'], capture_output=True, text=True,
                          env=dict(os.environ, DB_PATH=str(tmp_path / 'babytrack.db')), timeout=60)
    assert done.returncode == 0, done.stderr
    assert bt.rows('SELECT * FROM changes ORDER BY seq') == log


# Restore and import reach devices ---------------------------------------------------------------

def test_restore_reaches_a_connected_device_and_one_resuming_from_its_cursor(server, admin):
    family_id, (mum, dad) = open_family(admin, 'Olivia', 'Mum', 'Dad')
    phone, now = Device(server, family_id, mum), int(time.time() * 1000)
    phone.add('e1', now - HOUR, 'sleep', 'sleeping', updated_at=now - 2000)
    phone.entry_echo('e1')
    phone.send({'type': 'entry', 'action': 'delete', 'id': 'e1', 'updated_at': now - 1000})
    phone.entry_echo('e1')
    away = Device(server, family_id, dad)
    cursor = away.cursor
    away.close()
    first = admin.ok('GET', f'/admin/families/{family_id}/entries/e1/history')['changes'][0]
    entry = admin.ok('POST', f'/admin/families/{family_id}/entries/e1/restore', {'seq': first['seq']})['entry']
    pushed = phone.entry_echo('e1')
    assert pushed == {'type': 'entry', 'action': 'update', 'entry': entry}
    assert (entry['value'], entry['deleted'], entry['by']) == ('sleeping', False, 'jane')
    back = Device(server, family_id, dad, since=cursor)
    assert back.init['entries'] == [entry] and back.init['cursor'] == entry['seq']
    phone.close()
    back.close()


def multipart(fields, filename='export.csv'):
    """Encode form fields (bytes values are the file) as multipart/form-data; return (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if isinstance(value, bytes):
            parts.append(f'{head}; filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n'.encode() + value + b'\r\n')
        else:
            parts.append(f'{head}\r\n\r\n{value}\r\n'.encode())
    return b''.join(parts) + f'--{boundary}--\r\n'.encode(), f'multipart/form-data; boundary={boundary}'


def post_import(admin, family_id, data, **fields):
    """POST a file to the import route over a real socket as a JSON client; return (status, answer)."""
    body, content_type = multipart({**fields, 'file': data})
    request = urllib.request.Request(f'{admin.server.base_url}/admin/families/{family_id}/import', data=body,
                                     method='POST', headers={'Content-Type': content_type, 'Accept': 'application/json'})
    try:
        with admin.opener.open(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b'null')


def test_an_import_reaches_live_devices_and_a_second_import_adds_nothing(server, admin):
    family_id, (mum,) = open_family(admin, 'Olivia', 'Mum')
    phone = Device(server, family_id, mum)
    data = (b'Type,Start,End,Duration,Start Condition,Start Location,End Condition,Notes\n'
            b'Diaper,2026-11-03 08:00,,,Pee,,,\nSleep,2026-11-03 09:00,2026-11-03 10:30,1:30,,,,\n')
    status, answer = post_import(admin, family_id, data)
    assert status == 200 and answer['added'] == answer['entries'] == 3
    pushed = [phone.recv_until(lambda m: m['type'] == 'entry') for _ in range(3)]
    assert sorted(m['entry']['value'] for m in pushed) == ['awake', 'sleeping', 'wet']
    assert {m['entry']['by'] for m in pushed} == {'import'}
    assert post_import(admin, family_id, data)[1]['added'] == 0
    phone.expect_silence()
    phone.close()


def test_a_file_over_5_mib_is_refused_and_stores_nothing(server, admin):
    family_id, _ = open_family(admin, 'Olivia')
    limit = 5 * 1024 * 1024
    status, answer = post_import(admin, family_id, b'x' * (limit + 1))
    assert status == 413 and '5 MiB' in answer['error']
    status, answer = post_import(admin, family_id, b'x' * (limit + 200 * 1024))  # refused before it is read
    assert status == 413
    status, answer = post_import(admin, family_id, b'x' * limit)  # at the limit it is read (and is not a known file)
    assert status == 400 and 'Line 1' in answer['error']
    assert admin.family(family_id)['entries'] == []
    assert server.healthy()


def test_the_change_log_drops_the_oldest_superseded_versions_and_keeps_every_current_one(bt, logged_in, monkeypatch):
    monkeypatch.setattr(bt, 'FAMILY_MAX_ENTRIES', 50)
    family, now = bt.create_family('Olivia'), bt.now_ms()
    for n in range(50):  # the family at its cap: 50 current versions, the oldest rows of its log
        write(bt, family, 'add', f'e{n}', now=now, ts=now - HOUR, type='feed', value='bottle', updated_at=now)
    for n in range(1, 200):
        write(bt, family, 'update', 'e0', now=now + n, value=f'bottle {n}', updated_at=now + n)
    assert bt.one('SELECT COUNT(*) AS n FROM changes')['n'] <= 100
    assert all(bt.entry_history(family['id'], f'e{n}')[-1]['value'] == 'bottle' for n in range(1, 50))
    kept = [c['value'] for c in bt.entry_history(family['id'], 'e0')]
    assert kept[-1] == 'bottle 199' and kept == [f'bottle {n}' for n in range(200 - len(kept), 200)]  # the newest kept
    count, top, _ = bt.change_counts[family['id']]
    bt.change_counts[family['id']] = (count, top, top)  # as if every version after the last trim were current
    for n in range(1, 50):  # versions from before the last trim superseded now: the next trims find them too
        write(bt, family, 'update', f'e{n}', now=now + 300, value='milk', updated_at=now + 300)
        write(bt, family, 'update', 'e0', now=now + 300 + n, value=f'bottle {300 + n}', updated_at=now + 300 + n)
    assert bt.one('SELECT COUNT(*) AS n FROM changes')['n'] <= 100
    assert [bt.entry_history(family['id'], f'e{n}')[-1]['value'] for n in range(50)] == ['bottle 349'] + ['milk'] * 49
    bt.change_counts.clear()  # a restart: counted once again, and still bounded
    write(bt, family, 'update', 'e0', now=now + 400, value='bottle 400', updated_at=now + 400)
    assert bt.one('SELECT COUNT(*) AS n FROM changes')['n'] <= 100


def test_long_history_and_deleted_lists_page_back_with_an_older_link(bt, logged_in, monkeypatch):
    monkeypatch.setattr(bt, 'PAGE_ROWS', 3)
    family, now = bt.create_family('Olivia'), bt.now_ms()
    for n in range(7):
        write(bt, family, 'add' if n == 0 else 'update', 'e1', now=now + n, ts=now - HOUR, type='feed',
              value=f'bottle {n}', updated_at=now + n)
    path, accept = f"/admin/families/{family['id']}/entries/e1/history", {'Accept': 'application/json'}
    seen, before = [], ''
    while True:
        answer = logged_in.get(path + before, headers=accept).json
        seen[:0] = [c['value'] for c in answer['changes']]
        if answer['older'] is None:
            break
        before = f"?before={answer['older']}"
    assert seen == [f'bottle {n}' for n in range(7)]
    page = logged_in.get(path)
    assert [li.select_one('.event').get_text() for li in page.html.select('.versions li')] == [
        'feed: bottle 4', 'feed: bottle 5', 'feed: bottle 6']
    older = page.click('Older versions')
    assert 'feed: bottle 1' in older.text and 'bottle 4' not in older.text and 'badge online">current' not in older.text
    for n in range(4):
        write(bt, family, 'add', f'd{n}', now=now, ts=now - HOUR, type='nappy', value='wet', updated_at=now)
        write(bt, family, 'delete', f'd{n}', now=now + 10 + n, updated_at=now + 10 + n)
    deleted = logged_in.get(f"/admin/families/{family['id']}/deleted")
    assert [a.get_text() for a in deleted.html.select('tbody tr button')] == ['Restore'] * 3
    rest = deleted.click('Older deletions')
    assert len(rest.html.select('tbody tr')) == 1 and '/entries/d0/' in rest.text and 'Older deletions' not in rest.text
    logged_in.get(path + '?before=%B2', headers=accept, status=400)


# Import ------------------------------------------------------------------------------------------

def upload(web, family, data, status=200, **fields):
    """Import through WebTest as a JSON client."""
    return web.post(f"/admin/families/{family['id']}/import", fields, upload_files=[('file', 'export', data)],
                    headers={'Accept': 'application/json'}, status=status)


def same_entries(bt, family):
    return sorted((e['ts'], e['type'], e['value']) for e in bt.live_entries(family['id']))


@pytest.mark.parametrize('kind', ['csv', 'json'])
def test_own_export_round_trips_into_another_family_and_back_into_itself(bt, logged_in, kind):
    olivia, copy = bt.create_family('Olivia', tz=LONDON), bt.create_family('Copy', tz=LONDON)
    now = bt.now_ms()
    tricky = ['bottle', '=SUM(A1)', '-2 oz', '+1', '@home', 'said "no", then, yes', 'ünïcødé 😴', 'two\nlines', '']
    for number, value in enumerate(tricky):
        write(bt, olivia, 'add', f'e{number}', ts=now - number * HOUR, type='feed' if number % 2 else '=note', value=value)
    write(bt, olivia, 'delete', 'e0')
    exported = logged_in.get(f"/admin/families/{olivia['id']}/export.{kind}").body
    preview = upload(logged_in, copy, exported, preview='1').json
    assert preview == {'entries': 8, 'skipped': {}, 'from': now - 8 * HOUR, 'to': now - HOUR}
    assert bt.live_entries(copy['id']) == []
    assert upload(logged_in, copy, exported).json['added'] == 8
    assert same_entries(bt, copy) == same_entries(bt, olivia)
    assert {e['by'] for e in bt.live_entries(copy['id'])} == {'import'}
    assert all(len(bt.entry_history(copy['id'], e['id'])) == 1 for e in bt.live_entries(copy['id']))
    again = logged_in.get(f"/admin/families/{copy['id']}/export.{kind}").body
    assert upload(logged_in, copy, again).json['added'] == 0  # its own export: the same ids
    assert upload(logged_in, copy, exported).json['added'] == 0  # the same file twice
    before = counts(bt)
    assert upload(logged_in, olivia, exported).json['added'] == 0  # back into itself: nothing doubled or revived
    assert counts(bt) == before and 'e0' not in {e['id'] for e in bt.live_entries(olivia['id'])}


HUCKLEBERRY = (
    '\ufeffType,Start,End,Duration,Start Condition,Start Location,End Condition,Notes\r\n'
    'Sleep,2026-10-24 19:10,2026-10-25 01:30,7:20,"Rocked, then held",Crib,Woke happy,"long one, finally"\r\n'
    'Sleep,2026-10-25 01:50,2026-10-25 01:20,0:30,,Crib,,fell asleep before the clocks went back\r\n'
    'Feed,2026-10-25 06:05,2026-10-25 06:20,0:15,0:10R,Breast,0:05L,\r\n'
    'Feed,2026-10-25 09:00,,,"0:07L, 0:00R",Breast,,\r\n'
    'Feed,2026-10-25 10:00,2026-10-25 10:10,,Formula,Bottle,120ml,"said ""more"", please"\r\n'
    'Feed,2026-10-25 11:00,,,,,,\r\n'
    'Diaper,2026-10-25 07:00,,,Pee,,,\r\n'
    'Diaper,2026-10-25 08:15,,yellow,Loose,,Poo:small,\r\n'
    'Diaper,2026-10-25 12:00,,,Pee + Poo,,,\r\n'
    'Diaper,2026-10-25 13:00,,,,,"Both, pee:medium poo:medium",\r\n'
    'Diaper,2026-10-25 14:00,,,Dry,,,\r\n'
    'Solids,2026-10-25 12:30,,,"Carrot, sweet potato",,Loved,\r\n'
    'Pump,2026-10-25 15:00,2026-10-25 15:20,0:20,60ml,,40ml,\r\n'
    'Pump,2026-10-25 21:00,,,30ml,,,\r\n'
    'Bath,2026-10-25 18:00,,,,,,\r\n'
    'Sleep,2026-10-25 19:05,,,,Crib,,\r\n'
    '\r\n'
)


def test_a_huckleberry_export_maps_to_exact_entries_in_the_familys_zone_across_a_dst_change(bt, logged_in):
    family = bt.create_family('Olivia', tz=LONDON)  # the clocks go back at 02:00 on 25 Oct 2026
    preview = upload(logged_in, family, HUCKLEBERRY.encode(), preview='1').json
    expected = [
        (at('2026-10-24 19:10'), 'sleep', 'sleeping'), (at('2026-10-25 01:30'), 'sleep', 'awake'),
        (at('2026-10-25 01:50'), 'sleep', 'sleeping'), (at('2026-10-25 01:20', fold=1), 'sleep', 'awake'),
        (at('2026-10-25 06:05'), 'feed', 'breast right'), (at('2026-10-25 06:15'), 'feed', 'breast left'),
        (at('2026-10-25 09:00'), 'feed', 'breast left'), (at('2026-10-25 10:00'), 'feed', 'bottle'),
        (at('2026-10-25 07:00'), 'nappy', 'wet'), (at('2026-10-25 08:15'), 'nappy', 'dirty'),
        (at('2026-10-25 12:00'), 'nappy', 'wet + dirty'), (at('2026-10-25 13:00'), 'nappy', 'wet + dirty'),
        (at('2026-10-25 19:05'), 'sleep', 'sleeping')]
    assert at('2026-10-25 01:20', fold=1) - at('2026-10-25 01:50') == 30 * MINUTE  # the second 01:20 (GMT)
    assert preview == {'entries': len(expected), 'from': at('2026-10-24 19:10'), 'to': at('2026-10-25 19:05'),
                       'skipped': {'Bath': 1, 'Diaper (dry)': 1, 'Feed (no side or bottle)': 1, 'Pump': 2, 'Solids': 1}}
    assert bt.live_entries(family['id']) == []
    answer = upload(logged_in, family, HUCKLEBERRY.encode()).json
    assert answer['added'] == len(expected)
    stored = bt.live_entries(family['id'])
    assert sorted((e['ts'], e['type'], e['value']) for e in stored) == sorted(expected)
    assert {e['by'] for e in stored} == {'import'} and all(e['updated_at'] == e['ts'] for e in stored)
    assert upload(logged_in, family, HUCKLEBERRY.encode()).json['added'] == 0
    # a later export that overlaps (one more row, different notes) adds only what is new
    later = HUCKLEBERRY.replace('"long one, finally"', 'edited') + 'Diaper,2026-10-26 07:00,,,Pee,,,\r\n'
    assert upload(logged_in, family, later.encode()).json['added'] == 1


def test_huckleberry_times_on_a_spring_forward_night(bt, logged_in):
    family = bt.create_family('Noah', tz='America/New_York')  # 02:00 became 03:00 on 8 Mar 2026
    data = ('Type,Start,End,Duration,Start Condition,Start Location,End Condition,Notes\n'
            'Sleep,2026-03-07 20:00,2026-03-08 07:00,10:00,,,,\nDiaper,2026-03-08 02:30,,,Pee,,,\n')
    assert upload(logged_in, family, data.encode()).json['added'] == 3
    ny = 'America/New_York'
    assert same_entries(bt, family) == [(at('2026-03-07 20:00', ny), 'sleep', 'sleeping'),
                                        (at('2026-03-08 03:30', ny), 'nappy', 'wet'),  # the gap: read before the change
                                        (at('2026-03-08 07:00', ny), 'sleep', 'awake')]
    assert at('2026-03-08 07:00', ny) - at('2026-03-07 20:00', ny) == 10 * HOUR


def test_a_json_client_on_another_site_cannot_import(bt, logged_in):
    family = bt.create_family('Olivia', tz=LONDON)
    answer = logged_in.post(f"/admin/families/{family['id']}/import", upload_files=[('file', 'h.csv', HUCKLEBERRY.encode())],
                            headers={'Accept': 'application/json', 'Origin': 'https://evil.example'}, status=403)
    assert answer.json['error'] and counts(bt)['entries'] == 0


@pytest.mark.parametrize('data, message', [
    ('Type,Start,End,Duration,Start Condition,Start Location,End Condition,Notes\nDiaper,2026-10-25 07:00,,,Pee,,,\n'
     'Sleep,yesterday,,,,,,\n', 'Line 3: Start must look like'),
    ('Type,Start,End,Duration,Start Condition,Start Location,End Condition,Notes\nDiaper,2099-10-25 07:00,,,Pee,,,\n',
     'Line 2: ts must be'),
    ('id,time,ts,type,value,by,updated_at,seq\na,,1700000000000,feed,bottle,Mum,1700000000000,1\n'
     'b,,"not a number",feed,bottle,Mum,1,2\n', 'Line 3: ts and updated_at must be whole numbers'),
    ('id,time,ts,type,value,by,updated_at,seq\na,,1700000000000,feed,bottle,Mum,1700000000000,1\n'
     '"bad id!",,1700000000000,feed,bottle,Mum,1,2\n', 'Line 3: entry id must be'),
    ('id,time,ts,type,value,by,updated_at,seq\na,,1700000000000,,"two\nlines",Mum,1700000000000,1\n',
     'Line 3: type must not be empty'),
    ('{"entries": [{"id": "a", "ts": 1700000000000, "type": "feed", "value": "bottle"}, {"id": "b", "ts": "soon"}]}',
     'Entry 2: ts must be an integer'),
    ('{"entries": [\n{"id": "a",\n}', 'Line 3: this is not valid JSON'),
    ('date,what\n2026-10-25,feed\n', 'Line 1: this is neither a babytrackd export nor a Huckleberry'),
    (b'\xff\xfeT\x00y\x00', 'not UTF-8'),
])
def test_a_file_it_cannot_read_gets_a_400_naming_the_line_and_stores_nothing(bt, logged_in, data, message):
    family = bt.create_family('Olivia', tz=LONDON)
    before = counts(bt)
    answer = upload(logged_in, family, data if isinstance(data, bytes) else data.encode(), status=400).json
    assert message in answer['error'], answer
    assert counts(bt) == before


def test_an_import_past_the_family_cap_is_refused_whole(bt, logged_in, monkeypatch):
    family = bt.create_family('Olivia', tz=LONDON)
    monkeypatch.setattr(bt, 'FAMILY_MAX_ENTRIES', 12)
    answer = upload(logged_in, family, HUCKLEBERRY.encode(), status=400).json
    assert 'limit of 12 entries' in answer['error'] and counts(bt)['entries'] == 0


def test_import_form_previews_then_imports_the_held_file_without_a_second_upload(bt, logged_in):
    family = bt.create_family('Olivia', tz=LONDON)
    form = form_of(logged_in.get(f"/admin/families/{family['id']}"), '/import')
    form['file'] = ('huckleberry.csv', HUCKLEBERRY.encode())
    preview = form.submit()
    text = ' '.join(preview.html.get_text().split())
    assert '13 entries from 24 Oct 2026 to 25 Oct 2026' in text
    assert 'Skipped: 1 Bath, 1 Diaper (dry), 1 Feed (no side or bottle), 2 Pump, 1 Solids' in text
    assert bt.live_entries(family['id']) == []
    assert preview.html.select_one('#import-preview a[href$="#import"]').get_text() == 'Cancel'
    done = form_of(preview, '/import').submit()
    assert '13 new; 0 were already here.' in ' '.join(done.html.get_text().split())
    assert len(bt.live_entries(family['id'])) == 13
    assert 'This preview has expired' in form_of(preview, '/import').submit(status=400).text  # held files are used once


def test_import_form_shows_a_bad_file_beside_the_form_and_needs_the_csrf_token(bt, logged_in):
    family = bt.create_family('Olivia', tz=LONDON)
    form = form_of(logged_in.get(f"/admin/families/{family['id']}"), '/import')
    form['file'] = ('notes.csv', b'date,what\n')
    page = form.submit(status=400)
    assert 'this is neither a babytrackd export' in page.html.select_one('#import .error').get_text()
    form['csrf'] = 'wrong'
    form['file'] = ('huckleberry.csv', HUCKLEBERRY.encode())
    form['preview'] = '0'
    form.submit(status=403)
    assert counts(bt)['entries'] == 0


def test_a_held_preview_posted_from_another_familys_page_is_refused_and_still_imports_on_its_own(bt, logged_in):
    olivia, noah = bt.create_family('Olivia', tz=LONDON), bt.create_family('Noah', tz=LONDON)
    form = form_of(logged_in.get(f"/admin/families/{olivia['id']}"), '/import')
    form['file'] = ('huckleberry.csv', HUCKLEBERRY.encode())
    preview = form.submit()
    held = form_of(preview, '/import')
    own, held.action = held.action, f"/admin/families/{noah['id']}/import"
    assert 'This preview has expired' in held.submit(status=400).text
    held.action = own
    held.submit()
    assert (len(bt.live_entries(olivia['id'])), bt.live_entries(noah['id'])) == (13, [])


def test_a_json_import_is_parsed_once(bt, logged_in, monkeypatch):
    olivia, copy = bt.create_family('Olivia', tz=LONDON), bt.create_family('Copy', tz=LONDON)
    now = bt.now_ms()
    for n in range(3):
        write(bt, olivia, 'add', f'e{n}', now=now, ts=now - n * HOUR, type='feed', value='bottle', updated_at=now)
    exported = logged_in.get(f"/admin/families/{olivia['id']}/export.json").body
    parsed, parse_json = [], bt.parse_json
    monkeypatch.setattr(bt, 'parse_json', lambda text: parsed.append(len(text)) or parse_json(text))
    assert upload(logged_in, copy, exported).json['added'] == 3
    assert parsed == [len(exported)]


def test_held_previews_are_bounded(bt, logged_in):
    family = bt.create_family('Olivia', tz=LONDON)
    for _ in range(bt.IMPORT_HELD + 3):
        form = form_of(logged_in.get(f"/admin/families/{family['id']}"), '/import')
        form['file'] = ('huckleberry.csv', HUCKLEBERRY.encode())
        form.submit()
    assert len(bt.held_imports) == bt.IMPORT_HELD


# A crash during writes ---------------------------------------------------------------------------

def read_database(path, sql, *args):
    with sqlite3.connect(f'file:{path}?mode=ro', uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, args)]


class RecordingWriter(Writer):
    """test_reliability's phone that also keeps every entry the server sent it (each an acknowledged change)."""

    def take(self, message):
        if message['type'] == 'entry':
            self.received = getattr(self, 'received', []) + [message['entry']]
        super().take(message)


def test_after_a_crash_the_change_log_and_the_entries_agree(tmp_path):
    server = Server(tmp_path)
    writing, up, stop = threading.Event(), threading.Event(), threading.Event()
    writers, rng = [], random.Random(12)
    try:
        admin = AdminClient(server)
        admin.login()
        family_id, tokens = open_family(admin, 'Crash', 'Mum', 'Dad')
        writers = [RecordingWriter(server, family_id, token, label, rng.random(), writing, up, stop)
                   for token, label in zip(tokens, ['Mum', 'Dad'])]
        up.set()
        writing.set()
        for writer in writers:
            writer.start()

        def acknowledged():
            for writer in writers:
                writer.check()
            return sum(writer.acknowledged for writer in writers)
        for _ in range(2):
            wait_for(lambda: acknowledged() >= 0 and all(w.device for w in writers), 10, message='phones online')
            wait_for(lambda: acknowledged() >= 60 + rng.randint(0, 100), 30, message='acknowledged taps')
            up.clear()
            server.stop(signal.SIGKILL)
            wait_for(lambda: not any(w.device for w in writers), 5, message='phones to notice the crash')
            entries = {r['id']: r for r in read_database(server.db_path, 'SELECT * FROM entries')}
            changes = read_database(server.db_path, 'SELECT * FROM changes ORDER BY seq')
            by_seq = {c['seq']: c for c in changes}
            for entry in entries.values():  # the current state is the newest version in the log
                newest = max((c for c in changes if c['entry_id'] == entry['id']), key=lambda c: c['seq'], default=None)
                assert newest is not None, f"{entry['id']} has no row in the change log"
                assert newest == dict(by_seq[entry['seq']], at=newest['at'])
                assert {k: entry[k] for k in ('ts', 'type', 'value', 'deleted', 'updated_at', 'by')} == \
                    {k: newest[k] for k in ('ts', 'type', 'value', 'deleted', 'updated_at', 'by')}
            assert {c['entry_id'] for c in changes} == set(entries)
            received = [e for writer in writers for e in getattr(writer, 'received', [])]
            assert len({e['seq'] for e in received}) > 50
            for seen in received:  # every change a phone was sent has its row in the log, as it was sent
                row = by_seq.get(seen['seq'])
                assert row is not None, f"seq {seen['seq']} was acknowledged and is not in the change log"
                assert dict(row, deleted=bool(row['deleted'])) == dict(
                    {k: seen[k] for k in ('seq', 'ts', 'type', 'value', 'deleted', 'updated_at', 'by')},
                    entry_id=seen['id'], family_id=family_id, at=row['at'])
            server.start()
            up.set()
        writing.clear()
        wait_for(lambda: acknowledged() >= 0 and all(w.device and not w.outbox for w in writers), 20,
                 message='every outbox to drain')
    finally:
        stop.set()
        up.set()
        for writer in writers:
            writer.join(5)
            if writer.device:
                writer.drop()
        server.stop()


# In a real browser -------------------------------------------------------------------------------

@pytest.mark.parametrize('width', [390, 1280])
def test_history_deleted_and_import_preview_in_chromium(server, admin, browser, width, tmp_path):
    os.makedirs(SHOTS, exist_ok=True)
    family = admin.create_family('Olivia Bennett', tz=LONDON)
    link = admin.create_link(family['id'], 'Mum')
    phone, now = Device(server, family['id'], link['token']), int(time.time() * 1000)
    phone.add('e1', now - 2 * HOUR, 'feed', 'bottle', updated_at=now - 3000)
    phone.entry_echo('e1')
    phone.send({'type': 'entry', 'action': 'update', 'entry': {'id': 'e1', 'value': 'breast left', 'updated_at': now - 2000}})
    phone.entry_echo('e1')
    phone.add('e2', now - HOUR, 'nappy', 'wet + dirty', updated_at=now - 1500)
    phone.entry_echo('e2')
    phone.send({'type': 'entry', 'action': 'delete', 'id': 'e2', 'updated_at': now - 1000})
    phone.entry_echo('e2')

    context = browser.new_context(viewport={'width': width, 'height': 900})
    page = context.new_page()
    problems = []
    page.on('console', lambda message: problems.append(message.text) if message.type in ('error', 'warning') else None)
    page.on('pageerror', lambda error: problems.append(str(error)))
    base = f"{server.base_url}/admin/families/{family['id']}"
    page.goto(server.base_url + '/admin')
    page.fill('input[name=username]', 'jane')
    page.fill('input[name=password]', 'correct horse battery staple')
    page.click('button:has-text("Log in")')
    page.wait_for_selector('h1:has-text("Clients")')

    def fits():
        return page.evaluate('document.documentElement.scrollWidth') <= width

    page.goto(base)
    page.click('#activity a.event:has-text("breast left")')
    page.wait_for_selector('h1:has-text("History of an entry")')
    assert page.locator('.versions li').count() == 2 and fits()
    page.screenshot(path=f'{SHOTS}/history-{width}.png', full_page=True)
    page.click('button:has-text("Restore this version")')
    page.wait_for_selector('.versions li:nth-child(3) .badge.online')
    assert phone.entry_echo('e1')['entry']['value'] == 'bottle'  # the phone has it at once

    page.goto(base)
    page.click('#activity a:has-text("Recently deleted")')
    page.wait_for_selector('h1:has-text("Recently deleted")')
    assert page.locator('table.activity tbody tr').count() == 1 and fits()
    page.screenshot(path=f'{SHOTS}/deleted-{width}.png', full_page=True)

    huckleberry = tmp_path / 'huckleberry.csv'
    huckleberry.write_text(HUCKLEBERRY)
    page.goto(base + '#import')
    page.locator('#import').screenshot(path=f'{SHOTS}/import-form-{width}.png')
    page.set_input_files('#import input[type=file]', str(huckleberry))
    page.click('#import button:has-text("Preview")')
    page.wait_for_selector('h1:has-text("Import this file?")')
    assert '13 entries from 24 Oct 2026 to 25 Oct 2026' in page.inner_text('#import-preview') and fits()
    page.screenshot(path=f'{SHOTS}/import-preview-{width}.png', full_page=True)
    page.click('button:has-text("Import")')
    page.wait_for_selector('h1:has-text("Imported")')
    assert '13 new' in page.inner_text('#import-preview')
    phone.recv_until(lambda m: m['type'] == 'entry' and m['entry']['by'] == 'import')
    phone.close()
    context.close()
    assert problems == []
