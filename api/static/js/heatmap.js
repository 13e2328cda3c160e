// Which tensors were trained in which epoch: rows are tensors in model order, grouped by layer; columns are
// epochs. Drawn with CSS grid cells, so that each cell has a tooltip and rows stay readable at any count.

import { h, replace } from './dom.js';

// The layer a tensor belongs to: the name up to its first numeric part ('model.layers.3'), else the module
// that holds it ('model.embed_tokens', 'lm_head').
export function layerOf(name) {
  const parts = name.split('.');
  const index = parts.findIndex((p) => /^\d+$/.test(p));
  if (index >= 0) return parts.slice(0, index + 1).join('.');
  return parts.length > 1 ? parts.slice(0, -1).join('.') : name;
}

// Model order: the model's own list, with any other trained name (adapters, a classification head) placed
// after the last known name that came before it in an epoch's list.
export function tensorOrder(modelNames, epochLists) {
  const order = [...(modelNames || [])];
  const known = new Set(order);
  for (const list of epochLists) {
    let anchor = -1;
    for (const name of list) {
      if (known.has(name)) {
        anchor = order.indexOf(name);
        continue;
      }
      order.splice(anchor + 1, 0, name);
      known.add(name);
      anchor += 1;
    }
  }
  return order;
}

// columns: [{epoch, tensors: Set, pending: bool}]; modelNames: the model's tensor names in order (or null).
export function renderHeatmap(container, modelNames, columns) {
  if (!columns.length) {
    replace(container, h('p', { class: 'muted' }, 'No epoch has chosen its tensors yet.'));
    return;
  }
  const names = tensorOrder(modelNames, columns.map((c) => [...c.tensors]));
  const grid = h('div', {
    class: 'heatmap', id: 'heatmap', role: 'table', 'aria-label': 'tensors trained per epoch',
    style: { gridTemplateColumns: `minmax(8rem, max-content) repeat(${columns.length}, minmax(16px, 28px)) max-content` },
  });
  grid.append(h('div', { class: 'hm-head hm-corner', role: 'columnheader' }, 'tensor \\ epoch'));
  for (const c of columns) {
    grid.append(h('div', { class: 'hm-head', role: 'columnheader', title: c.pending ? 'running' : '' }, String(c.epoch)));
  }
  grid.append(h('div', { class: 'hm-head', role: 'columnheader' }, 'trained'));
  let group = null;
  for (const name of names) {
    const layer = layerOf(name);
    if (layer !== group) {
      group = layer;
      const size = names.filter((n) => layerOf(n) === layer).length;
      grid.append(h('div', { class: 'hm-group', role: 'rowheader' }, `${layer} (${size} tensor${size === 1 ? '' : 's'})`));
    }
    const short = name.startsWith(`${layer}.`) ? name.slice(layer.length + 1) : name;
    grid.append(h('div', { class: 'hm-label', role: 'rowheader', title: name }, short));
    let count = 0;
    for (const c of columns) {
      const on = c.tensors.has(name);
      count += on ? 1 : 0;
      grid.append(h('div', {
        class: `hm-cell${on ? ' on' : ''}${c.pending ? ' pending' : ''}`, role: 'cell',
        title: `${name}, epoch ${c.epoch}: ${on ? 'trained' : 'frozen'}${c.pending ? ' (epoch running)' : ''}`,
        dataset: { tensor: name, epoch: String(c.epoch), trained: on ? '1' : '0' },
      }));
    }
    grid.append(h('div', { class: 'hm-count', role: 'cell' }, `${count}/${columns.length}`));
  }
  const legend = h('div', { class: 'legend' },
    h('span', {}, h('span', { class: 'swatch', style: { background: 'var(--heat-on)' } }), 'trained'),
    h('span', {}, h('span', { class: 'swatch', style: { background: 'var(--heat-off)' } }), 'frozen'),
    h('span', {}, `${names.length} tensors, ${columns.length} epoch${columns.length === 1 ? '' : 's'}`));
  replace(container, h('div', { class: 'heatmap-scroll' }, grid), legend);
}
