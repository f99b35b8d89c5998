// What the page tells the user while it works: the status line, the error box, the progress bar.
import { $ } from './dom.js';

// The header's line from /health: the model the worker holds (`loaded_model`: after a job on
// another MODELS_DIR model, that one, which made the result shown), else the default model's
// version; device, dtype, status. Called at start and after every job.
export async function showServer() {
  try {
    const health = await (await fetch('/health')).json();
    const model = (health.loaded_model && health.loaded_model.model_version) || health.model_version || 'model';
    $('server').textContent = `${model} · ${health.device || ''} ${health.dtype || ''} · ${health.status}`;
  } catch (_) {
    $('server').textContent = 'The server did not answer /health.';
  }
}

export function setBusy(busy) {
  $('generate').disabled = busy;
  $('cancel').disabled = !busy;
}

// The form's field for a request field a 422 names.
// Others are the name with `.` and `_` as `-` (`clip_skip`: clip-skip, `hires.scale`: hires-scale).
const FIELD_IDS = {
  negative_prompt: 'negative', guidance_scale: 'guidance', batch_size: 'batch', init_image: 'init',
  mask_image: 'mask', 'hires.negative_prompt': 'hires-negative',
};

function fieldOf(name) {
  const id = FIELD_IDS[name] || name.replace(/[._]/g, '-');
  const el = $(id);
  return el && el.matches('input, select, textarea') ? el : null;
}

// Shows `err` (null: clears the box). The fields a 422 names are marked invalid, described by
// the message, and the first one shown takes the focus (its section opened).
export function showError(err) {
  const box = $('error');
  for (const el of document.querySelectorAll('[aria-invalid]')) {
    el.removeAttribute('aria-invalid');
    if (el.getAttribute('aria-errormessage') === 'error') el.removeAttribute('aria-errormessage');
  }
  if (!err) { box.hidden = true; box.textContent = ''; return; }
  box.hidden = false;
  box.textContent = err.message || String(err);
  const fields = (err.body && Array.isArray(err.body.fields) ? err.body.fields : []).map((f) => fieldOf(String(f.field)));
  const marked = fields.filter((el) => el);
  for (const el of marked) {
    el.setAttribute('aria-invalid', 'true');
    el.setAttribute('aria-errormessage', 'error');
  }
  const first = marked.find((el) => !el.disabled && !el.closest('[hidden]'));
  if (!first) return;
  const section = first.closest('details');
  if (section) section.open = true;
  first.focus();
}

export function setStatus(text) { $('status').textContent = text; }

export function setProgress(step, total) {
  const bar = $('progress');
  bar.max = Math.max(total, 1);
  bar.value = Math.min(step, bar.max);
  bar.setAttribute('aria-valuetext', total ? `step ${step} of ${total}` : 'idle');
}

export function eta(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return '';
  return seconds < 1 ? ' · less than a second left' : ` · about ${Math.round(seconds)} s left`;
}
