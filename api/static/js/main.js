// The dashboard's entry point: the API key gate, the navigation, and a hash router over the views.
//   #/jobs                           jobs list              (views/jobs.js)
//   #/jobs/<id>                      one job                (views/job.js)
//   #/new[?file=<id>][&model=<id>]   new job with estimate  (views/new-job.js)
//   #/files                          upload and datasets    (views/files.js)

import { api, clearKey, getKey, setKey } from './api.js';
import { $, h, replace } from './dom.js';

const VIEWS = {
  jobs: () => import('./views/jobs.js'),
  job: () => import('./views/job.js'),
  new: () => import('./views/new-job.js'),
  files: () => import('./views/files.js'),
};

let cleanup = null; // the current view's stop function (polling, charts)
let generation = 0; // ignores a view that finishes loading after the user moved on

function parseRoute() {
  const [path, query = ''] = (location.hash.replace(/^#/, '') || '/jobs').split('?');
  const parts = path.split('/').filter(Boolean);
  const params = Object.fromEntries(new URLSearchParams(query));
  if (parts[0] === 'jobs' && parts[1]) return { view: 'job', nav: 'jobs', params: { ...params, id: decodeURIComponent(parts[1]) } };
  if (parts[0] in VIEWS && parts[0] !== 'job') return { view: parts[0], nav: parts[0], params };
  return { view: 'jobs', nav: 'jobs', params };
}

async function route() {
  if (!getKey()) {
    showGate();
    return;
  }
  showApp();
  const { view, nav, params } = parseRoute();
  for (const link of document.querySelectorAll('[data-nav]')) link.classList.toggle('active', link.dataset.nav === nav);
  if (cleanup) cleanup();
  cleanup = null;
  const mine = ++generation;
  const root = $('#view');
  try {
    const module = await VIEWS[view]();
    if (mine !== generation) return;
    replace(root);
    cleanup = module.render(root, params) || null;
  } catch (error) {
    if (mine !== generation) return;
    replace(root, h('p', { class: 'error', role: 'alert' }, `This view could not be shown: ${error.message}`));
  }
}

function showGate(message) {
  if (cleanup) cleanup();
  cleanup = null;
  replace($('#view'));
  $('#nav').hidden = true;
  $('#keybox').hidden = true;
  $('#key-gate').hidden = false;
  const error = $('#key-error');
  error.hidden = !message;
  error.textContent = message || '';
  $('#api-key').focus();
}

function showApp() {
  $('#key-gate').hidden = true;
  $('#nav').hidden = false;
  $('#keybox').hidden = false;
  const key = getKey();
  $('#key-hint').textContent = `key …${key.slice(-4)}`;
}

async function saveKey(event) {
  event.preventDefault();
  const input = $('#api-key');
  const key = input.value.trim();
  if (!key) return;
  const button = event.submitter || $('#key-form button');
  button.disabled = true;
  try {
    await api('/v1/models', { key }); // proves the key before keeping it
    setKey(key);
    input.value = '';
    if (!location.hash) location.hash = '#/jobs';
    await route();
  } catch (error) {
    showGate(error.status === 401 ? 'This key was refused: check it and try again.' : error.message);
  } finally {
    button.disabled = false;
  }
}

function init() {
  $('#key-form').addEventListener('submit', saveKey);
  $('#forget-key').addEventListener('click', () => {
    clearKey();
    showGate();
  });
  window.addEventListener('gt:unauthorized', () => {
    clearKey();
    showGate('The API refused the saved key (revoked, or another service): enter a key.');
  });
  window.addEventListener('hashchange', route);
  route();
}

init();
