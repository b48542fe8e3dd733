// Forward timings of the CPU backend, the quick check for changes to the engine's per-chunk work
// (docs/benchmarks.md, CPU section): p = 1 causal N = 16384 and p = 2 non-causal N = 65536,
// D = Dv = 64, B = H = 1, with 1 and 2 threads; medians of 9 calls after 20 warm-up calls.
// Needs `pnpm --filter @fastmax/backend-cpu build`; run `node packages/backend-cpu/scripts/bench-forward.mjs`.

import { cpuBackend } from '@fastmax/backend-cpu';
import { createFastmax } from '@fastmax/core';

const rand = (n) => {
  const a = new Float32Array(n);
  let s = 12345;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    a[i] = s / 2 ** 32 - 0.5;
  }
  return a;
};
const cases = [
  { name: 'p=1 causal N=16384', p: 1, causal: true, N: 16384 },
  { name: 'p=2 non-causal N=65536', p: 2, causal: false, N: 65536 },
];
for (const threads of [1, 2]) {
  const fm = await createFastmax({ backend: cpuBackend({ threads }) });
  for (const c of cases) {
    const D = 64;
    const q = { shape: [1, 1, c.N, D], data: rand(c.N * D) };
    const k = { shape: [1, 1, c.N, D], data: rand(c.N * D) };
    const v = { shape: [1, 1, c.N, D], data: rand(c.N * D) };
    const opts = { order: c.p, causal: c.causal };
    const warm = 20;
    for (let i = 0; i < warm; i++) await fm.attention(q, k, v, opts);
    const t = [];
    for (let i = 0; i < 9; i++) {
      const s = performance.now();
      await fm.attention(q, k, v, opts);
      t.push(performance.now() - s);
    }
    t.sort((a, b) => a - b);
    console.log(`threads=${threads} ${c.name}: median ${t[4].toFixed(1)} ms (min ${t[0].toFixed(1)})`);
  }
  fm.dispose();
}
