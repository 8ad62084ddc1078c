"""Bench the parents' app with a year of data (issue 14): Lighthouse, long tasks, axe-core.

    python bench_app.py [--days 365] [--per-day 46] [--runs 1]

Builds a family that has tracked for a year (~17,000 entries) in a temporary database, starts the
real server, opens the app through its share link in Debian's Chromium and prints:
- Lighthouse 12.2.3 (mobile preset) performance score, total blocking time, cumulative layout
  shift and accessibility score, when `node` and Lighthouse are installed. Install it outside the
  repository (`npm i -E lighthouse@12.2.3` in some directory) and point LIGHTHOUSE at its
  `node_modules/.bin/lighthouse`, or install it in this directory (`node_modules/` is ignored).
- Long tasks measured in Playwright with the CPU throttled 4x (Emulation.setCPUThrottlingRate):
  opening the app on a fresh phone, reopening it, and one tap.
- axe-core serious/critical nodes on the app (normal and nursery themes) and Jane's pages.
"""

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('BCRYPT_ROUNDS', '4')
import conftest  # noqa: E402  (the test suite's real-server helpers)

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => { for (const t of list.getEntries()) window.__longTasks.push(t.duration); })
  .observe({type: 'longtask', buffered: true});
"""


def year_of_entries(family_id, days, per_day, now_ms):
    """Yield entry rows for `days` days up to now: sleep states, feeds and nappies through each day."""
    rng = random.Random(14)
    day_ms = 86400000
    start = now_ms - days * day_ms
    kinds = [('sleep', 'sleeping'), ('sleep', 'awake')] * 8 + [('feed', 'bottle'), ('feed', 'breast left'),
                                                             ('feed', 'breast right')] * 5
    kinds += [('nappy', 'wet'), ('nappy', 'dirty'), ('nappy', 'wet + dirty')] * 5
    n = 0
    for d in range(days + 1):
        sleeps = 0
        for i in range(per_day):
            ts = start + d * day_ms + int((i + rng.random()) * day_ms / per_day)
            if ts >= now_ms:
                return
            kind, value = kinds[(i * 7) % len(kinds)]
            if kind == 'sleep':
                value = ('sleeping', 'awake')[sleeps % 2]
                sleeps += 1
            n += 1
            yield (f'bench-{n}', family_id, ts, kind, value, 0, ts, "Mum's phone")


def build_family(server, admin, days, per_day):
    """Create the family and its link, then write a year of entries straight into the stopped server's file."""
    family = admin.create_family('Baby Year', tz='Europe/London')
    link = admin.create_link(family['id'], "Mum's phone")
    server.stop()
    db = sqlite3.connect(server.db_path)
    seq = db.execute('SELECT COALESCE(MAX(seq), 0) FROM changes').fetchone()[0]
    found = [row + (seq + i + 1,) for i, row in enumerate(year_of_entries(family['id'], days, per_day,
                                                                          int(time.time() * 1000)))]
    with db:
        db.executemany('INSERT INTO entries (id, family_id, ts, type, value, deleted, updated_at, by, seq) '
                       'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', found)
        conftest.log_changes(db)
    db.close()
    server.start()
    admin.login()
    return family, link, len(found)


def lighthouse_path():
    for path in (os.environ.get('LIGHTHOUSE'), os.path.join(HERE, 'node_modules/.bin/lighthouse'),
                 shutil.which('lighthouse')):
        if path and os.path.exists(path):
            return path
    return None


def run_lighthouse(url, runs):
    """Run Lighthouse `runs` times on `url` (a share link); return the median run's figures."""
    binary = lighthouse_path()
    if not binary or not shutil.which('node'):
        print('Lighthouse not found: install it with `npm i -E lighthouse@12.2.3` (node and npm needed) '
              'and set LIGHTHOUSE to its node_modules/.bin/lighthouse', file=sys.stderr)
        return None
    results = []
    with tempfile.TemporaryDirectory() as out:
        for n in range(runs):
            path = os.path.join(out, f'lh{n}.json')
            subprocess.run([binary, url, '--quiet', '--output=json', f'--output-path={path}',
                            '--only-categories=performance,accessibility',
                            '--chrome-flags=--headless=new --no-sandbox --disable-gpu'],
                           env=dict(os.environ, CHROME_PATH=CHROMIUM), check=True, timeout=300)
            with open(path) as f:
                report = json.load(f)
            if os.environ.get('LIGHTHOUSE_KEEP'):   # a copy of each report, to read its audits
                shutil.copy(path, f"{os.environ['LIGHTHOUSE_KEEP']}.{n}.json")
            failed = [a['id'] for a in report['audits'].values()
                      if a.get('score') == 0 and a['id'] in accessibility_audits(report)]
            results.append({'performance': round(report['categories']['performance']['score'] * 100),
                            'tbt_ms': round(report['audits']['total-blocking-time']['numericValue']),
                            'cls': round(report['audits']['cumulative-layout-shift']['numericValue'], 3),
                            'fcp_ms': round(report['audits']['first-contentful-paint']['numericValue']),
                            'lcp_ms': round(report['audits']['largest-contentful-paint']['numericValue']),
                            'accessibility': round(report['categories']['accessibility']['score'] * 100),
                            'a11y_failed': failed})
    results.sort(key=lambda r: r['performance'])
    return results[len(results) // 2]


def accessibility_audits(report):
    """The ids of the audits in Lighthouse's accessibility category."""
    return {ref['id'] for ref in report['categories']['accessibility']['auditRefs']}


def long_tasks(page):
    return page.evaluate('window.__longTasks.splice(0)')


def throttled_page(browser, rate=4):
    context = browser.new_context(viewport={'width': 360, 'height': 780})
    context.add_init_script(LONG_TASKS)
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send('Emulation.setCPUThrottlingRate', {'rate': rate})
    return context, page


def wait_loaded(page):
    from playwright.sync_api import expect
    expect(page.locator('#sync')).to_have_text('Online · all saved', timeout=60000)
    expect(page.locator('#log li').first).to_be_visible(timeout=60000)
    page.wait_for_timeout(500)   # let the last render and any trailing task land


def summary(tasks):
    return {'long_tasks': len(tasks), 'longest_ms': round(max(tasks, default=0)),
            'blocking_ms': round(sum(t - 50 for t in tasks))}


def measure_long_tasks(browser, link_url):
    """Open the app on a fresh throttled phone, reopen it, tap once; return long-task figures."""
    context, page = throttled_page(browser)
    started = time.monotonic()
    page.goto(link_url)
    wait_loaded(page)
    first = dict(summary(long_tasks(page)), ready_s=round(time.monotonic() - started, 2))
    started = time.monotonic()
    page.reload()
    wait_loaded(page)
    again = dict(summary(long_tasks(page)), ready_s=round(time.monotonic() - started, 2))
    rows = page.locator('#log li').count()
    feedback = page.evaluate("""() => new Promise((done) => {
        const button = [...document.querySelectorAll('#groups button')].find((b) => b.textContent.trim() === 'bottle');
        const before = document.querySelectorAll('#log li').length;
        const t0 = performance.now();
        button.click();
        const sync = performance.now() - t0;
        requestAnimationFrame(() => setTimeout(() => done({handler_ms: sync, frame_ms: performance.now() - t0,
            shown: document.querySelectorAll('#log li').length === before + 1})));
    })""")
    page.wait_for_timeout(1000)
    tap = dict(summary(long_tasks(page)), handler_ms=round(feedback['handler_ms'], 1),
               frame_ms=round(feedback['frame_ms'], 1), shown=feedback['shown'])
    context.close()
    return {'first open': first, 'reopen': again, 'tap': tap, 'rows': rows}


def axe_counts(browser, server, admin, family, link_url):
    """Serious/critical axe-core nodes on the app (both themes) and on Jane's pages."""
    from axe_playwright_python.sync_playwright import Axe
    axe = Axe()

    def serious(page):
        found = axe.run(page).response['violations']
        return sum(len(v['nodes']) for v in found if v['impact'] in ('serious', 'critical')), \
            sorted({v['id'] for v in found if v['impact'] in ('serious', 'critical')})

    counts = {}
    context = browser.new_context(viewport={'width': 360, 'height': 780})
    page = context.new_page()
    page.goto(link_url)
    wait_loaded(page)
    counts['app'] = serious(page)
    page.locator('#nursery').click()
    page.wait_for_timeout(300)
    counts['app (nursery)'] = serious(page)
    context.close()
    context = browser.new_context(viewport={'width': 1280, 'height': 900})
    page = context.new_page()
    page.goto(server.base_url + '/admin')
    counts['login'] = serious(page)
    context.add_cookies([{'name': c.name, 'value': c.value, 'url': server.base_url + '/admin'} for c in admin.jar])
    page.goto(server.base_url + '/admin')
    counts['dashboard'] = serious(page)
    page.goto(server.base_url + f"/admin/families/{family['id']}")
    counts['family page'] = serious(page)
    context.close()
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--days', type=int, default=365)
    parser.add_argument('--per-day', type=int, default=46)
    parser.add_argument('--runs', type=int, default=1, help='Lighthouse runs (the median is printed)')
    parser.add_argument('--no-lighthouse', action='store_true')
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as directory:
        server = conftest.Server(directory)
        try:
            admin = conftest.AdminClient(server)
            admin.login()
            family, link, count = build_family(server, admin, args.days, args.per_day)
            link_url = f"{server.base_url}/t/{link['token']}"
            print(f'{count} entries over {args.days} days; server on {server.base_url}')
            lh = None if args.no_lighthouse else run_lighthouse(link_url, args.runs)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                tasks = measure_long_tasks(browser, link_url)
                axe = axe_counts(browser, server, admin, family, link_url)
                browser.close()
        finally:
            server.stop()
    print('\n| measure (a year of data) | value | target |\n|---|---|---|')
    if lh:
        print(f"| Lighthouse performance score | {lh['performance']} | ≥ 90 |")
        print(f"| Total blocking time | {lh['tbt_ms']} ms | ≤ 200 ms |")
        print(f"| Cumulative layout shift | {lh['cls']} | ≤ 0.1 |")
        print(f"| Lighthouse accessibility | {lh['accessibility']} | 100 |")
        print(f"| (first contentful paint / largest contentful paint) | {lh['fcp_ms']} / {lh['lcp_ms']} ms | |")
    print(f"| axe-core serious/critical nodes (app, nursery, login, dashboard, family page) | "
          f"{sum(n for n, _ in axe.values())} | 0 |")
    for name in ('first open', 'reopen', 'tap'):
        t = tasks[name]
        extra = (f", ready in {t['ready_s']} s" if 'ready_s' in t else
                 f", click handler {t['handler_ms']} ms, next frame {t['frame_ms']} ms")
        print(f"| long tasks at 4x CPU, {name} | {t['long_tasks']} (longest {t['longest_ms']} ms, "
              f"blocking {t['blocking_ms']} ms{extra}) | |")
    print()
    for name, (n, ids) in axe.items():
        print(f'axe {name}: {n} serious/critical nodes {ids}')
    if lh and lh['a11y_failed']:
        print('Lighthouse accessibility audits failed:', ', '.join(lh['a11y_failed']))
    print(f"rows in today's log: {tasks['rows']}")


if __name__ == '__main__':
    main()
