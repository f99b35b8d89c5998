// The session's results, kept in this browser: thumbnails that fill the form again.
import { $, pngSrc } from './dom.js';
import { fillForm, fillFromRecord } from './form.js';
import { loadImage } from './images_in.js';

const HISTORY_STORE = 'sdserve.history'; // localStorage: this browser
const HISTORY_MAX = 24;

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

// `asked`: the request as the page sent it (how the hires size was asked), less its images
// (large, and not brought back); `record`: the job record's `request` (a few hundred bytes:
// images by digest), which fills the form when kept (entries from before the page kept it
// fill it from `meta` and `asked`).
export async function addToHistory(b64, meta, asked, record) {
  const kept = asked ? { ...asked } : null;
  if (kept) { delete kept.init_image; delete kept.mask_image; }
  const entry = { thumb: await thumbnail(b64), meta: { ...meta }, asked: kept, record: record || null, at: Date.now() };
  const history = [entry, ...readHistory()].slice(0, HISTORY_MAX);
  try {
    localStorage.setItem(HISTORY_STORE, JSON.stringify(history));
  } catch (_) {
    localStorage.setItem(HISTORY_STORE, JSON.stringify(history.slice(0, 4))); // quota: keep a few
  }
  renderHistory();
}

export function renderHistory() {
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
    button.addEventListener('click', () => reuse(entry));
    li.appendChild(button);
    list.appendChild(li);
  }
}

function reuse(entry) {
  if (entry.record) fillFromRecord(entry.record, entry.asked);
  else fillForm(entry.meta, entry.asked);
}

export function clearHistory() {
  localStorage.removeItem(HISTORY_STORE);
  renderHistory();
}
