// sdserve's page: a form over POST /jobs, live state from GET /jobs/{id}/events, results and a
// history kept in this browser. Plain JavaScript, no build step, nothing loaded from elsewhere.
// Events are read with fetch (not EventSource) so that an API key can travel in a header: keys
// never go into URLs.
'use strict';

const $ = (id) => document.getElementById(id);
const KEY_STORE = 'sdserve.apiKey'; // sessionStorage: this tab only
const HISTORY_STORE = 'sdserve.history'; // localStorage: this browser
const HISTORY_MAX = 24;

const state = {
  job: null, // id of the job this page is following
  abort: null, // AbortController of its event stream
  initImage: null, // data URL of the init image
  initSize: null, // {width, height}
  maskDrawn: false,
  maskFile: null, // data URL of a chosen mask file (wins over painting)
  result: null, // the last result body (GET /jobs/{id}.result)
  request: null, // what the page asked for that result
};

// ---------- HTTP ----------

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE) || '';
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class HttpError extends Error {
  constructor(status, body) {
    const msg = body && body.error ? body.error : `HTTP ${status}`;
    super(body && body.details ? `${msg}\n${typeof body.details === 'string' ? body.details : JSON.stringify(body.details)}` : msg);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (response.status === 401) {
    askForKey();
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new HttpError(401, { error: 'This server needs an API key: enter it in the "API key" field and try again.', details: body && body.error });
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new HttpError(response.status, body);
  }
  return response;
}

function askForKey() {
  $('key-row').hidden = false;
  if (!$('api-key').value) $('api-key').focus();
}

// Reads a text/event-stream body: calls onEvent(type, data) per event until the stream ends.
async function readEvents(path, onEvent, signal) {
  const response = await api(path, { signal, headers: { Accept: 'text/event-stream' } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? '' : line.slice(colon + 1);
        if (text.startsWith(' ')) text = text.slice(1);
        if (field === 'event') type = text;
        else if (field === 'data') data.push(text);
      }
      if (data.length === 0) continue;
      let parsed = null;
      try { parsed = JSON.parse(data.join('\n')); } catch (_) { parsed = data.join('\n'); }
      if (onEvent(type, parsed) === false) return;
    }
  }
}

// ---------- the form ----------

function numberOf(id) {
  const v = $(id).value.trim();
  return v === '' ? null : Number(v);
}

// The hires fix's number fields (`hires-width`, ...), as the request's `hires` names them.
const HIRES_NUMBERS = ['width', 'height', 'strength', 'steps'];

function buildRequest() {
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
  const batch = numberOf('batch');
  if (batch !== null && batch !== 1) request.batch_size = batch;
  if (state.initImage) {
    request.init_image = state.initImage;
    request.strength = numberOf('strength');
    const mask = maskForRequest();
    if (mask) request.mask_image = mask;
  }
  const loras = [...document.querySelectorAll('.lora')]
    .filter((row) => row.querySelector('input[type=checkbox]').checked)
    .map((row) => ({ name: row.dataset.name, weight: Number(row.querySelector('input[type=number]').value) }));
  if (loras.length) request.loras = loras;
  if ($('hires-on').checked && !state.initImage) {
    request.hires = { upscaler: $('hires-upscaler').value };
    for (const k of HIRES_NUMBERS) if (numberOf(`hires-${k}`) !== null) request.hires[k] = numberOf(`hires-${k}`);
  }
  for (const k of Object.keys(request)) if (request[k] === null) delete request[k];
  return request;
}

function fillForm(p) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  set('prompt', p.prompt);
  set('negative', p.negative_prompt);
  set('steps', p.steps);
  set('width', p.width);
  set('height', p.height);
  set('guidance', p.guidance_scale);
  set('seed', p.seed);
  set('batch', p.batch_size);
  if (p.scheduler !== undefined) $('scheduler').value = p.scheduler || '';
  if (p.strength !== undefined && p.strength !== null) $('strength').value = p.strength;
  // metadata.hires is the second pass as it ran (null: none).
  $('hires-on').checked = Boolean(p.hires);
  if (p.hires) {
    for (const k of HIRES_NUMBERS) set(`hires-${k}`, p.hires[k]);
    setUpscaler(p.hires.upscaler);
    $('hires-box').open = true;
  }
  $('prompt').focus();
}

// ---------- running a job ----------

function setBusy(busy) {
  $('generate').disabled = busy;
  $('cancel').disabled = !busy;
}

function showError(err) {
  const box = $('error');
  if (!err) { box.hidden = true; box.textContent = ''; return; }
  box.hidden = false;
  box.textContent = err.message || String(err);
}

function setStatus(text) { $('status').textContent = text; }

function setProgress(step, total) {
  const bar = $('progress');
  bar.max = Math.max(total, 1);
  bar.value = Math.min(step, bar.max);
  bar.setAttribute('aria-valuetext', total ? `step ${step} of ${total}` : 'idle');
}

function eta(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return '';
  return seconds < 1 ? ' · less than a second left' : ` · about ${Math.round(seconds)} s left`;
}

async function generate(event) {
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
        if (data.status === 'queued') setStatus(`Queued, position ${data.position ?? '?'}.`);
        if (data.progress) setProgress(data.progress.step, data.progress.total);
        if (data.status === 'succeeded' && data.result) { finish(data.result); ended = true; return false; }
        if (data.status === 'failed' && data.error) { showError(new HttpError(0, data.error)); ended = true; return false; }
        if (data.status === 'cancelled') { cancelled(); ended = true; return false; }
        break;
      case 'queued': setStatus(`Queued, position ${data.position}.`); break;
      case 'started': setStatus('Started.'); break;
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

async function cancel() {
  if (!state.job) return;
  $('cancel').disabled = true;
  setStatus('Cancelling…');
  try {
    await api(`/jobs/${encodeURIComponent(state.job)}`, { method: 'DELETE' });
  } catch (err) {
    showError(err);
  }
}

function pngSrc(b64) { return `data:image/png;base64,${b64}`; }

function finish(result) {
  state.result = result;
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
  const shown = ['prompt', 'negative_prompt', 'seed', 'seeds', 'steps', 'width', 'height', 'guidance_scale', 'scheduler', 'mode', 'strength', 'hires', 'batch_size', 'model_version', 'generation_time_seconds'];
  const text = (k, v) => {
    if (k === 'hires') return `${v.width}x${v.height}, ${v.upscaler}, strength ${v.strength}, ${v.steps} steps`;
    return Array.isArray(v) ? v.join(', ') : String(v);
  };
  for (const k of shown) {
    if (meta[k] === undefined || meta[k] === null || meta[k] === '') continue;
    const dt = document.createElement('dt');
    dt.textContent = k.replace(/_/g, ' ');
    const dd = document.createElement('dd');
    dd.textContent = text(k, meta[k]);
    dl.append(dt, dd);
  }
  $('download').href = pngSrc(images[0]);
  $('download').download = `sdserve-${meta.seed ?? 'image'}.png`;
  $('result-box').hidden = false;
  addToHistory(images[0], meta);
}

// ---------- init image and mask ----------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error('That file is not an image this browser can read.'));
    img.src = src;
  });
}

async function setInitImage(dataUrl) {
  const img = await loadImage(dataUrl);
  state.initImage = dataUrl;
  state.initSize = { width: img.naturalWidth, height: img.naturalHeight };
  for (const id of ['init-canvas', 'mask-canvas']) {
    $(id).width = img.naturalWidth;
    $(id).height = img.naturalHeight;
  }
  $('init-canvas').getContext('2d').drawImage(img, 0, 0);
  clearMask();
  $('canvas-box').hidden = false;
  $('images-in').open = true;
  // Empty width and height: the server sizes the output from the init image (DESIGN §1).
  for (const id of ['width', 'height']) { $(id).value = ''; $(id).placeholder = 'from the image'; }
  setStatus(`Init image ${img.naturalWidth}x${img.naturalHeight}: the output takes its size unless you set one.`);
  syncHires();
}

function clearInit() {
  state.initImage = null;
  state.initSize = null;
  $('init').value = '';
  $('mask').value = '';
  state.maskFile = null;
  clearMask();
  $('canvas-box').hidden = true;
  for (const id of ['width', 'height']) { if ($(id).value === '') $(id).value = 512; $(id).placeholder = ''; }
  syncHires();
}

function clearMask() {
  const c = $('mask-canvas');
  c.getContext('2d').clearRect(0, 0, c.width, c.height);
  state.maskDrawn = false;
  $('mask-state').textContent = 'No mask painted.';
}

// The mask the request carries: a mask file wins; else the painted strokes as white on black.
function maskForRequest() {
  if (state.maskFile) return state.maskFile;
  if (!state.maskDrawn) return null;
  const src = $('mask-canvas');
  const out = document.createElement('canvas');
  out.width = src.width;
  out.height = src.height;
  const ctx = out.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(src, 0, 0);
  return out.toDataURL('image/png');
}

function setUpPainting() {
  const c = $('mask-canvas');
  let drawing = false;
  const point = (e) => {
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) * (c.width / r.width), (e.clientY - r.top) * (c.height / r.height)];
  };
  const dab = (e) => {
    const ctx = c.getContext('2d');
    const [x, y] = point(e);
    const radius = (Number($('brush').value) / 2) * (c.width / c.getBoundingClientRect().width);
    ctx.fillStyle = '#fff';
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.fill();
    state.maskDrawn = true;
    $('mask-state').textContent = 'Mask painted: white is repainted.';
  };
  c.addEventListener('pointerdown', (e) => {
    if (!$('paint').checked) return;
    drawing = true;
    c.setPointerCapture(e.pointerId);
    dab(e);
  });
  c.addEventListener('pointermove', (e) => { if (drawing) dab(e); });
  c.addEventListener('pointerup', () => { drawing = false; });
  c.addEventListener('pointercancel', () => { drawing = false; });
}

// ---------- history ----------

function readHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_STORE)) || []; } catch (_) { return []; }
}

async function thumbnail(b64) {
  const img = await loadImage(pngSrc(b64));
  const c = document.createElement('canvas');
  const scale = 128 / Math.max(img.naturalWidth, img.naturalHeight);
  c.width = Math.max(1, Math.round(img.naturalWidth * scale));
  c.height = Math.max(1, Math.round(img.naturalHeight * scale));
  c.getContext('2d').drawImage(img, 0, 0, c.width, c.height);
  return c.toDataURL('image/jpeg', 0.8);
}

async function addToHistory(b64, meta) {
  const entry = { thumb: await thumbnail(b64), meta: { ...meta }, at: Date.now() };
  const history = [entry, ...readHistory()].slice(0, HISTORY_MAX);
  try {
    localStorage.setItem(HISTORY_STORE, JSON.stringify(history));
  } catch (_) {
    localStorage.setItem(HISTORY_STORE, JSON.stringify(history.slice(0, 4))); // quota: keep a few
  }
  renderHistory();
}

function renderHistory() {
  const list = $('history');
  list.replaceChildren();
  for (const entry of readHistory()) {
    const li = document.createElement('li');
    const button = document.createElement('button');
    button.type = 'button';
    button.title = `Reuse: ${entry.meta.prompt} (seed ${entry.meta.seed})`;
    const img = document.createElement('img');
    img.src = entry.thumb;
    img.alt = 'Earlier result';
    const caption = document.createElement('span');
    caption.textContent = entry.meta.prompt;
    button.append(img, caption);
    button.addEventListener('click', () => fillForm(entry.meta));
    li.appendChild(button);
    list.appendChild(li);
  }
}

// ---------- start ----------

// The LoRA list as last drawn (names and errors), so a refresh that finds it unchanged
// leaves the rows (and the focus in them) alone.
let lorasDrawn = null;
let lorasListed = false; // the server lists LoRAs (GET /loras is in its OpenAPI document)

// Draws LORA_DIR's files as rows; the server picks up files dropped in without a restart, so
// this runs again when the window regains focus and when the list is opened. Ticks and weights
// of rows that stay are kept; a file that cannot be used is shown with its reason, disabled.
async function loadLoras() {
  try {
    const body = await (await api('/loras')).json();
    const loras = Array.isArray(body) ? body : body.loras || [];
    const drawn = JSON.stringify(loras.map((l) => [l.name, l.error || null]));
    if (drawn === lorasDrawn) return;
    lorasDrawn = drawn;
    const box = $('loras');
    const kept = new Map([...box.querySelectorAll('.lora')].map((row) => [row.dataset.name, {
      checked: row.querySelector('input[type=checkbox]').checked,
      weight: row.querySelector('input[type=number]').value,
    }]));
    box.replaceChildren();
    for (const lora of loras) {
      const row = document.createElement('div');
      row.className = 'lora';
      row.dataset.name = lora.name;
      const id = `lora-${lora.name.replace(/[^A-Za-z0-9_-]/g, '_')}`;
      row.innerHTML = `<input type="checkbox" id="${id}"><label for="${id}"></label><input type="number" step="0.05" min="-4" max="4" value="1">`;
      row.querySelector('label').textContent = lora.name;
      const check = row.querySelector('input[type=checkbox]');
      const weight = row.querySelector('input[type=number]');
      weight.setAttribute('aria-label', `Weight of ${lora.name}`);
      const before = kept.get(lora.name);
      if (before) {
        check.checked = before.checked;
        weight.value = before.weight;
      }
      if (lora.error) {
        check.checked = false;
        check.disabled = true;
        weight.disabled = true;
        const why = document.createElement('small');
        why.className = 'lora-error';
        why.id = `${id}-error`;
        why.textContent = lora.error;
        check.setAttribute('aria-describedby', why.id);
        row.appendChild(why);
      }
      box.appendChild(row);
    }
    $('lora-box').hidden = loras.length === 0;
  } catch (err) {
    if (err.status !== 404) throw err; // a server without LoRA support has no /loras
  }
}

// ---------- hires fix ----------

// Text-to-image only (the server refuses hires with an init image): disabled, with a note, while one is set.
function syncHires() {
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
async function loadUpscalers(doc) {
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

async function probeServer() {
  try {
    const health = await (await fetch('/health')).json();
    $('server').textContent = `${health.model_version || 'model'} · ${health.device || ''} ${health.dtype || ''} · ${health.status}`;
  } catch (_) {
    $('server').textContent = 'The server did not answer /health.';
  }
  try {
    await api('/jobs'); // 401 here shows the key field before the first Generate
    // Only a server that lists LoRAs is asked for them (no 404 noise otherwise).
    const doc = await (await api('/openapi.json')).json();
    lorasListed = Boolean(doc.paths && doc.paths['/loras']);
    if (lorasListed) await loadLoras();
    await loadUpscalers(doc);
  } catch (err) {
    if (err.status !== 401) showError(err);
  }
}

function init() {
  $('form').addEventListener('submit', generate);
  $('cancel').addEventListener('click', cancel);
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) $('form').requestSubmit();
  });
  $('random-seed').addEventListener('click', () => { $('seed').value = ''; $('seed').focus(); });
  $('api-key').addEventListener('change', () => {
    sessionStorage.setItem(KEY_STORE, $('api-key').value.trim());
    probeServer();
  });
  $('api-key').value = sessionStorage.getItem(KEY_STORE) || '';
  $('init').addEventListener('change', async () => {
    const file = $('init').files[0];
    if (file) setInitImage(await readFile(file)).catch(showError);
  });
  $('mask').addEventListener('change', async () => {
    const file = $('mask').files[0];
    state.maskFile = file ? await readFile(file) : null;
  });
  $('clear-mask').addEventListener('click', clearMask);
  $('clear-init').addEventListener('click', clearInit);
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', async (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    const file = e.dataTransfer.files[0];
    if (file) setInitImage(await readFile(file)).catch(showError);
  });
  setUpPainting();
  $('use-init').addEventListener('click', () => {
    if (state.result) setInitImage(pngSrc(state.result.image_base64)).catch(showError);
  });
  $('reuse').addEventListener('click', () => { if (state.result) fillForm(state.result.metadata || {}); });
  $('clear-history').addEventListener('click', () => { localStorage.removeItem(HISTORY_STORE); renderHistory(); });
  // LoRA files dropped into LORA_DIR while the page is open (the user comes back from the file
  // manager; or opens the list) show up without a reload.
  const relistLoras = () => { if (lorasListed) loadLoras().catch(() => {}); };
  window.addEventListener('focus', relistLoras);
  $('lora-box').addEventListener('toggle', () => { if ($('lora-box').open) relistLoras(); });
  setProgress(0, 0);
  renderHistory();
  probeServer();
}

init();
