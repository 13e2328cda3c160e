// One job: progress (epoch, step, ETA), FLOPs per epoch beside full fine-tuning, the heat map of tensors
// trained per epoch, loss curves, energy and carbon, events, checkpoint downloads, the fine-tuned model and a
// cancel button.

import { JOBS, api, download, withQuery } from '../api.js';
import { destroyCharts, flopsChart, lossChart } from '../charts.js';
import { h, replace, table } from '../dom.js';
import { bytes, clock, dateTime, duration, fixed, flops, grams, integer, joules, percent } from '../format.js';
import { renderHeatmap } from '../heatmap.js';
import { poll } from '../live.js';
import { methodName, progressBar, statusBadge, statusLabel } from './jobs.js';

const REFRESH_MS = 1500;
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const PAGE = 100; // the API's largest page

// 'ftevent-42' -> 42: events are numbered in the order they were written.
const eventNumber = (event) => Number(String(event.id).replace(/^ftevent-/, ''));

function stat(label, value, sub, id) {
  return h('div', { class: 'stat', id }, h('div', { class: 'label' }, label), h('div', { class: 'value' }, value),
    sub ? h('div', { class: 'sub' }, sub) : null);
}

function card(title, id, ...children) {
  return h('section', { class: 'card', id }, h('h2', {}, title), children);
}

export function render(root, params) {
  const jobId = params.id;
  // events: oldest first (the API answers newest first); checkpoints: newest first, as the API answers.
  const state = { job: null, epochs: [], events: [], checkpoints: [], modelNames: null, seenEpochs: -1 };

  const header = h('div', { id: 'job-header' }, h('p', { class: 'muted' }, 'Loading the job…'));
  const error = h('div', { id: 'job-error' });
  const progress = h('div', { id: 'job-progress' });
  const totals = h('div', { class: 'stats', id: 'job-totals' });
  const flopsCanvas = h('canvas', { id: 'flops-chart', role: 'img', 'aria-label': 'FLOPs per epoch against full fine-tuning' });
  const lossCanvas = h('canvas', { id: 'loss-chart', role: 'img', 'aria-label': 'training and validation loss per epoch' });
  const flopsNote = h('p', { class: 'muted small' });
  const lossNote = h('p', { class: 'muted small' });
  const heat = h('div', { id: 'heatmap-box' });
  const epochTable = h('div', { id: 'epochs-box' });
  const events = h('ol', { class: 'events', id: 'events' });
  const checkpoints = h('div', { id: 'checkpoints-box' });
  const downloadNote = h('div', { id: 'download-note' });

  replace(root,
    h('section', { class: 'card' }, header, error, progress, totals),
    h('div', { class: 'grid section' },
      card('FLOPs per epoch', 'flops-card', h('div', { class: 'chart-box' }, flopsCanvas), flopsNote),
      card('Loss', 'loss-card', h('div', { class: 'chart-box' }, lossCanvas), lossNote)),
    card('Tensors trained per epoch', 'heatmap-card',
      h('p', { class: 'muted small' }, 'Rows: the model\'s tensors in model order, grouped by layer. Columns: epochs.'),
      heat),
    card('Epochs: FLOPs, energy and carbon', 'epochs-card', epochTable),
    h('div', { class: 'grid section' },
      card('Events', 'events-card', events),
      card('Checkpoints', 'checkpoints-card', checkpoints, downloadNote)));

  function drawHeader(job) {
    const cancel = TERMINAL.has(job.status) ? null : h('button', {
      type: 'button', class: 'danger', id: 'cancel-job', onclick: () => cancelJob(job),
    }, 'Cancel job');
    const hp = job.hyperparameters;
    replace(header,
      h('div', { class: 'spread' },
        h('div', {},
          h('h1', { class: 'mono', style: { marginBottom: '0.25rem', overflowWrap: 'anywhere' } }, job.id),
          h('div', { class: 'row small' }, statusBadge(job.status),
            h('span', { id: 'job-method' }, `${methodName(job)} on ${job.model}`),
            h('span', {}, job.rho === null ? 'no FLOPs budget (rho)' : `rho ${job.rho.toFixed(3)}`),
            job.rho_min === null ? null : h('span', { class: 'muted' }, `rho_min ${job.rho_min.toFixed(3)}`))),
        cancel),
      h('p', { class: 'muted small' },
        `${hp.n_epochs} epochs, batch ${hp.batch_size}, learning rate ${hp.learning_rate}, max_seq_len ${hp.max_seq_len}; `,
        `created ${dateTime(job.created_at)}`, job.started_at ? `, started ${dateTime(job.started_at)}` : '',
        job.finished_at ? `, finished ${dateTime(job.finished_at)}` : '',
        `; training file `, h('span', { class: 'mono' }, job.training_file)),
      // A succeeded job's model: listed by GET /v1/models, and usable as a new job's model.
      job.fine_tuned_model ? h('p', { class: 'notice small', id: 'fine-tuned-model-line' }, 'Fine-tuned model: ',
        h('span', { class: 'mono', id: 'fine-tuned-model', style: { overflowWrap: 'anywhere' } }, job.fine_tuned_model),
        ' · ', h('a', { href: `#/new?model=${encodeURIComponent(job.fine_tuned_model)}`, id: 'fine-tune-again' },
          'New job on this model')) : null,
      job.error ? h('p', { class: 'error', role: 'alert', id: 'job-failure' }, `${job.error.code}: ${job.error.message}`) : null);
  }

  function drawProgress(job) {
    const p = job.progress;
    const parts = [];
    if (p.epoch) parts.push(`epoch ${p.epoch}/${p.n_epochs}`);
    else parts.push(`${job.epochs_done}/${p.n_epochs} epochs`);
    if (p.step !== null) parts.push(`step ${p.step}/${p.steps_in_epoch ?? '?'}`);
    parts.push(`${percent(p.fraction, 0)} done`);
    parts.push(job.status === 'running' ? `ETA ${duration(p.eta_s)}` : statusLabel(job.status));
    replace(progress, h('div', { class: 'spread small' }, h('span', { id: 'progress-text' }, parts.join(' · '))),
      progressBar(p.fraction, true));
  }

  function drawTotals(job) {
    const est = job.estimate;
    const wall = state.epochs.reduce((sum, e) => sum + e.wall_s, 0);
    const tiles = [
      stat('FLOPs spent (job)', flops(job.flops.total),
        job.flops.full ? `full fine-tuning: ${flops(job.flops.full)} on the same tokens` : 'no epoch finished yet', 'stat-flops'),
      stat('FLOPs saved vs full', percent(job.flops.saved),
        est ? `estimated before the run: ${percent(est.flops_saved)}` : null, 'stat-saved'),
      stat('Energy (J)', job.epochs_done ? joules(job.energy_j) : '—',
        est ? `estimate: ${joules(est.energy_j.method)}; full fine-tuning ${joules(est.energy_j.full)}` : null, 'stat-energy'),
      stat('Carbon (gCO2e)', job.epochs_done ? grams(job.gco2e) : '—',
        est ? `estimate: ${grams(est.gco2e.method)}; full fine-tuning ${grams(est.gco2e.full)}` : null, 'stat-carbon'),
      stat('Training time (s)', state.epochs.length ? duration(wall) : '—',
        est ? `device estimate: ${duration(est.time_s.method)} (full ${duration(est.time_s.full)})` : null, 'stat-time'),
    ];
    replace(totals, tiles);
  }

  async function drawCharts() {
    const epochs = state.epochs;
    if (!epochs.length) {
      flopsNote.textContent = 'The chart fills in as epochs finish.';
      lossNote.textContent = 'The curves fill in as epochs finish.';
    } else {
      const last = epochs[epochs.length - 1];
      flopsNote.textContent = `Each epoch: the job's FLOPs (forward, activation and weight gradients, tensor selection) beside full fine-tuning's on the same tokens. Last epoch: ${percent(last.rho_achieved)} of full.`;
      lossNote.textContent = epochs.some((e) => e.valid_loss !== null)
        ? 'Mean training loss per epoch, and validation loss after each epoch.'
        : 'Mean training loss per epoch (no validation file).';
    }
    await flopsChart(flopsCanvas, epochs, flops);
    await lossChart(lossCanvas, epochs);
  }

  function drawHeatmap() {
    const columns = state.epochs.map((e) => ({ epoch: e.epoch, tensors: new Set(e.selected_tensors), pending: false }));
    // The epoch running now: its selection event comes before its record.
    const done = new Set(columns.map((c) => c.epoch));
    for (const event of state.events) {
      const epoch = event.data?.epoch;
      if (event.kind === 'selection' && epoch && !done.has(epoch) && Array.isArray(event.data.selected_tensors)) {
        columns.push({ epoch, tensors: new Set(event.data.selected_tensors), pending: !TERMINAL.has(state.job.status) });
        done.add(epoch);
      }
    }
    columns.sort((a, b) => a.epoch - b.epoch);
    renderHeatmap(heat, state.modelNames, columns);
  }

  function drawEpochs() {
    const columns = [
      { label: 'Epoch', num: true }, { label: 'Tensors trained', num: true }, { label: 'FLOPs spent', num: true },
      { label: 'FLOPs full FT', num: true }, { label: 'rho achieved', num: true }, { label: 'Tokens', num: true },
      { label: 'Steps', num: true }, { label: 'Wall (s)', num: true }, { label: 'Train loss', num: true },
      { label: 'Valid loss', num: true }, { label: 'Valid accuracy', num: true }, { label: 'Energy (J)', num: true },
      { label: 'Energy from' }, { label: 'Carbon (gCO2e)', num: true },
    ];
    const rows = state.epochs.map((e) => h('tr', { dataset: { epoch: String(e.epoch) } },
      h('td', { class: 'num' }, e.epoch),
      h('td', { class: 'num' }, e.selected_tensors.length),
      h('td', { class: 'num', title: `forward ${flops(e.flops.fwd)}, activation gradients ${flops(e.flops.bwd_act)}, weight gradients ${flops(e.flops.bwd_weight)}, selection ${flops(e.flops.selection)}` }, flops(e.flops.total)),
      h('td', { class: 'num' }, flops(e.flops.full)),
      h('td', { class: 'num' }, fixed(e.rho_achieved, 3)),
      h('td', { class: 'num' }, integer(e.tokens)),
      h('td', { class: 'num' }, integer(e.steps)),
      h('td', { class: 'num' }, fixed(e.wall_s, 2)),
      h('td', { class: 'num' }, fixed(e.train_loss, 4)),
      h('td', { class: 'num' }, fixed(e.valid_loss, 4)),
      h('td', { class: 'num' }, e.valid_accuracy === null ? '—' : percent(e.valid_accuracy)),
      h('td', { class: 'num' }, joules(e.energy_j)),
      h('td', {}, e.energy_method),
      h('td', { class: 'num' }, grams(e.gco2e))));
    if (!rows.length) replace(epochTable, h('p', { class: 'muted' }, 'No epoch has finished yet.'));
    else replace(epochTable, table(columns, rows, { id: 'epochs-table' }));
  }

  // Oldest first, like a log, scrolled to the newest at the bottom.
  function drawEvents() {
    replace(events, state.events.map((e) => h('li', { class: e.level, dataset: { kind: e.kind, eventId: e.id }, title: e.id },
      h('span', { class: 'muted small' }, clock(e.created_at)),
      h('span', { class: 'type' }, h('span', { class: 'badge' }, e.kind)),
      h('span', { class: 'msg' }, e.message))));
    if (!state.events.length) events.append(h('li', { class: 'muted' }, 'No event yet.'));
    events.scrollTop = events.scrollHeight;
  }

  function drawCheckpoints() {
    if (!state.checkpoints.length) {
      replace(checkpoints, h('p', { class: 'muted' }, 'Checkpoints appear as epochs finish: one per epoch and the final one.'));
      return;
    }
    // Newest first (the final one on top), as the API lists them; each is a model id a new job can start from.
    const rows = state.checkpoints.map((c) => h('tr', { dataset: { checkpoint: c.name } },
      h('td', {}, h('div', { class: 'nowrap' }, c.name),
        h('div', { class: 'mono small muted ckpt-model', title: 'fine_tuned_model_checkpoint: usable as a new job\'s model' },
          c.fine_tuned_model_checkpoint)),
      h('td', { class: 'num' }, c.epoch ?? '—'),
      h('td', { class: 'num' }, integer(c.step_number)),
      h('td', { class: 'num nowrap' }, bytes(c.bytes)),
      h('td', {}, h('button', {
        type: 'button', class: 'download', dataset: { checkpointId: c.id },
        onclick: (event) => downloadCheckpoint(c, event.currentTarget),
      }, 'Download .tar'))));
    replace(checkpoints, table([{ label: 'Name and model id' }, { label: 'Epoch', num: true }, { label: 'Step', num: true },
      { label: 'Size', num: true }, { label: '' }], rows, { id: 'checkpoints-table' }));
  }

  async function downloadCheckpoint(checkpoint, button) {
    button.disabled = true;
    replace(downloadNote, h('p', { class: 'muted small' }, `Downloading ${checkpoint.name}…`));
    try {
      const saved = await download(`${JOBS}/${jobId}/checkpoints/${checkpoint.id}/content`, `${jobId}-${checkpoint.name}.tar`);
      replace(downloadNote, h('p', { class: 'notice small' }, `Saved ${saved.name} (${bytes(saved.bytes)}): a tar of the Hugging Face folder.`));
    } catch (e) {
      replace(downloadNote, h('p', { class: 'error', role: 'alert' }, `Download failed: ${e.message}`));
    } finally {
      button.disabled = false;
    }
  }

  async function cancelJob(job) {
    if (!window.confirm(`Cancel job ${job.id}? A running job stops within one training step.`)) return;
    try {
      state.job = await api(`${JOBS}/${job.id}/cancel`, { method: 'POST' });
      drawHeader(state.job);
      drawProgress(state.job);
    } catch (e) {
      replace(error, h('p', { class: 'error', role: 'alert' }, `Cancel failed: ${e.message}`));
    }
  }

  async function loadModelNames(modelId) {
    try {
      const models = await api('/v1/models');
      state.modelNames = models.data.find((m) => m.id === modelId)?.tensor_names || null;
    } catch {
      state.modelNames = null; // the heat map then shows the tensors that were trained
    }
  }

  // The events written since the last look. The API lists them newest first and pages towards older ones
  // (`after` an event id): read pages until one reaches an event already shown. Returns how many are new.
  async function loadEvents() {
    const last = state.events.length ? eventNumber(state.events[state.events.length - 1]) : 0;
    const fresh = [];
    let after = null;
    for (;;) {
      const answer = await api(withQuery(`${JOBS}/${jobId}/events`, { limit: PAGE, after }));
      const newer = answer.data.filter((e) => eventNumber(e) > last);
      fresh.push(...newer);
      if (!answer.has_more || !answer.data.length || newer.length < answer.data.length) break;
      after = answer.data[answer.data.length - 1].id;
    }
    fresh.sort((a, b) => eventNumber(a) - eventNumber(b));
    state.events.push(...fresh);
    return fresh.length;
  }

  // Every page of a list (checkpoints: newest first; epochs: in order).
  async function loadAll(path, cursor) {
    const data = [];
    let after = null;
    for (;;) {
      const answer = await api(withQuery(path, { limit: PAGE, after }));
      data.push(...answer.data);
      if (!answer.has_more || !answer.data.length) return data;
      after = cursor(answer.data[answer.data.length - 1]);
    }
  }

  async function refresh() {
    try {
      const job = await api(`${JOBS}/${jobId}`);
      const first = state.job === null;
      state.job = job;
      if (first) await loadModelNames(job.model);
      const freshEvents = await loadEvents();
      const ended = TERMINAL.has(job.status);
      if (job.epochs_done !== state.seenEpochs || ended) {
        const [epochs, ckpts] = await Promise.all([
          loadAll(`${JOBS}/${jobId}/epochs`, (e) => e.epoch), loadAll(`${JOBS}/${jobId}/checkpoints`, (c) => c.id),
        ]);
        state.epochs = epochs;
        state.checkpoints = ckpts;
        state.seenEpochs = job.epochs_done;
        drawEpochs();
        drawCheckpoints();
        await drawCharts();
      }
      replace(error);
      drawHeader(job);
      drawProgress(job);
      drawTotals(job);
      if (freshEvents || first || ended) {
        drawEvents();
        drawHeatmap();
      }
      root.dataset.status = job.status; // lets tests and scripts wait on the view, not on timing
      return !ended;
    } catch (e) {
      replace(error, h('p', { class: 'error', role: 'alert' }, e.status === 404 ? `No job ${jobId}.` : `Could not load the job: ${e.message}`));
      return e.status !== 404;
    }
  }

  const stop = poll(refresh, REFRESH_MS);
  return () => {
    stop();
    destroyCharts(root);
    delete root.dataset.status;
  };
}
