// The form as a request (the native /jobs body) and a result's parameters back into the form.
import { chosenModel, chosenVae, setModel, setVae } from './choices.js';
import { $, numberOf, state } from './dom.js';
import { fillHires, hiresRequest } from './hires.js';
import { maskForRequest } from './images_in.js';
import { selectedLoras, setLoras } from './loras.js';
import { selectedStyles, setStyles } from './styles.js';
import { addExtras, fillExtras } from './variation.js';

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
  const model = chosenModel();
  if (model) request.model = model;
  const vae = chosenVae();
  if (vae) request.vae = vae;
  const styles = selectedStyles();
  if (styles.length) request.styles = styles;
  addExtras(request);
  const loras = selectedLoras();
  if (loras.length) request.loras = loras;
  const hires = hiresRequest();
  if (hires) request.hires = hires;
  for (const k of Object.keys(request)) if (request[k] === null) delete request[k];
  return request;
}

// `p` is a result's metadata (also as kept in the history); `asked` what the page sent for it,
// when known (entries from before the page kept it have at most its `hires`): it says how the
// hires size was asked, the model, the styles and the LoRAs ticked (not in the metadata as
// such), and the prompts as written (the metadata's have the styles' texts in them, which
// ticking the styles again would add twice).
export function fillForm(p, asked) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  const styles = (asked && asked.styles) || [];
  const written = styles.length ? asked : p;
  $('prompt').value = written.prompt || '';
  $('negative').value = written.negative_prompt || '';
  setStyles(styles);
  // The LoRAs ticked (the metadata's also hold the prompt's tags, which the prompt brings back).
  setLoras((asked && asked.loras) || []);
  setModel(asked && asked.model);
  setVae(p.vae);
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
  fillExtras(p);
  fillHires(p.hires, asked && asked.hires, styles.length > 0);
  $('prompt').focus();
}

// The LoRAs of a job record's `request` that its prompt as written and its styles do not bring
// back: `as_written.loras`, those the request listed in `loras` (the record's `loras` also hold
// the tags of the prompt and of the styles, by file name where a tag named an alias). Records of
// servers from before it: each tag of `prompt` takes one entry of its name out.
function lorasBesideTags(r, written) {
  if (Array.isArray(written.loras)) return written.loras;
  const left = [...(r.loras || [])];
  for (const [, name] of written.prompt.matchAll(/<lora:([^:>]+)(?::[^>]*)?>/g)) {
    const i = left.findLastIndex((l) => l.name === name.trim());
    if (i >= 0) left.splice(i, 1);
  }
  return left;
}

// How the hires size was asked: the record's `hires.scale` (null: by width and height), else
// (records from before it) the page's copy of what it sent, `sent`.
function hiresScale(r, sent) {
  if (r.hires && r.hires.scale !== undefined) return r.hires.scale;
  return sent && sent.hires ? sent.hires.scale : null;
}

// A job record's `request` (GET /jobs/{id}: the validated request as it ran, its prompts
// styled, `styles` and `as_written` the prompts before the styles went in) into the form.
// The record, not the page's copy of what it sent, so a job from any client, or a reloaded
// page, comes back as it ran; with styles, the prompts as written are filled in and the
// styles ticked, so the next run styles them once. The hires size comes back as it was
// asked: by scale or by width and height.
export function fillFromRecord(r, sent) {
  const written = (r.styles && r.styles.length && r.as_written) || null;
  const prompt = written ? written.prompt : r.prompt;
  const loras = written ? lorasBesideTags(r, written) : r.loras || [];
  const asked = {
    styles: written ? r.styles : [],
    prompt,
    negative_prompt: written ? written.negative_prompt : r.negative_prompt,
    loras,
    model: r.model,
    hires: { ...((written && written.hires) || {}), scale: hiresScale(r, sent) },
  };
  fillForm(r, asked);
}
