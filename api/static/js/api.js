// The REST API (docs/api.md) as the dashboard calls it: every request carries the key as a Bearer token.

const KEY_STORAGE = 'greentrainer.apiKey';

// Fine-tuning jobs live at OpenAI's path.
export const JOBS = '/v1/fine_tuning/jobs';

export class ApiError extends Error {
  // body: the API's error in OpenAI's shape, {message, type, param, code, line?, field?, rho_min?}
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || 'http_error';
    this.type = body.type || null;
    this.line = body.line ?? null;
    this.field = body.field ?? null;
    this.rhoMin = body.rho_min ?? null;
    this.param = body.param ?? null;
  }
}

export function getKey() {
  return localStorage.getItem(KEY_STORAGE);
}

export function setKey(key) {
  localStorage.setItem(KEY_STORAGE, key);
}

export function clearKey() {
  localStorage.removeItem(KEY_STORAGE);
}

async function send(path, { method = 'GET', json, form, key = getKey() } = {}) {
  const headers = { Authorization: `Bearer ${key || ''}`, Accept: 'application/json' };
  let body;
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // multipart: the browser sets the boundary
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (cause) {
    throw new ApiError(0, { code: 'network', message: `the service cannot be reached (${cause.message})` });
  }
  if (!response.ok) {
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    const error = new ApiError(response.status, data?.error || { message: `${response.status} ${response.statusText}` });
    if (response.status === 401) window.dispatchEvent(new CustomEvent('gt:unauthorized', { detail: error }));
    throw error;
  }
  return response;
}

export async function api(path, options = {}) {
  return (await send(path, options)).json();
}

// Path with query parameters, leaving out null/undefined ones.
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') query.set(k, v);
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

// A plain link cannot send the Authorization header: fetch the file, then save it from a blob URL.
export async function download(path, fallbackName) {
  const response = await send(path);
  const disposition = response.headers.get('Content-Disposition') || '';
  const match = disposition.match(/filename="?([^";]+)"?/i);
  const name = match ? match[1] : fallbackName;
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement('a');
  link.href = url;
  link.download = name;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return { name, bytes: blob.size };
}
