"""The parents' app with history, many taps and more than one family (issues 14, 15, 10).

The protocol half (the windowed `init`, `/app/entries`) runs against a real server over real
sockets; the rest drives the app in Debian's headless Chromium as `test_app.py` does, and checks
accessibility with axe-core (any serious or critical violation fails).
"""

import datetime as dt
import json
import os
import re
import time
import urllib.error
import urllib.request
import zoneinfo

import pytest
import websocket
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect

import conftest
from conftest import Device, Server
from test_app import SERVER_DOWN, browser, midday_zone, phones, row, server_entries, tap  # noqa: F401 (fixtures)

DAY = 86400000


def window_start(tz, days, now=None):
    """The start of the local day days-1 days before today in zone `tz`, in ms."""
    zone = zoneinfo.ZoneInfo(tz)
    today = dt.datetime.fromtimestamp((now or time.time() * 1000) / 1000, zone).date()
    first = today - dt.timedelta(days=days - 1)
    return int(dt.datetime(first.year, first.month, first.day, tzinfo=zone).timestamp() * 1000)


def seed(server, family_id, token, entries):
    """Store entries [(id, ts, type, value)] through a real device; return their seqs by id."""
    device = Device(server, family_id, token)
    seqs = {}
    for entry_id, ts, kind, value in entries:
        device.add(entry_id, ts, kind, value)
        seqs[entry_id] = device.entry_echo(entry_id)['entry']['seq']
    device.close()
    return seqs


def handshake(server, family_id, token, query):
    return websocket.create_connection(f'{server.ws_url}?family={family_id}&{query}', cookie=f'bt_link={token}',
                                       origin=server.base_url, timeout=5)


def app_entries(server, query, token=None):
    """GET /app/entries?query with the link cookie; return (status, JSON)."""
    request = urllib.request.Request(f'{server.base_url}/app/entries?{query}', headers={
        'Accept': 'application/json', **({'Cookie': f'bt_link={token}'} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# -- the protocol: a window of days, older days on request ----------------------

def test_init_with_days_holds_the_window_and_each_stateful_categorys_state_before_it(server, admin):
    family = admin.create_family('Window', tz='America/New_York')
    link = admin.create_link(family['id'], 'Mum')
    start = window_start(family['tz'], 3)
    now = int(time.time() * 1000)
    seqs = seed(server, family['id'], link['token'], [
        ('asleep-long-ago', start - 5 * DAY, 'sleep', 'sleeping'),
        ('awake-before', start - 3600000, 'sleep', 'awake'),        # the state carried into the window
        ('feed-before', start - 1, 'feed', 'bottle'),               # before the window, not stateful
        ('feed-first', start, 'feed', 'bottle'),                    # the window's first moment
        ('gone', start + 1000, 'nappy', 'wet'),
        ('nappy-now', now, 'nappy', 'dirty')])
    device = Device(server, family['id'], link['token'])
    device.send({'type': 'entry', 'action': 'delete', 'id': 'gone', 'updated_at': now})
    device.entry_echo('gone')
    cursor = device.cursor
    device.close()

    ws = handshake(server, family['id'], link['token'], 'since=0&days=3')
    init = json.loads(ws.recv())
    ws.close()
    assert sorted(e['id'] for e in init['entries']) == ['awake-before', 'feed-first', 'nappy-now']
    assert init['cursor'] == cursor
    assert {e['id']: e['seq'] for e in init['entries']}['awake-before'] == seqs['awake-before']

    ws = handshake(server, family['id'], link['token'], f"since={seqs['nappy-now']}&days=3")  # since wins
    assert [e['id'] for e in json.loads(ws.recv())['entries']] == ['gone']
    ws.close()
    whole = Device(server, family['id'], link['token'], since=0)  # no days: the whole live history
    assert len(whole.init['entries']) == 5
    whole.close()


@pytest.mark.parametrize('days', ['0', '367', 'x', '1.5', '-1', '٣', '1000'])
def test_a_days_that_is_not_a_whole_number_from_1_to_366_is_refused_on_the_handshake(server, admin, days):
    family = admin.create_family('Window')
    link = admin.create_link(family['id'], 'Mum')
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        handshake(server, family['id'], link['token'], f'since=0&days={days}')
    assert refused.value.status_code == 400
    assert b'days must be a whole number from 1 to 366' in refused.value.resp_body


def test_app_entries_answers_older_days_oldest_first_and_refuses_like_app_me(server, admin):
    family = admin.create_family('Window')
    link = admin.create_link(family['id'], 'Mum')
    before = int(time.time() * 1000) - 10 * DAY
    seed(server, family['id'], link['token'], [
        ('too-old', before - 2 * DAY - 1, 'feed', 'bottle'), ('first', before - 2 * DAY, 'feed', 'bottle'),
        ('second', before - 1, 'sleep', 'awake'), ('at-before', before, 'feed', 'bottle'),
        ('deleted', before - DAY, 'nappy', 'wet')])
    device = Device(server, family['id'], link['token'])
    device.send({'type': 'entry', 'action': 'delete', 'id': 'deleted', 'updated_at': before})
    device.entry_echo('deleted')
    device.close()

    status, answer = app_entries(server, f'before={before}&days=2', link['token'])
    assert status == 200
    assert [e['id'] for e in answer['entries']] == ['first', 'second']
    assert set(answer['entries'][0]) == {'id', 'ts', 'type', 'value', 'deleted', 'updated_at', 'seq', 'by'}
    for query in (f'before={before}&days=0', f'before={before}&days=32', 'before=soon&days=2', f'before={before}'):
        status, answer = app_entries(server, query, link['token'])
        assert status == 400 and 'days a whole number from 1 to 31' in answer['error']
    assert app_entries(server, f'before={before}&days=2')[0] == 401
    admin.revoke_link(family['id'], link['token'])
    status, answer = app_entries(server, f'before={before}&days=2', link['token'])
    assert (status, answer['reason']) == (410, 'revoked')


# -- the app: two weeks first, older days when browsed back to ----------------------------------

LAYOUT_SHIFTS = """
window.__shifts = 0;
new PerformanceObserver((list) => {
  for (const s of list.getEntries()) if (!s.hadRecentInput) window.__shifts += s.value;
}).observe({type: 'layout-shift', buffered: true});
"""


def test_a_fresh_phone_loads_two_weeks_and_older_days_when_browsed_back(server, admin, phones):
    family = admin.create_family('Baby History', tz=midday_zone())
    link = admin.create_link(family['id'], "Mum's phone")
    now = int(time.time() * 1000)
    seed(server, family['id'], link['token'], [
        ('asleep-30-days-ago', now - 30 * DAY, 'sleep', 'sleeping'),   # still the current state
        ('feed-20-days-ago', now - 20 * DAY, 'feed', 'breast left'),
        ('feed-40-days-ago', now - 40 * DAY, 'feed', 'breast right'),
        ('feed-today', now - 60000, 'feed', 'bottle')])
    context = phones.new_context()
    context.add_init_script(LAYOUT_SHIFTS)
    sockets, loads = [], []
    context.on('request', lambda r: '/app/entries' in r.url and loads.append(r.url))
    page = context.new_page()
    page.on('websocket', lambda ws: sockets.append(ws.url))
    page.goto(link['url'])
    expect(page.locator('#sync')).to_have_text('Online · all saved', timeout=5000)
    expect(page.locator('#log li')).to_have_count(1)
    expect(page.locator('.state-label')).to_have_text('sleeping')  # carried in from before the window
    assert 'days=14' in sockets[0] and 'since=0' in sockets[0]
    assert page.evaluate('window.__shifts') <= 0.1
    assert loads == []

    for _ in range(20):
        page.get_by_role('button', name='Previous day').click()
    expect(page.locator('#day-title')).to_have_text(re.compile(r'^Log · '))
    expect(row(page, 'breast left')).to_have_count(1, timeout=5000)
    expect(page.locator('#total-feeds')).to_have_text('1')
    assert len(loads) == 1 and re.search(r'days=7$', loads[0])

    context.set_offline(True)
    for _ in range(20):
        page.get_by_role('button', name='Previous day').click()
    expect(page.locator('#log-note')).to_have_text('Offline: this day is not on this phone yet. It loads when you are online.')
    expect(page.locator('#log li')).to_have_count(0)

    page.reload()  # offline again: what was loaded is on the phone
    expect(page.locator('#sync')).to_have_text(re.compile('^Offline'), timeout=5000)
    for _ in range(20):
        page.get_by_role('button', name='Previous day').click()
    expect(row(page, 'breast left')).to_have_count(1)
    for _ in range(20):
        page.get_by_role('button', name='Next day').click()
    expect(page.locator('#day-title')).to_have_text("Today's log")
    expect(page.get_by_role('button', name='Next day')).to_be_disabled()
    context.set_offline(False)
    expect(page.locator('#sync')).to_have_text('Online · all saved', timeout=10000)
    assert phones.app_errors(expected=SERVER_DOWN) == []


# -- another family's link: nothing tapped is lost -------------------------------

def test_taps_for_another_family_wait_until_its_link_is_opened_again(admin, phones):
    smith = admin.create_family('Baby Smith', tz=midday_zone())
    jones = admin.create_family('Baby Jones', tz=midday_zone())
    smith_link = admin.create_link(smith['id'], "Mum's phone")
    jones_link = admin.create_link(jones['id'], "Nan's phone")
    blocked = {'smith': True}
    context = phones.new_context()
    # Baby Smith's socket opens but never reaches the server while blocked: taps wait in the outbox.
    context.route_web_socket(re.compile(rf"family={smith['id']}"),
                             lambda ws: None if blocked['smith'] else ws.connect_to_server())
    page = context.new_page()
    page.goto(smith_link['url'])
    expect(page.locator('#family-name')).to_have_text('Baby Smith')
    tap(page, 'bottle')
    tap(page, 'wet')
    # stored on the phone: no longer 'Saving on this phone · 2 waiting' (leaving then could lose the last tap)
    expect(page.locator('#sync')).to_have_text(re.compile('^(?!Saving).* · 2 waiting$'))

    page.goto(jones_link['url'])
    expect(page.locator('#family-name')).to_have_text('Baby Jones')
    expect(page.locator('#sync')).to_have_text('Online · all saved', timeout=5000)
    expect(page.locator('#parked')).to_have_text(
        "2 taps for Baby Smith are waiting on this phone. Open Baby Smith's link to send them.")
    expect(page.locator('#log li')).to_have_count(0)
    tap(page, 'dirty')
    expect(page.locator('#sync')).to_have_text('Online · all saved')

    blocked['smith'] = False
    page.goto(smith_link['url'])
    expect(page.locator('#family-name')).to_have_text('Baby Smith')
    expect(page.locator('#sync')).to_have_text('Online · all saved', timeout=5000)
    expect(page.locator('#parked')).to_be_hidden()
    expect(page.locator('#log li')).to_have_count(2)
    assert sorted((e['value'], e['by']) for e in server_entries(admin, smith['id'])) == [
        ('bottle', "Mum's phone"), ('wet', "Mum's phone")]
    assert [e['value'] for e in server_entries(admin, jones['id'])] == ['dirty']
    assert phones.errors == []


# -- refusals for now (budget, storage) keep the outbox --------------------------

with open(os.path.join(conftest.HERE, 'babytrackd.py')) as source:
    SERVER_HAS_A_BUDGET = 'too many messages' in source.read()  # the refusal is written there once it exists


@pytest.fixture
def budget_server(tmp_path):
    """A server with a small write budget (where the server enforces one) that refills fast."""
    running = Server(tmp_path, WS_WRITE_BURST=200, WS_WRITE_RATE=500)
    yield running
    running.stop()


def tap_offline(page, context, label, count):
    """Tap `label` `count` times with the phone offline; return once the outbox holds them all."""
    context.set_offline(True)
    expect(page.locator('#sync')).to_have_text(re.compile('^Offline'), timeout=5000)
    page.evaluate("""([label, count]) => {
        const button = [...document.querySelectorAll('#groups button')].find((b) => b.textContent === label);
        for (let i = 0; i < count; i += 1) button.click();
    }""", [label, count])
    expect(page.locator('#sync')).to_have_text(f'Offline · {count} waiting', timeout=30000)


def assert_stored_once(server, admin, family, link, count):
    """The family holds `count` entries, each stored by exactly one write (one seq each)."""
    entries = server_entries(admin, family['id'])
    assert len(entries) == count and len({e['id'] for e in entries}) == count
    device = Device(server, family['id'], link['token'], since=0)
    assert device.init['cursor'] == count  # only this family writes: a repeat would have taken a seq
    device.close()


def test_an_outbox_of_3000_offline_taps_drains_completely_within_the_write_budget(budget_server, phones):
    admin = conftest.AdminClient(budget_server)
    admin.login()
    family = admin.create_family('Baby Busy', tz=midday_zone())
    link = admin.create_link(family['id'], "Mum's phone")
    page = phones.open(link)
    refusals = []
    page.on('websocket', lambda ws: ws.on('framereceived', lambda frame: 'too many messages' in str(frame) and
                                          refusals.append(frame)))
    tap_offline(page, phones.contexts[0], 'bottle', 3000)

    phones.contexts[0].set_offline(False)
    expect(page.locator('#sync')).to_have_text('Online · all saved', timeout=120000)
    assert_stored_once(budget_server, admin, family, link, 3000)
    assert refusals or not SERVER_HAS_A_BUDGET  # a server with a budget refuses some of 3,000 writes
    expect(page.locator('#total-feeds')).to_have_text('3000')
    assert phones.errors == []


def test_writes_refused_for_now_stay_queued_and_are_sent_after_retry_after(server, admin, phones):
    family = admin.create_family('Baby Busy', tz=midday_zone())
    link = admin.create_link(family['id'], "Mum's phone")
    context = phones.new_context()
    refusals = {'too many messages': 0, 'storage unavailable': 0}

    def proxy(ws):
        """Pass the app's socket through, answering every 7th write as a server over its budget or
        with a storage fault does (no id, retry_after), whatever this branch's server does."""
        upstream = ws.connect_to_server()
        writes = {'n': 0}

        def from_app(message):
            if json.loads(message).get('type') == 'entry':
                writes['n'] += 1
                if writes['n'] % 7 == 0:
                    error = 'storage unavailable' if writes['n'] % 2 else 'too many messages'
                    refusals[error] += 1
                    return ws.send(json.dumps({'type': 'error', 'error': error, 'retry_after': 0.2}))
            upstream.send(message)
        ws.on_message(from_app)

    context.route_web_socket(re.compile('/ws'), proxy)
    page = phones.open(link, context)
    tap_offline(page, context, 'wet', 300)
    context.set_offline(False)
    expect(page.locator('#sync')).to_have_text(re.compile(r'^Server busy, retrying · \d+ waiting$'), timeout=10000)
    expect(page.locator('#sync')).to_have_text('Online · all saved', timeout=60000)
    assert refusals['too many messages'] > 0 and refusals['storage unavailable'] > 0
    assert_stored_once(server, admin, family, link, 300)
    expect(page.locator('#total-wet')).to_have_text('300')
    expect(page.locator('#toast-text')).not_to_contain_text('Not saved')  # nothing was lost: nothing to say
    assert phones.errors == []


# -- accessibility: axe-core on the app in both themes and on every admin page -----------------

def serious_violations(page):
    found = Axe().run(page).response['violations']
    return [(v['id'], [n['target'] for n in v['nodes']]) for v in found if v['impact'] in ('serious', 'critical')]


def test_the_app_in_both_themes_and_janes_pages_have_no_serious_accessibility_violations(server, admin, phones):
    family = admin.create_family('Baby Axe', tz=midday_zone())
    link = admin.create_link(family['id'], "Mum's phone")
    now = int(time.time() * 1000)
    seed(server, family['id'], link['token'], [('a', now - 7200000, 'sleep', 'sleeping'),
                                               ('b', now - 3600000, 'feed', 'bottle'), ('c', now - 60000, 'nappy', 'wet')])
    page = phones.open(link)
    expect(page.locator('#log li')).to_have_count(3)
    row(page, 'bottle').locator('.entry-row').click()   # the editor's controls too
    assert serious_violations(page) == []
    page.get_by_role('button', name='Nursery mode').click()
    expect(page.locator('html')).to_have_class(re.compile('nursery'))
    assert serious_violations(page) == []
    # Every control is at least 48 px square; the ticking timer is hidden, the state read out politely.
    small = page.evaluate("""() => [...document.querySelectorAll('button, input')].filter((b) => b.offsetParent)
        .map((b) => [b.textContent || b.getAttribute('aria-label'), b.getBoundingClientRect()])
        .filter(([, r]) => r.width < 48 || r.height < 48).map(([name]) => name)""")
    assert small == []
    expect(page.locator('.timer')).to_have_attribute('aria-hidden', 'true')
    expect(page.locator('#announce')).to_have_attribute('aria-live', 'polite')
    tap(page, 'awake')
    expect(page.locator('#announce')).to_have_text('sleep: awake for 0 minutes')
    expect(page.locator('#sync')).to_have_attribute('role', 'status')

    for width in (360, 1280):
        context = phones.new_context()
        jane = context.new_page()
        jane.set_viewport_size({'width': width, 'height': 900})
        jane.goto(server.base_url + '/admin')
        assert serious_violations(jane) == [], ('login', width)
        context.add_cookies([{'name': c.name, 'value': c.value, 'url': server.base_url + '/admin'} for c in admin.jar])
        jane.goto(server.base_url + '/admin')
        expect(jane.locator('body')).to_contain_text('Baby Axe')
        assert serious_violations(jane) == [], ('dashboard', width)
        jane.goto(f"{server.base_url}/admin/families/{family['id']}")
        expect(jane.locator('#activity')).to_be_visible()
        assert serious_violations(jane) == [], ('family page', width)
    assert phones.errors == []


# -- the sleep program on the phone: last night, the plan's next item, notes (issue 11 item 6) --

def test_last_night_the_plans_next_item_janes_notes_and_a_parents_own_note(server, admin, phones):
    family = admin.create_family('Baby Nights', tz=midday_zone())  # about noon there: last night is over
    link = admin.create_link(family['id'], "Mum's phone")
    zone = zoneinfo.ZoneInfo(family['tz'])
    today = dt.datetime.now(zone).date()
    yesterday = today - dt.timedelta(days=1)
    night = int(dt.datetime(yesterday.year, yesterday.month, yesterday.day, 19, tzinfo=zone).timestamp() * 1000)
    minute = 60000
    seed(server, family['id'], link['token'], [
        ('down', night - 30 * minute, 'sleep', 'sleeping'),        # carried in: counts from 19:00
        ('up-1', night + 180 * minute, 'sleep', 'awake'), ('down-1', night + 200 * minute, 'sleep', 'sleeping'),
        ('up-2', night + 480 * minute, 'sleep', 'awake'), ('down-2', night + 510 * minute, 'sleep', 'sleeping'),
        ('morning', night + 750 * minute, 'sleep', 'awake'),       # 07:30, after the night's end
        ('feed', night + 240 * minute, 'feed', 'bottle')])  # 23:00: yesterday's
    plan = {'wake': '07:00', 'naps': [{'start': '09:30', 'end': '11:00'}, {'start': '13:30', 'end': '15:00'}],
            'bedtime': '19:00'}
    note = {'id': 'n1', 'date': str(today), 'text': '<b>Teething</b> is normal', 'created_at': 1}
    sockets = []

    def proxy(ws):
        """The server of this branch may not send plans and notes yet: add them as PROTOCOL.md says."""
        sockets.append(ws)
        server_ws = ws.connect_to_server()

        def to_app(message):
            data = json.loads(message)
            if data['type'] == 'init':
                data.update(plan=plan, notes=[note])
            ws.send(json.dumps(data))
        server_ws.on_message(to_app)

    context = phones.new_context()
    context.route_web_socket(re.compile('/ws'), proxy)
    page = phones.open(link, context)
    # 19:00-22:00, 22:20-03:00, 03:30-07:00 asleep: 11 h 10 min, two wakings, 4 h 40 min the longest.
    expect(page.locator('#night-title')).to_have_text('Last night')
    expect(page.locator('#night-sleep')).to_have_text('11h 10m')
    expect(page.locator('#night-wakings')).to_have_text('2')
    expect(page.locator('#night-longest')).to_have_text('4h 40m')
    # It is 12:00-12:59 there, so the next item is the second nap, 31 to 90 minutes away.
    expect(page.locator('#plan-next')).to_have_text(re.compile(r'^Plan: Nap 2 at 13:30 · in (1h \d{1,2}m|\d{2}m)$'))
    expect(page.locator('#notes li')).to_have_text(f'From your consultant · {today}new<b>Teething</b> is normal')
    expect(page.locator('#notes b')).to_have_count(0)

    sockets[0].send(json.dumps({'type': 'note', 'note': {'id': 'n2', 'date': str(today), 'text': 'Early bedtime',
                                                          'created_at': 2}}))
    expect(page.locator('#notes li').first).to_contain_text('Early bedtime')
    page.locator('#notes').scroll_into_view_if_needed()
    expect(page.locator('#notes .unread')).to_have_count(0, timeout=8000)  # seen after a few seconds
    sockets[0].send(json.dumps({'type': 'note', 'note': {'id': 'n1', 'deleted': True}}))
    expect(page.locator('#notes li')).to_have_count(1)

    page.get_by_label('A note for today (teething, medicine…)').fill('Calpol 2 am')
    page.get_by_role('button', name='Add note').click()
    expect(row(page, 'Calpol 2 am')).to_have_count(1)
    expect(page.locator('#sync')).to_have_text('Online · all saved')
    expect(page.locator('#total-feeds')).to_have_text('0')
    assert [(e['type'], e['value']) for e in server_entries(admin, family['id']) if e['type'] == 'note'] == [
        ('note', 'Calpol 2 am')]
    assert serious_violations(page) == []
    assert phones.errors == []


def minutes_text(minutes):
    """The card's form of a number of minutes, as the app's minutesText writes it."""
    return f'{minutes // 60}h {minutes % 60}m' if minutes >= 60 else f'{minutes}m'


def expect_night_card(page, night):
    """The Last night card shows the server's report row `night`, number for number."""
    expect(page.locator('#night-sleep')).to_have_text(minutes_text(night['sleep_minutes']))
    expect(page.locator('#night-wakings')).to_have_text(str(night['wakings']))
    expect(page.locator('#night-longest')).to_have_text(minutes_text(night['longest_stretch_minutes']))


def test_the_last_night_card_equals_the_servers_report_for_a_night_window_of_its_own(server, admin, phones):
    family = admin.create_family('Baby Report', tz='Australia/Sydney')
    admin.update_family(family['id'], night_start='20:00', night_end='06:30')
    link = admin.create_link(family['id'], 'Dad')
    zone = zoneinfo.ZoneInfo(family['tz'])
    noon = dt.datetime.now(zone).replace(hour=12, minute=0, second=0, microsecond=0)
    if noon > dt.datetime.now(zone):
        noon -= dt.timedelta(days=1)
    date = noon.date() - dt.timedelta(days=1)  # the phone's clock reads that noon: last night is over

    def at(clock, next_day=False):
        """The instant of wall clock 'HH:MM[:SS]' on `date` (or the day after) there; a change night is 9 or 11 h."""
        day = date + dt.timedelta(days=next_day)
        return int(dt.datetime.combine(day, dt.time.fromisoformat(clock), zone).timestamp() * 1000)

    seed(server, family['id'], link['token'], [
        ('down', at('19:15'), 'sleep', 'sleeping'),               # carried in: counts from 20:00
        ('up-1', at('22:30'), 'sleep', 'awake'), ('down-1', at('22:50'), 'sleep', 'sleeping'),
        ('gone', at('23:20'), 'sleep', 'awake'),                  # deleted below: no third waking
        ('feed', at('23:40'), 'feed', 'bottle'),
        ('up-2', at('01:00', True), 'sleep', 'awake'),
        ('down-2', at('01:19:30', True), 'sleep', 'sleeping'),    # half minutes round like Python: to even
        ('again', at('04:00', True), 'sleep', 'sleeping'),        # a second tap of the same state: one sleep
        ('morning', at('07:00', True), 'sleep', 'awake')])        # after the night's end
    device = Device(server, family['id'], link['token'])
    device.send({'type': 'entry', 'action': 'delete', 'id': 'gone', 'updated_at': int(time.time() * 1000)})
    assert device.entry_echo('gone')['entry']['deleted']
    device.close()
    night = admin.ok('GET', f"/admin/families/{family['id']}/report?days=1&end={date}")['days'][0]['night']
    asleep = [at('22:30') - at('20:00'), at('01:00', True) - at('22:50'), at('06:30', True) - at('01:19:30', True)]
    assert (night['sleep_minutes'], night['wakings'], night['longest_stretch_minutes'], night['complete']) == (
        round(sum(asleep) / 60000), 2, round(max(asleep) / 60000), True)  # 590 and 310 on a night of 10.5 h

    context = phones.new_context()
    context.clock.install(time=noon)
    page = phones.open(link, context)
    expect(page.locator('#night-title')).to_have_text('Last night')
    expect_night_card(page, night)

    # A night that starts after midnight ends that same morning; the phone learns the window at its next /app/me.
    admin.update_family(family['id'], night_start='00:30', night_end='08:00')
    night = admin.ok('GET', f"/admin/families/{family['id']}/report?days=1&end={date}")['days'][0]['night']
    asleep = [at('01:00', True) - at('00:30', True), at('07:00', True) - at('01:19:30', True)]
    assert (night['sleep_minutes'], night['wakings'], night['longest_stretch_minutes'], night['complete']) == (
        round(sum(asleep) / 60000), 1, round(max(asleep) / 60000), True)  # 370 and 340 on a night of 7.5 h
    page.reload()
    expect(page.locator('#night-title')).to_have_text('Last night')
    expect_night_card(page, night)
    assert phones.errors == []


def test_an_open_night_with_the_default_window_equals_the_servers_report_so_far(server, admin, phones):
    offset = (1 - dt.datetime.now(dt.timezone.utc).hour + 12) % 24 - 12  # about 01:00 there: the night is open
    family = admin.create_family('Baby Tonight', tz=f'Etc/GMT{-offset:+d}' if offset else 'UTC')
    link = admin.create_link(family['id'], 'Gran')
    zone, minute, now = zoneinfo.ZoneInfo(family['tz']), 60000, int(time.time() * 1000)
    date = dt.datetime.now(zone).date() - dt.timedelta(days=1)
    start = int(dt.datetime(date.year, date.month, date.day, 19, tzinfo=zone).timestamp() * 1000)
    seed(server, family['id'], link['token'], [
        ('down', start + 30 * minute, 'sleep', 'sleeping'),
        ('up', start + 180 * minute, 'sleep', 'awake'), ('down-1', start + 195 * minute, 'sleep', 'sleeping'),
        ('up-1', now - 20 * minute, 'sleep', 'awake')])  # still awake: not a waking yet
    row = admin.ok('GET', f"/admin/families/{family['id']}/report?days=1")['days'][0]
    assert (row['date'], row['night']['wakings'], row['night']['complete']) == (str(date), 1, False)

    page = phones.open(link)
    expect(page.locator('#night-title')).to_have_text('Last night so far')
    expect_night_card(page, row['night'])
    assert phones.errors == []
