"""Tests for the sleep program's nights (issue 11, items 1, 2 and 5): the night window, the report and
its Nights table, and the triage flags on the dashboard and in the JSON list.

Golden reports are computed by hand and read through the JSON route (WebTest, a fixed clock, a real
SQLite file); the pages through WebTest; the pages' look in Debian's Chromium at phone and laptop widths.
"""

import datetime as dt
import json
import os
import sqlite3
import time
import uuid

import pytest

from conftest import ADMIN_PASSWORD, AdminClient, Device, Server, wait_for
from test_admin import HOSTILE, LATER, SHOTS, SYDNEY, add, assert_clean, at, browser, form_of, write_day  # noqa: F401 (browser is a fixture)

HOUR, MINUTE = 3600_000, 60_000
PLAN = {'wake': '07:00', 'naps': [{'start': '09:30', 'end': '11:00'}, {'start': '14:00', 'end': '15:30'}],
        'bedtime': '19:00'}


@pytest.fixture
def clock(bt, monkeypatch):
    """The server's clock, fixed long after every golden night; set clock[0] to move it."""
    moment = [LATER]
    monkeypatch.setattr(bt, 'now_ms', lambda: moment[0])
    return moment


@pytest.fixture
def jane(clock, logged_in):
    return logged_in


def report(web, family, status=200, **query):
    query = '&'.join(f'{key}={value}' for key, value in query.items())
    return web.get(f"/admin/families/{family['id']}/report?{query}", headers={'Accept': 'application/json'},
                   status=status).json


def set_plan(bt, family, plan):
    """Store a plan the way the plan routes do (families.plan as JSON)."""
    bt.db.execute('UPDATE families SET plan = ? WHERE id = ?', (json.dumps(plan) if plan else None, family['id']))


def night_row(tz, date, night, day=None, diff=None):
    """A report row: local times 'YYYY-MM-DD HH:MM' (a trailing '!' for the second of a repeated hour) become ms."""
    ms = lambda text: at(text.rstrip('!'), tz, int(text.endswith('!'))) if isinstance(text, str) else text
    following = (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()
    return {'date': date,
            'day': {'start': at(f'{date} 07:00', tz), 'end': at(f'{date} 19:00', tz), 'naps': 0, 'nap_minutes': 0,
                    'wake_windows': [], **(day or {})},
            'night': {'start': at(f'{date} 19:00', tz), 'end': at(f'{following} 07:00', tz), 'complete': True,
                      **{key: ms(value) for key, value in night.items()}},
            'plan_diff': {'bedtime_minutes': None, 'wake_minutes': None, **(diff or {})}}


# Two naps, bedtime 19:15, two wakings (25 and 20 min), up at 06:20.
PLAIN = [('2026-10-03 06:45', 'sleep', 'awake'),
         ('2026-10-03 09:30', 'sleep', 'sleeping'), ('2026-10-03 10:45', 'sleep', 'awake'),
         ('2026-10-03 14:00', 'sleep', 'sleeping'), ('2026-10-03 15:30', 'sleep', 'awake'),
         ('2026-10-03 19:15', 'sleep', 'sleeping'), ('2026-10-03 23:40', 'sleep', 'awake'),
         ('2026-10-04 00:05', 'sleep', 'sleeping'), ('2026-10-04 03:10', 'sleep', 'awake'),
         ('2026-10-04 03:30', 'sleep', 'sleeping'), ('2026-10-04 06:20', 'sleep', 'awake'),
         ('2026-10-04 09:00', 'sleep', 'sleeping'), ('2026-10-04 10:00', 'sleep', 'awake'),
         ('2026-10-03 12:00', 'feed', 'bottle'), ('2026-10-04 01:00', 'nappy', 'wet')]
PLAIN_NIGHT = {'bedtime': '2026-10-03 19:15', 'morning_wake': '2026-10-04 06:20', 'sleep_minutes': 265 + 185 + 170,
               'wakings': 2, 'awake_minutes': 45, 'longest_stretch_minutes': 265}
PLAIN_DAY = {'naps': 2, 'nap_minutes': 75 + 90, 'wake_windows': [165, 195, 225]}  # 06:45-09:30, 10:45-14:00, 15:30-19:15


# The report ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('tz, entries, query, rows', [
    # a plain night with two wakings: the day before it (two naps, three wake windows) and the night
    ('UTC', PLAIN, {'days': 1, 'end': '2026-10-03'}, [night_row('UTC', '2026-10-03', PLAIN_NIGHT, PLAIN_DAY)]),
    # an early bedtime at 17:30 is the night's (not a nap); its sleep counts from 19:00
    ('UTC', [('2026-10-03 07:00', 'sleep', 'awake'), ('2026-10-03 12:00', 'sleep', 'sleeping'),
             ('2026-10-03 13:00', 'sleep', 'awake'), ('2026-10-03 17:30', 'sleep', 'sleeping'),
             ('2026-10-04 05:45', 'sleep', 'awake')], {'days': 1, 'end': '2026-10-03'},
     [night_row('UTC', '2026-10-03', {'bedtime': '2026-10-03 17:30', 'morning_wake': '2026-10-04 05:45',
                                      'sleep_minutes': 645, 'wakings': 0, 'awake_minutes': 0,
                                      'longest_stretch_minutes': 645},
                {'naps': 1, 'nap_minutes': 60, 'wake_windows': [300, 270]})]),
    # a late nap inside the three hours before the night is still a nap; bedtime is the sleep that reaches the night
    ('UTC', [('2026-10-03 13:00', 'sleep', 'awake'), ('2026-10-03 16:15', 'sleep', 'sleeping'),
             ('2026-10-03 16:45', 'sleep', 'awake'), ('2026-10-03 19:05', 'sleep', 'sleeping'),
             ('2026-10-04 06:05', 'sleep', 'awake')], {'days': 1, 'end': '2026-10-03'},
     [night_row('UTC', '2026-10-03', {'bedtime': '2026-10-03 19:05', 'morning_wake': '2026-10-04 06:05',
                                      'sleep_minutes': 660, 'wakings': 0, 'awake_minutes': 0,
                                      'longest_stretch_minutes': 660},
                {'naps': 1, 'nap_minutes': 30, 'wake_windows': [195, 140]})]),
    # states carried in from before the report: asleep into the day (a sleep-in is not a nap) ...
    ('UTC', [('2026-10-03 19:00', 'sleep', 'sleeping'), ('2026-10-04 02:00', 'sleep', 'awake'),
             ('2026-10-04 02:40', 'sleep', 'sleeping'), ('2026-10-04 07:50', 'sleep', 'awake'),
             ('2026-10-04 10:00', 'sleep', 'sleeping'), ('2026-10-04 11:00', 'sleep', 'awake'),
             ('2026-10-04 19:30', 'sleep', 'sleeping'), ('2026-10-05 06:30', 'sleep', 'awake')],
     {'days': 1, 'end': '2026-10-04'},
     [night_row('UTC', '2026-10-04', {'bedtime': '2026-10-04 19:30', 'morning_wake': '2026-10-05 06:30',
                                      'sleep_minutes': 660, 'wakings': 0, 'awake_minutes': 0,
                                      'longest_stretch_minutes': 660},
                {'naps': 1, 'nap_minutes': 60, 'wake_windows': [130, 510]})]),
    # ... and awake: the first wake window runs from the waking before the report began
    ('UTC', [('2026-10-04 06:10', 'sleep', 'awake'), ('2026-10-04 09:00', 'sleep', 'sleeping'),
             ('2026-10-04 10:30', 'sleep', 'awake')], {'days': 1, 'end': '2026-10-04'},
     [night_row('UTC', '2026-10-04', {'bedtime': None, 'morning_wake': None, 'sleep_minutes': 0, 'wakings': 0,
                                      'awake_minutes': 0, 'longest_stretch_minutes': 0},
                {'naps': 1, 'nap_minutes': 90, 'wake_windows': [170]})]),
    # Sydney falls back on 2026-04-05: a 13-hour night; awake at the first 02:30, asleep again at the second 02:15
    (SYDNEY, [('2026-04-04 19:00', 'sleep', 'sleeping'), ('2026-04-05 02:30', 'sleep', 'awake'),
              ('2026-04-05 02:15!', 'sleep', 'sleeping'), ('2026-04-05 06:00', 'sleep', 'awake')],
     {'days': 1, 'end': '2026-04-04'},
     [night_row(SYDNEY, '2026-04-04', {'bedtime': '2026-04-04 19:00', 'morning_wake': '2026-04-05 06:00',
                                       'sleep_minutes': 450 + 225, 'wakings': 1, 'awake_minutes': 45,
                                       'longest_stretch_minutes': 450})]),
    # and springs forward on 2026-10-04: an 11-hour night; 01:30 to 03:30 on the clock is one real hour
    (SYDNEY, [('2026-10-03 19:30', 'sleep', 'sleeping'), ('2026-10-04 01:30', 'sleep', 'awake'),
              ('2026-10-04 03:30', 'sleep', 'sleeping'), ('2026-10-04 06:30', 'sleep', 'awake')],
     {'days': 1, 'end': '2026-10-03'},
     [night_row(SYDNEY, '2026-10-03', {'bedtime': '2026-10-03 19:30', 'morning_wake': '2026-10-04 06:30',
                                       'sleep_minutes': 360 + 180, 'wakings': 1, 'awake_minutes': 60,
                                       'longest_stretch_minutes': 360})]),
    # deleted entries never count: a deleted early bedtime, a deleted waking, a deleted morning wake
    ('UTC', PLAIN + [('2026-10-03 18:00', 'sleep', 'sleeping', 'deleted'),
                     ('2026-10-04 01:00', 'sleep', 'awake', 'deleted'), ('2026-10-04 01:10', 'sleep', 'sleeping', 'deleted'),
                     ('2026-10-04 05:00', 'sleep', 'awake', 'deleted')],
     {'days': 1, 'end': '2026-10-03'}, [night_row('UTC', '2026-10-03', PLAIN_NIGHT, PLAIN_DAY)]),
    # two days: the rows come oldest first, one per date, each with its own day and night
    ('UTC', PLAIN, {'days': 2, 'end': '2026-10-04'},
     [night_row('UTC', '2026-10-03', PLAIN_NIGHT, PLAIN_DAY),
      night_row('UTC', '2026-10-04', {'bedtime': None, 'morning_wake': None, 'sleep_minutes': 0, 'wakings': 0,
                                      'awake_minutes': 0, 'longest_stretch_minutes': 0},
                {'naps': 1, 'nap_minutes': 60, 'wake_windows': [160]})]),
])
def test_report_golden(bt, jane, tz, entries, query, rows):
    family = bt.create_family('Golden', '', tz)
    write_day(bt, family, entries)
    assert report(jane, family, **query) == {'days': rows}


def test_report_with_a_renamed_button_config(bt, jane):
    family = bt.create_family('Renamed')
    bt.save_config(family['id'], [{'category': 'sleep', 'stateful': True, 'buttons': [
        {'label': 'asleep', 'counted': True}, {'label': 'up'}]}] + bt.DEFAULT_CONFIG[1:])
    write_day(bt, family, [('2026-10-03 19:00', 'sleep', 'asleep'), ('2026-10-04 01:00', 'sleep', 'up'),
                           ('2026-10-04 01:20', 'sleep', 'asleep'), ('2026-10-04 06:00', 'sleep', 'up'),
                           ('2026-10-04 06:10', 'sleep', 'sleeping')])  # an old label: no longer a sleeping state
    night = {'bedtime': '2026-10-03 19:00', 'morning_wake': '2026-10-04 06:00', 'sleep_minutes': 360 + 280,
             'wakings': 1, 'awake_minutes': 20, 'longest_stretch_minutes': 360}
    assert report(jane, family, days=1, end='2026-10-03') == {'days': [night_row('UTC', '2026-10-03', night)]}


def test_an_open_night_counts_up_to_now_and_says_it_is_not_complete(bt, jane, clock):
    family = bt.create_family('Open')
    write_day(bt, family, [('2026-10-03 19:15', 'sleep', 'sleeping'), ('2026-10-03 23:00', 'sleep', 'awake'),
                           ('2026-10-03 23:30', 'sleep', 'sleeping')])
    clock[0] = at('2026-10-04 02:00')  # before 07:00 the day of the 4th has not begun: the last row is the 3rd
    days = report(jane, family, days=2)['days']
    assert [row['date'] for row in days] == ['2026-10-02', '2026-10-03']
    assert days[-1] == night_row('UTC', '2026-10-03', {
        'bedtime': '2026-10-03 19:15', 'morning_wake': None, 'sleep_minutes': 225 + 150, 'wakings': 1,
        'awake_minutes': 30, 'longest_stretch_minutes': 225, 'complete': False})
    clock[0] = at('2026-10-04 08:00')  # still asleep after the night: complete, with no morning wake yet
    days = report(jane, family)['days']
    assert len(days) == 14 and days[-1]['date'] == '2026-10-04' and days[-1]['night']['sleep_minutes'] == 0
    assert days[-2]['night'] == night_row('UTC', '2026-10-03', {
        'bedtime': '2026-10-03 19:15', 'morning_wake': None, 'sleep_minutes': 225 + 450, 'wakings': 1,
        'awake_minutes': 30, 'longest_stretch_minutes': 450})['night']


def test_plan_diff_is_actual_minus_planned(bt, jane):
    family = bt.create_family('Planned')
    write_day(bt, family, PLAIN)
    set_plan(bt, family, PLAN)
    assert report(jane, family, days=1, end='2026-10-03')['days'][0]['plan_diff'] == {
        'bedtime_minutes': 15, 'wake_minutes': -40}  # 19:15 against 19:00, 06:20 against 07:00
    set_plan(bt, family, dict(PLAN, bedtime='18:30', wake='06:00'))
    days = report(jane, family, days=2, end='2026-10-04')['days']
    assert [row['plan_diff'] for row in days] == [{'bedtime_minutes': 45, 'wake_minutes': 20},
                                                  {'bedtime_minutes': None, 'wake_minutes': None}]


def test_report_follows_the_familys_night_window(bt, jane):
    family = bt.create_family('Late', '', SYDNEY)
    jane.patch_json(f"/admin/families/{family['id']}", {'night_start': '20:30', 'night_end': '06:15'})
    write_day(bt, family, [('2026-10-03 20:00', 'sleep', 'sleeping'), ('2026-10-04 06:45', 'sleep', 'awake')])
    row = report(jane, family, days=1, end='2026-10-03')['days'][0]
    assert (row['day']['start'], row['day']['end']) == (at('2026-10-03 06:15', SYDNEY), at('2026-10-03 20:30', SYDNEY))
    assert (row['night']['start'], row['night']['end']) == (at('2026-10-03 20:30', SYDNEY), at('2026-10-04 06:15', SYDNEY))
    assert row['night']['end'] - row['night']['start'] == 8 * HOUR + 45 * MINUTE  # the clock skips an hour
    assert row['night']['sleep_minutes'] == 525 and row['night']['bedtime'] == at('2026-10-03 20:00', SYDNEY)
    assert row['night']['morning_wake'] == at('2026-10-04 06:45', SYDNEY)  # within three hours of the night's end


@pytest.mark.parametrize('query', ['days=0', 'days=61', 'days=x', 'days=1.5', 'days=-1', 'days=', 'end=2026-13-01',
                                   'end=yesterday', 'end=0001-01-01', 'end=9999-12-31'])
def test_report_refuses_bad_queries(bt, jane, query):
    family = bt.create_family('Olivia')
    answer = jane.get(f"/admin/families/{family['id']}/report?{query}", headers={'Accept': 'application/json'},
                      status=400)
    assert answer.json['error']


def test_report_of_sixty_days_an_unknown_family_and_no_session(bt, web, clock):
    family = bt.create_family('Olivia')
    web.get(f"/admin/families/{family['id']}/report", headers={'Accept': 'application/json'}, status=401)
    web.post_json('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD})
    web.get('/admin/families/nosuchid/report', headers={'Accept': 'application/json'}, status=404)
    days = report(web, family, days=60, end='2026-10-04')['days']
    assert len(days) == 60 and days[0]['date'] == '2026-08-06' and days[-1]['date'] == '2026-10-04'


# The night window ------------------------------------------------------------------------------------

def test_night_window_defaults_and_changes_through_the_json_api(bt, jane):
    family = jane.post_json('/admin/families', {'name': 'Olivia'}, status=201).json
    assert (family['night_start'], family['night_end']) == ('19:00', '07:00')
    changed = jane.patch_json(f"/admin/families/{family['id']}", {'night_start': '18:30'}).json
    assert (changed['night_start'], changed['night_end']) == ('18:30', '07:00')
    shown = jane.get(f"/admin/families/{family['id']}", headers={'Accept': 'application/json'}).json
    assert (shown['night_start'], shown['night_end']) == ('18:30', '07:00')


@pytest.mark.parametrize('changes, message', [
    ({'night_start': '7:00'}, 'night_start must be a time HH:MM'),
    ({'night_start': '24:00'}, 'night_start must be a time HH:MM'),
    ({'night_end': '06:60'}, 'night_end must be a time HH:MM'),
    ({'night_end': '06:00:00'}, 'night_end must be a time HH:MM'),
    ({'night_end': ' 06:00'}, 'night_end must be a time HH:MM'),
    ({'night_end': '０６:００'}, 'night_end must be a time HH:MM'),  # fullwidth digits
    ({'night_start': 1900}, 'night_start must be a time HH:MM'),
    ({'night_start': None}, 'night_start must be a time HH:MM'),
    ({'night_start': ''}, 'night_start must be a time HH:MM'),
    ({'night_start': '07:00'}, 'must not be equal'),  # equal to the stored night_end
    ({'night_start': '20:00', 'night_end': '20:00'}, 'must not be equal'),
    ({'night_end': '19:00', 'name': 'Changed'}, 'must not be equal'),
])
def test_night_window_refuses_anything_but_two_different_times(bt, jane, changes, message):
    family = bt.create_family('Olivia')
    answer = jane.patch_json(f"/admin/families/{family['id']}", changes, status=400)
    assert message in answer.json['error']
    assert bt.get_family(family['id']) == family


@pytest.mark.parametrize('date, hours', [('2026-04-04', 13), ('2026-10-03', 11), ('2026-10-10', 12)])
def test_night_windows_follow_daylight_saving(bt, date, hours):
    family = bt.create_family('Clock', '', SYDNEY)
    day_start, night_start, night_end = bt.night_bounds(family, dt.date.fromisoformat(date))
    following = (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()
    assert (day_start, night_start, night_end) == (at(f'{date} 07:00', SYDNEY), at(f'{date} 19:00', SYDNEY),
                                                   at(f'{following} 07:00', SYDNEY))
    assert night_end - night_start == hours * HOUR and night_start - day_start == 12 * HOUR


def test_details_form_sets_the_night_window(bt, jane):
    family = bt.create_family('Olivia')
    page = jane.get(f"/admin/families/{family['id']}")
    form = form_of(page, '/edit', 'name')
    assert (form['night_start'].value, form['night_end'].value) == ('19:00', '07:00')
    assert form.fields['night_start'][0].attrs['type'] == 'time'
    form['night_start'], form['night_end'] = '18:45', '06:30'
    form.submit(status=303)
    assert bt.get_family(family['id']) == dict(family, night_start='18:45', night_end='06:30')


@pytest.mark.parametrize('fields, message', [
    ({'night_start': '25:00'}, 'night_start must be a time HH:MM'),
    ({'night_start': '06:30', 'night_end': '06:30'}, 'night_start and night_end must not be equal'),
])
def test_details_form_night_window_mistakes_keep_what_was_typed(bt, jane, fields, message):
    family = bt.create_family('Olivia')
    csrf = form_of(jane.get(f"/admin/families/{family['id']}"), '/edit', 'name')['csrf'].value
    typed = {'csrf': csrf, 'name': 'Olivia B.', 'notes': 'typed', 'tz': 'UTC', 'night_end': '06:30', **fields}
    page = jane.post(f"/admin/families/{family['id']}/edit", typed, status=400)
    section = page.html.find(id='details')
    assert message in section.find(class_='error').get_text()
    assert section.find('input', attrs={'name': 'night_start'})['value'] == typed['night_start']
    assert section.find('input', attrs={'name': 'name'})['value'] == 'Olivia B.'
    assert bt.get_family(family['id']) == family


# The Nights table ------------------------------------------------------------------------------------

def nights_rows(page):
    return [[' '.join(cell.get_text().split()) for cell in row.find_all(['th', 'td'])]
            for row in page.html.select('#nights tbody tr')]


def test_nights_table_shows_fourteen_nights_newest_first_against_the_plan(bt, jane, clock):
    family = bt.create_family('Olivia')
    write_day(bt, family, PLAIN)
    clock[0] = at('2026-10-05 12:00')
    page = jane.get(f"/admin/families/{family['id']}")
    assert_clean(page.text)
    region = page.html.select_one('#nights .scroll')
    assert region['tabindex'] == '0' and region['role'] == 'region'
    assert page.html.find(id=region['aria-labelledby']).get_text() == 'Nights'
    headers = [th.get_text() for th in page.html.select('#nights thead th')]
    assert headers == ['Date', 'Bedtime', 'Morning wake', 'Night sleep', 'Wakings', 'Awake', 'Longest stretch',
                       'Naps', 'Nap time', 'Wake windows']
    rows = nights_rows(page)
    assert len(rows) == 14 and rows[0][0] == 'Mon 5 Oct so far' and rows[-1][0] == 'Tue 22 Sep'
    assert rows[2] == ['Sat 3 Oct', '19:15', '06:20', '10 h 20 min', '2', '45 min', '4 h 25 min', '2',
                       '2 h 45 min', '2 h 45 min · 3 h 15 min · 3 h 45 min']
    assert rows[1] == ['Sun 4 Oct', '—', '—', '—', '—', '—', '—', '1', '1 h', '2 h 40 min']
    set_plan(bt, family, PLAN)
    rows = nights_rows(jane.get(f"/admin/families/{family['id']}"))
    assert rows[2][1:3] == ['19:15 late 15 min', '06:20 early 40 min']
    set_plan(bt, family, dict(PLAN, bedtime='19:15', wake='05:00'))
    assert nights_rows(jane.get(f"/admin/families/{family['id']}"))[2][1:3] == ['19:15 on plan', '06:20 late 1 h 20 min']


def test_nights_table_ends_at_the_chosen_past_date(bt, jane, clock):
    family = bt.create_family('Olivia')
    write_day(bt, family, PLAIN)
    clock[0] = at('2026-10-20 12:00')
    rows = nights_rows(jane.get(f"/admin/families/{family['id']}?date=2026-10-03"))
    assert rows[0][:3] == ['Sat 3 Oct', '19:15', '06:20'] and rows[-1][0] == 'Sun 20 Sep'
    assert nights_rows(jane.get(f"/admin/families/{family['id']}?date=2026-12-01"))[0][0] == 'Tue 20 Oct so far'


# Triage flags ----------------------------------------------------------------------------------------

NOW = '2026-10-05 12:00'  # a Monday; the last complete night is the night of Sunday the 4th


def flags_of(web):
    """Return {family name: flags} from the JSON list."""
    return {f['name']: f['flags'] for f in web.get('/admin/families', headers={'Accept': 'application/json'}).json['families']}


def dashboard_flags(web):
    """Return [(family name, [flag words])] in the dashboard's order."""
    page = web.get('/admin')
    assert_clean(page.text)
    return [(row.select_one('.client a').get_text(), [li.get_text() for li in row.select('.flags li')])
            for row in page.html.select('table.clients tbody tr')]


def a_night(date, bedtime='19:00', wakings=(), wake='07:00'):
    """Entries of one night on the family's clock: asleep at bedtime, each waking (clock time, minutes), awake at wake."""
    following = (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()
    day = lambda clock: date if clock >= '12:00' else following
    entries = [(f'{day(bedtime)} {bedtime}', 'sleep', 'sleeping')]
    for clock, minutes in wakings:
        woke = dt.datetime.fromisoformat(f'{day(clock)} {clock}')
        entries += [(f'{woke:%Y-%m-%d %H:%M}', 'sleep', 'awake'),
                    (f'{woke + dt.timedelta(minutes=minutes):%Y-%m-%d %H:%M}', 'sleep', 'sleeping')]
    return entries + [(f'{following} {wake}', 'sleep', 'awake')]


@pytest.fixture
def now(clock):
    clock[0] = at(NOW)
    return clock[0]


def test_no_flags_for_a_family_that_is_doing_fine(bt, jane, now):
    family = bt.create_family('Fine')
    bt.create_link(family['id'], 'Mum')
    write_day(bt, family, a_night('2026-10-04', '19:00', [('01:00', 20), ('04:00', 20)], '07:00')
              + [('2026-10-05 11:00', 'sleep', 'sleeping')])
    assert flags_of(jane) == {'Fine': []}
    assert dashboard_flags(jane) == [('Fine', [])]


def test_quiet_needs_a_live_link_and_a_day_without_entries(bt, jane, now, clock):
    family = bt.create_family('Quiet')
    write_day(bt, family, [('2026-10-04 11:00', 'feed', 'bottle')])  # 25 h ago
    assert flags_of(jane) == {'Quiet': []}  # no link: nobody is expected to log
    link = bt.create_link(family['id'], 'Mum')
    assert flags_of(jane) == {'Quiet': ['quiet']}
    assert dashboard_flags(jane) == [('Quiet', ['No entries for 25 h'])]
    clock[0] = at('2026-10-07 12:00')
    assert dashboard_flags(jane)[0][1] == ['No entries for 3 days']
    clock[0] = now
    write_day(bt, family, [('2026-10-04 13:00', 'feed', 'bottle')])  # 23 h ago
    assert flags_of(jane) == {'Quiet': []}
    bt.revoke_link(family['id'], link['token'])
    other = bt.create_family('Expired link')
    bt.create_link(other['id'], 'Dad', now + HOUR)
    clock[0] = now + 2 * HOUR  # the link has expired: no live link, not quiet
    assert flags_of(jane) == {'Quiet': [], 'Expired link': []}
    bt.create_link(other['id'], 'Gran')
    assert flags_of(jane) == {'Quiet': [], 'Expired link': ['quiet']}
    assert dict(dashboard_flags(jane))['Expired link'] == ['No entries yet']


@pytest.mark.parametrize('night, plan, flagged, words', [
    (a_night('2026-10-04', '19:00', [], '05:00'), None, False, ''),  # 600 is not under 600
    (a_night('2026-10-04', '19:00', [], '04:59'), None, True, 'Short night: 9 h 59 min'),
    (a_night('2026-10-04', '19:00', [('23:00', 60)], '06:00'), None, False, ''),  # 660
    (a_night('2026-10-04', '20:00', [], '06:00'), PLAN, True, 'Short night: 10 h'),  # the plan's 12 h less 2 h
    (a_night('2026-10-04', '19:00', [], '06:00'), PLAN, True, 'Short night: 11 h'),  # exactly 60 min under
    (a_night('2026-10-04', '19:00', [], '06:01'), PLAN, False, ''),  # 59 min under
    (a_night('2026-10-04', '20:00', [], '05:10'), dict(PLAN, bedtime='20:00', wake='06:00'), False, ''),  # 50 under 10 h
    ([], None, False, ''),  # no sleep logged at all: that is for quiet and state_stuck to say
    (a_night('2026-10-03', '19:00', [], '04:00') + a_night('2026-10-04'), None, False, ''),  # the night before: old news
])
def test_short_night(bt, jane, now, night, plan, flagged, words):
    family = bt.create_family('Olivia')
    write_day(bt, family, night + [('2026-10-05 11:00', 'feed', 'bottle')])
    set_plan(bt, family, plan)
    assert flags_of(jane) == {'Olivia': ['short_night'] if flagged else []}
    if flagged:  # the same minutes as the report's
        assert dashboard_flags(jane) == [('Olivia', [words])]
        night = bt.night_report(bt.get_family(family['id']), 1, dt.date(2026, 10, 4), now)['days'][0]['night']
        assert words == f"Short night: {bt.hm(night['sleep_minutes'])}"


def test_short_night_counts_the_last_complete_night_in_the_familys_zone(bt, jane, clock):
    family = bt.create_family('Sydney', '', SYDNEY)
    write_day(bt, family, a_night('2026-10-03', '19:00', [], '03:00'))  # in Sydney: the 11-hour night, 7 h of sleep
    clock[0] = at('2026-10-04 06:00', SYDNEY)  # that night is not over yet: the last complete one is the 2nd
    assert flags_of(jane) == {'Sydney': []}
    clock[0] = at('2026-10-04 07:00', SYDNEY)
    assert flags_of(jane) == {'Sydney': ['short_night']}
    assert dashboard_flags(jane) == [('Sydney', ['Short night: 7 h'])]


@pytest.mark.parametrize('wakings, flagged', [
    ([('22:00', 10), ('01:00', 20), ('04:00', 15)], True),
    ([('22:00', 10), ('01:00', 20)], False),
    ([('22:00', 10), ('01:00', 20), ('06:50', 30)], False),  # the third ends after the night: up for the day
])
def test_many_wakings(bt, jane, now, wakings, flagged):
    family = bt.create_family('Olivia')
    write_day(bt, family, a_night('2026-10-04', '19:00', wakings, '07:30') + [('2026-10-05 11:00', 'feed', 'bottle')])
    assert flags_of(jane) == {'Olivia': ['many_wakings'] if flagged else []}
    night = bt.night_report(bt.get_family(family['id']), 1, dt.date(2026, 10, 4), now)['days'][0]['night']
    assert night['wakings'] == (3 if flagged else 2)  # the flag counts as the report does
    if flagged:
        assert dashboard_flags(jane) == [('Olivia', ['3 wakings last night'])]


@pytest.mark.parametrize('hours, flagged, words', [
    (2, True, 'Link for Dad expires today'), (13, True, 'Link for Dad expires tomorrow'),
    (60, True, 'Link for Dad expires Thursday'), (71.9, True, 'Link for Dad expires Thursday'),
    (72.1, False, ''),
])
def test_link_expiring(bt, jane, now, hours, flagged, words):
    family = bt.create_family('Olivia')
    write_day(bt, family, [('2026-10-05 11:00', 'feed', 'bottle')])
    link = bt.create_link(family['id'], 'Dad', now + int(hours * HOUR))
    assert flags_of(jane) == {'Olivia': ['link_expiring'] if flagged else []}
    if flagged:
        assert dashboard_flags(jane) == [('Olivia', [words])]
        bt.revoke_link(family['id'], link['token'])
        assert flags_of(jane) == {'Olivia': []}


def test_link_expiring_names_the_soonest_link_or_says_it_has_no_label(bt, jane, now):
    family = bt.create_family('Olivia')
    write_day(bt, family, [('2026-10-05 11:00', 'feed', 'bottle')])
    bt.create_link(family['id'], 'Mum', now + 50 * HOUR)
    bt.create_link(family['id'], None, now + 5 * HOUR)
    assert dashboard_flags(jane) == [('Olivia', ['An unlabelled link expires today'])]


@pytest.mark.parametrize('since, value, flagged, words', [
    ('2026-10-04 22:00', 'sleeping', True, 'Asleep for 14 h — a forgotten tap?'),
    ('2026-10-04 22:01', 'sleeping', False, ''),
    ('2026-10-04 09:00', 'awake', True, 'Awake for 27 h — a forgotten tap?'),
])
def test_state_stuck(bt, jane, now, since, value, flagged, words):
    family = bt.create_family('Olivia')
    write_day(bt, family, [(since, 'sleep', value), ('2026-10-05 11:00', 'feed', 'bottle')])
    assert ('state_stuck' in flags_of(jane)['Olivia']) == flagged
    if flagged:
        assert words in dashboard_flags(jane)[0][1]


def test_state_stuck_reads_a_renamed_config_and_ignores_deleted_and_future_entries(bt, jane, now):
    family = bt.create_family('Olivia')
    bt.save_config(family['id'], [{'category': 'sleep', 'stateful': True, 'buttons': [
        {'label': 'asleep', 'counted': True}, {'label': 'up'}]}])
    write_day(bt, family, [('2026-10-04 20:00', 'sleep', 'asleep'), ('2026-10-05 08:00', 'sleep', 'up', 'deleted'),
                           ('2026-10-05 11:00', 'feed', 'bottle')])
    add(bt, family, now + HOUR, 'sleep', 'up')  # a tap an hour ahead does not end the state now
    assert dashboard_flags(jane) == [('Olivia', ['Asleep for 16 h — a forgotten tap?'])]


def test_night_flags_read_a_renamed_config(bt, jane, now):
    family = bt.create_family('Olivia')
    bt.save_config(family['id'], [{'category': 'sleep', 'stateful': True, 'buttons': [
        {'label': 'asleep', 'counted': True}, {'label': 'up'}]}])
    night = [('2026-10-04 19:00', 'sleep', 'asleep'), ('2026-10-04 22:00', 'sleep', 'up'),
             ('2026-10-04 22:10', 'sleep', 'asleep'), ('2026-10-05 01:00', 'sleep', 'up'),
             ('2026-10-05 01:10', 'sleep', 'sleeping'),  # an old label: awake now, so no sleep here
             ('2026-10-05 03:00', 'sleep', 'asleep'), ('2026-10-05 03:30', 'sleep', 'up'),
             ('2026-10-05 03:40', 'sleep', 'asleep'), ('2026-10-05 06:00', 'sleep', 'up')]
    write_day(bt, family, night + [('2026-10-05 11:00', 'feed', 'bottle')])
    assert dashboard_flags(jane) == [('Olivia', ['Short night: 8 h 40 min', '3 wakings last night'])]
    report_night = bt.night_report(bt.get_family(family['id']), 1, dt.date(2026, 10, 4), now)['days'][0]['night']
    assert (report_night['sleep_minutes'], report_night['wakings']) == (180 + 170 + 30 + 140, 3)


def test_dashboard_lists_flagged_families_first_and_archived_ones_have_no_flags(bt, jane, now, clock):
    for name in ('Amelia', 'Ben', 'Cleo'):
        family = bt.create_family(name)
        clock[0] += 1000  # newest first without flags: Cleo, Ben, Amelia
        write_day(bt, family, [('2026-10-05 11:00', 'feed', 'bottle')])
    clock[0] = now
    ben = next(f for f in bt.list_families() if f['name'] == 'Ben')
    bt.create_link(ben['id'], 'Dad', now + 10 * HOUR)
    write_day(bt, ben, [('2026-10-04 20:00', 'sleep', 'sleeping')])
    assert [name for name, _ in dashboard_flags(jane)] == ['Ben', 'Cleo', 'Amelia']
    assert dashboard_flags(jane)[0][1] == ['Link for Dad expires today', 'Asleep for 16 h — a forgotten tap?']
    assert flags_of(jane) == {'Cleo': [], 'Ben': ['link_expiring', 'state_stuck'], 'Amelia': []}
    jane.patch_json(f"/admin/families/{ben['id']}", {'archived': True})
    archived = jane.get('/admin/families?archived=1', headers={'Accept': 'application/json'}).json['families']
    assert {f['name']: f['flags'] for f in archived} == {'Cleo': [], 'Ben': [], 'Amelia': []}
    assert [name for name, _ in dashboard_flags(jane)] == ['Cleo', 'Amelia']


@pytest.mark.parametrize('hostile', HOSTILE)
def test_hostile_link_labels_come_out_escaped_on_the_dashboard(bt, jane, now, hostile):
    family = bt.create_family(hostile)
    bt.create_link(family['id'], hostile, now + 5 * HOUR)
    page = jane.get('/admin')
    escaped = hostile.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;').replace('"', '&quot;')
    assert hostile not in page.text and f'Link for {escaped} expires today' in page.text
    assert not page.html.find('script', src=False) and not page.html.find('img')
    assert_clean(page.text)


def test_flags_take_one_query_for_every_family(bt, jane, now):
    for number in range(5):
        family = bt.create_family(f'Family {number}', '', (SYDNEY, 'UTC', 'America/New_York')[number % 3])
        bt.create_link(family['id'], 'Mum')
        write_day(bt, family, a_night('2026-10-04', '19:00', [('22:00', 10), ('01:00', 20), ('04:00', 15)]))
    statements, families = [], bt.list_families()
    bt.db.set_trace_callback(statements.append)
    flags = bt.family_flags(families, now)
    bt.db.set_trace_callback(None)
    assert len(statements) == 1
    assert len(flags) == 5 and all(said[0][0] == 'many_wakings' for said in flags.values())


def test_night_flags_agree_with_the_report_on_random_nights(bt, jane, now):
    """The flags' SQL and the report's Python read the same last night: random taps, double taps, deletions."""
    import random
    rng, families = random.Random(11), []
    for number in range(24):
        family = bt.create_family(f'Random {number}', '', ('UTC', SYDNEY, 'America/New_York')[number % 3])
        if number % 4 == 0:
            bt.save_config(family['id'], [{'category': 'sleep', 'stateful': True, 'buttons': [
                {'label': 'asleep', 'counted': True}, {'label': 'nap', 'counted': True}, {'label': 'up'}]}])
        asleep, awake = (['asleep', 'nap'], ['up', 'sleeping']) if number % 4 == 0 else (['sleeping'], ['awake'])
        ts, sleeping = now - 40 * HOUR, False
        while ts < now:
            sleeping = sleeping if rng.random() < 0.15 else not sleeping  # now and then the same tap twice
            ts += rng.randrange(5, 90 + number * 5) * MINUTE if sleeping else rng.randrange(60, 360 + number * 20) * MINUTE
            entry_id = add(bt, family, ts, 'sleep', rng.choice(asleep if sleeping else awake))
            if rng.random() < 0.1:
                bt.apply_entry(family['id'], 'delete', {'id': entry_id, 'updated_at': LATER - 1000}, 'test', now=LATER)
        families.append(bt.get_family(family['id']))
    flags = bt.family_flags(families, now)
    for family in families:
        today = bt.local_today(family['tz'], now)
        date = today - dt.timedelta(days=1 if bt.night_bounds(family, today - dt.timedelta(days=1))[2] <= now else 2)
        night = bt.night_report(family, 1, date, now)['days'][0]['night']
        expected = ([('short_night', f"Short night: {bt.hm(night['sleep_minutes'])}")]
                    if 0 < night['sleep_minutes'] < 600 else []) + (
                   [('many_wakings', f"{night['wakings']} wakings last night")] if night['wakings'] >= 3 else [])
        assert [flag for flag in flags[family['id']] if flag[0] in ('short_night', 'many_wakings')] == expected, family
    codes = [code for said in flags.values() for code, _ in said]
    assert 3 <= codes.count('short_night') < 21 and 3 <= codes.count('many_wakings') < 21  # flags on and off


# In a real browser ------------------------------------------------------------------------------

def log_entries(server, admin, family, label, entries, expires_at=None):
    """Open a link for the family and log (ts, type, value) entries from a phone over the socket."""
    link = admin.create_link(family['id'], label, expires_at)
    phone, last = Device(server, family['id'], link['token']), None
    for ts, type, value in entries:
        last = uuid.uuid4().hex
        phone.add(last, ts, type, value)
    if last:
        phone.entry_echo(last, timeout=20)  # in order: the last one stored means all are
    phone.close()
    return link


def fortnight(now):
    """Fourteen UTC days and nights up to now: two naps, bedtime near 19:10, three wakings, up near 06:30."""
    today, entries = dt.datetime.fromtimestamp(now / 1000, dt.timezone.utc).date(), []
    for back in range(15, -1, -1):
        day = today - dt.timedelta(days=back)
        shift = (back * 7) % 40 - 20  # a little different every day
        for hours, value in [(6.5, 'awake'), (9.5, 'sleeping'), (10.75, 'awake'), (13.5, 'sleeping'), (15, 'awake'),
                             (19.17, 'sleeping'), (23, 'awake'), (23.25, 'sleeping'), (26, 'awake'), (26.33, 'sleeping'),
                             (28, 'awake'), (28.17, 'sleeping')]:
            ts = at(f'{day} 00:00') + int(hours * HOUR) + shift * MINUTE
            if ts < now - MINUTE:
                entries.append((ts, 'sleep', value))
        entries += [(at(f'{day} 00:00') + hours * HOUR, 'feed', 'bottle') for hours in (7, 11, 15, 18)
                    if at(f'{day} 00:00') + hours * HOUR < now]
    return entries


@pytest.mark.parametrize('width', [390, 1280])
def test_flags_and_nights_in_chromium(tmp_path, browser, width):
    os.makedirs(SHOTS, exist_ok=True)
    server = Server(tmp_path)
    try:
        admin, now = AdminClient(server), int(time.time() * 1000)
        admin.login()
        olivia = admin.create_family('Olivia Bennett')
        log_entries(server, admin, olivia, 'Mum', fortnight(now))
        with sqlite3.connect(server.db_path) as db:  # the plan, as the plan form stores it
            db.execute('UPDATE families SET plan = ? WHERE id = ?', (json.dumps(PLAN), olivia['id']))
        log_entries(server, admin, admin.create_family('Leo Hart'), None, [(now - HOUR, 'feed', 'bottle')])
        admin.create_link(admin.create_family('Noah Price', tz='Europe/London')['id'], 'Mum')
        log_entries(server, admin, admin.create_family('Ava Ng', tz=SYDNEY), 'Gran',
                    [(now - 15 * HOUR, 'sleep', 'sleeping'), (now - HOUR, 'feed', 'bottle')], now + 40 * HOUR)
        log_entries(server, admin, admin.create_family(HOSTILE[1]), HOSTILE[0], [(now - HOUR, 'feed', 'bottle')],
                    now + 20 * HOUR)

        context = browser.new_context(viewport={'width': width, 'height': 900})
        page, problems = context.new_page(), []
        page.on('console', lambda message: problems.append(message.text) if message.type in ('error', 'warning') else None)
        page.on('pageerror', lambda error: problems.append(str(error)))
        fits = lambda: page.evaluate('document.documentElement.scrollWidth') <= width
        page.goto(server.base_url + '/admin')
        page.fill('input[name=username]', 'jane')
        page.fill('input[name=password]', ADMIN_PASSWORD)
        page.click('button:has-text("Log in")')
        page.wait_for_selector('h1:has-text("Clients")')
        shown = page.evaluate('''[...document.querySelectorAll('table.clients tbody tr')].map(row =>
            [row.querySelector('.client a').textContent, [...row.querySelectorAll('.flags li')].map(li => li.textContent)])''')
        names, flags = [name for name, _ in shown], dict(shown)
        assert names[-1] == 'Leo Hart' and len(names) == 5  # the only family without a flag comes last
        assert flags['Olivia Bennett'][:1] == [f"Short night: {flags['Olivia Bennett'][0].split(': ')[1]}"]
        assert '3 wakings last night' in flags['Olivia Bennett']
        assert flags['Noah Price'] == ['No entries yet'] and flags['Leo Hart'] == []
        assert any(words.startswith('Link for Gran expires ') for words in flags['Ava Ng'])
        assert flags['Ava Ng'][-1] == 'Asleep for 15 h — a forgotten tap?'
        assert flags[HOSTILE[1]][0].startswith(f'Link for {HOSTILE[0]} expires ')  # shown as text, never run
        assert fits(), 'the dashboard is wider than the window'
        page.screenshot(path=f'{SHOTS}/nights-dashboard-{width}.png', full_page=True)

        page.click('a:text-is("Olivia Bennett")')
        page.wait_for_selector('#nights')
        rows = page.locator('#nights tbody tr')
        assert rows.count() == 14
        last_night = rows.nth(1) if 'so far' in rows.nth(0).inner_text() else rows.nth(0)
        assert 'late' in last_night.inner_text() or 'early' in last_night.inner_text()
        assert fits(), 'the family page is wider than the window'
        page.locator('#nights').screenshot(path=f'{SHOTS}/nights-table-{width}.png')
        region = page.locator('#nights .scroll')
        region.focus()
        assert page.evaluate('document.activeElement.getAttribute("aria-labelledby")') == 'nights-title'
        if width == 390:  # the table scrolls inside its region, by keyboard too
            assert page.evaluate('(el => el.scrollWidth > el.clientWidth)', region.element_handle())
            page.keyboard.press('ArrowRight')
            wait_for(lambda: page.evaluate('document.querySelector("#nights .scroll").scrollLeft') > 0,
                     message='the Nights table to scroll')
        page.screenshot(path=f'{SHOTS}/nights-family-{width}.png', full_page=True)
        assert page.input_value('#details input[name=night_start]') == '19:00'
        page.locator('#details').screenshot(path=f'{SHOTS}/nights-details-{width}.png')

        page.set_viewport_size({'width': 703, 'height': 1000})  # A4 less its 12 mm margins, at 96 dpi
        page.emulate_media(media='print')
        assert page.is_visible('#nights') and page.is_hidden('#details')
        assert page.evaluate('document.querySelector("#nights table").scrollWidth <= 703')
        page.locator('#nights').screenshot(path=f'{SHOTS}/nights-print-{width}.png')
        context.close()
        assert problems == []
    finally:
        server.stop()



def test_the_flags_are_worked_out_again_only_for_families_that_changed(bt, jane, now, monkeypatch):
    quiet, busy = bt.create_family('Quiet'), bt.create_family('Busy')
    for family in (quiet, busy):
        write_day(bt, family, [('2026-10-05 11:00', 'feed', 'bottle')])
    worked_out = []
    real = bt.family_flags
    monkeypatch.setattr(bt, 'family_flags', lambda families, at: worked_out.append(
        sorted(f['name'] for f in families)) or real(families, at))
    flags_of(jane)
    flags_of(jane)  # nothing changed: nothing worked out again
    bt.create_link(busy['id'], 'Dad', now + 5 * HOUR)
    assert flags_of(jane) == {'Quiet': [], 'Busy': ['link_expiring']}
    write_day(bt, quiet, [('2026-10-05 11:30', 'feed', 'bottle')])
    flags_of(jane)
    assert worked_out == [['Busy', 'Quiet'], ['Busy'], ['Quiet']]
