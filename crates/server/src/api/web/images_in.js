// The init image and its mask: chosen as files, dropped, or taken from a result; the mask
// painted over the image or chosen as a file.
import { $, pngSrc, state } from './dom.js';
import { syncHires } from './hires.js';
import { setStatus, showError } from './status.js';
import { syncVariation } from './variation.js';

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export function loadImage(src) {
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
  syncVariation();
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
  syncVariation();
}

function clearMask() {
  const c = $('mask-canvas');
  c.getContext('2d').clearRect(0, 0, c.width, c.height);
  state.maskDrawn = false;
  $('mask-state').textContent = 'No mask painted.';
}

// The mask the request carries: a mask file wins; else the painted strokes as white on black.
export function maskForRequest() {
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

export function initImagesIn() {
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
}
