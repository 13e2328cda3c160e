// Charts with Chart.js, vendored in /static/vendor/chart.umd.js (see docs/dashboard.md). The library is
// loaded the first time a chart is drawn, so that the jobs list does not wait for it.

let loading = null;

export function loadChart() {
  if (window.Chart) return Promise.resolve(window.Chart);
  if (!loading) {
    loading = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = '/static/vendor/chart.umd.js';
      script.onload = () => resolve(window.Chart);
      script.onerror = () => reject(new Error('the charting library could not be loaded'));
      document.head.append(script);
    });
  }
  return loading;
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function baseOptions(Chart) {
  const text = cssVar('--text');
  const grid = cssVar('--border');
  Chart.defaults.color = cssVar('--muted');
  Chart.defaults.borderColor = grid;
  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  return {
    responsive: true,
    maintainAspectRatio: false,
    animation: false, // live updates redraw often; no animation keeps them calm and cheap
    interaction: { mode: 'index', intersect: false },
    plugins: { legend: { labels: { color: text, boxWidth: 12 } } },
  };
}

// Per-epoch FLOPs: the job's spending stacked by kind (forward, activation gradients, weight gradients,
// selection) beside what full fine-tuning would spend on the same tokens.
export async function flopsChart(canvas, epochs, format) {
  const Chart = await loadChart();
  const labels = epochs.map((e) => `epoch ${e.epoch}`);
  const part = (key, label, color) => ({
    label, data: epochs.map((e) => e.flops[key]), backgroundColor: cssVar(color), stack: 'job',
  });
  const data = {
    labels,
    datasets: [
      part('fwd', 'forward', '--fwd'),
      part('bwd_act', 'activation gradients', '--bwd-act'),
      part('bwd_weight', 'weight gradients', '--bwd-weight'),
      part('selection', 'tensor selection', '--selection'),
      { label: 'full fine-tuning', data: epochs.map((e) => e.flops.full), backgroundColor: cssVar('--full'), stack: 'full' },
    ],
  };
  const options = baseOptions(Chart);
  options.scales = {
    x: { stacked: true },
    y: { stacked: true, beginAtZero: true, title: { display: true, text: 'FLOPs' }, ticks: { callback: (v) => format(v) } },
  };
  options.plugins.tooltip = { callbacks: { label: (ctx) => `${ctx.dataset.label}: ${format(ctx.parsed.y)}` } };
  return upsert(Chart, canvas, 'bar', data, options);
}

// Training and validation loss per epoch.
export async function lossChart(canvas, epochs) {
  const Chart = await loadChart();
  const line = (key, label, color, dash) => ({
    label, data: epochs.map((e) => e[key]), borderColor: cssVar(color), backgroundColor: cssVar(color),
    borderDash: dash, spanGaps: true, tension: 0.2, pointRadius: 3,
  });
  const datasets = [line('train_loss', 'training loss', '--fwd', [])];
  if (epochs.some((e) => e.valid_loss !== null)) datasets.push(line('valid_loss', 'validation loss', '--selection', [6, 4]));
  const options = baseOptions(Chart);
  options.scales = {
    x: { title: { display: true, text: 'epoch' } },
    y: { title: { display: true, text: 'loss (cross-entropy, nats)' } },
  };
  return upsert(Chart, canvas, 'line', { labels: epochs.map((e) => e.epoch), datasets }, options);
}

// Draw once, then update in place on later polls.
function upsert(Chart, canvas, type, data, options) {
  const existing = Chart.getChart(canvas);
  if (existing) {
    existing.data = data;
    existing.update('none');
    return existing;
  }
  return new Chart(canvas, { type, data, options });
}

export function destroyCharts(root) {
  if (!window.Chart) return;
  for (const canvas of root.querySelectorAll('canvas')) window.Chart.getChart(canvas)?.destroy();
}
