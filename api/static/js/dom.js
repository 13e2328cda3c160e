// A small element builder: h('td', {class: 'num'}, text). Text always goes in as text, never as HTML,
// so names and messages from the API cannot inject markup.

const PROPERTIES = new Set(['value', 'checked', 'disabled', 'selected', 'hidden', 'open']);

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key === 'style' && typeof value === 'object') Object.assign(el.style, value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (PROPERTIES.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

export function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

// A table inside a box that scrolls sideways on narrow screens. columns: [{label, num?}].
export function table(columns, rows, props = {}) {
  const head = h('tr', {}, columns.map((c) => h('th', { class: c.num ? 'num' : null, scope: 'col', title: c.title }, c.label)));
  const tbody = h('tbody', {}, rows);
  return h('div', { class: 'table-scroll' }, h('table', props, h('thead', {}, head), tbody));
}

// An error box; `error` is an ApiError or any Error.
export function errorBox(error, props = {}) {
  return h('p', { class: 'error', role: 'alert', ...props }, error.message || String(error));
}
