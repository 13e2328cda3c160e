// Datasets: upload a JSONL file (POST /v1/files, multipart) and list the uploaded ones. The API checks every
// line and names the first bad one; the view shows that line from the local file, with its neighbours.

import { api } from '../api.js';
import { h, replace, table } from '../dom.js';
import { age, bytes, dateTime, integer } from '../format.js';

const CONTEXT_LINES = 1; // lines shown before and after a bad one
const MAX_LINE_CHARS = 240;

const EXAMPLES = [
  '{"prompt": "What is 2 plus 2? ", "completion": "It is 4."}',
  '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
  '{"text": "great film", "label": "positive"}',
];

// The bad line and its neighbours, read from the file the user picked.
async function badLines(file, line) {
  const text = await file.text();
  const lines = text.split(/\r?\n/);
  if (lines.length > 1 && lines[lines.length - 1] === '') lines.pop(); // the newline that ends the file
  const first = Math.max(1, line - CONTEXT_LINES);
  const last = Math.min(lines.length, line + CONTEXT_LINES);
  const out = [];
  for (let n = first; n <= last; n += 1) {
    const content = lines[n - 1] ?? '';
    const shown = content.length > MAX_LINE_CHARS ? `${content.slice(0, MAX_LINE_CHARS)}…` : content;
    out.push(h('div', { class: n === line ? 'bad' : null, dataset: { line: String(n) } }, h('span', { class: 'ln' }, String(n)), shown));
  }
  return h('div', { class: 'bad-lines', id: 'bad-lines' }, out);
}

export function render(root) {
  const input = h('input', { id: 'dataset-file', name: 'file', type: 'file', accept: '.jsonl,.json,application/jsonl', required: true });
  const button = h('button', { type: 'submit', class: 'primary', id: 'upload-button' }, 'Upload');
  const result = h('div', { id: 'upload-result', 'aria-live': 'polite' });
  const list = h('div', { id: 'files-box' }, h('p', { class: 'muted' }, 'Loading datasets…'));
  const form = h('form', { id: 'upload-form', class: 'stack' },
    h('label', { for: 'dataset-file' }, 'JSONL dataset (one example per line)'), input,
    h('div', { class: 'row' }, button), result);

  replace(root,
    h('h1', {}, 'Datasets'),
    h('div', { class: 'grid section' },
      h('section', { class: 'card' }, h('h2', {}, 'Upload'), form),
      h('section', { class: 'card' }, h('h2', {}, 'Line formats'),
        h('p', { class: 'muted small' }, 'Every line of a file has the same format: a prompt and its completion, a chat, or a labelled text.'),
        h('div', { class: 'table-scroll' }, EXAMPLES.map((e) => h('pre', { class: 'mono small', style: { margin: '0.3rem 0' } }, e))))),
    h('section', { class: 'card' }, h('h2', {}, 'Uploaded datasets'), list));

  async function loadFiles() {
    try {
      const files = await api('/v1/files?limit=100');
      const now = Date.now() / 1000;
      if (!files.data.length) {
        replace(list, h('p', { class: 'muted' }, 'No dataset yet.'));
        return;
      }
      const rows = files.data.map((f) => h('tr', { dataset: { fileId: f.id } },
        h('td', { class: 'id' }, f.id), h('td', {}, f.filename), h('td', {}, f.format),
        h('td', { class: 'num' }, integer(f.examples)), h('td', { class: 'num' }, f.tokens === null ? '—' : integer(f.tokens)),
        h('td', { class: 'num' }, bytes(f.bytes)), h('td', { class: 'nowrap', title: dateTime(f.created_at) }, age(f.created_at, now)),
        h('td', {}, h('a', { href: `#/new?file=${encodeURIComponent(f.id)}` }, 'New job'))));
      replace(list, table([
        { label: 'File' }, { label: 'Name' }, { label: 'Format' }, { label: 'Examples', num: true },
        { label: 'Tokens', num: true }, { label: 'Size', num: true }, { label: 'Age' }, { label: '' },
      ], rows, { id: 'files-table' }));
    } catch (e) {
      replace(list, h('p', { class: 'error', role: 'alert' }, `Could not load the datasets: ${e.message}`));
    }
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const file = input.files[0];
    if (!file) {
      replace(result, h('p', { class: 'error', role: 'alert' }, 'Choose a JSONL file first.'));
      return;
    }
    const data = new FormData();
    data.append('file', file, file.name);
    data.append('purpose', 'fine-tune');
    button.disabled = true;
    replace(result, h('p', { class: 'muted' }, `Uploading and checking ${file.name}…`));
    try {
      const uploaded = await api('/v1/files', { method: 'POST', form: data });
      replace(result, h('div', { class: 'notice', id: 'upload-ok', dataset: { fileId: uploaded.id } },
        `${uploaded.filename}: ${integer(uploaded.examples)} examples (${uploaded.format})`,
        uploaded.tokens === null ? '' : `, ${integer(uploaded.tokens)} tokens`, '. ',
        h('a', { href: `#/new?file=${encodeURIComponent(uploaded.id)}`, id: 'use-file' }, 'Create a job with it')));
      form.reset();
      loadFiles();
    } catch (e) {
      const where = e.line ? `Line ${e.line}${e.field ? `, field "${e.field}"` : ''}` : null;
      const box = h('div', { class: 'error', role: 'alert', id: 'upload-error', dataset: { line: e.line ?? '', field: e.field ?? '' } },
        where ? h('strong', { style: { display: 'block' } }, where) : null, h('span', {}, e.message));
      if (e.line) box.append(await badLines(file, e.line));
      replace(result, box);
    } finally {
      button.disabled = false;
    }
  });

  loadFiles();
  return null;
}
