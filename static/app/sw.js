/* babytrackd — the parents' app service worker.
 *
 * Caches the app shell under a versioned name: the shell is served cache-first, so the app opens
 * with no network at all; /app/me and /ws always go to the network (the app keeps their data in
 * IndexedDB). Bump VERSION whenever a shell file changes: the browser then installs this worker
 * afresh, it fetches the new shell, takes over, and deletes every older cache.
 */
'use strict';

const VERSION = '2026-11-30.3';
const CACHE = `babytrackd-app-${VERSION}`;
const SHELL = [
  '/app/',
  '/app/app.js',
  '/app/theme.js',
  '/app/app.css',
  '/app/manifest.webmanifest',
  '/app/icon.svg',
  '/app/moon.svg',
  '/app/icon-192.png',
  '/app/icon-512.png',
];

self.addEventListener('install', (event) => {
  event.waitUntil(
    caches.open(CACHE)
      .then((cache) => cache.addAll(SHELL.map((url) => new Request(url, {cache: 'reload'}))))
      .then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    caches.keys()
      .then((names) => Promise.all(names
        .filter((name) => name.startsWith('babytrackd-app-') && name !== CACHE)
        .map((name) => caches.delete(name))))
      .then(() => self.clients.claim()));
});

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== location.origin) return;
  if (url.pathname === '/app/me' || url.pathname === '/ws') return;
  if (event.request.mode === 'navigate' && url.pathname.startsWith('/app/')) {
    event.respondWith(fromCache('/app/', event.request));
  } else if (SHELL.includes(url.pathname)) {
    event.respondWith(fromCache(url.pathname, event.request));
  }
});

/** The cached copy of a shell file, or the network's when the cache lost it. */
async function fromCache(path, request) {
  const cached = await caches.match(path, {cacheName: CACHE});
  return cached || fetch(request);
}
