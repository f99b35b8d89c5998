// Prompt styles (STYLES_FILE, `GET /styles`): a row per style with what it adds to the
// prompts. The request's `styles` is a list in order (A1111 applies them in turn), so the
// page keeps the order in which they were ticked. Read again when the list is opened or the
// window regains focus: the server reads the file on every request, so edits count at once.
import { $ } from './dom.js';
import { api } from './http.js';

let stylesListed = false; // the server lists styles (GET /styles is in its OpenAPI document)
let stylesDrawn = null; // the list as last drawn, so an unchanged one leaves the rows alone
let ticked = []; // names in the order they were ticked

// The request's `styles`: the ticked names in the order ticked.
export function selectedStyles() {
  return [...ticked];
}

// Ticks exactly `names`, in that order (a result's styles); a name the list lacks (the file
// changed since) gets a row of its own, so the request still names it and the server says why.
export function setStyles(names) {
  ticked = [];
  for (const row of $('styles').querySelectorAll('.style')) row.querySelector('input').checked = false;
  for (const name of names) {
    let row = rowOf(name);
    if (!row) row = addRow({ name, prompt: '', negative_prompt: '' }, 'not in the styles file now');
    row.querySelector('input').checked = true;
    ticked.push(name);
  }
  if (names.length) $('styles-box').hidden = false;
  showChosen();
}

function rowOf(name) {
  return [...$('styles').querySelectorAll('.style')].find((row) => row.dataset.name === name);
}

function showChosen() {
  $('styles-chosen').textContent = ticked.length ? `: ${ticked.join(', ')}` : '';
}

// What a style adds, as the user reads it.
function describe(style) {
  const parts = [];
  if (style.prompt.trim()) parts.push(`prompt: ${style.prompt}`);
  if (style.negative_prompt.trim()) parts.push(`negative prompt: ${style.negative_prompt}`);
  return parts.length ? parts.join(' · ') : 'adds nothing';
}

function addRow(style, problem) {
  const n = $('styles').querySelectorAll('.style').length;
  const id = `style-${n}`;
  const row = document.createElement('div');
  row.className = 'style';
  row.dataset.name = style.name;
  const check = document.createElement('input');
  check.type = 'checkbox';
  check.id = id;
  const label = document.createElement('label');
  label.htmlFor = id;
  label.textContent = style.name;
  const adds = document.createElement('small');
  adds.id = `${id}-adds`;
  adds.textContent = problem || describe(style);
  if (problem) adds.className = 'style-error';
  check.setAttribute('aria-describedby', adds.id);
  check.addEventListener('change', () => {
    ticked = ticked.filter((name) => name !== style.name);
    if (check.checked) ticked.push(style.name);
    showChosen();
  });
  row.append(check, label, adds);
  $('styles').appendChild(row);
  return row;
}

async function loadStyles() {
  const body = await (await api('/styles')).json();
  const styles = Array.isArray(body.styles) ? body.styles : [];
  const drawn = JSON.stringify([styles, body.error || null]);
  if (drawn === stylesDrawn) return;
  stylesDrawn = drawn;
  const kept = [...ticked];
  $('styles').replaceChildren();
  for (const style of styles) addRow(style);
  // A file that cannot be read: no styles, and why (the server's words).
  $('styles-error').hidden = !body.error;
  $('styles-error').textContent = body.error ? `The styles file cannot be used: ${body.error}` : '';
  $('styles-box').hidden = styles.length === 0 && !body.error;
  setStyles(kept); // a ticked style gone from the file stays ticked, marked as gone
}

// Only a server that lists styles (`doc` is its OpenAPI document) is asked for them.
export async function startStyles(doc) {
  stylesListed = Boolean(doc.paths && doc.paths['/styles']);
  if (stylesListed) await loadStyles();
}

export function initStyles() {
  const relist = () => { if (stylesListed) loadStyles().catch(() => {}); };
  window.addEventListener('focus', relist);
  $('styles-box').addEventListener('toggle', () => { if ($('styles-box').open) relist(); });
}
