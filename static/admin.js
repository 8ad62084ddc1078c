// babytrackd admin pages: small progressive helpers. Every page works without this file.
'use strict';

document.addEventListener('DOMContentLoaded', () => {
  // Copy buttons: <button data-copy="input-id" hidden> next to a read-only input.
  for (const button of document.querySelectorAll('button[data-copy]')) {
    const input = document.getElementById(button.dataset.copy);
    if (!input) continue;
    button.hidden = false;
    button.addEventListener('click', async () => {
      try {
        await navigator.clipboard.writeText(input.value);
      } catch (error) {  // no clipboard API (plain http): select it so Ctrl+C works
        input.focus();
        input.select();
        document.execCommand('copy');
      }
      button.textContent = 'Copied';
      setTimeout(() => { button.textContent = 'Copy'; }, 2000);
    });
  }

  // Read-only inputs select their whole value on focus, ready to copy by hand.
  for (const input of document.querySelectorAll('input[readonly]')) {
    input.addEventListener('focus', () => input.select());
  }

  // Forms that ask first: <form data-confirm="Question?">.
  for (const form of document.querySelectorAll('form[data-confirm]')) {
    form.addEventListener('submit', (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }

  // A select that reveals a field only for its "date" choice: <select data-reveal="element-id">.
  for (const select of document.querySelectorAll('select[data-reveal]')) {
    const target = document.getElementById(select.dataset.reveal);
    const update = () => { target.hidden = select.value !== 'date'; };
    select.addEventListener('change', update);
    update();
  }

  for (const button of document.querySelectorAll('button[data-print]')) {
    button.hidden = false;
    button.addEventListener('click', () => window.print());
  }
});
