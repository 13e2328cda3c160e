// Jobs: status, model, method, rho, FLOPs saved against full fine-tuning, energy, carbon and age, kept
// live by polling.

import { JOBS, api, withQuery } from '../api.js';
import { h, replace, table } from '../dom.js';
import { age, dateTime, flops, grams, joules, percent } from '../format.js';
import { poll } from '../live.js';

const PAGE = 100; // the API's largest page
const REFRESH_MS = 3000;
const STATES = ['validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled'];
const COLUMNS = [
  { label: 'Job' }, { label: 'Status' }, { label: 'Model' }, { label: 'Method' }, { label: 'rho', num: true },
  { label: 'FLOPs saved vs full', num: true, title: '1 - FLOPs spent / FLOPs full fine-tuning would spend on the same tokens' },
  { label: 'Energy (J)', num: true }, { label: 'Carbon (gCO2e)', num: true }, { label: 'Progress' }, { label: 'Age' },
];

// 'validating_files' -> 'validating files': the API's names, as words.
export function statusLabel(status) {
  return status.replaceAll('_', ' ');
}

export function statusBadge(status) {
  return h('span', { class: `badge ${status}`, dataset: { status } }, statusLabel(status));
}

// The method's name: OpenAI's method object, {"type": T, T: {"hyperparameters": {...}}}.
export function methodName(job) {
  return job.method?.type ?? '—';
}

export function progressBar(fraction, big = false) {
  const pct = Math.round(100 * (fraction || 0));
  return h('div', {
    class: `progress${big ? ' big' : ''}`, role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100',
    'aria-valuenow': String(pct),
  }, h('span', { style: { width: `${pct}%` } }));
}

function savedCell(job) {
  if (job.flops.saved !== null) {
    return h('td', { class: 'num', title: `${flops(job.flops.total)} spent of ${flops(job.flops.full)} for full fine-tuning` },
      percent(job.flops.saved));
  }
  if (job.estimate) {
    return h('td', { class: 'num muted', title: 'estimated before the run (no epoch finished yet)' },
      `~${percent(job.estimate.flops_saved)} (est.)`);
  }
  return h('td', { class: 'num muted' }, '—');
}

function jobRow(job, now) {
  const open = () => { location.hash = `#/jobs/${job.id}`; };
  const p = job.progress;
  const where = job.status === 'running' && p.epoch
    ? `epoch ${p.epoch}/${p.n_epochs}${p.step ? `, step ${p.step}/${p.steps_in_epoch ?? '?'}` : ''}`
    : `${job.epochs_done}/${p.n_epochs} epochs`;
  return h('tr', { class: 'clickable', dataset: { jobId: job.id }, onclick: open },
    h('td', { class: 'id' }, h('a', { href: `#/jobs/${job.id}`, title: job.id },
      h('span', { class: 'id-full' }, job.id), h('span', { class: 'id-short', 'aria-hidden': 'true' }, `…${job.id.slice(-8)}`))),
    h('td', {}, statusBadge(job.status)),
    h('td', {}, job.model),
    h('td', {}, methodName(job)),
    h('td', { class: 'num' }, job.rho === null ? '—' : job.rho.toFixed(2)),
    savedCell(job),
    h('td', { class: 'num' }, job.epochs_done ? joules(job.energy_j) : '—'),
    h('td', { class: 'num' }, job.epochs_done ? grams(job.gco2e) : '—'),
    h('td', {}, h('div', { class: 'stack', style: { gap: '0.15rem', minWidth: '120px' } },
      progressBar(p.fraction), h('span', { class: 'small muted nowrap' }, where))),
    h('td', { class: 'nowrap', title: dateTime(job.created_at) }, age(job.created_at, now)),
  );
}

export function render(root) {
  const state = { status: '', pages: 1, jobs: [], hasMore: false, error: null };
  const filter = h('select', { id: 'status-filter', 'aria-label': 'status filter' },
    h('option', { value: '' }, 'every status'), STATES.map((s) => h('option', { value: s }, statusLabel(s))));
  const body = h('div', { id: 'jobs-body' }, h('p', { class: 'muted' }, 'Loading jobs…'));
  const more = h('button', { type: 'button', id: 'load-more', hidden: true }, 'Show older jobs');
  const count = h('span', { class: 'muted small', id: 'jobs-count' });
  const error = h('div', { id: 'jobs-error' });

  replace(root, h('section', { class: 'card' },
    h('div', { class: 'spread section' },
      h('h1', { style: { margin: 0 } }, 'Jobs'),
      h('div', { class: 'row toolbar' }, filter, h('a', { class: 'button primary', href: '#/new' }, 'New job'))),
    error, body, h('div', { class: 'spread', style: { marginTop: '0.75rem' } }, count, more)));

  // Refreshes every page shown so far (newest first), so older rows stay live too.
  async function load() {
    const jobs = [];
    let after = null;
    let hasMore = false;
    for (let page = 0; page < state.pages; page += 1) {
      const answer = await api(withQuery(JOBS, { limit: PAGE, after, status: state.status }));
      jobs.push(...answer.data);
      hasMore = answer.has_more;
      if (!hasMore || !answer.data.length) break;
      after = answer.data[answer.data.length - 1].id;
    }
    state.jobs = jobs;
    state.hasMore = hasMore;
  }

  function draw() {
    const now = Date.now() / 1000;
    if (!state.jobs.length) {
      replace(body, h('p', { class: 'muted', id: 'jobs-empty' }, state.status
        ? `No ${statusLabel(state.status)} jobs.`
        : 'No jobs yet. Upload a dataset, then create a job.'));
    } else {
      replace(body, table(COLUMNS, state.jobs.map((j) => jobRow(j, now)), { id: 'jobs-table' }));
    }
    count.textContent = `${state.jobs.length} job${state.jobs.length === 1 ? '' : 's'} shown${state.hasMore ? ', older ones not yet loaded' : ''}`;
    more.hidden = !state.hasMore;
  }

  async function refresh() {
    try {
      await load();
      replace(error);
      draw();
    } catch (e) {
      replace(error, h('p', { class: 'error', role: 'alert' }, `Could not load the jobs: ${e.message}`));
    }
  }

  let stop = poll(refresh, REFRESH_MS);
  const restart = () => {
    stop();
    stop = poll(refresh, REFRESH_MS);
  };
  filter.addEventListener('change', () => {
    state.status = filter.value;
    state.pages = 1;
    restart();
  });
  more.addEventListener('click', () => {
    state.pages += 1;
    restart();
  });
  return () => stop();
}
