// Live updates by polling, and a debounce for inputs.

// Run `task` now and then every `intervalMs` after it finishes, skipping while the tab is hidden.
// `task` returns false to stop (a job that ended). Returns the function that stops it.
export function poll(task, intervalMs) {
  let timer = null;
  let stopped = false;
  async function tick() {
    if (stopped) return;
    if (!document.hidden) {
      const again = await task();
      if (again === false) stopped = true;
    }
    if (!stopped) timer = setTimeout(tick, intervalMs);
  }
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

export function debounce(fn, waitMs) {
  let timer = null;
  const debounced = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), waitMs);
  };
  debounced.cancel = () => clearTimeout(timer);
  return debounced;
}
