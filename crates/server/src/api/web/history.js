// The session's results, kept in this browser: thumbnails that fill the form again.
import { $, pngSrc } from './dom.js';
import { fillForm } from './form.js';
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

// `asked`: the request as the page sent it (how the hires size was asked, the model, the
// styles, the prompts as written), less its images (large, and not brought back).
export async function addToHistory(b64, meta, asked) {
  const kept = asked ? { ...asked } : null;
  if (kept) { delete kept.init_image; delete kept.mask_image; }
  const entry = { thumb: await thumbnail(b64), meta: { ...meta }, asked: kept, at: Date.now() };
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
    button.addEventListener('click', () => fillForm(entry.meta, entry.asked));
    li.appendChild(button);
    list.appendChild(li);
  }
}

export function clearHistory() {
  localStorage.removeItem(HISTORY_STORE);
  renderHistory();
}
