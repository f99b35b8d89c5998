// The server's jobs (GET /jobs: queued and running ones, then the recent finished ones, from
// every client of the server): each fills the form from its record's `request` (form.js
// `fillFromRecord`), so a job sent by a script or another browser can be run again from here.
// Read when the page starts, after each of its own jobs, on "Refresh" and when the window
// regains focus.
import { $ } from './dom.js';
import { fillFromRecord } from './form.js';
import { api } from './http.js';

let listed = ''; // the list as last drawn, so an unchanged one leaves the rows alone

// The prompt a job was written with (before its styles went in).
function writtenPrompt(r) {
  return (r.styles && r.styles.length && r.as_written ? r.as_written.prompt : r.prompt) || '';
}

function row(job) {
  const r = job.request || {};
  const li = document.createElement('li');
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'link';
  const styles = r.styles && r.styles.length ? `, styles ${r.styles.join(', ')}` : '';
  button.textContent = writtenPrompt(r) || '(no prompt)';
  button.title = `Reuse the parameters of job ${job.id}`;
  button.addEventListener('click', () => fillFromRecord(r));
  const about = document.createElement('small');
  about.textContent = ` ${job.status}, seed ${r.seed}${styles}`;
  li.append(button, about);
  return li;
}

export async function refreshJobs() {
  let jobs;
  try {
    jobs = (await (await api('/jobs')).json()).jobs || [];
  } catch (_) {
    return; // no key yet, or the server is away: the list stays as it was
  }
  const drawn = JSON.stringify(jobs.map((j) => [j.id, j.status]));
  if (drawn === listed) return;
  listed = drawn;
  $('jobs').replaceChildren(...jobs.filter((j) => j.request).map(row));
  $('jobs-empty').hidden = jobs.length > 0;
}

export function initJobs() {
  $('refresh-jobs').addEventListener('click', refreshJobs);
  window.addEventListener('focus', () => { refreshJobs(); });
}
