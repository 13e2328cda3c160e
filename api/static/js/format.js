// Numbers as people read them, always with their unit.

const PREFIXES = [
  [1e18, 'E'], [1e15, 'P'], [1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k'], [1, ''],
  [1e-3, 'm'], [1e-6, 'µ'], [1e-9, 'n'], [1e-12, 'p'],
];

// 254410752, 'FLOPs' -> '254 MFLOPs'; 0.0551, 'J' -> '55.1 mJ'; 0 -> '0 J'.
export function si(value, unit, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return '—';
  if (value === 0) return `0 ${unit}`;
  const abs = Math.abs(value);
  const [scale, prefix] = PREFIXES.find(([s]) => abs >= s * 0.9995) || PREFIXES[PREFIXES.length - 1];
  return `${trimZeros((value / scale).toPrecision(digits))} ${prefix}${unit}`;
}

// '1.50' -> '1.5', '2.00' -> '2', '100' stays.
function trimZeros(text) {
  return text.includes('.') && !text.includes('e') ? text.replace(/0+$/, '').replace(/\.$/, '') : text;
}

export const flops = (v) => si(v, 'FLOPs');
export const joules = (v) => si(v, 'J');
export const grams = (v) => si(v, 'gCO2e');
export const bytes = (v) => si(v, 'B');

export function percent(fraction, digits = 1) {
  if (fraction === null || fraction === undefined || Number.isNaN(fraction)) return '—';
  return `${(100 * fraction).toFixed(digits)} %`;
}

export function fixed(value, digits = 2) {
  return value === null || value === undefined ? '—' : Number(value).toFixed(digits);
}

export function integer(value) {
  return value === null || value === undefined ? '—' : Math.round(value).toLocaleString('en-US');
}

// Seconds as '1h02m', '3m05s', '12 s', '0.39 s'.
export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '—';
  if (seconds < 10) return `${Number(seconds.toPrecision(2))} s`;
  const s = Math.round(seconds);
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  const secs = s % 60;
  if (hours) return `${hours}h${String(minutes).padStart(2, '0')}m`;
  return minutes ? `${minutes}m${String(secs).padStart(2, '0')}s` : `${secs} s`;
}

// Seconds since 1970 -> '12 s ago', '5 min ago', '3 h ago', '2 d ago'.
export function age(unixSeconds, now = Date.now() / 1000) {
  if (!unixSeconds) return '—';
  const d = Math.max(0, now - unixSeconds);
  if (d < 60) return `${Math.floor(d)} s ago`;
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return `${Math.floor(d / 86400)} d ago`;
}

export function dateTime(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : '—';
}

export function clock(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false }) : '';
}
