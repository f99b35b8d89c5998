// Running a job: POST /jobs, its events until it ends, cancel, and the result shown.
import { $, pngSrc, state } from './dom.js';
import { buildRequest } from './form.js';
import { hiresText } from './hires.js';
import { addToHistory } from './history.js';
import { refreshJobs } from './jobs.js';
import { api, HttpError, KEY_STORE, readEvents } from './http.js';
import { eta, setBusy, setProgress, setStatus, showError, showServer } from './status.js';

export async function generate(event) {
  event.preventDefault();
  showError(null);
  if (state.job) return;
  const key = $('api-key').value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  const request = buildRequest();
  if (!request.prompt.trim()) {
    showError(new Error('Write a prompt first.'));
    $('prompt').focus();
    return;
  }
  setBusy(true);
  setProgress(0, request.steps || 1);
  setStatus('Submitting…');
  $('preview').hidden = true;
  try {
    const response = await api('/jobs', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(request),
    });
    const job = await response.json();
    state.job = job.id;
    state.request = request;
    state.record = null;
    await follow(job.id);
  } catch (err) {
    if (err.name !== 'AbortError') showError(err);
    setStatus('Idle.');
  } finally {
    state.job = null;
    state.abort = null;
    setBusy(false);
  }
}

function follow(id) {
  state.abort = new AbortController();
  let ended = false;
  const onEvent = (type, data) => {
    switch (type) {
      case 'state':
        if (data.request) state.record = data.request; // the job record's: what it runs
        if (data.status === 'queued') setStatus(`Queued, position ${data.position ?? '?'}.`);
        if (data.loading) setStatus(`Loading the model ${data.loading}…`);
        if (data.progress) setProgress(data.progress.step, data.progress.total);
        if (data.status === 'succeeded' && data.result) { finish(data.result); ended = true; return false; }
        if (data.status === 'failed' && data.error) { showError(new HttpError(0, data.error)); ended = true; return false; }
        if (data.status === 'cancelled') { cancelled(); ended = true; return false; }
        break;
      case 'queued': setStatus(`Queued, position ${data.position}.`); break;
      case 'started': setStatus('Started.'); break;
      case 'loading': setStatus(`Loading the model ${data.model}…`); break;
      case 'progress':
        setProgress(data.step, data.total);
        setStatus(`Step ${data.step} of ${data.total}${eta(data.eta_seconds)}`);
        break;
      case 'preview':
        $('preview').src = data.image_base64.startsWith('data:') ? data.image_base64 : `data:image/png;base64,${data.image_base64}`;
        $('preview').hidden = false;
        break;
      case 'succeeded': finish(data.result); ended = true; return false;
      case 'failed': showError(new HttpError(0, data.error)); setStatus('Failed.'); ended = true; return false;
      case 'cancelled': cancelled(); ended = true; return false;
      default: break;
    }
    return true;
  };
  return readEvents(`/jobs/${encodeURIComponent(id)}/events`, onEvent, state.abort.signal).then(() => {
    if (!ended) throw new Error('The event stream closed before the job ended.');
  });
}

function cancelled() {
  setStatus('Cancelled.');
  $('preview').hidden = true;
}

export async function cancel() {
  if (!state.job) return;
  $('cancel').disabled = true;
  setStatus('Cancelling…');
  try {
    await api(`/jobs/${encodeURIComponent(state.job)}`, { method: 'DELETE' });
  } catch (err) {
    showError(err);
  }
}

function finish(result) {
  showServer(); // the worker holds the model that made it now
  state.result = result;
  state.asked = state.request;
  state.resultRecord = state.record;
  const meta = result.metadata || {};
  const images = result.images && result.images.length ? result.images : [result.image_base64];
  setProgress($('progress').max, $('progress').max);
  setStatus(`Done in ${meta.generation_time_seconds !== undefined ? meta.generation_time_seconds.toFixed(1) + ' s' : 'time unknown'}.`);
  $('preview').hidden = true;
  const box = $('results');
  box.replaceChildren();
  images.forEach((b64, i) => {
    const img = document.createElement('img');
    img.src = pngSrc(b64);
    img.alt = i === 0 ? 'Generated image' : `Generated image ${i + 1}`;
    box.appendChild(img);
  });
  const dl = $('params');
  dl.replaceChildren();
  const shown = ['prompt', 'negative_prompt', 'styles', 'seed', 'seeds', 'variation_seed', 'variation_strength', 'seed_resize_from_width', 'seed_resize_from_height', 'steps', 'width', 'height', 'image_width', 'image_height', 'guidance_scale', 'scheduler', 'schedule', 'clip_skip', 'mode', 'strength', 'hires', 'tiling', 'batch_size', 'model', 'model_version', 'vae', 'generation_time_seconds'];
  // The model and styles as asked (the metadata names neither); defaults left unsaid.
  const asked = state.asked || {};
  const values = { ...meta, model: asked.model, styles: asked.styles };
  const quiet = { clip_skip: 1, variation_strength: 0, tiling: false };
  const text = (k, v) => {
    if (k === 'hires') return hiresText(v);
    return Array.isArray(v) ? v.join(', ') : String(v);
  };
  for (const k of shown) {
    const v = values[k];
    if (v === undefined || v === null || v === '' || v === quiet[k] || (Array.isArray(v) && !v.length)) continue;
    const dt = document.createElement('dt');
    dt.textContent = k.replace(/_/g, ' ');
    const dd = document.createElement('dd');
    dd.textContent = text(k, v);
    dl.append(dt, dd);
  }
  $('download').href = pngSrc(images[0]);
  $('download').download = `sdserve-${meta.seed ?? 'image'}.png`;
  $('result-box').hidden = false;
  addToHistory(images[0], meta, state.asked, state.record);
  refreshJobs();
}
