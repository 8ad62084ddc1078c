"""Tests for the consultant's pages and the day summaries (issue 3).

Summaries are checked against golden days written straight through apply_entry, with the clock
passed in; the pages and their forms through WebTest on a fixed clock; pushes and revocation
against a real server; and the real pages in Debian's Chromium at phone and laptop widths.
"""

import csv
import datetime as dt
import io
import json
import os
import re
import sys
import time
import urllib.parse
import urllib.request
import uuid
import zoneinfo

import pytest
import webtest

from conftest import ADMIN_PASSWORD, Device, close_code

SYDNEY = 'Australia/Sydney'
HOSTILE = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>']
SHOTS = '/tmp/shots'


def at(text, tz='UTC', fold=0):
    """Return the milliseconds of a wall-clock time 'YYYY-MM-DD HH:MM' in zone tz."""
    local = dt.datetime.fromisoformat(text).replace(tzinfo=zoneinfo.ZoneInfo(tz), fold=fold)
    return int(local.timestamp() * 1000)


LATER = at('2027-06-01 00:00')  # a clock long after every golden day


def add(bt, family, ts, type, value, by='test'):
    """Write one entry as a device would; return its id."""
    entry_id = uuid.uuid4().hex
    bt.apply_entry(family['id'], 'add', {'entry': {'id': entry_id, 'ts': ts, 'type': type, 'value': value,
                                                   'updated_at': ts}}, by, now=LATER)
    return entry_id


def delete(bt, family, entry_id):
    bt.apply_entry(family['id'], 'delete', {'id': entry_id, 'updated_at': LATER - 1000}, 'test', now=LATER)


def write_day(bt, family, entries):
    """Write (local time, type, value[, 'deleted']) rows in the family's zone."""
    for local, type, value, *deleted in entries:
        fold = int(local.endswith('!'))  # '!' marks the second of two equal clock times (autumn)
        entry_id = add(bt, family, at(local.rstrip('!'), family['tz'], fold), type, value)
        if deleted:
            delete(bt, family, entry_id)


NIGHT = [('2026-10-03 20:00', 'sleep', 'sleeping'), ('2026-10-04 06:00', 'sleep', 'awake')]
NIGHT_APRIL = [('2026-04-04 20:00', 'sleep', 'sleeping'), ('2026-04-05 06:00', 'sleep', 'awake')]
OPEN = [('2026-10-04 20:00', 'sleep', 'sleeping')]
NAPPIES = [('2026-10-04 08:00', 'nappy', 'wet'), ('2026-10-04 09:00', 'nappy', 'dirty'),
           ('2026-10-04 10:00', 'nappy', 'wet + dirty'), ('2026-10-04 11:00', 'feed', 'bottle'),
           ('2026-10-04 12:00', 'feed', 'breast left')]


# Summaries ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('tz, date, entries, now, hours, totals', [
    # a night from 20:00 to 06:00 splits 240 / 360 at midnight
    ('UTC', '2026-10-03', NIGHT, None, 24, {'sleep_minutes': 240}),
    ('UTC', '2026-10-04', NIGHT, None, 24, {'sleep_minutes': 360}),
    # Sydney springs forward on 2026-10-04 (23 h): 01:00-04:00 on the clock is two real hours
    (SYDNEY, '2026-10-04', [('2026-10-04 01:00', 'sleep', 'sleeping'), ('2026-10-04 04:00', 'sleep', 'awake')],
     None, 23, {'sleep_minutes': 120}),
    (SYDNEY, '2026-10-03', NIGHT, None, 24, {'sleep_minutes': 240}),
    (SYDNEY, '2026-10-04', NIGHT, None, 23, {'sleep_minutes': 300}),
    # and falls back on 2026-04-05 (25 h): the same clock times are four real hours
    (SYDNEY, '2026-04-05', [('2026-04-05 01:00', 'sleep', 'sleeping'), ('2026-04-05 04:00', 'sleep', 'awake')],
     None, 25, {'sleep_minutes': 240}),
    (SYDNEY, '2026-04-04', NIGHT_APRIL, None, 24, {'sleep_minutes': 240}),
    (SYDNEY, '2026-04-05', NIGHT_APRIL, None, 25, {'sleep_minutes': 420}),
    # a state that began the day before carries in, through a whole day if need be
    ('UTC', '2026-10-03', [('2026-10-02 21:00', 'sleep', 'sleeping'), ('2026-10-04 07:00', 'sleep', 'awake')],
     None, 24, {'sleep_minutes': 1440}),
    ('UTC', '2026-10-04', [('2026-10-02 21:00', 'sleep', 'sleeping'), ('2026-10-04 07:00', 'sleep', 'awake')],
     None, 24, {'sleep_minutes': 420}),
    # an open state counts to the day's end on a past day, to now today
    ('UTC', '2026-10-04', OPEN, None, 24, {'sleep_minutes': 240}),
    ('UTC', '2026-10-04', OPEN, '2026-10-04 22:30', 24, {'sleep_minutes': 150}),
    ('UTC', '2026-10-05', OPEN, '2026-10-05 03:00', 24, {'sleep_minutes': 180}),
    (SYDNEY, '2026-10-04', [('2026-10-03 22:00', 'sleep', 'sleeping')], '2026-10-04 05:00', 23,
     {'sleep_minutes': 240}),
    # a day that has not begun yet has nothing
    ('UTC', '2026-10-06', OPEN, '2026-10-05 03:00', 24, {'sleep_minutes': 0}),
    # awake is a state too, but not a counted one
    ('UTC', '2026-10-04', [('2026-10-04 08:00', 'sleep', 'awake'), ('2026-10-04 09:00', 'sleep', 'sleeping'),
                           ('2026-10-04 09:45', 'sleep', 'awake')], None, 24, {'sleep_minutes': 45}),
    # "wet + dirty" counts for both; feeds are entries of type feed
    ('UTC', '2026-10-04', NAPPIES, None, 24, {'sleep_minutes': 0, 'feeds': 2, 'wet': 2, 'dirty': 2}),
    (SYDNEY, '2026-10-04', NAPPIES, None, 23, {'feeds': 2, 'wet': 2, 'dirty': 2}),
    # deleted entries never count: not as events, not as states, not carried in
    ('UTC', '2026-10-04', [('2026-10-04 08:00', 'nappy', 'wet + dirty', 'deleted'),
                           ('2026-10-04 09:00', 'feed', 'bottle', 'deleted'), ('2026-10-04 10:00', 'feed', 'bottle')],
     None, 24, {'feeds': 1, 'wet': 0, 'dirty': 0}),
    ('UTC', '2026-10-04', [('2026-10-03 22:00', 'sleep', 'sleeping', 'deleted'),
                           ('2026-10-04 10:00', 'sleep', 'sleeping', 'deleted'), ('2026-10-04 11:00', 'sleep', 'awake')],
     None, 24, {'sleep_minutes': 0}),
    ('UTC', '2026-10-04', [('2026-10-04 13:00', 'sleep', 'sleeping'), ('2026-10-04 14:00', 'sleep', 'awake', 'deleted')],
     None, 24, {'sleep_minutes': 660}),
])
def test_day_summary_golden(bt, tz, date, entries, now, hours, totals):
    family = bt.create_family('Golden', '', tz)
    write_day(bt, family, entries)
    summary = bt.day_summary(family, dt.date.fromisoformat(date), at(now, tz) if now else LATER)
    assert summary['date'] == date and summary['tz'] == tz
    assert len(summary['hours']) == hours
    assert {name: summary['totals'][name] for name in totals} == totals
    assert summary['categories']['sleep']['minutes'] == summary['totals']['sleep_minutes']
    assert summary['categories']['feed']['count'] == summary['totals']['feeds']


def test_hour_slots_follow_the_local_clock_on_daylight_saving_days(bt):
    family = bt.create_family('Clock', '', SYDNEY)
    write_day(bt, family, [('2026-04-05 02:30', 'feed', 'bottle'), ('2026-04-05 02:40!', 'feed', 'breast left'),
                           ('2026-10-04 03:10', 'feed', 'bottle')])
    autumn = bt.day_summary(family, dt.date(2026, 4, 5), LATER)
    assert [h['hour'] for h in autumn['hours']][:5] == [0, 1, 2, 2, 3]
    assert [e['value'] for e in autumn['hours'][2]['events']] == ['bottle']
    assert [e['value'] for e in autumn['hours'][3]['events']] == ['breast left']  # the second 02:40
    spring = bt.day_summary(family, dt.date(2026, 10, 4), LATER)
    assert [h['hour'] for h in spring['hours']][:4] == [0, 1, 3, 4]
    assert [e['value'] for e in spring['hours'][2]['events']] == ['bottle']
    assert spring['hours'][0]['start'] == at('2026-10-04 00:00', SYDNEY)


def test_summary_counts_custom_categories_and_their_counted_states(bt):
    family = bt.create_family('Custom')
    bt.save_config(family['id'], bt.DEFAULT_CONFIG + [
        {'category': 'tummy', 'stateful': True, 'buttons': [{'label': 'on', 'counted': True}, {'label': 'off'}]}])
    write_day(bt, family, [('2026-10-04 10:00', 'tummy', 'on'), ('2026-10-04 10:20', 'tummy', 'off'),
                           ('2026-10-04 11:00', 'bath', 'yes')])
    summary = bt.day_summary(family, dt.date(2026, 10, 4), LATER)
    assert summary['categories']['tummy'] == {'count': 2, 'minutes': 20}
    assert summary['categories']['bath'] == {'count': 1}
    assert summary['totals']['sleep_minutes'] == 0


def test_sleep_chart_draws_fourteen_days_on_the_wall_clock(bt):
    family = bt.create_family('Chart', '', SYDNEY)
    write_day(bt, family, NIGHT + [('2026-10-04 01:30', 'feed', 'bottle'),
                                   ('2026-10-04 13:00', 'sleep', 'sleeping'), ('2026-10-04 15:00', 'sleep', 'awake')])
    chart = bt.sleep_chart(family, dt.date(2026, 10, 4), LATER)
    assert [row['date'] for row in chart] == [dt.date(2026, 9, 21) + dt.timedelta(days=n) for n in range(14)]
    before, night = chart[-2], chart[-1]
    assert before['sleep'] == [(1200.0, 240.0)] and before['minutes'] == 240
    # on the 23-hour day 06:00 is still at 06:00 on the chart, 13:00-15:00 at 13-15
    assert night['sleep'] == [(0.0, 360.0), (780.0, 120.0)] and night['minutes'] == 300 + 120
    assert night['feeds'] == [90.0]
    assert all(row['sleep'] == [] and row['minutes'] == 0 for row in chart[:-2])


def test_formatters(bt):
    now = at('2026-10-04 20:00', SYDNEY)
    assert bt.when(at('2026-10-04 19:42', SYDNEY), SYDNEY, now) == '19:42'
    assert bt.when(at('2026-10-03 19:42', SYDNEY), SYDNEY, now) == 'yesterday 19:42'
    assert bt.when(at('2026-10-11 08:00', SYDNEY), SYDNEY, now) == 'Sun 11 Oct 08:00'
    assert bt.when(at('2027-01-02 08:00', SYDNEY), SYDNEY, now) == 'Sat 2 Jan 2027 08:00'
    assert [bt.ago(now - minutes * 60000, now) for minutes in (0, 12, 61, 1500, 4400)] == [
        'just now', '12 min ago', '1 h ago', '1 day ago', '3 days ago']
    assert [bt.hm(m) for m in (0, 45, 60, 585)] == ['0 min', '45 min', '1 h', '9 h 45 min']


# Pages ------------------------------------------------------------------------------------------

@pytest.fixture
def clock(bt, monkeypatch):
    """The server's clock, fixed at Sunday 2026-10-04 20:00 in Sydney (09:00 UTC); set clock[0] to move it."""
    moment = [at('2026-10-04 20:00', SYDNEY)]
    monkeypatch.setattr(bt, 'now_ms', lambda: moment[0])
    return moment


@pytest.fixture
def jane(clock, web):
    """A WebTest client logged in through the login form, on the fixed clock."""
    form = form_of(web.get('/admin'), '/admin/login')
    form['username'], form['password'] = 'jane', ADMIN_PASSWORD
    assert form.submit(status=303).headers['Location'].endswith('/admin')
    return web


def form_of(page, action_end, field=None):
    """Return the page's form whose action ends with action_end (and that has `field`)."""
    return next(f for f in page.forms.values() if f.action.split('#')[0].endswith(action_end)
                and (field is None or field in f.fields))


def family_page(web, family, **query):
    return web.get(f"/admin/families/{family['id']}" + (f'?{urllib.parse.urlencode(query)}' if query else ''))


def assert_clean(html):
    """No inline script or style anywhere: the CSP would block it and it must never be needed."""
    assert 'style=' not in html
    assert not re.search(r'<script(?![^>]*\bsrc=)[^>]*>', html)
    assert not re.search(r'\son[a-z]+=', html.replace('onerror=alert(1)&gt;', ''))


def test_logged_out_admin_shows_the_login_page(web):
    page = web.get('/admin')
    form = form_of(page, '/admin/login')
    assert set(form.fields) >= {'username', 'password'} and 'Log out' not in page.text
    assert_clean(page.text)


@pytest.mark.parametrize('username', ['jane', 'someone'])
def test_login_page_has_one_message_for_any_wrong_credential(web, username):
    form = form_of(web.get('/admin'), '/admin/login')
    form['username'], form['password'] = username, 'wrong'
    page = form.submit(status=401)
    assert 'Wrong username or password.' in page.text
    assert form_of(page, '/admin/login')['username'].value == username


def test_login_page_shows_the_rate_limit(web):
    for _ in range(5):
        web.post('/admin/login', {'username': 'jane', 'password': 'wrong'}, status=401)
    page = web.post('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, status=429)
    assert 'Too many failed logins. Try again in 15 minutes.' in page.text and 'Log out' not in page.text


@pytest.mark.parametrize('headers, status', [
    ({'Origin': 'null', 'Sec-Fetch-Site': 'same-origin'}, 303),  # Chromium under Referrer-Policy: no-referrer
    ({'Origin': 'null'}, 403),
    ({'Origin': 'null', 'Sec-Fetch-Site': 'cross-site'}, 403),
])
def test_login_form_from_a_browser_that_hides_its_origin(web, headers, status):
    web.post('/admin/login', {'username': 'jane', 'password': ADMIN_PASSWORD}, headers=headers, status=status)


def test_log_out_form(jane):
    form = form_of(jane.get('/admin'), '/admin/logout')
    assert form.submit(status=303).headers['Location'].endswith('/admin')
    assert 'name="password"' in jane.get('/admin').text


def test_dashboard_shows_each_family_now_and_today(bt, jane):
    olivia = bt.create_family('Olivia', '', SYDNEY)
    write_day(bt, olivia, [('2026-10-04 06:10', 'sleep', 'awake'), ('2026-10-04 07:00', 'feed', 'bottle'),
                           ('2026-10-04 08:00', 'nappy', 'wet + dirty'), ('2026-10-04 13:00', 'sleep', 'sleeping'),
                           ('2026-10-04 14:30', 'sleep', 'awake'), ('2026-10-04 19:42', 'sleep', 'sleeping')])
    bt.create_family('Noah', '', 'Europe/London')
    page = jane.get('/admin')
    assert_clean(page.text)
    row = page.html.find('a', string='Olivia').find_parent('tr')
    cells = [' '.join(td.get_text().split()) for td in row.find_all('td')]
    assert cells == ['Olivia', '18 min ago', 'sleeping since 19:42', '1 h 48 min', '1', '1 wet · 1 dirty']
    noah = [' '.join(td.get_text().split()) for td in page.html.find('a', string='Noah').find_parent('tr').find_all('td')]
    assert noah == ['Noah', 'no entries yet', '—', '0 min', '0', '0 wet · 0 dirty']


def test_dashboard_state_that_began_yesterday(bt, jane, clock):
    family = bt.create_family('Night', '', SYDNEY)
    write_day(bt, family, [('2026-10-04 19:42', 'sleep', 'sleeping')])
    clock[0] = at('2026-10-05 05:00', SYDNEY)
    assert 'sleeping since yesterday 19:42' in jane.get('/admin').text


def test_dashboard_lets_the_sockets_in_between_slices_of_its_rows(bt, jane, monkeypatch):
    """Each step of the dashboard takes a turn of its own, the first right after the family list, and the table's
    rows go out 50 at a time: 120 families give the loop two turns inside the table, and every row is still there."""
    for n in range(120):
        bt.create_family(f'Family {n:03d}')
    turns = []  # where each turn was taken: the file and function of its caller
    monkeypatch.setattr(bt.gevent, 'idle', lambda: turns.append(
        (os.path.basename(sys._getframe(1).f_code.co_filename), sys._getframe(1).f_code.co_name)))
    page = jane.get('/admin')
    assert turns[0] == ('babytrackd.py', 'admin_dashboard'), turns  # before families_today's own
    assert turns.count(('babytrackd.py', 'admin_dashboard')) == 4
    assert [file for file, _ in turns].count('dashboard.tpl') == 2
    assert sorted(a.get_text() for a in page.html.select('table.clients a')) == [f'Family {n:03d}' for n in range(120)]


def test_dashboard_archived_toggle(bt, jane):
    bt.create_family('Active')
    gone = bt.create_family('Gone')
    bt.update_family(gone['id'], {'archived': True})
    page = jane.get('/admin')
    assert 'Active' in page.text and 'Gone' not in page.text
    page = page.click('Show archived')
    assert 'Gone' in page.text and 'archived' in page.html.find('a', string='Gone').find_parent('td').get_text()
    assert 'Gone' not in page.click('Hide archived').text


def test_add_client_form(bt, jane):
    form = form_of(jane.get('/admin'), '/admin/families/new')
    assert form['tz'].value == 'UTC' and SYDNEY in [value for value, selected, text in form['tz'].options]
    form['name'], form['notes'], form['tz'] = 'Olivia', 'Reflux', SYDNEY
    page = form.submit(status=303).follow()
    family = bt.list_families()[0]
    assert (family['name'], family['notes'], family['tz']) == ('Olivia', 'Reflux', SYDNEY)
    assert page.request.path == f"/admin/families/{family['id']}" and '<h1>Olivia' in page.text


@pytest.mark.parametrize('fields, message', [
    ({'name': '   '}, 'name must not be empty'),
    ({'name': 'x' * 201}, 'name must be at most 200 characters'),
    ({'notes': 'n' * 10_001}, 'notes must be at most 10,000 characters'),
])
def test_add_client_mistakes_keep_what_was_typed(bt, jane, fields, message):
    typed = {'csrf': form_of(jane.get('/admin'), '/admin/families/new')['csrf'].value,
             'name': 'Olivia', 'notes': 'Started on Monday', 'tz': SYDNEY, **fields}
    page = jane.post('/admin/families/new', typed, status=400)
    assert message in page.html.find(class_='error').get_text()
    form = form_of(page, '/admin/families/new')
    assert (form['name'].value, form['notes'].value, form['tz'].value) == (typed['name'], typed['notes'], SYDNEY)
    assert page.html.find('details', id='add').has_attr('open')
    assert bt.list_families(True) == []


def test_family_page_shows_the_day_the_chart_and_the_activity(bt, jane):
    family = bt.create_family('Olivia', 'Bedtime 19:00', SYDNEY)
    write_day(bt, family, NIGHT + [('2026-10-04 07:00', 'feed', 'bottle'), ('2026-10-04 08:00', 'nappy', 'wet'),
                                   ('2026-10-04 13:20', 'sleep', 'sleeping'), ('2026-10-04 14:45', 'sleep', 'awake')])
    page = family_page(jane, family)
    assert_clean(page.text)
    assert 'Sunday 4 October 2026' in page.text and 'Bedtime 19:00' in page.text
    totals = {dt_.get_text(): ' '.join(dt_.find_next('dd').get_text().split()) for dt_ in page.html.select('.totals dt')}
    assert totals == {'Sleep': '6 h 25 min', 'Feeds': '1', 'Wet nappies': '1', 'Dirty nappies': '0'}
    rows = page.html.select('table.grid tbody tr')
    assert len(rows) == 23 and [r.th.get_text() for r in rows][:4] == ['00:00', '01:00', '03:00', '04:00']
    assert [(r['x'], r['width']) for r in rows[0].select('rect.asleep')] == [('0.0', '60.0')]
    assert rows[4].select('rect.asleep') and not rows[5].select('rect.asleep')  # asleep until 06:00
    assert '07:00' in rows[6].get_text() and 'bottle' in rows[6].get_text() and '· test' in rows[6].get_text()
    assert [[(r['x'], r['width']) for r in row.select('rect.asleep')] for row in rows[12:14]] == [
        [('20.0', '40.0')], [('0.0', '45.0')]]  # 13:20-14:45
    chart = page.html.select('table.chart tbody tr')
    assert len(chart) == 14 and 'chosen' in chart[-1]['class']
    assert [(r['x'], r['width']) for r in chart[-2].select('rect.asleep')] == [('1200.0', '240.0')]
    assert ' '.join(chart[-1].select_one('.total').get_text().split()) == '6 h 25 min'
    activity = page.html.select('#activity tbody tr')
    assert len(activity) == 6 and 'awake' in activity[0].get_text() and 'test' in activity[0].get_text()


def test_family_page_shows_the_same_numbers_as_the_json_summary(bt, jane):
    family = bt.create_family('Same', '', SYDNEY)
    write_day(bt, family, NIGHT_APRIL + NAPPIES)
    for date in ('2026-04-04', '2026-04-05', '2026-10-04'):
        summary = jane.get(f"/admin/families/{family['id']}/summary?date={date}",
                           headers={'Accept': 'application/json'}).json
        page = family_page(jane, family, date=date)
        shown = [' '.join(dd.get_text().split()) for dd in page.html.select('.totals dd')][:4]
        totals = summary['totals']
        assert shown == [bt.hm(totals['sleep_minutes']), str(totals['feeds']), str(totals['wet']), str(totals['dirty'])]
        assert len(page.html.select('table.grid tbody tr')) == len(summary['hours'])


def test_date_picker_and_previous_next_day(bt, jane):
    family = bt.create_family('Days', '', SYDNEY)
    page = family_page(jane, family)
    picker = form_of(page, f"/admin/families/{family['id']}", 'date')
    assert picker['date'].value == '2026-10-04'
    picker['date'] = '2026-04-05'
    page = picker.submit()
    assert 'Sunday 5 April 2026' in page.text and len(page.html.select('table.grid tbody tr')) == 25
    assert 'Saturday 4 April 2026' in page.click('Previous day').text
    assert 'Monday 6 April 2026' in page.click('Next day').text
    jane.get(f"/admin/families/{family['id']}?date=5/4/2026", status=400)
    jane.get('/admin/families/nosuchid', status=404)


@pytest.mark.parametrize('date', ['0001-01-01', '9999-12-31', '1900-01-05'])
def test_dates_out_of_range_are_a_400_not_a_crash(bt, jane, date):
    family = bt.create_family('Days', '', 'America/New_York')
    page = jane.get(f"/admin/families/{family['id']}?date={date}", status=400)
    assert 'date must be between the years 1900 and 9000' in page.text
    if date != '1900-01-05':  # that day has a summary; only its 14-day chart reaches before 1900
        jane.get(f"/admin/families/{family['id']}/summary?date={date}", headers={'Accept': 'application/json'},
                 status=400)


def test_family_page_forms_take_only_html_forms(bt, jane):
    family = bt.create_family('Olivia')
    for path in FORM_POSTS[1:-1]:
        jane.post_json(path.format(id=family['id'], token='x' * 32), {'expires': 'date', 'expires_on': 5,
                                                                      'config': 5, 'name': 'JSON'}, status=415)
    assert bt.get_family(family['id']) == family and bt.list_links(family['id']) == []


def test_details_form_edits_name_notes_and_zone(bt, jane):
    family = bt.create_family('Olivia')
    form = form_of(family_page(jane, family), '/edit', 'name')
    form['name'], form['notes'], form['tz'] = 'Olivia B.', 'Now on two naps', SYDNEY
    answer = form.submit(status=303)
    assert answer.headers['Location'].endswith(f"/admin/families/{family['id']}#details")
    assert bt.get_family(family['id']) == dict(family, name='Olivia B.', notes='Now on two naps', tz=SYDNEY)
    assert 'Times in Australia/Sydney' in answer.follow().text


@pytest.mark.parametrize('fields, message', [
    ({'name': ''}, 'name must not be empty'),
    ({'name': 'x' * 201}, 'name must be at most 200 characters'),
    ({'tz': 'Mars/Olympus'}, 'tz must be an IANA time zone name'),
])
def test_details_form_mistakes_keep_what_was_typed(bt, jane, fields, message):
    family = bt.create_family('Olivia', 'Old notes')
    csrf = form_of(family_page(jane, family), '/edit', 'name')['csrf'].value
    typed = {'csrf': csrf, 'name': 'Olivia B.', 'notes': 'New notes\nsecond line', 'tz': SYDNEY, **fields}
    page = jane.post(f"/admin/families/{family['id']}/edit", typed, status=400)
    section = page.html.find(id='details')
    assert message in section.find(class_='error').get_text()
    assert section.find('input', attrs={'name': 'name'})['value'] == typed['name']
    assert section.find('textarea', attrs={'name': 'notes'}).get_text() == typed['notes']
    assert bt.get_family(family['id']) == family


def test_archive_and_unarchive_forms(bt, jane, monkeypatch):
    family = bt.create_family('Olivia')
    closed = []
    monkeypatch.setattr(bt.hub, 'close_family', closed.append)
    form_of(family_page(jane, family), '/edit', 'archived').submit(status=303)
    assert bt.get_family(family['id'])['archived'] and closed == [family['id']]
    page = family_page(jane, family)
    assert 'Unarchive client' in page.text and 'archived' in page.html.h1.get_text()
    form_of(page, '/edit', 'archived').submit(status=303)
    assert not bt.get_family(family['id'])['archived'] and closed == [family['id']]


@pytest.mark.parametrize('expires, on, expected', [
    ('never', '', None),
    ('7', '', at('2026-10-11 20:00', SYDNEY)),
    ('14', '', at('2026-10-18 20:00', SYDNEY)),
    ('date', '2026-10-10', at('2026-10-11 00:00', SYDNEY)),  # works through the last day, in the family's zone
])
def test_new_link_form(bt, jane, expires, on, expected):
    family = bt.create_family('Olivia', '', SYDNEY)
    form = form_of(family_page(jane, family), '/links/new')
    form['label'], form['expires'], form['expires_on'] = "Mum's phone", expires, on
    assert form.submit(status=303).headers['Location'].endswith('#links')
    [link] = bt.list_links(family['id'])
    assert link['label'] == "Mum's phone" and link['expires_at'] == expected
    page = family_page(jane, family)
    item = page.html.select_one('#links li')
    assert item.find('input')['value'] == link['url'] and item.find('button', attrs={'data-copy': True})
    assert ('never expires' if expected is None else 'expires ') in item.get_text()


@pytest.mark.parametrize('fields, message', [
    ({'expires': 'date', 'expires_on': ''}, 'Pick the last day the link should work.'),
    ({'expires': 'date', 'expires_on': '2026-10-03'}, 'The last day must be today or later.'),
    ({'label': 'x' * 101}, 'label must be at most 100 characters'),
])
def test_new_link_form_mistakes_keep_what_was_typed(bt, jane, fields, message):
    family = bt.create_family('Olivia', '', SYDNEY)
    csrf = form_of(family_page(jane, family), '/links/new')['csrf'].value
    typed = {'csrf': csrf, 'label': 'Grandma', 'expires': 'never', 'expires_on': '', **fields}
    page = jane.post(f"/admin/families/{family['id']}/links/new", typed, status=400)
    assert message in page.html.find(id='links').find(class_='error').get_text()
    form = form_of(page, '/links/new')
    assert (form['label'].value, form['expires'].value, form['expires_on'].value) == (
        typed['label'], typed['expires'], typed['expires_on'])
    assert bt.list_links(family['id']) == []


def test_expired_links_say_so(bt, jane, clock):
    family = bt.create_family('Olivia', '', SYDNEY)
    bt.create_link(family['id'], 'Old', clock[0] + 1000)
    clock[0] += 60_000
    assert 'expired' in family_page(jane, family).html.select_one('#links li').get_text()


def test_revoke_form(bt, jane, monkeypatch):
    family = bt.create_family('Olivia')
    link = bt.create_link(family['id'], 'Mum')
    closed = []
    monkeypatch.setattr(bt.hub, 'close_link', closed.append)
    form = form_of(family_page(jane, family), f"/links/{link['token']}/revoke")
    form.submit(status=303)
    assert bt.list_links(family['id']) == [] and closed == [link['token']]
    assert bt.check_link(link['token'])[1][1] == 'revoked'
    page = form.submit(status=400)  # a second click, from the old page
    assert 'That link was already revoked.' in page.text and closed == [link['token']]


def test_config_form_stores_and_pushes(bt, jane, monkeypatch):
    family = bt.create_family('Olivia')
    pushed = []
    monkeypatch.setattr(bt.hub, 'broadcast', lambda family_id, message: pushed.append((family_id, message)))
    form = form_of(family_page(jane, family), '/config')
    assert json.loads(form['config'].value) == bt.DEFAULT_CONFIG
    groups = [{'category': 'sleep', 'stateful': True, 'buttons': [{'label': 'asleep', 'counted': True},
                                                                  {'label': 'up'}]}]
    form['config'] = json.dumps(groups)
    assert form.submit(status=303).headers['Location'].endswith('#config')
    assert bt.get_config(family['id']) == groups
    assert pushed == [(family['id'], {'type': 'config', 'data': groups})]
    chips = [c.get_text() for c in family_page(jane, family).html.select('#config .chip')]
    assert chips == ['asleep', 'up']


@pytest.mark.parametrize('text, message', [
    ('[{"category": "sleep", "buttons": [{"label": "a"}]},]', 'This is not valid JSON: Expecting value (line 1, column 53).'),
    ('', 'This is not valid JSON: Expecting value (line 1, column 1).'),
    ('[' * 5000 + ']' * 5000, 'nested too deeply'),
    ('{"category": "sleep"}', 'config must be a list of button groups'),
    ('[{"category": "feed", "buttons": [{"label": ""}]}]', 'group 1 button 1 label must not be empty'),
    ('[{"category": "a", "buttons": [{"label": "x"}]},\n {"category": "a", "buttons": [{"label": "y"}]}]',
     'category "a" appears twice'),
])
def test_config_form_mistakes_keep_what_was_typed(bt, jane, monkeypatch, text, message):
    family = bt.create_family('Olivia')
    pushed = []
    monkeypatch.setattr(bt.hub, 'broadcast', lambda *args: pushed.append(args))
    form = form_of(family_page(jane, family), '/config')
    form['config'] = text
    page = form.submit(status=400)
    assert message in page.html.find(id='config').find(class_='error').get_text()
    assert form_of(page, '/config')['config'].value == text
    assert bt.get_config(family['id']) == bt.DEFAULT_CONFIG and pushed == []


FORM_POSTS = ['/admin/families/new', '/admin/families/{id}/edit', '/admin/families/{id}/links/new',
              '/admin/families/{id}/links/{token}/revoke', '/admin/families/{id}/config', '/admin/logout']


@pytest.mark.parametrize('path', FORM_POSTS)
@pytest.mark.parametrize('csrf', [None, 'wrong'])
def test_every_form_needs_the_csrf_token(bt, jane, path, csrf):
    family = bt.create_family('Olivia')
    link = bt.create_link(family['id'], 'Mum')
    fields = {'name': 'Forged', 'notes': '', 'tz': 'UTC', 'archived': '1', 'label': 'x', 'expires': 'never',
              'config': '[{"category": "x", "buttons": [{"label": "y"}]}]', **({'csrf': csrf} if csrf else {})}
    page = jane.post(path.format(id=family['id'], token=link['token']), fields, status=403)
    assert 'This form has expired' in page.text
    assert bt.list_families(True) == [dict(family, last_activity=None)]
    assert bt.list_links(family['id']) == [link] and bt.get_config(family['id']) == bt.DEFAULT_CONFIG
    assert 'Log out' in jane.get('/admin').text


@pytest.mark.parametrize('path', FORM_POSTS[:-1])
def test_forms_need_a_session(bt, web, path):
    family = bt.create_family('Olivia')
    answer = web.post(path.format(id=family['id'], token='x' * 32), {'name': 'Forged'}, status=303)
    assert answer.headers['Location'].endswith('/admin')
    assert bt.get_family(family['id']) == family and len(bt.list_families(True)) == 1


def test_forms_for_an_unknown_family_are_404(jane):
    csrf = form_of(jane.get('/admin'), '/admin/logout')['csrf'].value
    for path in FORM_POSTS[1:-1]:
        jane.post(path.format(id='nosuchid', token='x' * 32), {'csrf': csrf}, status=404)
    jane.get('/admin/families/nosuchid/export.csv', status=404)


@pytest.mark.parametrize('hostile', HOSTILE)
def test_hostile_strings_come_out_escaped_everywhere(bt, jane, clock, hostile):
    escaped = hostile.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;').replace('"', '&quot;')
    csrf = form_of(jane.get('/admin'), '/admin/families/new')['csrf'].value
    page = jane.post('/admin/families/new', {'csrf': csrf, 'name': hostile, 'notes': hostile, 'tz': 'UTC'}).follow()
    family = bt.list_families()[0]
    assert family['name'] == hostile
    jane.post(f"/admin/families/{family['id']}/links/new", {'csrf': csrf, 'label': hostile, 'expires': 'never'})
    config = [{'category': hostile, 'stateful': True, 'buttons': [{'label': hostile, 'counted': True}]},
              {'category': 'sleep', 'stateful': True, 'buttons': [{'label': hostile, 'counted': True}]}]
    jane.post(f"/admin/families/{family['id']}/config", {'csrf': csrf, 'config': json.dumps(config)}, status=303)
    ts = clock[0] - 3600_000
    for type in (hostile, 'sleep', 'feed', 'nappy'):
        add(bt, family, ts, type, hostile, by=hostile)
    pages = [jane.get('/admin'), family_page(jane, family),
             jane.post(f"/admin/families/{family['id']}/config", {'csrf': csrf, 'config': hostile}, status=400),
             jane.post(f"/admin/families/{family['id']}/edit", {'csrf': csrf, 'name': hostile, 'tz': hostile},
                       status=400),
             jane.post('/admin/families/new', {'csrf': csrf, 'name': '', 'notes': hostile}, status=400),
             webtest.TestApp(bt.app).post('/admin/login', {'username': hostile, 'password': 'x'}, status=401)]
    for page in pages:
        assert hostile not in page.text
        assert escaped in page.text
        assert not page.html.find('script', src=False) and not page.html.find('img')
        assert_clean(page.text)
    text = pages[1].text
    assert text.count(escaped) >= 8  # name, notes, link label, category, button label, entry values and by


def test_templates_escape_everything_but_the_layout():
    views = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'views')
    for name in os.listdir(views):
        with open(os.path.join(views, name)) as template:
            text = template.read()
        if name == 'tz_select.tpl':  # zone_options() builds its <option>s once, from escaped zone names
            text = text.replace('{{!zone_options(selected)}}', '', 1)
        assert ('{{!' in text) == (name == 'base.tpl'), name
        assert 'style=' not in text and not re.search(r'<script(?![^>]*\bsrc=)', text), name


# Exports ----------------------------------------------------------------------------------------

@pytest.fixture
def exported(bt):
    family = bt.create_family('Export', '', SYDNEY)
    ids = [add(bt, family, at('2026-10-04 06:00', SYDNEY), 'sleep', 'awake', by='Mum'),
           add(bt, family, at('2026-10-03 20:00', SYDNEY), 'sleep', 'sleeping', by='Dad'),
           add(bt, family, at('2026-10-04 07:00', SYDNEY), 'feed', '=HYPERLINK("http://x")', by='Mum'),
           '-starts-with-a-dash']
    bt.apply_entry(family['id'], 'add', {'entry': {'id': ids[-1], 'ts': at('2026-10-04 09:00', SYDNEY), 'type': 'note',
                                                   'value': '', 'updated_at': LATER - 5000}}, None, now=LATER)
    delete(bt, family, add(bt, family, at('2026-10-04 08:00', SYDNEY), 'nappy', 'wet'))
    return family, ids


def test_export_csv(jane, exported):
    family, ids = exported
    answer = jane.get(f"/admin/families/{family['id']}/export.csv")
    assert answer.content_type == 'text/csv' and answer.charset == 'utf-8'
    assert answer.headers['Content-Disposition'] == f"attachment; filename=\"babytrack-{family['id']}.csv\""
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert list(rows[0]) == ['id', 'time', 'ts', 'type', 'value', 'by', 'updated_at', 'seq']
    assert [r['id'] for r in rows] == [ids[1], ids[0], ids[2], "'" + ids[3]]  # oldest first; the deleted one left out
    assert [r['time'] for r in rows] == ['2026-10-03T20:00:00+10:00', '2026-10-04T06:00:00+11:00',
                                         '2026-10-04T07:00:00+11:00', '2026-10-04T09:00:00+11:00']
    assert rows[0]['ts'] == str(at('2026-10-03 20:00', SYDNEY)) and rows[0]['by'] == 'Dad'
    assert rows[2]['value'] == '\'=HYPERLINK("http://x")'  # never run as a formula by a spreadsheet
    assert (rows[3]['value'], rows[3]['by']) == ('', '')  # a leading dash is a formula too


def test_export_json(bt, jane, exported):
    family, ids = exported
    answer = jane.get(f"/admin/families/{family['id']}/export.json")
    assert answer.content_type == 'application/json'
    assert answer.headers['Content-Disposition'] == f"attachment; filename=\"babytrack-{family['id']}.json\""
    data = answer.json
    assert data['family'] == bt.get_family(family['id']) and data['exported_at'] == bt.now_ms()
    first = data['entries'][0]
    assert [e['id'] for e in data['entries']] == [ids[1], ids[0], ids[2], ids[3]]
    assert first == {'id': ids[1], 'ts': at('2026-10-03 20:00', SYDNEY), 'time': '2026-10-03T20:00:00+10:00',
                     'type': 'sleep', 'value': 'sleeping', 'deleted': False, 'updated_at': first['updated_at'],
                     'seq': first['seq'], 'by': 'Dad'}
    assert data['entries'][2]['value'] == '=HYPERLINK("http://x")'
    assert 'Export CSV' in family_page(jane, family).text


# Against a real server -------------------------------------------------------------------------

def page_html(admin, path):
    with admin.opener.open(admin.server.base_url + path, timeout=10) as answer:
        return answer.read().decode()


def post_form(admin, path, fields):
    """Post an HTML form the way the browser does, with the page's CSRF token; return the final status."""
    csrf = re.search(r'name="csrf" value="([^"]+)"', page_html(admin, '/admin'))[1]
    data = urllib.parse.urlencode({'csrf': csrf, **fields}).encode()
    request = urllib.request.Request(admin.server.base_url + path, data=data, method='POST')
    with admin.opener.open(request, timeout=10) as answer:  # follows the 303 back to the page
        return answer.status, answer.read().decode()


@pytest.fixture
def olivia(admin):
    family = admin.create_family('Olivia')
    return family, admin.create_link(family['id'], 'Mum')


def test_config_form_reaches_every_live_device(server, admin, olivia):
    family, link = olivia
    phone, tablet = Device(server, family['id'], link['token']), Device(server, family['id'], link['token'])
    groups = [{'category': 'feed', 'buttons': [{'label': 'bottle'}]}]
    assert post_form(admin, f"/admin/families/{family['id']}/config", {'config': json.dumps(groups)})[0] == 200
    for device in (phone, tablet):
        assert device.recv_until(lambda m: m['type'] == 'config')['data'] == groups


def test_revoke_form_closes_the_links_sockets_and_presence_shows_on_the_page(server, admin, olivia):
    family, link = olivia
    phone = Device(server, family['id'], link['token'])
    html = page_html(admin, f"/admin/families/{family['id']}")
    assert re.search(r'<strong>Mum</strong>\s*<span class="badge online">online now</span>', html)
    post_form(admin, f"/admin/families/{family['id']}/links/{link['token']}/revoke", {})
    assert close_code(phone) in (4403, 1008)
    assert 'online now' not in page_html(admin, f"/admin/families/{family['id']}")


def test_archive_form_closes_the_familys_sockets(server, admin, olivia):
    family, link = olivia
    phone = Device(server, family['id'], link['token'])
    post_form(admin, f"/admin/families/{family['id']}/edit", {'archived': '1'})
    assert close_code(phone) in (4403, 1008)
    assert admin.family(family['id'])['archived'] is True


# In a real browser ------------------------------------------------------------------------------

CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']


@pytest.fixture
def browser():
    sync_api = pytest.importorskip('playwright.sync_api')
    if not os.path.exists('/usr/bin/chromium'):
        pytest.skip("Debian's chromium is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path='/usr/bin/chromium', args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.mark.parametrize('width', [390, 1280])
def test_pages_in_chromium(server, browser, width):
    os.makedirs(SHOTS, exist_ok=True)
    context = browser.new_context(viewport={'width': width, 'height': 900},
                                  permissions=['clipboard-read', 'clipboard-write'])
    page = context.new_page()
    problems = []
    page.on('console', lambda message: problems.append(message.text) if message.type in ('error', 'warning') else None)
    page.on('pageerror', lambda error: problems.append(str(error)))
    base = server.base_url

    def fits():
        return page.evaluate('document.documentElement.scrollWidth') <= width

    page.goto(base + '/admin')
    page.fill('input[name=username]', 'jane')
    page.fill('input[name=password]', 'wrong')
    page.click('button:has-text("Log in")')
    assert page.inner_text('.error') == 'Wrong username or password.'
    page.fill('input[name=password]', ADMIN_PASSWORD)
    page.click('button:has-text("Log in")')
    page.wait_for_selector('h1:has-text("Clients")')

    assert page.is_visible('#add input[name=name]')  # with no clients yet the Add client form is open
    page.fill('#add input[name=name]', 'Olivia Bennett')
    page.fill('#add textarea[name=notes]', 'Reflux. Bedtime target 19:00.')
    page.select_option('#add-tz', SYDNEY)
    page.click('#add button[type=submit]')
    page.wait_for_selector('h1:has-text("Olivia Bennett")')
    family_url = page.url

    assert page.is_hidden('#expires-on')  # the last-day field appears only for that choice
    page.select_option('select[name=expires]', 'date')
    assert page.is_visible('#expires-on')
    page.select_option('select[name=expires]', '7')
    page.fill('input[name=label]', 'Mum')
    page.click('button:has-text("Create link")')
    url = page.wait_for_selector('#links li input').input_value()
    assert url.startswith(base + '/t/')
    page.click('#links button:has-text("Copy")')
    page.wait_for_selector('#links button:has-text("Copied")')
    assert page.evaluate('navigator.clipboard.readText()') == url

    family_id = family_url.rsplit('/', 1)[1].split('#')[0]
    phone = Device(server, family_id, url.rsplit('/', 1)[1])
    now = int(time.time() * 1000)
    for minutes, type, value in [(300, 'sleep', 'sleeping'), (200, 'feed', 'bottle'), (150, 'sleep', 'awake'),
                                 (120, 'nappy', 'wet + dirty'), (60, 'sleep', 'sleeping')]:
        entry_id = uuid.uuid4().hex
        phone.add(entry_id, now - minutes * 60_000, type, value)
        phone.entry_echo(entry_id)  # stored

    page.goto(family_url)
    assert page.inner_text('#links .badge.online') == 'online now'
    assert page.locator('table.grid rect.asleep').count() > 0
    assert page.locator('table.chart tbody tr').count() == 14
    assert fits(), 'the family page is wider than the window'
    page.screenshot(path=f'{SHOTS}/admin-family-{width}.png', full_page=True)

    page.click('#config summary:has-text("Advanced")')  # the JSON editor waits under Advanced
    page.fill('textarea[name=config]', '[{"category": "sleep",')
    page.click('button:has-text("Save JSON")')
    assert 'This is not valid JSON' in page.inner_text('#config .error')
    assert page.input_value('textarea[name=config]') == '[{"category": "sleep",'

    page.goto(base + '/admin')
    row = page.locator('table.clients tr', has_text='Olivia Bennett')
    assert 'sleeping since' in row.inner_text() and '1 h ago' in row.inner_text()
    assert fits(), 'the dashboard is wider than the window'
    page.screenshot(path=f'{SHOTS}/admin-dashboard-{width}.png', full_page=True)

    page.goto(family_url)
    page.emulate_media(media='print')
    assert page.is_hidden('#links') and page.is_visible('#chart') and page.is_visible('table.grid')
    page.screenshot(path=f'{SHOTS}/admin-print-{width}.png', full_page=True)
    phone.close()
    context.close()
    assert problems == [f'Failed to load resource: the server responded with a status of {status}'
                        for status in ('401 (Unauthorized)', '400 (Bad Request)')]  # the two refusals above, no more
