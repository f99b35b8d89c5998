// What the server has to choose from, each shown only when it has something: the Model select
// (MODELS_DIR, `GET /models`), the VAE select (VAE_DIR, `GET /vaes`) and the embeddings
// (EMBEDDINGS_DIR, `GET /embeddings`) as buttons that write a name into a prompt. Read again
// when the window regains focus, so files dropped into the folders show up without a reload.
// An empty choice ("") leaves the field out of the request: the server's default.
import { $ } from './dom.js';
import { api } from './http.js';

const listed = { models: false, vaes: false, embeddings: false }; // in the OpenAPI document
let promptInUse = 'prompt'; // the prompt box an embedding goes into: the one last written in

// The request's `model` and `vae` (null: the default model, the model's own VAE).
export function chosenModel() { return $('model').value || null; }
export function chosenVae() { return $('vae').value || null; }

// Sets a select to `name` ("": its first option), adding an option for a name its list lacks
// (gone from the folder since): the request then names it and the server's 422 says why.
function choose(select, name, row) {
  if (![...select.options].some((o) => o.value === name)) select.add(new Option(`${name} (not listed now)`, name));
  select.value = name;
  if (name) { $(row).hidden = false; showCheckpointRow(); }
}

export function setModel(name) { choose($('model'), name || '', 'model-row'); }
export function setVae(name) { choose($('vae'), name || '', 'vae-row'); }

function showCheckpointRow() {
  $('checkpoint-row').hidden = $('model-row').hidden && $('vae-row').hidden;
}

// Replaces a select's options, keeping the choice; the row shows when there is a choice.
// An unchanged list leaves the select alone (it may be open or in use).
function relist(select, options, row) {
  const drawn = JSON.stringify(options);
  if (select.dataset.drawn === drawn) return;
  select.dataset.drawn = drawn;
  const chosen = select.value;
  select.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
  $(row).hidden = options.length < 2;
  choose(select, chosen, row);
  showCheckpointRow();
}

async function loadModels() {
  const body = await (await api('/models')).json();
  const others = (body.models || []).filter((m) => !m.default).map((m) => [m.name, m.name]);
  // The default model is the empty choice: requests without `model` run on it.
  relist($('model'), [['', `${body.default} (default)`], ...others], 'model-row');
}

async function loadVaes() {
  const body = await (await api('/vaes')).json();
  relist($('vae'), [['', "the model's own"], ...(body.vaes || []).map((v) => [v.name, v.name])], 'vae-row');
}

async function loadEmbeddings() {
  const body = await (await api('/embeddings')).json();
  const embeddings = body.embeddings || [];
  const box = $('embeddings');
  const drawn = JSON.stringify(embeddings.map((e) => [e.name, e.error || null]));
  if (box.dataset.drawn === drawn) return;
  box.dataset.drawn = drawn;
  box.replaceChildren();
  for (const e of embeddings) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'link embedding';
    button.textContent = e.name;
    // An embedding the model cannot use (another width): shown, disabled, with the reason.
    if (e.error) {
      button.disabled = true;
      button.title = e.error;
    } else {
      button.title = `Adds ${e.name} to the prompt last written in`;
      button.addEventListener('click', () => insertIntoPrompt(e.name));
    }
    box.append(button, ' ');
  }
  $('embeddings-row').hidden = embeddings.length === 0;
}

// Writes `name` at the cursor of the prompt box last written in, apart from its neighbours.
function insertIntoPrompt(name) {
  const box = $(promptInUse);
  const [start, end] = [box.selectionStart, box.selectionEnd];
  const before = box.value.slice(0, start);
  const after = box.value.slice(end);
  const lead = before && !/[\s,]$/.test(before) ? ', ' : '';
  const trail = after && !/^[\s,]/.test(after) ? ', ' : '';
  box.value = `${before}${lead}${name}${trail}${after}`;
  const caret = (before + lead + name).length;
  box.focus();
  box.setSelectionRange(caret, caret);
}

const LOADERS = { models: loadModels, vaes: loadVaes, embeddings: loadEmbeddings };

function loadAll() {
  return Promise.all(Object.keys(LOADERS).filter((k) => listed[k]).map((k) => LOADERS[k]()));
}

// Only what the server lists (`doc` is its OpenAPI document) is asked for: no 404 noise.
export async function startChoices(doc) {
  for (const k of Object.keys(listed)) listed[k] = Boolean(doc.paths && doc.paths[`/${k}`]);
  await loadAll();
}

export function initChoices() {
  for (const id of ['prompt', 'negative']) $(id).addEventListener('focus', () => { promptInUse = id; });
  window.addEventListener('focus', () => { loadAll().catch(() => {}); });
}
