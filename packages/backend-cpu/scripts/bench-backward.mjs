// Backward timings of the CPU backend against its forward (docs/benchmarks.md, CPU section, target
// "backward <= 3x the forward"): p = 2 causal, N = 16384, D = Dv = 64, B = H = 1, default options
// (normalization prefix-max-norm), with 1 and 2 threads; medians of 7 calls after 5 warm-up calls.
// The "core" lines time the calling thread's share on its own: core's float64 normalization
// (`prepareScores` and `prepareScoresBackward`), which no worker can take over.
// Needs `pnpm --filter @fastmax/core build && pnpm --filter @fastmax/backend-cpu build`; run
// `node packages/backend-cpu/scripts/bench-backward.mjs [N]`.

import { cpuBackend } from '@fastmax/backend-cpu';
import {
  createFastmax,
  prepareScores,
  prepareScoresBackward,
  resolveOptions,
  validateAttentionInputs,
} from '@fastmax/core';

const N = Number(process.argv[2] ?? 16384);
const D = 64;
const WARM = 5;
const RUNS = 7;

const rand = (n, seed) => {
  const a = new Float32Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    a[i] = s / 2 ** 32 - 0.5;
  }
  return a;
};

const median = async (fn) => {
  for (let i = 0; i < WARM; i++) await fn();
  const t = [];
  for (let i = 0; i < RUNS; i++) {
    const s = performance.now();
    await fn();
    t.push(performance.now() - s);
  }
  t.sort((a, b) => a - b);
  return { median: t[RUNS >> 1], min: t[0] };
};

const ms = ({ median: m, min }) => `median ${m.toFixed(1).padStart(7)} ms (min ${min.toFixed(1)})`;

const q = { shape: [1, 1, N, D], data: rand(N * D, 1) };
const k = { shape: [1, 1, N, D], data: rand(N * D, 2) };
const v = { shape: [1, 1, N, D], data: rand(N * D, 3) };
const dOut = { shape: [1, 1, N, D], data: rand(N * D, 4) };
const options = { order: 2, causal: true };

const resolved = resolveOptions(options);
const shape = validateAttentionInputs(q, k, v, resolved);
let prepared = prepareScores(q, k, shape, resolved);
const dx = Float64Array.from(rand(N * D, 5));
const dy = Float64Array.from(rand(N * D, 6));
const dsigma = Float64Array.from(rand(N, 7));
console.log(`p=2 causal N=${N} D=Dv=${D} B=H=1, normalization ${resolved.normalization.kind}`);
console.log(
  `core prepareScores          ${ms(await median(() => (prepared = prepareScores(q, k, shape, resolved))))}`,
);
console.log(
  `core prepareScoresBackward  ${ms(await median(() => prepareScoresBackward(prepared, shape, resolved, dx, dy, dsigma)))}`,
);

for (const threads of [1, 2]) {
  const fm = await createFastmax({ backend: cpuBackend({ threads }) });
  const forward = await median(() => fm.attention(q, k, v, options));
  const backward = await median(() => fm.backward(q, k, v, dOut, options));
  console.log(`threads=${threads} forward                   ${ms(forward)}`);
  console.log(`threads=${threads} backward                  ${ms(backward)}`);
  console.log(
    `threads=${threads} backward / forward        ${(backward.median / forward.median).toFixed(2)}x`,
  );
  await fm.dispose();
}
