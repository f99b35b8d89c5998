// sdserve's page: a form over POST /jobs, live state from GET /jobs/{id}/events, results and a
// history kept in this browser. Plain JavaScript modules, no build step, nothing loaded from
// elsewhere. This one starts the page; each part is a module of its own:
//   dom.js (shared state), http.js (calls, key, events), status.js (status, error, progress),
//   form.js (form <-> request), run.js (a job's run and result), images_in.js (init image and
//   mask), loras.js, hires.js (the hires fix), choices.js (model, VAE, embeddings), styles.js,
//   variation.js (clip skip and the variation seed), history.js, jobs.js (the server's jobs).
import { initChoices, startChoices } from './choices.js';
import { $, state } from './dom.js';
import { fillForm, fillFromRecord } from './form.js';
import { initHires, loadHiresLists } from './hires.js';
import { clearHistory, renderHistory } from './history.js';
import { api, KEY_STORE } from './http.js';
import { initImagesIn } from './images_in.js';
import { initJobs, refreshJobs } from './jobs.js';
import { initLoras, startLoras } from './loras.js';
import { cancel, generate } from './run.js';
import { setProgress, showError, showServer } from './status.js';
import { initStyles, startStyles } from './styles.js';
import { syncVariation } from './variation.js';

async function probeServer() {
  await showServer();
  try {
    await api('/jobs'); // 401 here shows the key field before the first Generate
    const doc = await (await api('/openapi.json')).json();
    await Promise.all([startLoras(doc), loadHiresLists(doc), startChoices(doc), startStyles(doc), refreshJobs()]);
  } catch (err) {
    if (err.status !== 401) showError(err);
  }
}

function init() {
  $('form').addEventListener('submit', generate);
  $('form').addEventListener('input', (e) => e.target.removeAttribute('aria-invalid')); // fixed
  $('cancel').addEventListener('click', cancel);
  // Ctrl+Enter in any of the prompts (a textarea, where Enter is a new line) generates.
  $('form').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && e.target.matches('textarea')) $('form').requestSubmit();
  });
  $('random-seed').addEventListener('click', () => { $('seed').value = ''; $('seed').focus(); });
  $('api-key').addEventListener('change', () => {
    sessionStorage.setItem(KEY_STORE, $('api-key').value.trim());
    probeServer();
  });
  $('api-key').value = sessionStorage.getItem(KEY_STORE) || '';
  initImagesIn();
  $('reuse').addEventListener('click', () => {
    if (state.resultRecord) fillFromRecord(state.resultRecord, state.asked);
    else if (state.result) fillForm(state.result.metadata || {}, state.asked);
  });
  initJobs();
  $('clear-history').addEventListener('click', clearHistory);
  initLoras();
  initHires();
  initChoices();
  initStyles();
  syncVariation();
  setProgress(0, 0);
  renderHistory();
  probeServer();
}

init();
