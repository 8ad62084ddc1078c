"""Time the sleep program's queries in-process on a temp SQLite file; print the medians.

    python bench_report.py [--runs 50]

- night_report: 60 nights of one family with a year of entries (48 a day: 14 sleep, 18 feeds, 16 nappies).
- family_flags: the dashboard's triage flags for 200 families in four zones, 30 days x 48 entries each,
  every family with a live link (some expiring) and a plan on every other one.
Not a test: it measures, it does not pass or fail (the target, 20 ms, is printed beside each figure).
"""

import os
os.environ.setdefault('BABYTRACKD_NO_PATCH', '1')

import argparse
import datetime as dt
import json
import random
import statistics
import tempfile
import time
import zoneinfo

import babytrackd as bt
from conftest import log_changes

ZONES = ['Europe/London', 'Australia/Sydney', 'America/New_York', 'UTC']
PLAN = {'wake': '07:00', 'naps': [{'start': '09:30', 'end': '11:00'}], 'bedtime': '19:00'}


def day_entries(date, tz, rng):
    """One realistic local day of 48 entries: (ts, type, value)."""
    zone = zoneinfo.ZoneInfo(tz)
    at = lambda hours: int((dt.datetime(date.year, date.month, date.day, tzinfo=zone)
                            + dt.timedelta(hours=hours + rng.uniform(-0.2, 0.2))).timestamp() * 1000)
    sleep = [(6.5, 'awake'), (9.5, 'sleeping'), (10.7, 'awake'), (13, 'sleeping'), (14.5, 'awake'), (16.5, 'sleeping'),
             (17, 'awake'), (19, 'sleeping'), (22.5, 'awake'), (22.8, 'sleeping'), (2, 'awake'), (2.4, 'sleeping'),
             (4.5, 'awake'), (4.8, 'sleeping')]
    feeds = [(n * 24 / 18, rng.choice(['bottle', 'breast left', 'breast right'])) for n in range(18)]
    nappies = [(n * 1.5 + 0.5, rng.choice(['wet', 'dirty', 'wet + dirty'])) for n in range(16)]
    return ([(at(h), 'sleep', v) for h, v in sleep] + [(at(h + 0.3), 'feed', v) for h, v in feeds]
            + [(at(h), 'nappy', v) for h, v in nappies])


def fill(families, days, now, rng):
    """Write `days` days of entries for each (id, tz) straight into the database; return the count."""
    today, rows, seq = dt.datetime.fromtimestamp(now / 1000, dt.timezone.utc).date(), [], 0
    for family_id, tz in families:
        for back in range(days, 0, -1):
            for ts, type, value in day_entries(today - dt.timedelta(days=back), tz, rng):
                seq += 1
                rows.append((f'{family_id}-{seq}', family_id, ts, type, value, ts, seq))
    with bt.transaction():
        bt.db.executemany("""INSERT INTO entries (id, family_id, ts, type, value, deleted, updated_at, seq, by)
                             VALUES (?, ?, ?, ?, ?, 0, ?, ?, 'bench')""", rows)
        log_changes(bt.db)
    bt.db.execute('ANALYZE')  # the statistics the server's periodic PRAGMA optimize gathers
    return len(rows)


def median_ms(work, runs):
    """Return the median wall time and the median CPU time of `work`, in ms (CPU time is steadier on a busy machine)."""
    wall, cpu = [], []
    for _ in range(runs):
        started, used = time.perf_counter(), time.process_time()
        work()
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - used) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=50)
    args, rng, now = parser.parse_args(), random.Random(11), bt.now_ms()
    with tempfile.TemporaryDirectory() as directory:
        bt.open_db(os.path.join(directory, 'report.db'))
        family = bt.create_family('A year', '', 'Europe/London')
        count = fill([(family['id'], family['tz'])], 365, now, rng)
        bt.db.execute('UPDATE families SET plan = ? WHERE id = ?', (json.dumps(PLAN), family['id']))
        report = bt.night_report(bt.get_family(family['id']), 60, None, now)
        assert len(report['days']) == 60 and report['days'][-2]['night']['sleep_minutes'] > 0
        wall, cpu = median_ms(lambda: bt.night_report(bt.get_family(family['id']), 60, None, now), args.runs)
        print(f'night_report, 60 nights, a year of {count:,} entries: median {wall:.1f} ms wall, {cpu:.1f} ms CPU (target 20 ms)')
        bt.db.close()

        bt.open_db(os.path.join(directory, 'flags.db'))
        families = [bt.create_family(f'Family {n}', '', ZONES[n % 4]) for n in range(200)]
        count = fill([(f['id'], f['tz']) for f in families], 30, now, rng)
        for n, f in enumerate(families):
            bt.create_link(f['id'], 'Mum', now + (48 + n) * 3600_000 if n % 10 == 0 else None)
            if n % 2:
                bt.db.execute('UPDATE families SET plan = ? WHERE id = ?', (json.dumps(PLAN), f['id']))
        listed = bt.list_families()
        flags = bt.family_flags(listed, now)
        flagged = sum(1 for said in flags.values() if said)
        wall, cpu = median_ms(lambda: bt.family_flags(listed, now), args.runs)
        print(f'family_flags, 200 families, {count:,} entries ({flagged} flagged): median {wall:.1f} ms wall, '
              f'{cpu:.1f} ms CPU (the whole dashboard: target 20 ms)')
        bt.db.close()


if __name__ == '__main__':
    main()
