"""Tests for the summaries done in SQL once per page (issue 10): the dashboard's and list's totals and
states for every family, the 14-day chart and the day summary, each checked against the contract's
rule written out naively here on random practices; a page's queries do not grow
with the number of families, days or entries, and each is served by an index; exports stream in
slices from one snapshot.
"""

import csv
import datetime as dt
import io
import random
import zoneinfo

import pytest

ZONES = ['Australia/Sydney', 'Europe/London', 'America/New_York', 'UTC']
TUMMY = {'category': 'tummy', 'stateful': True, 'buttons': [{'label': 'on', 'counted': True}, {'label': 'off'}]}
KINDS = [('sleep', 'sleeping'), ('sleep', 'awake'), ('feed', 'bottle'), ('nappy', 'wet'), ('nappy', 'Dirty'),
         ('nappy', 'wet + dirty'), ('tummy', 'on'), ('tummy', 'off'), ('bath', 'yes')]
HOUR = 3600 * 1000
LATER = 1_900_000_000_000  # a clock after every practice day


def at(text, tz):
    """Return the milliseconds of the wall-clock time 'YYYY-MM-DD HH:MM' in zone tz."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=zoneinfo.ZoneInfo(tz)).timestamp() * 1000)


def write(bt, family, ts, kind, value, entry_id):
    bt.apply_entry(family['id'], 'add', {'entry': {'id': entry_id, 'ts': ts, 'type': kind, 'value': value,
                                                   'updated_at': ts}}, 'test', now=LATER)


def practice(bt, seed, families=4, entries=80):
    """Random families around a daylight-saving change (Sydney springs forward on 2026-10-04, New York
    falls back on 2026-11-01): ties in time, deletions, a custom stateful category; return
    (families, everything written as {id, ts, type, value, deleted, family_id})."""
    rng, made, written = random.Random(seed), [], []
    for number in range(families):
        family = bt.create_family(f'Family {number}', '', ZONES[number % len(ZONES)])
        if number % 2:
            bt.save_config(family['id'], bt.DEFAULT_CONFIG + [TUMMY])
        first = at('2026-10-02 00:00' if number % 4 != 2 else '2026-10-30 00:00', family['tz'])
        moments = [first + rng.randrange(4 * 24 * 4) * 15 * 60000 for _ in range(entries // 2)]  # ties happen
        for count in range(entries):
            kind, value = rng.choice(KINDS)
            entry = {'id': f'{seed}-{number}-{count}', 'ts': rng.choice(moments), 'type': kind, 'value': value,
                     'deleted': False, 'family_id': family['id']}
            write(bt, family, entry['ts'], kind, value, entry['id'])
            if rng.random() < 0.15:
                bt.apply_entry(family['id'], 'delete', {'id': entry['id'], 'updated_at': entry['ts'] + 1}, 'test',
                               now=LATER)
                entry['deleted'] = True
            written.append(entry)
        made.append(bt.get_family(family['id']))
    return made, written


def naive_spans(written, family, category, start, stop):
    """The contract, straight: each live entry of a category sets its state until the next (by ts, then id)."""
    changes = sorted((e['ts'], e['id'], e['value']) for e in written
                     if e['family_id'] == family['id'] and e['type'] == category and not e['deleted'])
    spans = []
    for (ts, _, label), following in zip(changes, changes[1:] + [(stop, None, None)]):
        begin, finish = max(ts, start), min(following[0], stop)
        if finish > begin:
            spans.append((label, ts, begin, finish))
    return spans


def naive_day(bt, written, family, date, now):
    """The day's totals, the minutes of each stateful category and the states open at `now`."""
    start, end = bt.day_window(date, family['tz'])
    config = bt.get_config(family['id'])
    live = [e for e in written if e['family_id'] == family['id'] and not e['deleted'] and start <= e['ts'] < end]
    minutes, open_states = {}, []
    for group in config:
        if group.get('stateful'):
            counted = {b['label'] for b in group['buttons'] if b.get('counted')}
            spans = naive_spans(written, family, group['category'], start, min(end, now))
            minutes[group['category']] = round(sum(f - b for label, _, b, f in spans if label in counted) / 60000)
            open_states += [(label, since) for label, since, _, finish in spans if finish == now]
    nappies = [e['value'].lower() for e in live if e['type'] == 'nappy']
    totals = {'sleep_minutes': minutes.get('sleep', 0), 'feeds': sum(e['type'] == 'feed' for e in live),
              'wet': sum('wet' in v for v in nappies), 'dirty': sum('dirty' in v for v in nappies)}
    return totals, minutes, open_states


@pytest.mark.parametrize('seed', range(6))
def test_every_familys_today_is_the_contracts_day_summed_up_to_now(bt, seed):
    families, written = practice(bt, seed)
    rng = random.Random(seed)
    for now in sorted(at('2026-10-02 00:00', 'UTC') + rng.randrange(31 * 24) * HOUR + rng.randrange(HOUR)
                      for _ in range(8)):
        today = bt.families_today(families, now)
        for family in families:
            totals, _, open_states = naive_day(bt, written, family, bt.local_today(family['tz'], now), now)
            assert today[family['id']] == {'totals': totals, 'states': open_states}, (family['tz'], now)


@pytest.mark.parametrize('seed', range(6))
def test_day_summary_and_chart_are_the_contracts_days(bt, seed):
    families, written = practice(bt, seed)
    for family in families:
        last = dt.date(2026, 10, 5) if family['tz'] != 'America/New_York' else dt.date(2026, 11, 2)
        now = at(f'{last} 09:30', family['tz'])  # the last day is today, half lived
        chart = bt.sleep_chart(family, last, now)
        assert [row['date'] for row in chart] == [last - dt.timedelta(days=back) for back in range(13, -1, -1)]
        for row in chart:
            summary = bt.day_summary(family, row['date'], now)
            totals, minutes, _ = naive_day(bt, written, family, row['date'], now)
            assert summary['totals'] == totals and row['minutes'] == totals['sleep_minutes']
            assert {c: v['minutes'] for c, v in summary['categories'].items() if 'minutes' in v} == minutes
            start, end = bt.day_window(row['date'], family['tz'])
            feeds = sorted(e['ts'] for e in written if e['family_id'] == family['id'] and not e['deleted']
                           and e['type'] == 'feed' and start <= e['ts'] < end)
            assert row['feeds'] == [bt.clock_minutes(ts, start, family['tz']) for ts in feeds]
            assert sum(width for _, width in row['sleep']) == pytest.approx(
                sum(bt.clock_minutes(s['end'], start, family['tz']) - bt.clock_minutes(s['start'], start, family['tz'])
                    for s in summary['spans'] if s['category'] == 'sleep' and s['counted']), abs=0.2)


def test_a_state_carried_in_from_long_ago_and_a_category_no_longer_stateful(bt):
    family = bt.create_family('Carry', '', 'Europe/London')
    write(bt, family, at('2026-09-01 19:00', family['tz']), 'sleep', 'sleeping', 'a')
    write(bt, family, at('2026-09-01 19:00', family['tz']), 'tummy', 'on', 'b')
    now = at('2026-10-04 09:00', family['tz'])
    since = at('2026-09-01 19:00', family['tz'])
    assert bt.families_today([family], now)[family['id']] == {
        'totals': {'sleep_minutes': 9 * 60, 'feeds': 0, 'wet': 0, 'dirty': 0}, 'states': [('sleeping', since)]}
    bt.save_config(family['id'], [{'category': 'sleep', 'buttons': [{'label': 'sleeping'}]}, TUMMY])
    assert bt.families_today([family], now)[family['id']] == {
        'totals': {'sleep_minutes': 0, 'feeds': 0, 'wet': 0, 'dirty': 0}, 'states': [('on', since)]}
    bt.save_config(family['id'], [])  # a config with no buttons at all counts nothing, as its day summary does
    assert bt.families_today([family], now)[family['id']] == {
        'totals': {'sleep_minutes': 0, 'feeds': 0, 'wet': 0, 'dirty': 0}, 'states': []}
    assert bt.day_summary(family, dt.date(2026, 10, 4), now)['totals']['sleep_minutes'] == 0
    assert bt.families_today([], now) == {}


def test_the_families_list_shows_the_same_today_as_each_summary(bt, logged_in, monkeypatch):
    families, _ = practice(bt, 1)
    now = at('2026-10-03 21:10', 'UTC')
    monkeypatch.setattr(bt, 'now_ms', lambda: now)
    listed = logged_in.get('/admin/families', headers={'Accept': 'application/json'}).json['families']
    for family in listed:
        date = bt.local_today(family['tz'], now)
        summary = logged_in.get(f"/admin/families/{family['id']}/summary?date={date}",
                                headers={'Accept': 'application/json'}).json
        assert family['today'] == summary['totals']
    assert {f['id'] for f in listed} == {f['id'] for f in families}


def statements(bt, monkeypatch, action):
    """Run action; return the (SQL, arguments) it sent to the database, on its connection or apart."""
    sent, apart = [], bt.read_apart
    monkeypatch.setattr(bt, 'read_apart', lambda sql, args: sent.append((sql, args)) or apart(sql, args))
    bt.db.set_trace_callback(lambda sql: sql.startswith('PRAGMA') or sent.append((sql, ())))
    try:
        action()
    finally:
        bt.db.set_trace_callback(None)
        monkeypatch.setattr(bt, 'read_apart', apart)
    return sent


def test_pages_run_the_same_queries_for_3_families_or_30_and_for_1_day_or_14(bt, logged_in, monkeypatch):
    monkeypatch.setattr(bt, 'now_ms', lambda: at('2026-10-05 09:30', 'UTC'))
    families, _ = practice(bt, 2, families=3)
    one = bt.create_family('Lonely', '', 'UTC')
    pages = {'/admin': {}, '/admin/families': {'Accept': 'application/json'},
             f"/admin/families/{families[0]['id']}": {}, f"/admin/families/{one['id']}": {}}
    few = {path: len(statements(bt, monkeypatch, lambda: logged_in.get(path, headers=headers)))
           for path, headers in pages.items()}
    practice(bt, 3, families=27, entries=200)
    many = {path: len(statements(bt, monkeypatch, lambda: logged_in.get(path, headers=headers)))
            for path, headers in pages.items()}
    assert many == few, (few, many)
    assert few['/admin'] <= 8 and few[f"/admin/families/{one['id']}"] <= 18  # with the Nights table, plan and notes


def test_every_summary_query_is_served_by_an_index(bt, logged_in, monkeypatch):
    monkeypatch.setattr(bt, 'now_ms', lambda: at('2026-10-05 09:30', 'UTC'))
    families, _ = practice(bt, 4)
    family = families[1]
    json = {'Accept': 'application/json'}
    sent = statements(bt, monkeypatch, lambda: [
        logged_in.get('/admin'), logged_in.get('/admin/families', headers=json),
        logged_in.get(f"/admin/families/{family['id']}"),
        logged_in.get(f"/admin/families/{family['id']}/summary?date=2026-10-03", headers=json)])
    plans = {}
    for sql, args in sent:
        if ('entries' in sql or 'changes' in sql) and sql.lstrip().upper().startswith(('SELECT', 'WITH')):
            plans[sql] = ' | '.join(row[3] for row in bt.db.execute('EXPLAIN QUERY PLAN ' + sql, args))
    assert len(plans) >= 5
    for sql, plan in plans.items():
        scans = ('SCAN entries', 'SCAN changes', 'SCAN e ', 'SCAN p')
        assert not any(scan in plan + ' ' for scan in scans), (sql, plan)
    assert any('idx_entries_type' in plan for plan in plans.values())
    assert any('idx_entries_updated' in plan for plan in plans.values())  # the families list's last activity


def test_exports_stream_every_live_entry_in_slices_from_one_snapshot(bt, logged_in):
    family = bt.create_family('Big', '', 'Australia/Sydney')
    start = at('2026-10-01 00:00', family['tz'])
    for number in range(2500):  # ties in time come out in the order they always did: id descending
        write(bt, family, start + (number // 2) * 60000, 'feed', '=1+1' if number == 7 else 'bottle', f'e{number:04d}')
    bt.apply_entry(family['id'], 'delete', {'id': 'e0003', 'updated_at': LATER}, 'test', now=LATER)
    slices = bt.export_slices(family['id'])
    first = next(slices)
    write(bt, family, start + 2000 * 60000, 'feed', 'bottle', 'late')  # written while an export is under way
    entries = sum(len(part) for part in iter(lambda: next(slices), None))  # then None, then the change log
    assert len(first) + entries == 2499 and len(first) == 250  # that export never sees it
    assert sum(len(part) for part in slices if part) == 2501  # every change, the late one not among them
    expected = [f'e{n:04d}' for pair in range(1250) for n in (2 * pair + 1, 2 * pair) if n != 3] + ['late']
    rows = list(csv.DictReader(io.StringIO(logged_in.get(f"/admin/families/{family['id']}/export.csv").text)))
    assert [r['id'] for r in rows] == expected
    assert rows[0]['time'] == '2026-10-01T00:00:00+10:00' and rows[-2]['time'] == '2026-10-01T20:49:00+10:00'
    assert next(r for r in rows if r['id'] == 'e0007')['value'] == "'=1+1"
    data = logged_in.get(f"/admin/families/{family['id']}/export.json").json
    assert [e['id'] for e in data['entries']] == expected
    assert data['family'] == bt.get_family(family['id'])
    assert data['entries'][-2] == {'id': 'e2498', 'ts': start + 1249 * 60000, 'time': '2026-10-01T20:49:00+10:00',
                                   'type': 'feed', 'value': 'bottle', 'deleted': False,
                                   'updated_at': start + 1249 * 60000, 'seq': data['entries'][-2]['seq'], 'by': 'test'}
