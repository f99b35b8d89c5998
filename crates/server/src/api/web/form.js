// The form as a request (the native /jobs body) and a result's parameters back into the form.
import { $, numberOf, state } from './dom.js';
import { fillHires, hiresRequest } from './hires.js';
import { maskForRequest } from './images_in.js';
import { selectedLoras } from './loras.js';

export function buildRequest() {
  const request = {
    prompt: $('prompt').value,
    negative_prompt: $('negative').value,
    steps: numberOf('steps'),
    width: numberOf('width'),
    height: numberOf('height'),
    guidance_scale: numberOf('guidance'),
  };
  const seed = numberOf('seed');
  if (seed !== null) request.seed = seed;
  const scheduler = $('scheduler').value;
  if (scheduler) request.scheduler = scheduler;
  const schedule = $('schedule').value;
  if (schedule) request.schedule = schedule;
  const batch = numberOf('batch');
  if (batch !== null && batch !== 1) request.batch_size = batch;
  if ($('tiling').checked) request.tiling = true;
  if (state.initImage) {
    request.init_image = state.initImage;
    request.strength = numberOf('strength');
    const mask = maskForRequest();
    if (mask) request.mask_image = mask;
  }
  const loras = selectedLoras();
  if (loras.length) request.loras = loras;
  const hires = hiresRequest();
  if (hires) request.hires = hires;
  for (const k of Object.keys(request)) if (request[k] === null) delete request[k];
  return request;
}

// `p` is a result's metadata (also as kept in the history); `asked` what the page sent for it,
// when known (it says how the hires size was asked).
export function fillForm(p, asked) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  set('prompt', p.prompt);
  set('negative', p.negative_prompt);
  set('steps', p.steps);
  set('width', p.width);
  set('height', p.height);
  set('guidance', p.guidance_scale);
  set('seed', p.seed);
  set('batch', p.batch_size);
  $('tiling').checked = p.tiling === true;
  if (p.scheduler !== undefined) $('scheduler').value = p.scheduler || '';
  // The schedule the run used: with its scheduler, always a pair the server accepts.
  if (p.schedule !== undefined) $('schedule').value = p.schedule || '';
  if (p.strength !== undefined && p.strength !== null) $('strength').value = p.strength;
  fillHires(p.hires, asked && asked.hires);
  $('prompt').focus();
}
