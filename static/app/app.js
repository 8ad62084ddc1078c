/* babytrackd — the parents' app.
 *
 * Offline-first: every tap is written to IndexedDB and shown at once, then waits in an outbox
 * until the server echoes it back over the WebSocket (PROTOCOL.md). The outbox holds
 * one item per entry id: the entry's latest full local state. The cursor is the highest `seq`
 * seen; a reconnect asks for `since=<cursor>` and so receives exactly what it missed. A fresh
 * phone asks for the last 14 days only (`days=14`, §12) and loads older days when someone browses
 * back to them. Taps for another family (a phone that opened another family's link) wait, parked,
 * until that family's link is opened again (§13). A write the server refuses for a while (budget,
 * storage fault: an error with `retry_after` and no id, §10) stays queued and is sent again later.
 *
 * Rendering scales with what is on screen: entries are indexed as they arrive (by local day, and
 * the current state of each category), and the totals and the log cover the shown day only.
 *
 * Chapters, each using only those above it:
 *   State · Time · Index · Storage · Sync · Rendering · Events · Boot
 * (Sync draws through Rendering's `render()`, one deferred render per frame for what arrives, and
 * `renderNow()` for a person's own action, shown in the same task.)
 * All text from the server (family name, labels, values) reaches the page through textContent.
 */
'use strict';

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

const DEFAULT_CONFIG = [
  {category: 'sleep', stateful: true, buttons: [
    {label: 'sleeping', timing: true, counted: true},
    {label: 'awake', timing: true, counted: false}]},
  {category: 'feed', buttons: [{label: 'breast left'}, {label: 'breast right'}, {label: 'bottle'}]},
  {category: 'nappy', buttons: [{label: 'wet'}, {label: 'dirty'}, {label: 'wet + dirty'}]},
];
const DEAD_LINK = 'This link no longer works — ask your consultant for a new one.';
const NO_LINK = 'Open the link your consultant sent you to start.';
const RETRY_CAP_MS = 30000;
const HEARTBEAT_MS = 20000;    // we ping this often; a socket silent for 3 of these is dead
const UNDO_MS = 7000;
const WINDOW_DAYS = 14;        // a fresh phone's first load (PROTOCOL.md)
const OLDER_DAYS = 7;          // one step back past what is loaded fetches at least this many days
const DAY_MS = 86400000;
const IN_FLIGHT = 50;          // outbox items sent and not yet answered, at most
const ROWS_PER_FRAME = 12;     // log rows built per frame: a long day fills in without a long task
const ANNOUNCE_MS = 5 * 60000; // a running timer is read out this often (and on every change)
const CLOSE_REVOKED = [4403, 1008];

const state = {
  family: null,          // {id, name, tz} — the last answer of /app/me, kept in IndexedDB
  me: null,              // {label, expires_at}
  config: DEFAULT_CONFIG,
  entries: new Map(),    // id -> {id, ts, type, value, deleted, updated_at, seq, by}
  outbox: new Map(),     // id -> {entry: full local state, base: last server copy or null, queued_at}
  parked: [],            // other families' waiting taps: [{id, family: {id, name}, entry, base, queued_at}]
  cursor: 0,             // highest seq seen
  loadedFrom: null,      // every live entry from this ms on is on this phone (0: all of them; null: none yet)
  members: [],           // labels of the devices online now
  link: 'unknown',       // 'unknown' (not asked yet) | 'ok' | 'dead' (revoked, expired, archived) | 'none'
  conn: 'offline',       // 'offline' | 'connecting' | 'open'
  ready: false,          // the current socket's init has been applied
  inFlight: new Map(),   // id -> the outbox item sent on this socket and not yet answered
  pausedUntil: 0,        // the server asked us to wait (retry_after) until then
  shown: 0,              // start of the local day shown by the totals and the log (0: today)
  older: '',             // loading older days: '' | 'loading' | 'offline' | 'failed'
  editing: null,         // id of the entry whose time editor is open
  plan: null,            // Jane's plan {wake, naps: [{start, end}], bedtime}, or null
  notes: [],             // Jane's coaching notes [{id, date, text, created_at}]
  seenNotes: [],         // ids of her notes this phone has shown
};

function buttonOf(category, label) {
  const group = state.config.find((g) => g.category === category);
  return group ? group.buttons.find((b) => b.label === label) || null : null;
}

function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/** Keep only a well-formed button config; anything else falls back to the default. */
function cleanConfig(data) {
  if (!Array.isArray(data)) return DEFAULT_CONFIG;
  const groups = data.filter((g) => g && typeof g.category === 'string' && Array.isArray(g.buttons))
    .map((g) => ({
      category: g.category,
      stateful: g.stateful === true,
      buttons: g.buttons.filter((b) => b && typeof b.label === 'string')
        .map((b) => ({label: b.label, timing: b.timing === true, counted: b.counted === true})),
    }));
  return groups.length ? groups : DEFAULT_CONFIG;
}

// ---------------------------------------------------------------------------------------------
// Time: days and clocks in the family's time zone (the server's summary rules)
// ---------------------------------------------------------------------------------------------

const partsFormats = new Map();
const clockFormats = new Map();
const knownZones = new Map();   // zone name -> whether this browser knows it

function familyTz() {
  const tz = state.family && state.family.tz;
  if (tz && !knownZones.has(tz)) {
    try {
      clockFormats.set(tz, new Intl.DateTimeFormat(undefined, {timeZone: tz, hour: 'numeric', minute: '2-digit'}));
      knownZones.set(tz, true);
    } catch (e) { knownZones.set(tz, false); }   // an unknown zone: fall back to UTC
  }
  return tz && knownZones.get(tz) ? tz : 'UTC';
}

/** Wall-clock fields of instant `ms` in zone `tz`. */
function wallClock(tz, ms) {
  let f = partsFormats.get(tz);
  if (!f) {
    f = new Intl.DateTimeFormat('en-US', {timeZone: tz, hourCycle: 'h23', year: 'numeric',
      month: 'numeric', day: 'numeric', hour: 'numeric', minute: 'numeric', second: 'numeric'});
    partsFormats.set(tz, f);
  }
  const p = {};
  for (const part of f.formatToParts(ms)) if (part.type !== 'literal') p[part.type] = Number(part.value);
  p.hour %= 24;
  return p;
}

function zoneOffset(tz, ms) {
  const p = wallClock(tz, ms);
  return Date.UTC(p.year, p.month - 1, p.day, p.hour, p.minute, p.second) - Math.floor(ms / 1000) * 1000;
}

/** The instant at which zone `tz` shows the given wall-clock time (month is 1-12).
 *  Like the server's zoneinfo (fold=0): a time that happens twice is the first one, and a time
 *  skipped by a clock change (midnight in Santiago) is read with the offset before the change. */
function instantOf(tz, year, month, day, hour = 0, minute = 0) {
  const wall = Date.UTC(year, month - 1, day, hour, minute);
  const before = zoneOffset(tz, wall - 86400000);
  const after = zoneOffset(tz, wall + 86400000);
  const early = wall - before;
  const late = wall - after;
  return zoneOffset(tz, early) === before || zoneOffset(tz, late) !== after ? early : late;
}

/** [local midnight, next local midnight) around instant `ms` in zone `tz`. */
function dayBounds(tz, ms) {
  const p = wallClock(tz, ms);
  const next = new Date(Date.UTC(p.year, p.month - 1, p.day + 1));
  return {
    start: instantOf(tz, p.year, p.month, p.day),
    end: instantOf(tz, next.getUTCFullYear(), next.getUTCMonth() + 1, next.getUTCDate()),
  };
}

function clockText(ms) {
  const tz = familyTz();
  if (!clockFormats.has(tz)) clockFormats.set(tz, new Intl.DateTimeFormat(undefined, {timeZone: tz, hour: 'numeric', minute: '2-digit'}));
  return clockFormats.get(tz).format(ms);
}

function durationText(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const mm = String(Math.floor(s / 60) % 60).padStart(2, '0');
  return `${Math.floor(s / 3600)}:${mm}:${String(s % 60).padStart(2, '0')}`;
}

function minutesText(minutes) {
  const h = Math.floor(minutes / 60);
  return h ? `${h}h ${minutes % 60}m` : `${minutes}m`;
}

/** The start of the local day `back` days before the day of `ms` (0: that day). */
function daysBefore(ms, back) {
  const p = wallClock(familyTz(), ms);
  const d = new Date(Date.UTC(p.year, p.month - 1, p.day - back));
  return instantOf(familyTz(), d.getUTCFullYear(), d.getUTCMonth() + 1, d.getUTCDate());
}

// ---------------------------------------------------------------------------------------------
// Index: what the screen needs, kept up to date as entries arrive, so nothing walks them all
// ---------------------------------------------------------------------------------------------

const days = new Map();      // local day start -> Map(id -> live entry)
const current = new Map();   // category -> its latest live entry by (ts, id)
let dayCache = new Map();    // UTC day number -> [{start, end}] local days that touch it

const later = (a, b) => a.ts > b.ts || (a.ts === b.ts && a.id > b.id);

/** The local day {start, end} that holds instant `ms` (a few Intl calls per day, then a lookup). */
function dayAround(ms) {
  const key = Math.floor(ms / DAY_MS);
  let ranges = dayCache.get(key);
  if (!ranges) dayCache.set(key, ranges = []);
  for (const r of ranges) if (ms >= r.start && ms < r.end) return r;
  const r = dayBounds(familyTz(), ms);
  ranges.push(r);
  return r;
}

const dayOf = (ms) => dayAround(ms).start;

function dayName(start, now) {
  const today = dayOf(now);
  if (start === today) return 'Today';
  if (start === dayOf(today - 1)) return 'Yesterday';
  return new Intl.DateTimeFormat(undefined, {timeZone: familyTz(), weekday: 'short', day: 'numeric', month: 'short'})
    .format(start);
}

/** Put an entry (from the server, IndexedDB or a tap) into memory and the indexes. */
function putEntry(e) {
  const prev = state.entries.get(e.id);
  state.entries.set(e.id, e);
  // The usual case (an echo, a later time) keeps the current state without a recount.
  unindex(prev, !e.deleted && prev && e.type === prev.type && !later(prev, e));
  if (e.deleted) return;
  const day = dayOf(e.ts);
  if (!days.has(day)) days.set(day, new Map());
  days.get(day).set(e.id, e);
  const best = current.get(e.type);
  if (!best || best.id === e.id || later(e, best)) current.set(e.type, e);
}

function dropEntry(id) {
  unindex(state.entries.get(id));
  state.entries.delete(id);
}

function unindex(prev, keepCurrent = false) {
  if (!prev || prev.deleted) return;
  const day = days.get(dayOf(prev.ts));
  if (day && day.get(prev.id) === prev) day.delete(prev.id);
  const best = current.get(prev.type);
  if (best && best.id === prev.id && !keepCurrent) recountCurrent(prev.type, prev.id);
}

/** The category's current entry went away or moved back: find the next one (rare: edits, deletes). */
function recountCurrent(category, skip = null) {
  let best = null;
  for (const e of state.entries.values()) {
    if (!e.deleted && e.type === category && e.id !== skip && (!best || later(e, best))) best = e;
  }
  if (best) current.set(category, best); else current.delete(category);
}

/** Build the indexes afresh (after a restore, or when the family's time zone changed). */
function reindex() {
  days.clear();
  current.clear();
  dayCache = new Map();
  clockCache = new Map();
  const all = [...state.entries.values()];
  state.entries.clear();
  for (const e of all) putEntry(e);
}

function currentState(category) {
  return current.get(category) || null;
}

/** The live entries of the local day starting at `start`, oldest first. */
function dayEntries(start) {
  const day = days.get(start);
  return day ? [...day.values()].sort((a, b) => a.ts - b.ts || (a.id < b.id ? -1 : 1)) : [];
}

/** The category's latest live entry before `ms` on this phone: the state carried into a day. */
function stateBefore(category, ms) {
  const now = current.get(category);
  if (!now || now.ts < ms) return now || null;
  const oldest = Math.min(...days.keys());
  for (let day = dayOf(ms - 1); day >= oldest; day = dayOf(day - 1)) {
    let best = null;
    for (const e of (days.get(day) || new Map()).values()) {
      if (e.type === category && e.ts < ms && (!best || later(e, best))) best = e;
    }
    if (best) return best;
  }
  return null;
}

/** Whole minutes of `ms` rounded as the server's Python does: an exact half goes to the even minute. */
function toMinutes(ms) {
  const m = ms / 60000;
  const r = Math.round(m);
  return r - m === 0.5 && r % 2 ? r - 1 : r;
}

/** Minutes in the counted states of a stateful category within [from, to). */
function countedMinutes(category, list, from, to) {
  const group = state.config.find((g) => g.category === category && g.stateful);
  if (!group) return 0;
  const counted = new Set(group.buttons.filter((b) => b.counted).map((b) => b.label));
  const spans = list.filter((e) => e.type === category && e.ts < to);
  const carried = stateBefore(category, from);
  if (carried) spans.unshift(carried);
  let ms = 0;
  spans.forEach((e, i) => {
    if (!counted.has(e.value)) return;
    const stop = Math.min(i + 1 < spans.length ? spans[i + 1].ts : to, to);
    const begin = Math.max(e.ts, from);
    if (stop > begin) ms += stop - begin;
  });
  return toMinutes(ms);
}

const clock = (text, fallback) => /^([01]\d|2[0-3]):[0-5]\d$/.test(text || '') ? text : fallback;

let clockCache = new Map();   // "day offset HH:MM" -> instant (renders ask for the same few often)

/** The instant of wall-clock "HH:MM" on the local day `offset` days after the day of `now`. */
function atClock(now, offset, text) {
  const key = `${dayOf(now)} ${offset} ${text}`;
  if (!clockCache.has(key)) {
    const p = wallClock(familyTz(), now);
    const d = new Date(Date.UTC(p.year, p.month - 1, p.day + offset));
    const [h, m] = text.split(':').map(Number);
    clockCache.set(key, instantOf(familyTz(), d.getUTCFullYear(), d.getUTCMonth() + 1, d.getUTCDate(), h, m));
  }
  return clockCache.get(key);
}

/** The latest night begun by `now`, counted like the server's report (README "The sleep program"): asleep is a
 *  counted sleep state; spans are clipped to [night_start, next night_end); a waking is an awake
 *  span between two asleep ones; an open state counts up to now. */
function lastNight(now) {
  const family = state.family || {};
  const from = clock(family.night_start, '19:00');
  const to = clock(family.night_end, '07:00');
  let start = atClock(now, 0, from);
  let back = 0;
  if (start > now) { back = -1; start = atClock(now, -1, from); }
  const end = atClock(now, back + (from > to), to);   // a night that starts after midnight ends that morning
  const stop = Math.min(end, now);
  const group = state.config.find((g) => g.category === 'sleep' && g.stateful);
  const counted = new Set(group ? group.buttons.filter((b) => b.counted).map((b) => b.label) : []);
  const list = [];
  for (let day = dayOf(start); day < stop; day = dayAround(day).end) {
    list.push(...dayEntries(day).filter((e) => e.type === 'sleep' && e.ts >= start && e.ts < stop));
  }
  const carried = stateBefore('sleep', start);
  if (carried) list.unshift(carried);
  const spans = [];   // [asleep, ms], neighbours merged
  list.forEach((e, i) => {
    const ms = Math.min(i + 1 < list.length ? list[i + 1].ts : stop, stop) - Math.max(e.ts, start);
    const asleep = counted.has(e.value);
    if (spans.length && spans[spans.length - 1][0] === asleep) spans[spans.length - 1][1] += Math.max(ms, 0);
    else if (ms > 0) spans.push([asleep, ms]);
  });
  const asleep = spans.filter(([a]) => a).map(([, ms]) => ms);
  return {
    tonight: back === 0, complete: end <= now,
    sleep_minutes: toMinutes(asleep.reduce((a, b) => a + b, 0)),
    wakings: spans.filter(([a], i) => !a && i > 0 && i < spans.length - 1).length,
    longest_stretch_minutes: toMinutes(Math.max(0, ...asleep)),
  };
}

/** The plan's next item after `now`: "Nap 2 at 13:30 · in 40m", or '' without a plan. */
function planNext(now) {
  const plan = state.plan;
  if (!plan) return '';
  const items = [['Wake', plan.wake], ...(plan.naps || []).map((n, i) => [`Nap ${i + 1}`, n && n.start]), ['Bedtime', plan.bedtime]];
  let best = null;
  for (const offset of [0, 1]) {
    for (const [label, text] of items) {
      if (!clock(text, '')) continue;
      const at = atClock(now, offset, text);
      if (at > now && (!best || at < best.at)) best = {label, text, at};
    }
  }
  return best ? `Plan: ${best.label} at ${best.text} · in ${minutesText(Math.ceil((best.at - now) / 60000))}` : '';
}

/** The totals of the day [start, end) as the server's summary counts them. */
function dayTotals(start, end, list, now) {
  const totals = {sleep_minutes: countedMinutes('sleep', list, start, Math.min(end, now)), feeds: 0, wet: 0, dirty: 0};
  for (const e of list) {
    if (e.type === 'feed') totals.feeds += 1;
    const nappy = e.type === 'nappy' ? e.value.toLowerCase() : '';
    if (nappy.includes('wet')) totals.wet += 1;
    if (nappy.includes('dirty')) totals.dirty += 1;
  }
  return totals;
}

// ---------------------------------------------------------------------------------------------
// Storage: IndexedDB holds the family, the config, the entries, the outbox and the cursor, and
// (in `parked`) the waiting taps of families whose link this phone opened before
// ---------------------------------------------------------------------------------------------

let db = null;   // stays null when IndexedDB is unavailable: the app then works from memory

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open('babytrackd', 2);
    req.onupgradeneeded = (event) => {
      if (event.oldVersion < 1) {
        req.result.createObjectStore('meta');
        req.result.createObjectStore('entries', {keyPath: 'id'});
        req.result.createObjectStore('outbox', {keyPath: 'id'});
      }
      if (event.oldVersion < 2) req.result.createObjectStore('parked', {keyPath: 'id'});
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function loadStore(tx, name) {
  return new Promise((resolve, reject) => {
    const req = tx.objectStore(name).getAll();
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function loadMeta(tx) {
  return new Promise((resolve, reject) => {
    const meta = {};
    const req = tx.objectStore('meta').openCursor();
    req.onsuccess = () => {
      const c = req.result;
      if (!c) return resolve(meta);
      meta[c.key] = c.value;
      c.continue();
    };
    req.onerror = () => reject(req.error);
  });
}

async function loadAll() {
  const tx = db.transaction(['meta', 'entries', 'outbox', 'parked']);
  const [meta, entries, outbox, parked] = await Promise.all([loadMeta(tx), loadStore(tx, 'entries'),
    loadStore(tx, 'outbox'), loadStore(tx, 'parked')]);
  return {meta, entries, outbox, parked};
}

/** Write one batch of changes in a single transaction: {meta: {key: value}, entries: [entry],
 *  drop: [id], outbox: [item], unqueue: [id], park: [parked item], unpark: [id], clear: bool} */
function save(change) {
  if (!db) return Promise.resolve();
  return new Promise((resolve) => {
    const tx = db.transaction(['meta', 'entries', 'outbox', 'parked'], 'readwrite');
    if (change.clear) ['meta', 'entries', 'outbox'].forEach((s) => tx.objectStore(s).clear());
    for (const [k, v] of Object.entries(change.meta || {})) tx.objectStore('meta').put(v, k);
    for (const e of change.entries || []) tx.objectStore('entries').put(e);
    for (const id of change.drop || []) tx.objectStore('entries').delete(id);
    for (const item of change.outbox || []) tx.objectStore('outbox').put({id: item.entry.id, ...item});
    for (const id of change.unqueue || []) tx.objectStore('outbox').delete(id);
    for (const item of change.park || []) tx.objectStore('parked').put(item);
    for (const id of change.unpark || []) tx.objectStore('parked').delete(id);
    tx.oncomplete = () => resolve();
    tx.onerror = tx.onabort = () => resolve();   // the change is still in memory; the outbox is re-sent later
    if (tx.commit) tx.commit();   // at once, not when the task ends: a link opened right after a tap keeps it
  });
}

/** Store many entries a slice at a time, each in its own task, so a load never holds the page for
 *  long; each slice writes the entry as it is in memory then (a newer echo is never overwritten). */
let storing = 0;   // slices still being stored: the cursor waits for them

async function saveMany(entries, last) {
  storing += 1;
  for (let i = 0; i < entries.length; i += 25) {
    await new Promise((resolve) => setTimeout(resolve));
    save({entries: entries.slice(i, i + 25).map((e) => state.entries.get(e.id) || e)});
  }
  storing -= 1;
  return save({...last, meta: {...last.meta, ...(storing ? {} : {cursor: state.cursor})}});
}

// Writes under way: entries from the server not yet stored (ids; `acks` when some acknowledge our
// taps), transactions storing acknowledgements, and taps being stored.
const pending = {entries: new Set(), timer: null, acks: false, acking: 0, taps: 0};

/** Store entries from the server in one transaction per 50 ms (an outbox of thousands drains in a
 *  few transactions): each as it is in memory then, acknowledged unless queued again since. The
 *  last acknowledgement is stored at once: "all saved" is shown only once this phone agrees. */
function saveSoon(ids, acked = false) {
  for (const id of ids) pending.entries.add(id);
  pending.acks = pending.acks || acked;
  if (acked && !state.outbox.size) return flushSoon();
  if (!pending.timer) pending.timer = setTimeout(flushSoon, 50);
}

function flushSoon() {
  clearTimeout(pending.timer);
  pending.timer = null;
  const ids = [...pending.entries];
  pending.entries.clear();
  const unqueue = ids.filter((id) => !state.outbox.has(id));
  const acks = pending.acks;
  pending.acks = false;
  pending.acking += acks ? 1 : 0;
  save({entries: ids.map((id) => state.entries.get(id)).filter(Boolean), unqueue, meta: storing ? {} : {cursor: state.cursor}})
    .then(() => { pending.acking -= acks ? 1 : 0; if (acks) render(); });
}

function restore({meta, entries, outbox, parked}) {
  state.family = meta.family || null;
  state.me = meta.me || null;
  state.config = cleanConfig(meta.config);
  state.cursor = meta.cursor || 0;
  state.link = meta.link || (state.family ? 'ok' : 'unknown');
  // A phone from before windowed loads holds the whole history.
  state.loadedFrom = meta.loadedFrom ?? (state.cursor ? 0 : null);
  state.plan = meta.plan || null;
  state.notes = Array.isArray(meta.notes) ? meta.notes : [];
  state.seenNotes = Array.isArray(meta.seenNotes) ? meta.seenNotes : [];
  for (const e of entries) state.entries.set(e.id, e);
  reindex();
  outbox.sort((a, b) => a.queued_at - b.queued_at);
  for (const item of outbox) state.outbox.set(item.id, {entry: item.entry, base: item.base, queued_at: item.queued_at});
  state.parked = parked;
}

// ---------------------------------------------------------------------------------------------
// Sync: the socket, the outbox and the cursor
// ---------------------------------------------------------------------------------------------

let socket = null;
let retries = 0;
let retryTimer = null;
let resumeTimer = null;
let heartbeat = null;
let lastHeard = 0;
let sendWindow = IN_FLIGHT;   // halved by a refusal, one more per answer

const wireFields = (e) => ({id: e.id, ts: e.ts, type: e.type, value: e.value, deleted: e.deleted, updated_at: e.updated_at});
const sameFields = (a, b) => a.ts === b.ts && a.type === b.type && a.value === b.value && !!a.deleted === !!b.deleted;

/** Record a local change: memory and screen first, then IndexedDB, then the server. */
function change(entry) {
  const prev = state.entries.get(entry.id);
  entry.updated_at = Math.max(Date.now(), prev ? prev.updated_at + 1 : 0);
  const queued = state.outbox.get(entry.id);
  const item = {entry: wireFields(entry), base: queued ? queued.base : prev || null, queued_at: queued ? queued.queued_at : Date.now()};
  putEntry(entry);
  state.outbox.set(entry.id, item);
  pending.taps += 1;
  renderNow();    // a person's own action shows in the same task
  save({entries: [entry], outbox: [item]}).then(() => { pending.taps -= 1; render(); pump(); });
}

/** Send what waits in the outbox, a bounded number at a time, unless the server asked us to wait. */
function pump() {
  if (!socket || !state.ready || socket.readyState !== WebSocket.OPEN || Date.now() < state.pausedUntil) return;
  for (const [id, item] of state.outbox) {
    if (state.inFlight.size >= sendWindow) break;
    if (state.inFlight.get(id) === item) continue;
    state.inFlight.set(id, item);
    socket.send(JSON.stringify({type: 'entry', action: 'update', entry: item.entry}));
  }
}

/** The server refused a write for now (budget, storage): keep the outbox, send it again later. */
function pause(seconds) {
  const wait = Math.min(Math.max(Number(seconds) || 1, 0.05), 300) * 1000;
  state.pausedUntil = Math.max(state.pausedUntil, Date.now() + wait);
  state.inFlight.clear();     // we cannot tell which were refused: whatever is not answered goes again
  sendWindow = Math.max(1, sendWindow >> 1);
  clearTimeout(resumeTimer);
  resumeTimer = setTimeout(pump, state.pausedUntil - Date.now());
}

/** Apply an entry from the server (`stale`: its answer that our write lost). Returns the entry to
 *  store, or null when the local copy stays. */
function applyRemote(e, stale = false) {
  const item = state.outbox.get(e.id);
  if (item) {
    if (e.updated_at >= item.entry.updated_at || sameFields(e, item.entry) || stale) {
      state.outbox.delete(e.id);             // acknowledged (or overtaken by a newer write)
      state.inFlight.delete(e.id);
      sendWindow = Math.min(IN_FLIGHT, sendWindow + 1);
    } else {
      item.base = e;                          // an older write echoed: ours is still on its way
      return null;
    }
  } else {
    state.inFlight.delete(e.id);
    const local = state.entries.get(e.id);
    if (local && local.seq && e.seq && e.seq < local.seq) return null;
  }
  putEntry(e);
  return e;
}

function advanceCursor(seq) {
  if (Number.isInteger(seq) && seq > state.cursor) state.cursor = seq;
}

function onInit(msg) {
  const stored = [];
  const acked = [];
  for (const e of msg.entries || []) {
    const queued = state.outbox.has(e.id);
    if (applyRemote(e)) stored.push(e);
    if (queued && !state.outbox.has(e.id)) acked.push(e.id);
    advanceCursor(e.seq);
  }
  // init.cursor is the server's newest seq; below ours it means a restored backup: follow it.
  if (Number.isInteger(msg.cursor)) state.cursor = msg.cursor;
  if (socket && socket.windowStart !== undefined) state.loadedFrom = socket.windowStart;
  state.config = cleanConfig(msg.config);
  state.members = Array.isArray(msg.members) ? msg.members : [];
  if ('plan' in msg) state.plan = msg.plan && typeof msg.plan === 'object' ? msg.plan : null;
  if (Array.isArray(msg.notes)) state.notes = msg.notes.filter(goodNote);
  state.ready = true;
  retries = 0;
  // The cursor is stored after the entries it covers.
  saveMany(stored, {unqueue: acked,
    meta: {config: state.config, loadedFrom: state.loadedFrom, plan: state.plan, notes: state.notes}});
  renderButtons();
  render();
  pump();
}

function onMessage(msg) {
  lastHeard = Date.now();
  if (msg.type === 'init') return onInit(msg);
  if (msg.type === 'entry' && msg.entry) {
    const queued = state.outbox.has(msg.entry.id);
    const stored = applyRemote(msg.entry, msg.stale === true);
    advanceCursor(msg.entry.seq);
    saveSoon(stored ? [stored.id] : [], queued && !state.outbox.has(msg.entry.id));
    render();
    pump();
  } else if (msg.type === 'config') {
    state.config = cleanConfig(msg.data);
    save({meta: {config: state.config}});
    renderButtons();
    render();
  } else if (msg.type === 'plan') {
    state.plan = msg.plan && typeof msg.plan === 'object' ? msg.plan : null;
    save({meta: {plan: state.plan}});
    render();
  } else if (msg.type === 'note' && msg.note && typeof msg.note.id === 'string') {
    state.notes = state.notes.filter((n) => n.id !== msg.note.id);
    if (!msg.note.deleted && goodNote(msg.note)) state.notes.push(msg.note);
    save({meta: {notes: state.notes}});
    render();
  } else if (msg.type === 'presence') {
    state.members = Array.isArray(msg.members) ? msg.members : [];
    render();
  } else if (msg.type === 'error') {
    if (msg.id) {
      refused(msg.id);
      toast(`Not saved: ${msg.error || 'the server refused a change'}`);
    } else if ('retry_after' in msg) {
      pause(msg.retry_after);    // nothing is lost: the outbox waits, the status says so
    } else {
      toast(`Not saved: ${msg.error || 'the server refused a change'}`);
    }
  }
}

function goodNote(n) {
  return n && typeof n.id === 'string' && typeof n.text === 'string' && typeof n.date === 'string';
}

/** The server will never accept this change: drop it and go back to the server's copy. */
function refused(id) {
  const item = state.outbox.get(id);
  if (!item) return;
  state.outbox.delete(id);
  state.inFlight.delete(id);
  if (item.base) putEntry(item.base);
  else dropEntry(id);
  save(item.base ? {unqueue: [id], entries: [item.base]} : {unqueue: [id], drop: [id]});
  render();
  pump();
}

function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (socket || state.link !== 'ok' || !state.family || !navigator.onLine) return render();
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  // A fresh phone asks for a window of days; any other resumes from its cursor (PROTOCOL.md).
  const fresh = !state.cursor;
  const url = `${proto}//${location.host}/ws?family=${encodeURIComponent(state.family.id)}&since=${state.cursor}` +
    (fresh ? `&days=${WINDOW_DAYS}` : '');
  const ws = new WebSocket(url);
  if (fresh) ws.windowStart = daysBefore(Date.now(), WINDOW_DAYS - 1);
  let opened = false;
  socket = ws;
  lastHeard = Date.now();
  state.conn = 'connecting';
  ws.onopen = () => {
    opened = true;
    lastHeard = Date.now();
    state.conn = 'open';
    render();
  };
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    if (msg && typeof msg === 'object') onMessage(msg);
  };
  ws.onclose = (ev) => {
    if (socket !== ws) return;
    dropSocket();
    if (CLOSE_REVOKED.includes(ev.code)) return linkDead();
    if (opened) return retryLater();
    checkLink().then((alive) => { if (alive) retryLater(); });
  };
  render();
}

function dropSocket() {
  const ws = socket;
  socket = null;
  state.conn = 'offline';
  state.ready = false;
  state.members = [];
  state.inFlight.clear();
  if (ws) {
    ws.onopen = ws.onmessage = ws.onclose = null;
    if (ws.readyState < WebSocket.CLOSING) ws.close();
  }
  render();
}

function retryLater() {
  if (retryTimer || state.link !== 'ok') return;
  const ceiling = Math.min(RETRY_CAP_MS, 1000 * 2 ** retries);
  retries += 1;
  retryTimer = setTimeout(() => { retryTimer = null; connect(); }, ceiling / 2 + Math.random() * ceiling / 2);
}

/** Reconnect at once (coming back online or to the foreground). */
function reconnectNow() {
  retries = 0;
  if (!socket) connect();
}

/** Ping now and then; a socket that stays silent is a dead one (phones switch networks). */
function beat() {
  if (socket && state.conn === 'connecting' && Date.now() - lastHeard > HEARTBEAT_MS) {
    dropSocket();   // a handshake that hangs (captive portal, half-open connection)
    return retryLater();
  }
  if (!socket || state.conn !== 'open') return;
  if (Date.now() - lastHeard > 3 * HEARTBEAT_MS) {
    dropSocket();
    return connect();
  }
  socket.send(JSON.stringify({type: 'ping'}));
}

/** Ask /app/me whether our link still works; remember the family. Resolves false when dead. */
async function checkLink() {
  if (!navigator.onLine) return true;
  let res;
  try {
    res = await fetch('/app/me', {credentials: 'same-origin', cache: 'no-store'});
  } catch (e) {
    return true;    // the network failed, not the link
  }
  if (res.ok) {
    const me = await res.json();
    if (!state.family || state.family.id !== me.family.id) await switchFamily(me.family);
    const tzChanged = !state.family || state.family.tz !== me.family.tz;
    state.family = me.family;
    state.me = {label: me.label, expires_at: me.expires_at};
    state.link = 'ok';
    if (tzChanged) reindex();
    save({meta: {family: state.family, me: state.me, link: 'ok'}});
    renderButtons();
    render();
    return true;
  }
  if ([401, 403, 404, 410].includes(res.status)) {
    linkDead(state.family ? 'dead' : 'none');
    return false;
  }
  return true;
}

function linkDead(kind = 'dead') {
  state.link = kind;
  clearTimeout(retryTimer);
  retryTimer = null;
  if (socket) dropSocket();
  save({meta: {link: kind}});
  state.editing = null;
  renderButtons();
  render();
}

/** A link for another family replaced ours: its data is not ours to show, but its waiting taps
 *  are parked (never dropped) until its link is opened again; that family's own come back. */
async function switchFamily(next) {
  if (socket) dropSocket();
  const was = state.family;
  const park = was ? [...state.outbox.values()].map((item) =>
    ({id: item.entry.id, family: {id: was.id, name: was.name}, ...item})) : [];
  const back = state.parked.filter((p) => p.family.id === next.id);
  state.parked = state.parked.filter((p) => p.family.id !== next.id).concat(park);
  state.entries.clear();
  state.outbox.clear();
  state.cursor = 0;
  state.loadedFrom = null;
  state.config = DEFAULT_CONFIG;
  state.plan = null;
  state.notes = [];
  state.seenNotes = [];
  state.shown = 0;
  state.editing = null;
  state.family = next;
  reindex();
  const entries = [];
  for (const p of back) {
    const entry = {...p.entry, seq: p.base ? p.base.seq : 0, by: p.base ? p.base.by : 'this phone'};
    state.outbox.set(entry.id, {entry: p.entry, base: p.base, queued_at: p.queued_at});
    putEntry(entry);
    entries.push(entry);
  }
  await save({clear: true, park, unpark: back.map((p) => p.id), entries,
    outbox: back.map((p) => ({entry: p.entry, base: p.base, queued_at: p.queued_at}))});
}

/** Load older days from the server when the shown day is before what this phone holds. */
async function loadOlder() {
  const start = state.shown;
  if (!start || state.loadedFrom === null || start >= state.loadedFrom || state.older === 'loading') return;
  if (!navigator.onLine || state.link !== 'ok') { state.older = 'offline'; return render(); }
  const before = state.loadedFrom;
  const count = Math.min(31, Math.max(OLDER_DAYS, Math.ceil((before - start) / DAY_MS)));
  state.older = 'loading';
  render();
  let answer = null;
  try {
    const res = await fetch(`/app/entries?before=${before}&days=${count}`,
      {credentials: 'same-origin', cache: 'no-store', headers: {Accept: 'application/json'}});
    if (res.ok) answer = await res.json();
    else if ([401, 403, 404, 410].includes(res.status)) linkDead(state.family ? 'dead' : 'none');
  } catch (e) { /* the network failed */ }
  if (!answer || state.loadedFrom !== before) {
    state.older = navigator.onLine ? 'failed' : 'offline';
    return render();
  }
  const stored = [];
  for (const e of answer.entries || []) {
    const local = state.entries.get(e.id);
    if (state.outbox.has(e.id) || (local && local.seq >= e.seq)) continue;
    putEntry(e);
    stored.push(e);
  }
  state.loadedFrom = before - count * DAY_MS;
  state.older = '';
  saveMany(stored, {meta: {loadedFrom: state.loadedFrom}});
  render();
  loadOlder();    // the shown day may lie further back still
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** Create an element; `props` sets properties (className, textContent, type...), never HTML. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k.startsWith('aria') || k.startsWith('data-')) node.setAttribute(k.replace(/^aria(?=[A-Z])/, 'aria-').toLowerCase(), v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}

const stateViews = new Map();   // category -> {label, timer, since, buttons: Map(label -> button), heard}
const groupButtons = [];        // every logging button, to enable/disable at once
let builtFor = '';              // the config the buttons were built for

/** Change a node's text only when it differs (no needless layout or announcements). */
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function readOnly() {
  return state.link !== 'ok' || !state.family;
}

/** Build the button groups; done only when the config changes, so taps are never lost. Before the
 *  family is known they stand disabled in their place, so nothing moves when it arrives. */
function renderButtons() {
  const key = JSON.stringify(state.config);
  if (key === builtFor) return;
  builtFor = key;
  const root = $('groups');
  root.replaceChildren();
  stateViews.clear();
  groupButtons.length = 0;
  state.config.forEach((group, i) => {
    const section = el('section', {className: `group tone-${i % 4}`, 'data-category': group.category});
    section.append(el('h2', {textContent: group.category}));
    const buttons = el('div', {className: 'buttons'});
    const byLabel = new Map();
    for (const b of group.buttons) {
      const button = el('button', {type: 'button', className: 'log-button', textContent: b.label, disabled: readOnly()});
      button.addEventListener('click', () => logTap(group.category, b.label));
      byLabel.set(b.label, button);
      groupButtons.push(button);
      buttons.append(button);
    }
    if (group.stateful) {
      // The ticking timer is hidden from screen readers; #announce reads the state out now and then.
      const view = {label: el('span', {className: 'state-label'}), timer: el('span', {className: 'timer', ariaHidden: 'true'}),
        since: el('span', {className: 'since'}), buttons: byLabel, heard: null};
      section.append(el('div', {className: 'state-card'}, view.label, view.timer, view.since));
      stateViews.set(group.category, view);
    }
    section.append(buttons);
    root.append(section);
  });
}

function spokenDuration(ms) {
  const minutes = Math.floor(ms / 60000);
  const h = Math.floor(minutes / 60);
  const m = `${minutes % 60} minute${minutes % 60 === 1 ? '' : 's'}`;
  return h ? `${h} hour${h === 1 ? '' : 's'} ${m}` : m;
}

function renderStates(now) {
  let timing = false;
  for (const [category, view] of stateViews) {
    const current = currentState(category);
    const button = current && buttonOf(category, current.value);
    const timed = !!(current && button && button.timing);
    setText(view.label, current ? current.value : `No ${category} logged yet`);
    setText(view.timer, timed ? durationText(now - current.ts) : '');
    setText(view.since, current ? `since ${clockText(current.ts)} · ${current.by || 'this phone'}` : '');
    for (const [label, b] of view.buttons) {
      const pressed = String(!!current && current.value === label);
      if (b.getAttribute('aria-pressed') !== pressed) b.setAttribute('aria-pressed', pressed);
    }
    // Read out a change of state at once and a running timer every few minutes, never each second.
    const id = current ? `${current.id}@${current.ts}:${current.value}` : '';
    if (view.heard && (view.heard.id !== id || (timed && now - view.heard.at >= ANNOUNCE_MS))) {
      setText($('announce'), current ? `${category}: ${current.value}${timed ? ` for ${spokenDuration(now - current.ts)}` : ''}` : '');
    }
    if (!view.heard || view.heard.id !== id || now - view.heard.at >= ANNOUNCE_MS) view.heard = {id, at: now};
    timing = timing || timed;
  }
  keepAwake(timing);
}

function shownDay(now) {
  return dayAround(state.shown || now);
}

function renderTotals({start, end}, list, now) {
  const t = dayTotals(start, end, list, now);
  setText($('total-sleep'), minutesText(t.sleep_minutes));
  setText($('total-feeds'), String(t.feeds));
  setText($('total-wet'), String(t.wet));
  setText($('total-dirty'), String(t.dirty));
}

function renderDay(now) {
  const name = dayName(shownDay(now).start, now);
  setText($('totals-title'), name);
  setText($('day-title'), name === 'Today' ? "Today's log" : `Log · ${name}`);
  $('day-next').disabled = !state.shown;
  $('day-prev').disabled = !state.family;
  const old = state.shown && state.loadedFrom !== null && state.shown < state.loadedFrom;
  const note = !old ? '' : state.older === 'offline' ? 'Offline: this day is not on this phone yet. It loads when you are online.'
    : state.older === 'failed' ? 'This day could not be loaded. Try again in a moment.' : 'Loading this day…';
  setText($('log-note'), note);
}

function renderNight(now) {
  const night = lastNight(now);
  setText($('night-title'), night.complete ? 'Last night' : night.tonight ? 'Tonight so far' : 'Last night so far');
  setText($('night-sleep'), minutesText(night.sleep_minutes));
  setText($('night-wakings'), String(night.wakings));
  setText($('night-longest'), minutesText(night.longest_stretch_minutes));
  setText($('plan-next'), planNext(now));
}

let notesShown = '';

/** Jane's notes, newest first, each marked until this phone has shown it. */
function renderNotes() {
  const seen = new Set(state.seenNotes);
  const notes = state.notes.slice().sort((a, b) => (b.date > a.date) - (b.date < a.date) || (b.created_at || 0) - (a.created_at || 0));
  const key = JSON.stringify([notes, state.seenNotes]);
  if (key === notesShown) return;
  notesShown = key;
  $('notes').replaceChildren(...notes.map((n) => el('li', {},
    el('span', {className: 'when', textContent: `From your consultant · ${n.date}`},
      ...(seen.has(n.id) ? [] : [el('span', {className: 'unread', textContent: 'new'})])),
    n.text)));
}

/** Notes on screen for a few seconds count as seen (the mark goes on the next render). */
function watchNotes() {
  if (!('IntersectionObserver' in window)) return;
  let timer = null;
  new IntersectionObserver(([seen]) => {
    clearTimeout(timer);
    if (!seen.isIntersecting) return;
    timer = setTimeout(() => {
      const unseen = state.notes.filter((n) => !state.seenNotes.includes(n.id));
      if (!unseen.length || document.visibilityState !== 'visible') return;
      state.seenNotes = state.notes.map((n) => n.id);
      save({meta: {seenNotes: state.seenNotes}});
      render();
    }, 3000);
  }, {threshold: 0.5}).observe($('notes'));
}

const rows = new Map();   // entry id -> <li>, reused so a tap in progress survives a re-render

function renderLog(list) {
  const shown = list.slice().reverse();
  const listNode = $('log');
  const keep = new Set(shown.map((e) => e.id));
  for (const [id, li] of rows) if (!keep.has(id)) { li.remove(); rows.delete(id); }
  if (state.editing && !keep.has(state.editing)) state.editing = null;
  const locked = readOnly();
  let fresh = 0;
  let at = 0;
  for (const e of shown) {
    let li = rows.get(e.id);
    if (!li && fresh >= ROWS_PER_FRAME) { render(); continue; }   // the rest in the next frames
    if (!li) {
      fresh += 1;
      li = el('li', {className: 'entry'});
      const row = el('button', {type: 'button', className: 'entry-row', ariaExpanded: 'false'},
        el('span', {className: 'time'}), el('span', {className: 'what'}), el('span', {className: 'by'}));
      row.addEventListener('click', () => toggleEditor(e.id));
      li.append(row);
      rows.set(e.id, li);
    }
    const waiting = state.outbox.has(e.id);
    const key = [e.ts, e.type, e.value, e.by, waiting, locked, state.editing === e.id, state.config.length].join('\u0001');
    if (li.key !== key) {   // only rows that changed are touched
      li.key = key;
      const [time, what, by] = li.firstChild.children;
      time.textContent = clockText(e.ts);
      const tone = state.config.findIndex((g) => g.category === e.type);
      what.replaceChildren(el('span', {className: `dot${tone < 0 ? '' : ` tone-${tone % 4}`}`}),
        el('span', {className: 'value', textContent: e.value}), el('span', {className: 'type', textContent: ` (${e.type})`}));
      by.textContent = waiting ? 'waiting to sync' : e.by || '';
      li.classList.toggle('waiting', waiting);
      li.firstChild.disabled = locked;
      li.firstChild.setAttribute('aria-expanded', String(state.editing === e.id));
      const editor = li.querySelector('.editor');
      if (state.editing === e.id && !editor) li.append(buildEditor(e));
      if (state.editing !== e.id && editor) editor.remove();
    }
    if (listNode.children[at] !== li) listNode.insertBefore(li, listNode.children[at] || null);
    at += 1;
  }
  setText($('log-empty'), state.shown ? 'Nothing logged this day.' : 'Nothing logged yet today.');
  $('log-empty').hidden = shown.length > 0;
}

function hhmm(ms) {
  const p = wallClock(familyTz(), ms);
  return `${String(p.hour).padStart(2, '0')}:${String(p.minute).padStart(2, '0')}`;
}

function buildEditor(entry) {
  const input = el('input', {type: 'time', value: hhmm(entry.ts), className: 'time-input', required: true});
  const nudge = (minutes) => {
    const t = editedTime(state.entries.get(entry.id) || entry, input.value) ?? entry.ts;
    input.value = hhmm(Math.min(t + minutes * 60000, Date.now()));
  };
  const action = (text, className, fn) => {
    const b = el('button', {type: 'button', className, textContent: text});
    b.addEventListener('click', fn);
    return b;
  };
  return el('div', {className: 'editor'},
    el('label', {className: 'time-label'}, el('span', {textContent: 'Time'}), input),
    el('div', {className: 'nudges'},
      action('−10 min', 'nudge', () => nudge(-10)), action('−1 min', 'nudge', () => nudge(-1)),
      action('+1 min', 'nudge', () => nudge(1))),
    el('div', {className: 'actions'},
      action('Save', 'primary', () => saveTime(entry.id, input.value)),
      action('Delete', 'danger', () => removeEntry(entry.id)),
      action('Cancel', 'plain', () => toggleEditor(null))));
}

/** The instant for "HH:MM" on the entry's day; a time still to come today means yesterday. */
function editedTime(entry, value) {
  const m = /^(\d{2}):(\d{2})/.exec(value || '');
  if (!m) return null;
  const tz = familyTz();
  const p = wallClock(tz, entry.ts);
  let t = instantOf(tz, p.year, p.month, p.day, Number(m[1]), Number(m[2]));
  if (t > Date.now() + 60000) {
    const prev = new Date(Date.UTC(p.year, p.month - 1, p.day - 1));
    t = instantOf(tz, prev.getUTCFullYear(), prev.getUTCMonth() + 1, prev.getUTCDate(), Number(m[1]), Number(m[2]));
  }
  return t;
}

let membersShown = '';

function renderMembers() {
  const key = JSON.stringify([state.members, state.me && state.me.label, state.conn]);
  if (key === membersShown) return;
  membersShown = key;
  const mine = state.me && state.me.label ? state.me.label : 'device';
  let marked = false;
  const items = state.members.map((label) => {
    const you = !marked && String(label) === mine;
    marked = marked || you;
    return el('li', {className: you ? 'you' : '', textContent: you ? `${label} (this phone)` : String(label)});
  });
  $('members').replaceChildren(...items);
  if (!items.length) $('members').append(el('li', {className: 'muted', textContent: state.conn === 'open' ? 'Just you' : 'Not connected'}));
}

function renderSync() {
  const waiting = state.outbox.size;
  const queue = waiting ? ` · ${waiting} waiting` : '';
  let text;
  let mode;
  if (state.link === 'unknown') [text, mode] = ['Starting…', 'offline'];
  else if (!state.family || state.link === 'none') [text, mode] = ['Not set up', 'offline'];
  else if (state.link !== 'ok') [text, mode] = ['Read-only', 'dead'];
  else if (pending.taps) [text, mode] = [`Saving on this phone${queue}`, 'syncing'];   // "waiting" means stored
  else if (!navigator.onLine || state.conn === 'offline') [text, mode] = [`Offline${queue || ' · saved on this phone'}`, 'offline'];
  else if (state.conn === 'connecting') [text, mode] = [`Connecting…${queue}`, 'syncing'];
  else if (Date.now() < state.pausedUntil && waiting) [text, mode] = [`Server busy, retrying${queue}`, 'syncing'];
  else if (!state.ready || waiting || pending.acking) [text, mode] = [`Syncing${queue}`, 'syncing'];
  else [text, mode] = ['Online · all saved', 'online'];
  const sync = $('sync');
  setText(sync, text);
  if (sync.dataset.mode !== mode) sync.dataset.mode = mode;
}

function renderBanner() {
  const banner = $('banner');
  const text = state.link === 'dead' ? DEAD_LINK : state.link === 'none' ? NO_LINK : '';
  setText(banner, text);
  banner.hidden = !text;
  const waiting = new Map();   // family id -> [name, taps]
  for (const p of state.parked) waiting.set(p.family.id, [p.family.name, ((waiting.get(p.family.id) || [])[1] || 0) + 1]);
  const parked = [...waiting.values()].map(([name, n]) =>
    `${n} tap${n === 1 ? '' : 's'} for ${name} ${n === 1 ? 'is' : 'are'} waiting on this phone. Open ${name}'s link to send ${n === 1 ? 'it' : 'them'}.`);
  setText($('parked'), parked.join(' '));
  $('parked').hidden = !parked.length;
}

let renderPending = false;

/** Ask for a render: taps, messages and loads arriving in one frame cost one render, before its paint. */
function render() {
  if (renderPending) return;
  renderPending = true;
  const due = () => { if (renderPending) renderNow(); };
  requestAnimationFrame(due);
  setTimeout(due, 250);   // a hidden page gets no animation frames
}

function renderNow() {
  renderPending = false;
  const now = Date.now();
  setText($('family-name'), state.family ? state.family.name : 'babytrackd');
  document.title = state.family ? `${state.family.name} · babytrackd` : 'babytrackd';
  document.body.classList.toggle('read-only', readOnly());
  const locked = readOnly();
  for (const b of groupButtons) if (b.disabled !== locked) b.disabled = locked;
  $('note-save').disabled = locked;
  renderBanner();
  renderSync();
  renderStates(now);
  if (state.family) {   // a fresh phone's first paint needs no time zone work (its first use is slow)
    const day = shownDay(now);
    const list = dayEntries(day.start);
    renderTotals(day, list, now);
    renderNight(now);
    renderDay(now);
    renderLog(list);
  }
  renderNotes();
  renderMembers();
  document.documentElement.classList.add('shown');
}

let lastToday = 0;

/** Once a second: the timers and today's totals move; at midnight the whole day turns over. */
function tick() {
  const now = Date.now();
  const today = dayOf(now);
  if (today !== lastToday) {
    lastToday = today;
    return render();
  }
  renderStates(now);
  if (!state.shown) renderTotals(shownDay(now), dayEntries(today), now);
  if (state.family && Math.floor(now / 60000) !== Math.floor((now - 1000) / 60000)) renderNight(now);
  if (state.pausedUntil) renderSync();
}

let wakeLock = null;
let wakeWanted = false;
let wakePending = false;

/** Keep the screen on while a timer runs, where the browser allows it. */
async function keepAwake(want) {
  if (!('wakeLock' in navigator)) return;
  const changed = want !== wakeWanted;
  wakeWanted = want;
  if (!want && wakeLock) {
    const lock = wakeLock;
    wakeLock = null;
    lock.release().catch(() => {});
  } else if (want && !wakeLock && !wakePending && changed && document.visibilityState === 'visible') {
    wakePending = true;
    try {
      wakeLock = await navigator.wakeLock.request('screen');
      wakeLock.addEventListener('release', () => { wakeLock = null; });
      if (!wakeWanted) keepAwake(false);
    } catch (e) { /* refused (battery saver, no permission): the screen may sleep */ }
    wakePending = false;
  }
}

let toastTimer = null;
let undoAction = null;

function toast(text, undo = null) {
  $('toast-text').textContent = text;
  $('toast-undo').hidden = !undo;
  undoAction = undo;
  $('toast').hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $('toast').hidden = true; undoAction = null; }, UNDO_MS);
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

function logTap(category, label) {
  if (readOnly()) return;
  const entry = {id: newId(), ts: Date.now(), type: category, value: label, deleted: false,
    updated_at: 0, seq: 0, by: state.me && state.me.label ? state.me.label : 'this phone'};
  state.shown = 0;    // the tap shows where it went: today
  change(entry);
  toast(`Logged ${label} · ${clockText(entry.ts)}`, () => setDeleted(entry.id, true));
}

/** A parent's own note for today: an entry of type "note", never counted in totals. */
function addNote(event) {
  event.preventDefault();
  const text = $('note-text').value.trim();
  if (readOnly() || !text) return;
  state.shown = 0;
  change({id: newId(), ts: Date.now(), type: 'note', value: text.slice(0, 4000), deleted: false,
    updated_at: 0, seq: 0, by: state.me && state.me.label ? state.me.label : 'this phone'});
  $('note-text').value = '';
  toast('Note added');
}

/** Show the day before or after the shown one; older days than this phone holds are loaded. */
function showDay(step) {
  const now = Date.now();
  const {start, end} = shownDay(now);
  const next = step < 0 ? dayOf(start - 1) : end;
  state.shown = next >= dayOf(now) ? 0 : next;
  state.editing = null;
  state.older = '';
  renderNow();
  loadOlder();
}

function setDeleted(id, deleted) {
  const e = state.entries.get(id);
  if (!e || readOnly()) return;
  change({...e, deleted});
}

function removeEntry(id) {
  const e = state.entries.get(id);
  if (!e) return;
  state.editing = null;
  setDeleted(id, true);
  toast(`Deleted ${e.value} · ${clockText(e.ts)}`, () => setDeleted(id, false));
}

function saveTime(id, value) {
  const e = state.entries.get(id);
  const ts = e && editedTime(e, value);
  state.editing = null;
  if (e && ts !== null && ts !== e.ts) change({...e, ts});
  else renderNow();
}

function toggleEditor(id) {
  state.editing = state.editing === id ? null : id;
  renderNow();
}

function setNursery(on) {
  document.documentElement.classList.toggle('nursery', on);
  $('nursery').setAttribute('aria-pressed', String(on));
  const meta = document.querySelector('meta[name="theme-color"]');
  if (meta) meta.content = on ? '#0e0a09' : '#f5efe8';
}

function bindEvents() {
  setNursery(document.documentElement.classList.contains('nursery'));
  $('nursery').addEventListener('click', () => {
    const on = !document.documentElement.classList.contains('nursery');
    setNursery(on);
    try { localStorage.setItem('bt.nursery', on ? '1' : '0'); } catch (e) { /* not remembered */ }
  });
  $('toast-undo').addEventListener('click', () => {
    const undo = undoAction;
    $('toast').hidden = true;
    undoAction = null;
    if (undo) undo();
  });
  $('reload').addEventListener('click', () => location.reload());
  $('day-prev').addEventListener('click', () => showDay(-1));
  $('note-form').addEventListener('submit', addNote);
  watchNotes();
  $('day-next').addEventListener('click', () => showDay(1));
  window.addEventListener('online', () => { render(); reconnectNow(); if (state.older) { state.older = ''; loadOlder(); } });
  window.addEventListener('offline', () => { if (socket) dropSocket(); render(); });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState !== 'visible') return;
    wakeWanted = false;   // the lock was released while hidden: ask again
    render();
    if (socket) beat(); else reconnectNow();
  });
}

// ---------------------------------------------------------------------------------------------
// Boot
// ---------------------------------------------------------------------------------------------

function registerServiceWorker() {
  if (!('serviceWorker' in navigator)) return;
  const hadController = !!navigator.serviceWorker.controller;
  navigator.serviceWorker.addEventListener('controllerchange', () => {
    if (hadController) $('update').hidden = false;   // a new version took over: offer a reload
  });
  navigator.serviceWorker.register('/app/sw.js', {scope: '/app/'}).catch(() => {});
}

async function boot() {
  bindEvents();
  registerServiceWorker();
  try {
    db = await openDb();
    restore(await loadAll());
  } catch (e) {
    db = null;    // private mode or storage blocked: keep going from memory
  }
  renderButtons();
  renderNow();      // the shell and what this phone holds, before any network
  const alive = await checkLink();
  if (!state.family && state.link === 'unknown') state.link = 'none';
  renderButtons();
  render();
  if (alive) connect();
  setInterval(tick, 1000);
  heartbeat = setInterval(beat, HEARTBEAT_MS);
}

boot();
