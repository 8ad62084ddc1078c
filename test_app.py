"""The parents' app (static/app/) in Debian's headless Chromium, driven by Playwright, against a real server.

Each test opens one or more "phones" (browser contexts, 360 px wide) from share links and asserts
what a parent would see. The page's Content-Security-Policy stays on, so every wait goes through
Playwright's locator assertions (`expect`), each with a bounded timeout.
"""

import datetime as dt
import os
import re
import time
import zoneinfo

import pytest
from playwright.sync_api import expect, sync_playwright

import conftest
from conftest import Device

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static', 'app')
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
ONLINE = re.compile(r'^Online')
# What Chromium itself logs when the server is down or answers a dead link's /app/me: not app errors.
SERVER_DOWN = re.compile(r'net::ERR_CONNECTION_REFUSED|^WebSocket connection to .* failed')
LINK_GONE = re.compile(r'^Failed to load resource: the server responded with a status of 410')


@pytest.fixture(scope='module')
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Phones:
    """Open the app from share links, one browser context per phone; collect console errors."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.errors = []

    def new_context(self):
        context = self.browser.new_context(viewport={'width': 360, 'height': 780})
        self.contexts.append(context)
        return context

    def open(self, link, context=None):
        """Open a share link on a fresh phone (or `context`); return its page once it is online."""
        page = (context or self.new_context()).new_page()
        name = link['label']
        page.on('console', lambda message: message.type == 'error' and self.errors.append((name, message.text)))
        page.on('pageerror', lambda error: self.errors.append((name, str(error))))
        page.goto(link['url'])
        expect(page).to_have_url(re.compile(r'/app/$'))
        expect(page.locator('#sync')).to_have_text(ONLINE, timeout=5000)
        return page

    def app_errors(self, expected=None):
        """The console errors, less those the browser logs for a reason the test caused."""
        return [(name, text) for name, text in self.errors if not (expected and expected.search(text))]

    def close(self):
        for context in self.contexts:
            context.close()


@pytest.fixture
def phones(browser):
    opened = Phones(browser)
    yield opened
    opened.close()


def midday_zone():
    """A fixed-offset zone where it is about noon now, so no test runs across the family's midnight."""
    offset = max(-12, min(14, 12 - dt.datetime.now(dt.timezone.utc).hour))
    return f'Etc/GMT{-offset:+d}' if offset else 'UTC'


@pytest.fixture
def family(admin):
    return admin.create_family('Baby <b>Smith</b>', tz=midday_zone())


def tap(page, label):
    page.locator('#groups').get_by_role('button', name=label, exact=True).click()


def row(page, value):
    """Today's log rows whose value is `value`."""
    return page.locator('#log li').filter(has=page.locator('.value', has_text=re.compile(f'^{re.escape(value)}$')))


def wait_for_service_worker(page):
    """Wait (bounded) until the service worker controls the page, so it can serve the app offline."""
    controlled = page.evaluate("""() => new Promise((done) => {
        if (navigator.serviceWorker.controller) return done(true);
        navigator.serviceWorker.addEventListener('controllerchange', () => done(true));
        setTimeout(() => done(!!navigator.serviceWorker.controller), 10000);
    })""")
    assert controlled, 'the service worker never took control of the page'


def server_entries(admin, family_id):
    return admin.family(family_id)['entries']


# -- 1. two phones, one family ------------------------------------------------------------------

def test_tap_appears_on_the_other_phone_within_a_second(admin, family, phones):
    mum = phones.open(admin.create_link(family['id'], "Mum's phone"))
    dad = phones.open(admin.create_link(family['id'], "Dad's phone"))
    for page in (mum, dad):
        expect(page.locator('#family-name')).to_have_text('Baby <b>Smith</b>')
        expect(page.locator('#members')).to_contain_text("Mum's phone")
        expect(page.locator('#members')).to_contain_text("Dad's phone")

    tap(mum, 'bottle')
    expect(row(dad, 'bottle')).to_have_count(1, timeout=1000)
    expect(row(dad, 'bottle').locator('.by')).to_have_text("Mum's phone")
    expect(dad.locator('#total-feeds')).to_have_text('1')
    expect(mum.locator('#sync')).to_have_text('Online · all saved')

    tap(dad, 'sleeping')
    expect(mum.locator('.state-label')).to_have_text('sleeping', timeout=1000)
    expect(mum.locator('.timer')).to_have_text(re.compile(r'^0:00:0\d$'))
    expect(mum.locator('#groups').get_by_role('button', name='sleeping')).to_have_attribute('aria-pressed', 'true')

    phones.contexts[0].close()
    expect(dad.locator('#members')).not_to_contain_text("Mum's phone", timeout=5000)
    assert [e['value'] for e in server_entries(admin, family['id'])] == ['sleeping', 'bottle']
    assert phones.errors == []


# -- 2. offline, reload, back online ------------------------------------------------------------

def test_offline_taps_survive_a_reload_and_sync_exactly_once(admin, family, phones):
    mum = phones.open(admin.create_link(family['id'], "Mum's phone"))
    dad = phones.open(admin.create_link(family['id'], "Dad's phone"))
    wait_for_service_worker(mum)
    offline = phones.contexts[0]

    offline.set_offline(True)
    expect(mum.locator('#sync')).to_have_text(re.compile(r'^Offline'), timeout=5000)
    for label in ('sleeping', 'bottle', 'wet'):
        tap(mum, label)
    expect(mum.locator('#sync')).to_have_text('Offline · 3 waiting')

    mum.reload()  # still offline: the service worker serves the shell, IndexedDB the entries
    expect(mum.locator('#family-name')).to_have_text('Baby <b>Smith</b>')
    expect(mum.locator('#log li')).to_have_count(3)
    expect(mum.locator('#sync')).to_have_text('Offline · 3 waiting')
    expect(mum.locator('#log .waiting')).to_have_count(3)
    expect(dad.locator('#log li')).to_have_count(0)

    offline.set_offline(False)
    expect(mum.locator('#sync')).to_have_text('Online · all saved', timeout=5000)
    expect(dad.locator('#log li')).to_have_count(3, timeout=2000)
    entries = server_entries(admin, family['id'])
    assert sorted(e['value'] for e in entries) == ['bottle', 'sleeping', 'wet']
    assert len({e['id'] for e in entries}) == 3
    assert {e['by'] for e in entries} == {"Mum's phone"}
    expect(dad.locator('#total-wet')).to_have_text('1')
    assert phones.errors == []


# -- 3. edit and delete -------------------------------------------------------------------------

def test_edit_and_delete_with_undo_reach_the_other_phone(admin, family, phones):
    # Latency is the first test's business; here a loaded machine may take longer than a second.
    mum = phones.open(admin.create_link(family['id'], "Mum's phone"))
    dad = phones.open(admin.create_link(family['id'], "Dad's phone"))
    tap(mum, 'breast left')
    expect(row(dad, 'breast left')).to_have_count(1, timeout=5000)
    logged_at = row(mum, 'breast left').locator('.time').inner_text()

    row(mum, 'breast left').locator('.entry-row').click()
    mum.get_by_role('button', name='−10 min').click()
    mum.get_by_role('button', name='Save').click()
    edited_at = row(mum, 'breast left').locator('.time').inner_text()
    assert edited_at != logged_at
    expect(row(dad, 'breast left').locator('.time')).to_have_text(edited_at, timeout=5000)
    [entry] = server_entries(admin, family['id'])
    assert 9 * 60000 <= entry['updated_at'] - entry['ts'] <= 11 * 60000

    row(dad, 'breast left').locator('.entry-row').click()
    dad.get_by_role('button', name='Delete').click()
    expect(dad.locator('#log li')).to_have_count(0)
    expect(mum.locator('#log li')).to_have_count(0, timeout=5000)
    expect(mum.locator('#total-feeds')).to_have_text('0')
    expect(dad.locator('#sync')).to_have_text('Online · all saved')
    assert server_entries(admin, family['id']) == []

    dad.get_by_role('button', name='Undo').click()
    expect(row(mum, 'breast left').locator('.time')).to_have_text(edited_at, timeout=5000)
    expect(dad.locator('#sync')).to_have_text('Online · all saved')
    assert [e['value'] for e in server_entries(admin, family['id'])] == ['breast left']
    assert phones.errors == []


def test_offline_edits_on_two_phones_converge_on_the_last_write(admin, family, phones):
    mum = phones.open(admin.create_link(family['id'], "Mum's phone"))
    dad = phones.open(admin.create_link(family['id'], "Dad's phone"))
    tap(mum, 'bottle')
    expect(row(dad, 'bottle')).to_have_count(1, timeout=5000)
    mums, dads = phones.contexts
    mums.set_offline(True)
    dads.set_offline(True)
    expect(mum.locator('#sync')).to_have_text(re.compile(r'^Offline'), timeout=5000)
    expect(dad.locator('#sync')).to_have_text(re.compile(r'^Offline'), timeout=5000)

    row(mum, 'bottle').locator('.entry-row').click()  # Mum moves it first...
    mum.get_by_role('button', name='−10 min').click()
    mum.get_by_role('button', name='Save').click()
    expect(mum.locator('#sync')).to_have_text('Offline · 1 waiting')
    row(dad, 'bottle').locator('.entry-row').click()  # ...then Dad deletes it: the later write
    dad.get_by_role('button', name='Delete').click()
    expect(dad.locator('#sync')).to_have_text('Offline · 1 waiting')

    dads.set_offline(False)
    expect(dad.locator('#sync')).to_have_text('Online · all saved', timeout=5000)
    mums.set_offline(False)  # Mum's older edit loses; her outbox still drains
    expect(mum.locator('#sync')).to_have_text('Online · all saved', timeout=5000)
    expect(mum.locator('#log li')).to_have_count(0)
    expect(dad.locator('#log li')).to_have_count(0)
    assert server_entries(admin, family['id']) == []
    assert phones.errors == []


# -- 4. revocation ------------------------------------------------------------------------------

def test_revoked_link_says_so_and_keeps_the_log_read_only(admin, family, phones):
    mums_link = admin.create_link(family['id'], "Mum's phone")
    mum = phones.open(mums_link)
    dad = phones.open(admin.create_link(family['id'], "Dad's phone"))
    tap(mum, 'dirty')
    expect(mum.locator('#sync')).to_have_text('Online · all saved')

    admin.revoke_link(family['id'], mums_link['token'])
    expect(mum.locator('#banner')).to_have_text(
        'This link no longer works — ask your consultant for a new one.', timeout=3000)
    expect(mum.locator('#sync')).to_have_text('Read-only')
    expect(row(mum, 'dirty')).to_have_count(1)
    expect(mum.locator('#groups').get_by_role('button', name='bottle')).to_be_disabled()
    expect(dad.locator('#members')).not_to_contain_text("Mum's phone", timeout=3000)
    expect(dad.locator('#sync')).to_have_text('Online · all saved')

    mum.reload()  # the log is still there, read-only, from IndexedDB
    expect(mum.locator('#banner')).to_have_text(re.compile('^This link no longer works'), timeout=3000)
    expect(row(mum, 'dirty')).to_have_count(1)
    expect(mum.locator('#groups').get_by_role('button', name='bottle')).to_be_disabled()
    assert phones.app_errors(expected=LINK_GONE) == []


# -- server restarts, config changes ------------------------------------------------------------

def test_the_app_reconnects_after_a_server_restart_and_sends_what_waited(server, admin, family, phones, monkeypatch):
    mum = phones.open(admin.create_link(family['id'], "Mum's phone"))
    port = server.port
    server.stop()
    expect(mum.locator('#sync')).to_have_text(re.compile(r'^(Offline|Connecting)'), timeout=3000)
    tap(mum, 'awake')
    expect(mum.locator('#sync')).to_have_text(re.compile(r'· 1 waiting$'))

    monkeypatch.setattr(conftest, 'free_port', lambda: port)  # same origin, so the same app
    server.start()
    expect(mum.locator('#sync')).to_have_text('Online · all saved', timeout=20000)
    assert [(e['value'], e['by']) for e in server_entries(admin, family['id'])] == [('awake', "Mum's phone")]
    assert phones.app_errors(expected=SERVER_DOWN) == []


def test_a_new_button_config_reaches_the_phone_as_plain_text(admin, family, phones):
    mum = phones.open(admin.create_link(family['id'], "Mum's phone"))
    hostile = '<img src=x onerror=alert(1)>'
    admin.put_config(family['id'], [
        {'category': 'sleep', 'stateful': True, 'buttons': [
            {'label': 'down', 'timing': True, 'counted': True}, {'label': 'up', 'timing': True}]},
        {'category': 'feed', 'buttons': [{'label': hostile}]}])
    expect(mum.locator('#groups .log-button')).to_have_count(3, timeout=2000)
    tap(mum, hostile)
    expect(row(mum, hostile)).to_have_count(1)
    expect(mum.locator('#log img')).to_have_count(0)
    tap(mum, 'down')
    expect(mum.locator('.state-label')).to_have_text('down')
    expect(mum.locator('#total-feeds')).to_have_text('1')
    expect(mum.locator('#sync')).to_have_text('Online · all saved')
    assert phones.errors == []


def test_the_service_worker_keeps_one_cache_holding_the_whole_shell(server, admin, family, phones):
    version = re.search(r"^const VERSION = '([^']+)';$", open(os.path.join(APP_DIR, 'sw.js')).read(), re.M).group(1)
    context = phones.new_context()
    earlier = context.new_page()
    earlier.goto(server.base_url + '/health')
    earlier.evaluate("() => caches.open('babytrackd-app-0-old').then((c) => c.put('/app/', new Response('old')))")

    mum = phones.open(admin.create_link(family['id'], "Mum's phone"), context)
    wait_for_service_worker(mum)
    caches = mum.evaluate("""async () => {
        const found = {};
        for (const name of await caches.keys()) {
            const cache = await caches.open(name);
            found[name] = (await cache.keys()).map((r) => new URL(r.url).pathname).sort();
        }
        return found;
    }""")
    shell = sorted('/app/' if name == 'index.html' else f'/app/{name}' for name in os.listdir(APP_DIR) if name != 'sw.js')
    assert caches == {f'babytrackd-app-{version}': shell}
    assert phones.errors == []


# -- the totals follow the server's summary rules -----------------------------------------------

def test_today_totals_match_the_server_summary(server, admin, family, phones):
    link = admin.create_link(family['id'], 'Nan')
    now = int(time.time() * 1000)
    device = Device(server, family['id'], link['token'])
    for n, (minutes_ago, kind, value) in enumerate([(150, 'sleep', 'sleeping'), (95, 'sleep', 'awake'),
                                                    (90, 'feed', 'bottle'), (80, 'nappy', 'Wet + Dirty'),
                                                    (40, 'sleep', 'sleeping'), (30, 'nappy', 'wet')]):
        device.add(f'seed-{n}', now - minutes_ago * 60000, kind, value)
        device.entry_echo(f'seed-{n}')
    device.close()

    nan = phones.open(link)
    expect(nan.locator('#log li')).to_have_count(6)
    expect(nan.locator('.state-label')).to_have_text('sleeping')
    expect(nan.locator('.timer')).to_have_text(re.compile(r'^0:(39|40):\d\d$'))
    date = dt.datetime.fromtimestamp(now / 1000, zoneinfo.ZoneInfo(family['tz'])).date()
    totals = admin.ok('GET', f"/admin/families/{family['id']}/summary?date={date}")['totals']
    assert totals['feeds'] == 1 and totals['wet'] == 2 and totals['dirty'] == 1
    assert 94 <= totals['sleep_minutes'] <= 96
    expect(nan.locator('#total-sleep')).to_have_text(f"1h {totals['sleep_minutes'] - 60}m")
    expect(nan.locator('#total-feeds')).to_have_text('1')
    expect(nan.locator('#total-wet')).to_have_text('2')
    expect(nan.locator('#total-dirty')).to_have_text('1')
    assert phones.errors == []
