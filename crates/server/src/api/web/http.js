// The page's calls to this server: an API key in a header (never in a URL), errors as the
// server words them, and job events read with fetch (an EventSource cannot send the header).
import { $ } from './dom.js';

export const KEY_STORE = 'sdserve.apiKey'; // sessionStorage: this tab only

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE) || '';
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// A 422's broken fields one a line ("field: rule"), else the body's details.
function detailsOf(body) {
  if (!body) return '';
  if (Array.isArray(body.fields) && body.fields.length) return body.fields.map((f) => `${f.field}: ${f.rule}`).join('\n');
  if (!body.details) return '';
  return typeof body.details === 'string' ? body.details : JSON.stringify(body.details);
}

export class HttpError extends Error {
  constructor(status, body) {
    const msg = body && body.error ? body.error : `HTTP ${status}`;
    const details = detailsOf(body);
    super(details ? `${msg}\n${details}` : msg);
    this.status = status;
    this.body = body;
  }
}

export async function api(path, options = {}) {
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
export async function readEvents(path, onEvent, signal) {
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
