// The "Hires fix" section: the native `hires` object (a second pass at a larger size).
import { $, numberOf, state } from './dom.js';
import { api } from './http.js';

// The hires fix's number fields (`hires-width`, ...), as the request's `hires` names them.
const HIRES_NUMBERS = ['width', 'height', 'strength', 'steps'];

// The request's `hires`, or null when the section is off (or an init image is set).
export function hiresRequest() {
  if (!$('hires-on').checked || state.initImage) return null;
  const hires = { upscaler: $('hires-upscaler').value };
  for (const k of HIRES_NUMBERS) if (numberOf(`hires-${k}`) !== null) hires[k] = numberOf(`hires-${k}`);
  return hires;
}

// Sets the section from a result's `metadata.hires` (the second pass as it ran; null: none).
export function fillHires(hires) {
  $('hires-on').checked = Boolean(hires);
  if (!hires) return;
  for (const k of HIRES_NUMBERS) if (hires[k] !== undefined && hires[k] !== null) $(`hires-${k}`).value = hires[k];
  setUpscaler(hires.upscaler);
  $('hires-box').open = true;
}

// How the result's parameters show `metadata.hires`.
export function hiresText(h) {
  return `${h.width}x${h.height}, ${h.upscaler}, strength ${h.strength}, ${h.steps} steps`;
}

// Text-to-image only (the server refuses hires with an init image): disabled, with a note, while one is set.
export function syncHires() {
  for (const el of $('hires-box').querySelectorAll('input, select')) el.disabled = Boolean(state.initImage);
  $('hires-off').hidden = !state.initImage;
}

// Selects the upscaler by name, adding it when the server's list did not have it (yet).
function setUpscaler(name) {
  const select = $('hires-upscaler');
  if (![...select.options].some((o) => o.value === name)) select.add(new Option(name, name));
  select.value = name;
}

// The hires fix's upscalers are A1111's: its latent modes, then its image upscalers.
export async function loadUpscalers(doc) {
  const names = [];
  for (const path of ['/sdapi/v1/latent-upscale-modes', '/sdapi/v1/upscalers']) {
    if (!(doc.paths && doc.paths[path])) continue;
    const list = await (await api(path)).json();
    for (const item of list) if (item && item.name && !names.includes(item.name)) names.push(item.name);
  }
  if (!names.length) return;
  const select = $('hires-upscaler');
  const chosen = select.value;
  select.replaceChildren(...names.map((n) => new Option(n, n)));
  setUpscaler(chosen);
}
