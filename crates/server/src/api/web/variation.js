// Clip skip and A1111's variation seed (`variation_seed`, `variation_strength`): sent only
// when set, so an empty field is the server's default. The variation is text-to-image only
// (the server refuses it with an init image): off, with a note, while one is set.
import { $, numberOf, state } from './dom.js';

const VARIATION = [['variation-seed', 'variation_seed'], ['variation-strength', 'variation_strength']];

// Adds the fields that are set to `request`.
export function addExtras(request) {
  const clipSkip = numberOf('clip-skip');
  if (clipSkip !== null) request.clip_skip = clipSkip;
  if (state.initImage) return;
  for (const [id, key] of VARIATION) if (numberOf(id) !== null) request[key] = numberOf(id);
}

// From a result's metadata: the values that differ from the defaults (clip skip 1, no
// variation), the others emptied.
export function fillExtras(p) {
  $('clip-skip').value = p.clip_skip !== undefined && p.clip_skip !== null && p.clip_skip !== 1 ? p.clip_skip : '';
  const varied = p.variation_strength > 0;
  $('variation-seed').value = varied && p.variation_seed !== undefined && p.variation_seed !== null ? p.variation_seed : '';
  $('variation-strength').value = varied ? p.variation_strength : '';
}

export function syncVariation() {
  const off = Boolean(state.initImage);
  for (const [id] of VARIATION) $(id).disabled = off;
  $('variation-off').hidden = !off;
}
