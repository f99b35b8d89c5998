// The LoRA list: LORA_DIR's files as rows (tick and weight), read again when the list is
// opened or the window regains focus, so files dropped in show up without a reload.
import { $ } from './dom.js';
import { api } from './http.js';

// The LoRA list as last drawn (names and errors), so a refresh that finds it unchanged
// leaves the rows (and the focus in them) alone.
let lorasDrawn = null;
let lorasListed = false; // the server lists LoRAs (GET /loras is in its OpenAPI document)

// The ticked rows as the request's `loras`.
export function selectedLoras() {
  return [...document.querySelectorAll('.lora')]
    .filter((row) => row.querySelector('input[type=checkbox]').checked)
    .map((row) => ({ name: row.dataset.name, weight: Number(row.querySelector('input[type=number]').value) }));
}

// Draws LORA_DIR's files as rows. Ticks and weights of rows that stay are kept; a file that
// cannot be used is shown with its reason, disabled.
async function loadLoras() {
  try {
    const body = await (await api('/loras')).json();
    const loras = Array.isArray(body) ? body : body.loras || [];
    const drawn = JSON.stringify(loras.map((l) => [l.name, l.error || null]));
    if (drawn === lorasDrawn) return;
    lorasDrawn = drawn;
    const box = $('loras');
    const kept = new Map([...box.querySelectorAll('.lora')].map((row) => [row.dataset.name, {
      checked: row.querySelector('input[type=checkbox]').checked,
      weight: row.querySelector('input[type=number]').value,
    }]));
    box.replaceChildren();
    for (const lora of loras) {
      const row = document.createElement('div');
      row.className = 'lora';
      row.dataset.name = lora.name;
      const id = `lora-${lora.name.replace(/[^A-Za-z0-9_-]/g, '_')}`;
      row.innerHTML = `<input type="checkbox" id="${id}"><label for="${id}"></label><input type="number" step="0.05" min="-4" max="4" value="1">`;
      row.querySelector('label').textContent = lora.name;
      const check = row.querySelector('input[type=checkbox]');
      const weight = row.querySelector('input[type=number]');
      weight.setAttribute('aria-label', `Weight of ${lora.name}`);
      const before = kept.get(lora.name);
      if (before) {
        check.checked = before.checked;
        weight.value = before.weight;
      }
      if (lora.error) {
        check.checked = false;
        check.disabled = true;
        weight.disabled = true;
        const why = document.createElement('small');
        why.className = 'lora-error';
        why.id = `${id}-error`;
        why.textContent = lora.error;
        check.setAttribute('aria-describedby', why.id);
        row.appendChild(why);
      }
      box.appendChild(row);
    }
    $('lora-box').hidden = loras.length === 0;
  } catch (err) {
    if (err.status !== 404) throw err; // a server without LoRA support has no /loras
  }
}

// Only a server that lists LoRAs (`doc` is its OpenAPI document) is asked for them: no 404 noise.
export async function startLoras(doc) {
  lorasListed = Boolean(doc.paths && doc.paths['/loras']);
  if (lorasListed) await loadLoras();
}

export function initLoras() {
  // LoRA files dropped into LORA_DIR while the page is open (the user comes back from the file
  // manager; or opens the list) show up without a reload.
  const relistLoras = () => { if (lorasListed) loadLoras().catch(() => {}); };
  window.addEventListener('focus', relistLoras);
  $('lora-box').addEventListener('toggle', () => { if ($('lora-box').open) relistLoras(); });
}
