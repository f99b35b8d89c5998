// Clip skip, A1111's variation seed (`variation_seed`, `variation_strength`) and seed resize
// (`seed_resize_from_width`, `_height`): sent only when set, so an empty field is the server's
// default (a resize with one side only is the server's 422, which marks the field). The
// variation is text-to-image only (the server refuses it with an init image): off, with a
// note, while one is set.
import { $, numberOf, state } from './dom.js';

const VARIATION = [['variation-seed', 'variation_seed'], ['variation-strength', 'variation_strength']];
const SEED_RESIZE = [['seed-resize-from-width', 'seed_resize_from_width'], ['seed-resize-from-height', 'seed_resize_from_height']];

// Adds the fields that are set to `request`.
export function addExtras(request) {
  const clipSkip = numberOf('clip-skip');
  if (clipSkip !== null) request.clip_skip = clipSkip;
  for (const [id, key] of SEED_RESIZE) if (numberOf(id) !== null) request[key] = numberOf(id);
  if (state.initImage) return;
  for (const [id, key] of VARIATION) if (numberOf(id) !== null) request[key] = numberOf(id);
}

const given = (v) => v !== undefined && v !== null;

// From a result's metadata: the values that differ from the defaults (clip skip 1, no
// variation, no resize), the others emptied; their section open when one is set.
export function fillExtras(p) {
  $('clip-skip').value = given(p.clip_skip) && p.clip_skip !== 1 ? p.clip_skip : '';
  const varied = p.variation_strength > 0;
  $('variation-seed').value = varied && given(p.variation_seed) ? p.variation_seed : '';
  $('variation-strength').value = varied ? p.variation_strength : '';
  for (const [id, key] of SEED_RESIZE) $(id).value = given(p[key]) ? p[key] : '';
  if ([...VARIATION, ...SEED_RESIZE].some(([id]) => $(id).value !== '')) $('seed-extras').open = true;
}

export function syncVariation() {
  const off = Boolean(state.initImage);
  for (const [id] of VARIATION) $(id).disabled = off;
  $('variation-off').hidden = !off;
}
