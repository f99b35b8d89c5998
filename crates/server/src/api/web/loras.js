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

// One row: tick and weight. A file that cannot be used is shown with its reason, disabled; one
// the list lacks (`missing`) with a note, still usable: the request names it, the server says.
function loraRow(lora, missing) {
  const row = document.createElement('div');
  row.className = 'lora';
  row.dataset.name = lora.name;
  const id = `lora-${lora.name.replace(/[^A-Za-z0-9_-]/g, '_')}`;
  row.innerHTML = `<input type="checkbox" id="${id}"><label for="${id}"></label><input type="number" step="0.05" min="-4" max="4" value="1">`;
  row.querySelector('label').textContent = lora.name;
  const check = row.querySelector('input[type=checkbox]');
  const weight = row.querySelector('input[type=number]');
  weight.setAttribute('aria-label', `Weight of ${lora.name}`);
  const why = lora.error || (missing ? 'not in the list of LORA_DIR now' : null);
  if (why) {
    check.disabled = weight.disabled = Boolean(lora.error);
    const note = document.createElement('small');
    note.className = 'lora-error';
    note.id = `${id}-error`;
    note.textContent = why;
    check.setAttribute('aria-describedby', note.id);
    row.appendChild(note);
  }
  return row;
}

// A row of the list by name, or a new one marked missing.
function rowFor(name) {
  const row = [...document.querySelectorAll('.lora')].find((r) => r.dataset.name === name);
  return row || $('loras').appendChild(loraRow({ name }, true));
}

// Ticks exactly `loras` ({name, weight}: a request's) and unticks the others.
export function setLoras(loras) {
  for (const row of document.querySelectorAll('.lora')) row.querySelector('input[type=checkbox]').checked = false;
  for (const lora of loras) {
    const row = rowFor(lora.name);
    if (row.querySelector('input[type=checkbox]').disabled) continue;
    row.querySelector('input[type=checkbox]').checked = true;
    row.querySelector('input[type=number]').value = lora.weight ?? 1;
  }
  if (loras.length) $('lora-box').hidden = false;
}

// Draws LORA_DIR's files as rows. Ticks and weights of rows that stay are kept; a ticked one
// whose file is gone stays too, marked (it would otherwise leave the request unseen).
async function loadLoras() {
  try {
    const body = await (await api('/loras')).json();
    const loras = Array.isArray(body) ? body : body.loras || [];
    const drawn = JSON.stringify(loras.map((l) => [l.name, l.error || null]));
    if (drawn === lorasDrawn) return;
    lorasDrawn = drawn;
    const ticked = selectedLoras();
    const weights = new Map([...document.querySelectorAll('.lora')].map((row) => [row.dataset.name, row.querySelector('input[type=number]').value]));
    $('loras').replaceChildren(...loras.map((lora) => loraRow(lora)));
    for (const [name, value] of weights) {
      const row = [...document.querySelectorAll('.lora')].find((r) => r.dataset.name === name);
      if (row && !row.querySelector('input[type=number]').disabled) row.querySelector('input[type=number]').value = value;
    }
    setLoras(ticked);
    $('lora-box').hidden = $('loras').children.length === 0;
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
