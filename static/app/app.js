/* babytrackd — the parents' app.
 *
 * Offline-first: every tap is written to IndexedDB and shown at once, then waits in an outbox
 * until the server echoes it back over the WebSocket (shared/CONTRACT.md §5). The outbox holds
 * one item per entry id: the entry's latest full local state. The cursor is the highest `seq`
 * seen; a reconnect asks for `since=<cursor>` and so receives exactly what it missed.
 *
 * Chapters, each using only those above it:
 *   State · Time · Storage · Sync · Rendering · Events · Boot
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

const state = {
  family: null,          // {id, name, tz} — the last answer of /app/me, kept in IndexedDB
  me: null,              // {label, expires_at}
  config: DEFAULT_CONFIG,
  entries: new Map(),    // id -> {id, ts, type, value, deleted, updated_at, seq, by}
  outbox: new Map(),     // id -> {entry: full local state, base: last server copy or null, queued_at}
  cursor: 0,             // highest seq seen
  members: [],           // labels of the devices online now
  link: 'ok',            // 'ok' | 'dead' (revoked, expired, archived) | 'none' (never opened a link)
  conn: 'offline',       // 'offline' | 'connecting' | 'open'
  ready: false,          // the current socket's init has been applied
  editing: null,         // id of the entry whose time editor is open
};

function liveEntries() {
  return [...state.entries.values()].filter((e) => !e.deleted);
}

/** The current state of a stateful category: its latest live entry by ts, or null. */
function currentState(category) {
  let best = null;
  for (const e of state.entries.values()) {
    if (e.deleted || e.type !== category) continue;
    if (!best || e.ts > best.ts || (e.ts === best.ts && e.id > best.id)) best = e;
  }
  return best;
}

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
// Time: days and clocks in the family's time zone (the server's summary rules, CONTRACT §6)
// ---------------------------------------------------------------------------------------------

const partsFormats = new Map();

function familyTz() {
  const tz = state.family && state.family.tz;
  try {
    if (tz) { new Intl.DateTimeFormat('en', {timeZone: tz}); return tz; }
  } catch (e) { /* an unknown zone: fall back to UTC */ }
  return 'UTC';
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
  return new Intl.DateTimeFormat(undefined, {timeZone: familyTz(), hour: 'numeric', minute: '2-digit'})
    .format(ms);
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

/** Minutes spent today in the counted states of a stateful category; an open state counts to now. */
function countedMinutes(category, from, to) {
  const group = state.config.find((g) => g.category === category && g.stateful);
  if (!group) return 0;
  const counted = new Set(group.buttons.filter((b) => b.counted).map((b) => b.label));
  const list = liveEntries().filter((e) => e.type === category)
    .sort((a, b) => a.ts - b.ts || (a.id < b.id ? -1 : 1));
  let ms = 0;
  list.forEach((e, i) => {
    if (!counted.has(e.value)) return;
    const stop = Math.min(i + 1 < list.length ? list[i + 1].ts : to, to);
    const begin = Math.max(e.ts, from);
    if (stop > begin) ms += stop - begin;
  });
  return Math.round(ms / 60000);
}

function todayTotals(now) {
  const {start, end} = dayBounds(familyTz(), now);
  const totals = {sleep_minutes: countedMinutes('sleep', start, Math.min(end, now)), feeds: 0, wet: 0, dirty: 0};
  for (const e of liveEntries()) {
    if (e.ts < start || e.ts >= end) continue;
    if (e.type === 'feed') totals.feeds += 1;
    const nappy = e.type === 'nappy' ? e.value.toLowerCase() : '';
    if (nappy.includes('wet')) totals.wet += 1;
    if (nappy.includes('dirty')) totals.dirty += 1;
  }
  return totals;
}

// ---------------------------------------------------------------------------------------------
// Storage: IndexedDB holds the family, the config, the entries, the outbox and the cursor
// ---------------------------------------------------------------------------------------------

let db = null;   // stays null when IndexedDB is unavailable: the app then works from memory

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open('babytrackd', 1);
    req.onupgradeneeded = () => {
      req.result.createObjectStore('meta');
      req.result.createObjectStore('entries', {keyPath: 'id'});
      req.result.createObjectStore('outbox', {keyPath: 'id'});
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
  const tx = db.transaction(['meta', 'entries', 'outbox']);
  const [meta, entries, outbox] = await Promise.all([loadMeta(tx), loadStore(tx, 'entries'), loadStore(tx, 'outbox')]);
  return {meta, entries, outbox};
}

/** Write one batch of changes in a single transaction:
 *  {meta: {key: value}, entries: [entry], drop: [id], outbox: [item], unqueue: [id], clear: bool} */
function save(change) {
  if (!db) return Promise.resolve();
  return new Promise((resolve) => {
    const tx = db.transaction(['meta', 'entries', 'outbox'], 'readwrite');
    if (change.clear) ['meta', 'entries', 'outbox'].forEach((s) => tx.objectStore(s).clear());
    for (const [k, v] of Object.entries(change.meta || {})) tx.objectStore('meta').put(v, k);
    for (const e of change.entries || []) tx.objectStore('entries').put(e);
    for (const id of change.drop || []) tx.objectStore('entries').delete(id);
    for (const item of change.outbox || []) tx.objectStore('outbox').put({id: item.entry.id, ...item});
    for (const id of change.unqueue || []) tx.objectStore('outbox').delete(id);
    tx.oncomplete = () => resolve();
    tx.onerror = tx.onabort = () => resolve();   // the change is still in memory; the outbox is re-sent later
  });
}

function restore({meta, entries, outbox}) {
  state.family = meta.family || null;
  state.me = meta.me || null;
  state.config = cleanConfig(meta.config);
  state.cursor = meta.cursor || 0;
  state.link = meta.link || 'ok';
  for (const e of entries) state.entries.set(e.id, e);
  outbox.sort((a, b) => a.queued_at - b.queued_at);
  for (const item of outbox) state.outbox.set(item.id, {entry: item.entry, base: item.base, queued_at: item.queued_at});
}

// ---------------------------------------------------------------------------------------------
// Sync: the socket, the outbox and the cursor
// ---------------------------------------------------------------------------------------------

let socket = null;
let retries = 0;
let retryTimer = null;
let heartbeat = null;
let lastHeard = 0;

const wireFields = (e) => ({id: e.id, ts: e.ts, type: e.type, value: e.value, deleted: e.deleted, updated_at: e.updated_at});
const sameFields = (a, b) => a.ts === b.ts && a.type === b.type && a.value === b.value && !!a.deleted === !!b.deleted;

/** Record a local change: memory and screen first, then IndexedDB, then the server. */
function change(entry) {
  const prev = state.entries.get(entry.id);
  entry.updated_at = Math.max(Date.now(), prev ? prev.updated_at + 1 : 0);
  const queued = state.outbox.get(entry.id);
  const item = {entry: wireFields(entry), base: queued ? queued.base : prev || null, queued_at: queued ? queued.queued_at : Date.now()};
  state.entries.set(entry.id, entry);
  state.outbox.set(entry.id, item);
  render();
  save({entries: [entry], outbox: [item]}).then(() => { if (state.outbox.get(entry.id) === item) send(item); });
}

function send(item) {
  if (!socket || !state.ready || socket.readyState !== WebSocket.OPEN) return;
  socket.send(JSON.stringify({type: 'entry', action: 'update', entry: item.entry}));
}

function flushOutbox() {
  for (const item of state.outbox.values()) send(item);
}

/** Apply an entry from the server (`stale`: its answer that our write lost). Returns the entry to
 *  store, or null when the local copy stays. */
function applyRemote(e, stale = false) {
  const item = state.outbox.get(e.id);
  if (item) {
    if (e.updated_at >= item.entry.updated_at || sameFields(e, item.entry) || stale) {
      state.outbox.delete(e.id);             // acknowledged (or overtaken by a newer write)
    } else {
      item.base = e;                          // an older write echoed: ours is still on its way
      return null;
    }
  } else {
    const local = state.entries.get(e.id);
    if (local && local.seq && e.seq && e.seq < local.seq) return null;
  }
  state.entries.set(e.id, e);
  return e;
}

function advanceCursor(seq) {
  if (Number.isInteger(seq) && seq > state.cursor) state.cursor = seq;
}

function onInit(msg) {
  const stored = [];
  for (const e of msg.entries || []) {
    if (applyRemote(e)) stored.push(e);
    advanceCursor(e.seq);
  }
  // init.cursor is the server's newest seq; below ours it means a restored backup: follow it.
  if (Number.isInteger(msg.cursor)) state.cursor = msg.cursor;
  state.config = cleanConfig(msg.config);
  state.members = Array.isArray(msg.members) ? msg.members : [];
  state.ready = true;
  retries = 0;
  save({entries: stored, unqueue: stored.map((e) => e.id), meta: {cursor: state.cursor, config: state.config}});
  renderButtons();
  render();
  flushOutbox();
}

function onMessage(msg) {
  lastHeard = Date.now();
  if (msg.type === 'init') return onInit(msg);
  if (msg.type === 'entry' && msg.entry) {
    const stored = applyRemote(msg.entry, msg.stale === true);
    advanceCursor(msg.entry.seq);
    save({entries: stored ? [stored] : [], unqueue: stored ? [stored.id] : [], meta: {cursor: state.cursor}});
    render();
  } else if (msg.type === 'config') {
    state.config = cleanConfig(msg.data);
    save({meta: {config: state.config}});
    renderButtons();
    render();
  } else if (msg.type === 'presence') {
    state.members = Array.isArray(msg.members) ? msg.members : [];
    renderMembers();
  } else if (msg.type === 'error') {
    if (msg.id) refused(msg.id);
    toast(`Not saved: ${msg.error || 'the server refused a change'}`);
  }
}

/** The server will never accept this change: drop it and go back to the server's copy. */
function refused(id) {
  const item = state.outbox.get(id);
  if (!item) return;
  state.outbox.delete(id);
  if (item.base) state.entries.set(id, item.base);
  else state.entries.delete(id);
  save(item.base ? {unqueue: [id], entries: [item.base]} : {unqueue: [id], drop: [id]});
  render();
}

function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (socket || state.link !== 'ok' || !state.family || !navigator.onLine) return renderSync();
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const url = `${proto}//${location.host}/ws?family=${encodeURIComponent(state.family.id)}&since=${state.cursor}`;
  const ws = new WebSocket(url);
  let opened = false;
  socket = ws;
  lastHeard = Date.now();
  state.conn = 'connecting';
  ws.onopen = () => {
    opened = true;
    lastHeard = Date.now();
    state.conn = 'open';
    renderSync();
  };
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    if (msg && typeof msg === 'object') onMessage(msg);
  };
  ws.onclose = (ev) => {
    if (socket !== ws) return;
    dropSocket();
    if (ev.code === 4403 || ev.code === 1008) return linkDead();
    if (opened) return retryLater();
    checkLink().then((alive) => { if (alive) retryLater(); });
  };
  renderSync();
}

function dropSocket() {
  const ws = socket;
  socket = null;
  state.conn = 'offline';
  state.ready = false;
  state.members = [];
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
    if (state.family && state.family.id !== me.family.id) await forgetFamily();
    state.family = me.family;
    state.me = {label: me.label, expires_at: me.expires_at};
    state.link = 'ok';
    save({meta: {family: state.family, me: state.me, link: 'ok'}});
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

/** A link for another family replaced ours: its data is not ours to show. */
async function forgetFamily() {
  if (socket) dropSocket();
  state.entries.clear();
  state.outbox.clear();
  state.cursor = 0;
  state.config = DEFAULT_CONFIG;
  await save({clear: true});
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

const stateViews = new Map();   // category -> {label, timer, since, buttons: Map(label -> button)}
const groupButtons = [];        // every logging button, to enable/disable at once
let builtFor = '';              // the config and family the buttons were built for

function readOnly() {
  return state.link !== 'ok' || !state.family;
}

/** Build the button groups; done only when the config (or the link) changes, so taps are never lost. */
function renderButtons() {
  const key = JSON.stringify([state.family && state.family.id, state.config]);
  if (key === builtFor) return;
  builtFor = key;
  const root = $('groups');
  root.replaceChildren();
  stateViews.clear();
  groupButtons.length = 0;
  if (!state.family) return;
  state.config.forEach((group, i) => {
    const section = el('section', {className: `group tone-${i % 4}`, 'data-category': group.category});
    section.append(el('h2', {textContent: group.category}));
    const buttons = el('div', {className: 'buttons'});
    const byLabel = new Map();
    for (const b of group.buttons) {
      const button = el('button', {type: 'button', className: 'log-button', textContent: b.label});
      button.addEventListener('click', () => logTap(group.category, b.label));
      byLabel.set(b.label, button);
      groupButtons.push(button);
      buttons.append(button);
    }
    if (group.stateful) {
      const view = {label: el('span', {className: 'state-label'}), timer: el('span', {className: 'timer'}),
        since: el('span', {className: 'since'}), buttons: byLabel};
      section.append(el('div', {className: 'state-card'}, view.label, view.timer, view.since));
      stateViews.set(group.category, view);
    }
    section.append(buttons);
    root.append(section);
  });
}

function renderStates(now) {
  let timing = false;
  for (const [category, view] of stateViews) {
    const current = currentState(category);
    const button = current && buttonOf(category, current.value);
    view.label.textContent = current ? current.value : `No ${category} logged yet`;
    view.timer.textContent = current && button && button.timing ? durationText(now - current.ts) : '';
    view.since.textContent = current ? `since ${clockText(current.ts)} · ${current.by || 'this phone'}` : '';
    for (const [label, b] of view.buttons) b.setAttribute('aria-pressed', String(!!current && current.value === label));
    timing = timing || !!(current && button && button.timing);
  }
  keepAwake(timing);
}

function renderTotals(now) {
  const t = todayTotals(now);
  $('total-sleep').textContent = minutesText(t.sleep_minutes);
  $('total-feeds').textContent = String(t.feeds);
  $('total-wet').textContent = String(t.wet);
  $('total-dirty').textContent = String(t.dirty);
}

const rows = new Map();   // entry id -> <li>, reused so a tap in progress survives a re-render

function renderLog(now) {
  const {start, end} = dayBounds(familyTz(), now);
  const today = liveEntries().filter((e) => e.ts >= start && e.ts < end)
    .sort((a, b) => b.ts - a.ts || (a.id < b.id ? 1 : -1));
  const list = $('log');
  const keep = new Set(today.map((e) => e.id));
  for (const [id, li] of rows) if (!keep.has(id)) { li.remove(); rows.delete(id); }
  if (state.editing && !keep.has(state.editing)) state.editing = null;
  today.forEach((e, i) => {
    let li = rows.get(e.id);
    if (!li) {
      li = el('li', {className: 'entry'});
      const row = el('button', {type: 'button', className: 'entry-row', ariaExpanded: 'false'},
        el('span', {className: 'time'}), el('span', {className: 'what'}), el('span', {className: 'by'}));
      row.addEventListener('click', () => toggleEditor(e.id));
      li.append(row);
      rows.set(e.id, li);
    }
    const [time, what, by] = li.firstChild.children;
    time.textContent = clockText(e.ts);
    const tone = state.config.findIndex((g) => g.category === e.type);
    what.replaceChildren(el('span', {className: `dot${tone < 0 ? '' : ` tone-${tone % 4}`}`}),
      el('span', {className: 'value', textContent: e.value}), el('span', {className: 'type', textContent: ` (${e.type})`}));
    const waiting = state.outbox.has(e.id);
    by.textContent = waiting ? 'waiting to sync' : e.by || '';
    li.classList.toggle('waiting', waiting);
    li.firstChild.disabled = readOnly();
    li.firstChild.setAttribute('aria-expanded', String(state.editing === e.id));
    const editor = li.querySelector('.editor');
    if (state.editing === e.id && !editor) li.append(buildEditor(e));
    if (state.editing !== e.id && editor) editor.remove();
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
  });
  $('log-empty').hidden = today.length > 0;
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

function renderMembers() {
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
  if (!state.family || state.link === 'none') [text, mode] = ['Not set up', 'offline'];
  else if (state.link !== 'ok') [text, mode] = ['Read-only', 'dead'];
  else if (!navigator.onLine || state.conn === 'offline') [text, mode] = [`Offline${queue || ' · saved on this phone'}`, 'offline'];
  else if (state.conn === 'connecting') [text, mode] = [`Connecting…${queue}`, 'syncing'];
  else if (!state.ready || waiting) [text, mode] = [`Syncing${queue}`, 'syncing'];
  else [text, mode] = ['Online · all saved', 'online'];
  const sync = $('sync');
  sync.textContent = text;
  sync.dataset.mode = mode;
}

function renderBanner() {
  const banner = $('banner');
  const text = state.link === 'dead' ? DEAD_LINK : state.link === 'none' || !state.family ? NO_LINK : '';
  banner.textContent = text;
  banner.hidden = !text;
}

function render() {
  const now = Date.now();
  $('family-name').textContent = state.family ? state.family.name : 'babytrackd';
  document.title = state.family ? `${state.family.name} · babytrackd` : 'babytrackd';
  document.body.classList.toggle('read-only', readOnly());
  for (const b of groupButtons) b.disabled = readOnly();
  renderBanner();
  renderSync();
  renderStates(now);
  renderTotals(now);
  renderLog(now);
  renderMembers();
}

let shownDay = 0;

/** Once a second: the timers and the totals move; at midnight the whole day turns over. */
function tick() {
  const now = Date.now();
  const {start} = dayBounds(familyTz(), now);
  if (start !== shownDay) {
    shownDay = start;
    return render();
  }
  renderStates(now);
  renderTotals(now);
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
  change(entry);
  toast(`Logged ${label} · ${clockText(entry.ts)}`, () => setDeleted(entry.id, true));
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
  else render();
}

function toggleEditor(id) {
  state.editing = state.editing === id ? null : id;
  render();
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
  window.addEventListener('online', () => { render(); reconnectNow(); });
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
  render();
  const alive = await checkLink();
  renderButtons();
  render();
  if (alive) connect();
  setInterval(tick, 1000);
  heartbeat = setInterval(beat, HEARTBEAT_MS);
}

boot();
