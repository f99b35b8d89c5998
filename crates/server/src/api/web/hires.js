// The "Hires fix" section: the native `hires` object (a second pass at a larger size). Its
// size is a scale or a width and height, never both (the API refuses both); the pass may have
// its own scheduler (the server's list) and prompts.
import { $, numberOf, state } from './dom.js';
import { api } from './http.js';

// Number fields (`hires-strength`, ...) sent as the request's `hires` names them.
const HIRES_NUMBERS = ['strength', 'steps'];
// Text fields and the keys they fill; empty: the first pass's own (left out).
const HIRES_TEXTS = [['hires-prompt', 'prompt'], ['hires-negative', 'negative_prompt']];

const byScale = () => $('hires-by-scale').checked;

// The request's `hires`, or null when the section is off (or an init image is set).
export function hiresRequest() {
  if (!$('hires-on').checked || state.initImage) return null;
  const hires = { upscaler: $('hires-upscaler').value };
  const sizeKeys = byScale() ? ['scale'] : ['width', 'height'];
  for (const k of [...sizeKeys, ...HIRES_NUMBERS]) if (numberOf(`hires-${k}`) !== null) hires[k] = numberOf(`hires-${k}`);
  if ($('hires-scheduler').value) hires.scheduler = $('hires-scheduler').value;
  for (const [id, k] of HIRES_TEXTS) if ($(id).value.trim()) hires[k] = $(id).value;
  return hires;
}

// Sets the section from a result's `metadata.hires` (the second pass as it ran; null: none).
// Its width and height are the pass's size; `asked` (the page's own request's `hires`, when
// known) says whether that size was asked as a scale, which then comes back as one; with
// styles (`styled`) the pass's prompts come from it too (the metadata's are styled).
export function fillHires(hires, asked, styled) {
  $('hires-on').checked = Boolean(hires);
  if (!hires) return;
  const scale = asked && asked.scale !== undefined && asked.scale !== null ? asked.scale : null;
  $(scale !== null ? 'hires-by-scale' : 'hires-by-size').checked = true;
  if (scale !== null) $('hires-scale').value = scale;
  for (const k of ['width', 'height', ...HIRES_NUMBERS]) if (hires[k] !== undefined && hires[k] !== null) $(`hires-${k}`).value = hires[k];
  setOption($('hires-scheduler'), hires.scheduler || '');
  const texts = styled && asked ? asked : hires;
  for (const [id, k] of HIRES_TEXTS) $(id).value = texts[k] || '';
  setOption($('hires-upscaler'), hires.upscaler);
  $('hires-box').open = true;
  syncHires();
}

// How the result's parameters show `metadata.hires`.
export function hiresText(h) {
  const parts = [`${h.width}x${h.height}`, h.upscaler, `strength ${h.strength}`, `${h.steps} steps`];
  if (h.scheduler) parts.push(h.scheduler);
  if (h.prompt) parts.push(`prompt "${h.prompt}"`);
  if (h.negative_prompt) parts.push(`negative prompt "${h.negative_prompt}"`);
  return parts.join(', ');
}

// Text-to-image only (the server refuses hires with an init image): disabled, with a note,
// while one is set. Otherwise only the size fields of the chosen way are on.
export function syncHires() {
  const off = Boolean(state.initImage);
  for (const el of $('hires-box').querySelectorAll('input, select, textarea')) el.disabled = off;
  if (!off) {
    $('hires-scale').disabled = !byScale();
    for (const id of ['hires-width', 'hires-height']) $(id).disabled = byScale();
  }
  $('hires-off').hidden = !off;
  showScaleTarget();
}

// By scale: the size it gives (shown in the disabled Hires width and height too), and why the
// server would refuse it (each side must land exactly on a multiple of 64 in 256..768).
function showScaleTarget() {
  const [w, h, s] = [numberOf('width'), numberOf('height'), numberOf('hires-scale')];
  const hint = $('hires-target');
  if (!byScale() || state.initImage || w === null || h === null || s === null) { hint.textContent = ''; return; }
  const [tw, th] = [w * s, h * s];
  const fits = (t) => Number.isInteger(t) && t % 64 === 0 && t >= 256 && t <= 768;
  if (fits(tw) && fits(th)) {
    $('hires-width').value = tw;
    $('hires-height').value = th;
    hint.textContent = `${w}x${h} times ${s}: the image will be ${tw}x${th}.`;
  } else {
    hint.textContent = `${w}x${h} times ${s} is ${tw}x${th}: each side must come out a multiple of 64 in 256..768.`;
  }
}

// Selects an option by value, adding it when the server's list did not have it (yet).
function setOption(select, name) {
  if (![...select.options].some((o) => o.value === name)) select.add(new Option(name, name));
  select.value = name;
}

// Fills `select` with `names` after its first option (the "none chosen" one), keeping the choice.
function relist(select, names) {
  const chosen = select.value;
  select.replaceChildren(select.options[0], ...names.map((n) => new Option(n, n)));
  setOption(select, chosen);
}

// From the server (`doc` is its OpenAPI document): the upscalers are A1111's (its latent modes,
// then its image upscalers); the schedulers are the API's own names (SchedulerName), and the
// schedule types its SigmaScheduleName but `default` (the first option).
export async function loadHiresLists(doc) {
  const names = [];
  for (const path of ['/sdapi/v1/latent-upscale-modes', '/sdapi/v1/upscalers']) {
    if (!(doc.paths && doc.paths[path])) continue;
    const list = await (await api(path)).json();
    for (const item of list) if (item && item.name && !names.includes(item.name)) names.push(item.name);
  }
  if (names.length) {
    const select = $('hires-upscaler');
    const chosen = select.value;
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    setOption(select, chosen);
  }
  const schema = doc.components && doc.components.schemas && doc.components.schemas.SchedulerName;
  const schedulers = schema && Array.isArray(schema.enum) ? schema.enum : [];
  for (const id of ['scheduler', 'hires-scheduler']) if (schedulers.length) relist($(id), schedulers);
  const sigmas = doc.components && doc.components.schemas && doc.components.schemas.SigmaScheduleName;
  const schedules = sigmas && Array.isArray(sigmas.enum) ? sigmas.enum.filter((n) => n !== 'default') : [];
  if (schedules.length) relist($('schedule'), schedules);
}

export function initHires() {
  for (const id of ['hires-by-scale', 'hires-by-size']) $(id).addEventListener('change', syncHires);
  for (const id of ['width', 'height', 'hires-scale']) $(id).addEventListener('input', showScaleTarget);
  syncHires();
}
