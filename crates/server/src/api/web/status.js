// What the page tells the user while it works: the status line, the error box, the progress bar.
import { $ } from './dom.js';

export function setBusy(busy) {
  $('generate').disabled = busy;
  $('cancel').disabled = !busy;
}

export function showError(err) {
  const box = $('error');
  if (!err) { box.hidden = true; box.textContent = ''; return; }
  box.hidden = false;
  box.textContent = err.message || String(err);
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
