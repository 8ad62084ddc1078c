/* Apply the remembered nursery (dark) mode before the first paint, so the screen never flashes. */
'use strict';
(function () {
  let choice = null;
  try { choice = localStorage.getItem('bt.nursery'); } catch (e) { /* storage blocked: follow the system */ }
  const dark = choice === null ? matchMedia('(prefers-color-scheme: dark)').matches : choice === '1';
  document.documentElement.classList.toggle('nursery', dark);
}());
