// New job: a model (a base model or a fine-tuned one), an uploaded file, a method and rho on a slider. The
// estimate (POST /v1/estimates) follows every change, debounced: FLOPs, time, energy and carbon against full
// fine-tuning, and rho_min, which becomes the slider's minimum. A rho the API refuses shows the API's own
// message. Jobs and estimates carry OpenAI's method object: {"type": T, T: {"hyperparameters": {...}}}.

import { JOBS, api } from '../api.js';
import { h, replace } from '../dom.js';
import { bytes, duration, flops, grams, integer, joules, percent } from '../format.js';
import { debounce } from '../live.js';

let schema = null; // the API's OpenAPI schema, read once: the methods and the hyperparameters' bounds come from it

async function jobSchema() {
  if (!schema) {
    schema = fetch('/openapi.json').then((response) => {
      if (!response.ok) throw new Error(`/openapi.json answered HTTP ${response.status}`);
      return response.json();
    });
    schema.catch(() => { schema = null; }); // the next visit asks again
  }
  const components = (await schema).components.schemas;
  const type = components.JobMethod.properties.type; // the method object's type: x-methods, x-default-method
  return {
    methods: type['x-methods'], defaultMethod: type['x-default-method'], defaultRho: type['x-default-rho'],
    hyperparameters: components.Hyperparameters.properties,
  };
}

// A request's hyperparameters (the object itself, not a copy), and the request with another rho.
const hyperparametersOf = (request) => request.method[request.method.type].hyperparameters;

function withRho(request, rho) {
  const { type } = request.method;
  return { ...request, method: { type, [type]: { hyperparameters: { ...hyperparametersOf(request), rho } } } };
}

const DEFAULT_RHO = 0.6; // until the schema's x-default-rho (the service's default budget) is read
const ESTIMATE_WAIT_MS = 250;

// The learning-rate box's text as the API takes it: "auto" (also when empty) or a number.
function learningRate(text) {
  const value = text.trim().toLowerCase();
  return value === '' || value === 'auto' ? 'auto' : Number(value);
}

function numberField(id, label, value, attrs, hint) {
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    h('input', { id, name: id, type: 'number', value: String(value), required: true, ...attrs }),
    hint ? h('span', { class: 'hint' }, hint) : null);
}

export function render(root, params) {
  const model = h('select', { id: 'model', name: 'model', required: true }, h('option', { value: '' }, 'loading…'));
  const trainingFile = h('select', { id: 'training-file', name: 'training_file', required: true }, h('option', { value: '' }, 'loading…'));
  const validationFile = h('select', { id: 'validation-file', name: 'validation_file' }, h('option', { value: '' }, 'none'));
  const rhoRange = h('input', {
    id: 'rho', name: 'rho', type: 'range', min: '0.01', max: '1', step: '0.01', value: String(DEFAULT_RHO),
    'aria-describedby': 'rho-help',
  });
  const rhoNumber = h('input', {
    id: 'rho-value', type: 'number', min: '0.01', max: '1', step: '0.01', value: String(DEFAULT_RHO), 'aria-label': 'rho value',
  });
  const rhoHelp = h('span', { class: 'hint', id: 'rho-help' },
    'rho: the share of full fine-tuning FLOPs this job may spend. The slider starts at rho_min, the least that trains anything.');
  const rhoSummary = h('p', { class: 'rho-summary', id: 'rho-summary', 'aria-live': 'polite' });
  const rhoField = h('fieldset', { id: 'rho-field' }, h('legend', {}, 'Budget'),
    h('label', { for: 'rho' }, 'rho (share of full fine-tuning FLOPs)'),
    h('div', { class: 'rho-row' }, rhoRange, rhoNumber), rhoSummary, rhoHelp);
  const methodInputs = h('div', { class: 'methods', id: 'methods' }, h('p', { class: 'muted' }, 'loading…'));
  let budgeted = new Set(); // methods that take rho (x-methods' budgeted)
  const hp = { // defaults and bounds: showBounds, from the API's schema
    n_epochs: numberField('n_epochs', 'Epochs', '', { step: '1' }),
    batch_size: numberField('batch_size', 'Batch size (sequences)', '', { step: '1' }),
    // "auto" (the default) or a number: the estimate says what "auto" is for this model, batch and method.
    learning_rate: h('div', { class: 'field' },
      h('label', { for: 'learning_rate' }, 'Learning rate'),
      h('input', {
        // Anything else is the API's to refuse (400 naming learning_rate), shown as the estimate's error.
        id: 'learning_rate', name: 'learning_rate', type: 'text', inputmode: 'decimal', value: 'auto', required: true,
        'aria-describedby': 'learning-rate-auto',
      }),
      h('span', { class: 'hint', id: 'learning-rate-auto' }, '"auto": chosen for the model, batch size and method')),
    max_seq_len: numberField('max_seq_len', 'Max sequence length (tokens)', '', { step: '1' }, 'longer examples are cut'),
  };
  const seed = numberField('seed', 'Seed', 0, { min: '0', step: '1' });
  const suffix = h('div', { class: 'field' }, h('label', { for: 'suffix' }, 'Suffix (optional)'),
    h('input', { id: 'suffix', name: 'suffix', type: 'text', pattern: '[A-Za-z0-9_.\\-]+', maxlength: '64' }));
  const submit = h('button', { type: 'submit', class: 'primary', id: 'create-job' }, 'Create job');
  const submitError = h('div', { id: 'create-error' });
  const form = h('form', { id: 'new-job-form', class: 'stack', novalidate: true },
    h('div', { class: 'form-grid' },
      h('div', { class: 'field' }, h('label', { for: 'model' }, 'Model'), model),
      h('div', { class: 'field' }, h('label', { for: 'training-file' }, 'Training file'), trainingFile,
        h('span', { class: 'hint' }, h('a', { href: '#/files' }, 'Upload a dataset'))),
      h('div', { class: 'field' }, h('label', { for: 'validation-file' }, 'Validation file (optional)'), validationFile)),
    h('fieldset', {}, h('legend', {}, 'Method'), methodInputs),
    rhoField,
    h('fieldset', {}, h('legend', {}, 'Training'), h('div', { class: 'form-grid' }, Object.values(hp), seed, suffix)),
    submitError,
    h('div', { class: 'row' }, submit));

  const estimateBody = h('div', { id: 'estimate-body' }, h('p', { class: 'muted' }, 'Pick a model and a training file.'));
  const estimateError = h('div', { id: 'estimate-error' });
  const estimateCard = h('aside', { class: 'card sticky', id: 'estimate', 'aria-live': 'polite' },
    h('h2', {}, 'Estimate'), estimateError, estimateBody);

  replace(root, h('h1', {}, 'New job'), h('div', { class: 'new-job' }, h('section', { class: 'card' }, form), estimateCard));

  const method = () => form.querySelector('input[name=method]:checked')?.value;
  let sequence = 0; // answers that arrive after a newer request are dropped

  function body() {
    const hyperparameters = {
      n_epochs: Number(hp.n_epochs.querySelector('input').value),
      batch_size: Number(hp.batch_size.querySelector('input').value),
      learning_rate: learningRate(hp.learning_rate.querySelector('input').value),
      max_seq_len: Number(hp.max_seq_len.querySelector('input').value),
    };
    const type = method();
    if (budgeted.has(type)) hyperparameters.rho = Number(rhoNumber.value);
    const out = { model: model.value, training_file: trainingFile.value, method: { type, [type]: { hyperparameters } } };
    out.seed = Number(seed.querySelector('input').value) || 0;
    return out;
  }

  function setRhoMin(rhoMin) {
    // The slider cannot go below rho_min; the number box still takes any value, and the API says why it refuses.
    const min = Math.min(1, Math.ceil(rhoMin * 100) / 100);
    const typed = rhoNumber.value;
    rhoRange.min = String(min);
    rhoRange.value = typed; // the browser clamps it to [min, 1]
    rhoHelp.textContent = `rho: the share of full fine-tuning FLOPs this job may spend. rho_min = ${rhoMin.toFixed(4)}: below it nothing can be trained.`;
    rhoRange.dataset.rhoMin = String(rhoMin);
  }

  function drawLearningRate(e) {
    const lr = e.learning_rate;
    const auto = `"auto" = ${lr.auto.toPrecision(3)} for this job: full fine-tuning's ${lr.full.toPrecision(3)} × ${lr.scale.toPrecision(3)} for the method`;
    hp.learning_rate.querySelector('.hint').textContent = lr.multiplier === 1 ? auto : `${auto}; this job: ${lr.learning_rate.toPrecision(3)}`;
  }

  function drawEstimate(e) {
    drawLearningRate(e);
    // Beside the slider too, for screens where the estimate card is further down.
    rhoSummary.textContent = `${percent(e.flops_saved)} of the FLOPs saved: ${flops(e.flops.method)} instead of ${flops(e.flops.full)}, ${joules(e.energy_j.method)}`;
    const row = (label, full, job, saved) => h('tr', {},
      h('th', { scope: 'row' }, label), h('td', { class: 'num' }, job), h('td', { class: 'num' }, full),
      h('td', { class: 'num' }, saved));
    const lr = (value) => value.toPrecision(3);
    const savedOf = (pair) => (pair.full ? percent(1 - pair.method / pair.full) : '—');
    replace(estimateBody,
      h('div', { class: 'stats section' },
        h('div', { class: 'stat' }, h('div', { class: 'label' }, 'FLOPs saved vs full'),
          h('div', { class: 'value', id: 'estimate-saved' }, percent(e.flops_saved))),
        h('div', { class: 'stat' }, h('div', { class: 'label' }, 'rho_min'),
          h('div', { class: 'value', id: 'estimate-rho-min' }, e.rho_min.toFixed(4)))),
      h('div', { class: 'table-scroll' }, h('table', { class: 'estimate-table', id: 'estimate-table' },
        h('thead', {}, h('tr', {}, h('th', {}, ''), h('th', { class: 'num' }, `this job${e.rho === null ? '' : ` (rho ${e.rho.toFixed(2)})`}`),
          h('th', { class: 'num' }, 'full fine-tuning'), h('th', { class: 'num' }, 'saved'))),
        h('tbody', {},
          row('FLOPs', flops(e.flops.full), h('span', { id: 'estimate-flops' }, flops(e.flops.method)), percent(e.flops_saved)),
          row('Time (s)', duration(e.time_s.full), duration(e.time_s.method), savedOf(e.time_s)),
          row('Energy (J)', joules(e.energy_j.full), joules(e.energy_j.method), savedOf(e.energy_j)),
          row('Carbon (gCO2e)', grams(e.gco2e.full), grams(e.gco2e.method), savedOf(e.gco2e)),
          row('Learning rate', lr(e.learning_rate.full),
            h('span', { id: 'estimate-learning-rate' }, lr(e.learning_rate.learning_rate)), ''),
          row('Peak memory', bytes(e.peak_memory_bytes.full),
            h('span', { id: 'estimate-memory' }, `${e.memory.basis === 'bound' ? '≤ ' : ''}${bytes(e.peak_memory_bytes.method)}`),
            savedOf(e.peak_memory_bytes))))),
      h('p', { class: 'muted small' },
        `${integer(e.examples)} examples, ${integer(e.tokens)} tokens and ${integer(e.steps_per_epoch)} steps per epoch, ${e.n_epochs} epochs`,
        e.truncated_examples ? `; ${integer(e.truncated_examples)} examples cut at max_seq_len` : '',
        `. Time and energy on the device profile "${e.device.name}" (${flops(e.device.peak_flops)}/s peak, `,
        `${percent(e.device.utilization, 0)} used, ${e.device.watts} W). `,
        `Peak memory on ${e.memory.device_type}${e.memory.world_size > 1 ? `, per rank of ${e.memory.world_size}` : ''} (training step or importance evaluation, whichever is larger)`,
        e.device.memory_bytes === null ? '. ' : ` against the device's ${bytes(e.device.memory_bytes)}. `,
        e.basis === 'budget' ? 'The method spends at most rho of full fine-tuning.'
          : e.basis === 'profile' ? 'Exact FLOPs of the tensors this method trains.'
            : 'Approximate: LoRA adapters are not in the base model\'s profile.'));
  }

  // What rho_min depends on: everything but rho. A change of it asks the API for rho_min first (at rho = 1,
  // which is accepted whenever anything is), so that the slider never offers a budget the API would refuse.
  let probedContext = null;

  async function estimate() {
    if (!model.value || !trainingFile.value) return;
    const mine = ++sequence;
    const request = body();
    const { rho } = hyperparametersOf(request);
    const context = JSON.stringify(withRho(request, undefined)); // everything but rho
    estimateCard.classList.add('updating');
    estimateCard.dataset.state = 'pending';
    let raised = null;
    try {
      let answer = null;
      if (rho !== undefined && context !== probedContext) {
        const probe = await api('/v1/estimates', { method: 'POST', json: withRho(request, 1) });
        if (mine !== sequence) return;
        probedContext = context;
        setRhoMin(probe.rho_min);
        const min = Number(rhoRange.min);
        if (rho < min) {
          raised = `rho raised from ${rho} to ${min}: rho_min is ${probe.rho_min.toFixed(4)} for this model, dataset and batch size.`;
          rhoNumber.value = String(min);
          rhoRange.value = String(min);
          hyperparametersOf(request).rho = min;
        }
        if (hyperparametersOf(request).rho === 1) answer = probe;
      }
      answer = answer || await api('/v1/estimates', { method: 'POST', json: request });
      if (mine !== sequence) return;
      replace(estimateError, raised ? h('p', { class: 'notice small', id: 'rho-raised' }, raised) : null);
      setRhoMin(answer.rho_min);
      drawEstimate(answer);
      estimateCard.dataset.state = 'ok';
    } catch (e) {
      if (mine !== sequence) return;
      if (e.rhoMin !== null) setRhoMin(e.rhoMin);
      replace(estimateError, h('p', { class: 'error', role: 'alert', id: 'estimate-refused', dataset: { code: e.code } }, e.message));
      rhoSummary.textContent = 'refused: see the estimate';
      estimateCard.dataset.state = 'error';
    } finally {
      if (mine === sequence) estimateCard.classList.remove('updating');
    }
  }
  const estimateSoon = debounce(estimate, ESTIMATE_WAIT_MS);

  function methodChanged() {
    rhoField.hidden = !budgeted.has(method());
    estimateSoon();
  }

  rhoRange.addEventListener('input', () => {
    rhoNumber.value = rhoRange.value;
    estimateSoon();
  });
  rhoNumber.addEventListener('input', () => {
    if (rhoNumber.value !== '') rhoRange.value = rhoNumber.value;
    estimateSoon();
  });
  for (const element of [model, trainingFile, ...Object.values(hp).map((f) => f.querySelector('input')), seed.querySelector('input')]) {
    element.addEventListener('change', estimateSoon);
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!form.reportValidity()) return;
    const job = body();
    if (validationFile.value) job.validation_file = validationFile.value;
    const suffixValue = suffix.querySelector('input').value.trim();
    if (suffixValue) job.suffix = suffixValue;
    submit.disabled = true;
    replace(submitError);
    try {
      const created = await api(JOBS, { method: 'POST', json: job });
      location.hash = `#/jobs/${created.id}`;
    } catch (e) {
      replace(submitError, h('p', { class: 'error', role: 'alert' }, `The job was not created: ${e.message}`));
      submit.disabled = false;
    }
  });

  function showMethods(methods, defaultMethod) {
    budgeted = new Set(methods.filter((m) => m.budgeted).map((m) => m.name));
    replace(methodInputs, methods.map((m) => h('label', { class: 'method-option' },
      h('input', { type: 'radio', name: 'method', value: m.name, checked: m.name === defaultMethod }),
      h('span', {}, h('b', {}, `${m.title} (${m.name})`), h('span', { class: 'muted small' }, m.summary)))));
    for (const input of methodInputs.querySelectorAll('input[name=method]')) input.addEventListener('change', methodChanged);
    rhoField.hidden = !budgeted.has(method());
  }

  function showBounds(properties) {
    // The training fields take the API's defaults and bounds (greencore.spec.Hyperparameters).
    for (const [name, field] of Object.entries(hp)) {
      const property = properties[name];
      const input = field.querySelector('input');
      if (property.default !== undefined) input.value = String(property.default);
      const min = property.minimum ?? property.exclusiveMinimum;
      if (min !== undefined) input.min = String(min);
      if (property.maximum !== undefined) input.max = String(property.maximum);
    }
  }

  async function loadChoices() {
    try {
      const [models, files, choices] = await Promise.all([api('/v1/models'), api('/v1/files?limit=100'), jobSchema()]);
      showMethods(choices.methods, choices.defaultMethod);
      if (choices.defaultRho !== undefined) {
        rhoNumber.value = String(choices.defaultRho);
        rhoRange.value = String(choices.defaultRho);
      }
      showBounds(choices.hyperparameters);
      // Base models (owned_by "system"), then the models this tenant's jobs made (fine_tuned_model).
      const modelOption = (m) => h('option', { value: m.id },
        `${m.id} (${m.architecture}, ${integer(m.parameters)} parameters, ${m.tensors} tensors)`);
      const base = models.data.filter((m) => m.owned_by === 'system');
      const tuned = models.data.filter((m) => m.owned_by !== 'system');
      replace(model, models.data.length ? null : h('option', { value: '' }, 'no model in GT_MODELS_DIR'),
        tuned.length ? [h('optgroup', { label: 'Base models' }, base.map(modelOption)),
          h('optgroup', { label: 'Fine-tuned models' }, tuned.map(modelOption))] : base.map(modelOption));
      if (params.model && models.data.some((m) => m.id === params.model)) model.value = params.model;
      const fileOption = (f) => h('option', { value: f.id },
        `${f.filename}: ${integer(f.examples)} examples, ${f.format} (${f.id})`);
      replace(trainingFile, files.data.length ? null : h('option', { value: '' }, 'no dataset yet: upload one'),
        files.data.map(fileOption));
      replace(validationFile, h('option', { value: '' }, 'none'), files.data.map(fileOption));
      if (params.file && files.data.some((f) => f.id === params.file)) trainingFile.value = params.file;
      form.dataset.ready = 'true';
      estimateSoon();
    } catch (e) {
      replace(submitError, h('p', { class: 'error', role: 'alert' }, `Could not load models and files: ${e.message}`));
    }
  }
  loadChoices();
  return () => estimateSoon.cancel();
}
