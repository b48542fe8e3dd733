// Relative error of the CPU backend against a float64 oracle at large N, and peak RSS.
//
//   node scripts/accuracy.mjs                 errors at N = 4096, 65536, 1048576 (needs `pnpm build`)
//   node scripts/accuracy.mjs --rss 1048576   peak RSS of one p = 2 causal forward at that N
//
// Error: max over checked rows of |fastmax - oracle| divided by the largest |oracle| value (the
// conformance suite's measure). N = 4096: every row, oracle = core's referenceAttention. Larger N:
// the full O(N²) oracle is too slow, so 256 rows (the first, the last and evenly spaced ones) are
// evaluated in float64 straight from the definition, on core's prepareScores (float64).
import {
  createFastmax,
  keyLimit,
  prepareScores,
  resolveOptions,
  validateAttentionInputs,
} from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';
import { cpuBackend } from '../dist/index.js';

const D = 64;

function gaussian(length, seed) {
  let state = seed >>> 0 || 1;
  const next = () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return (state + 0.5) / 2 ** 32;
  };
  const data = new Float32Array(length);
  for (let i = 0; i < length; i += 2) {
    const r = Math.sqrt(-2 * Math.log(next()));
    const a = 2 * Math.PI * next();
    data[i] = r * Math.cos(a);
    if (i + 1 < length) data[i + 1] = r * Math.sin(a);
  }
  return data;
}

function inputs(N, seed) {
  const shape = [1, 1, N, D];
  return {
    q: { shape, data: gaussian(N * D, seed) },
    k: { shape, data: gaussian(N * D, seed + 1) },
    v: { shape, data: gaussian(N * D, seed + 2) },
  };
}

function sampledOracle(t, options, rows) {
  const resolved = resolveOptions(options);
  const shape = validateAttentionInputs(t.q, t.k, t.v, resolved);
  const { x, y, sigma } = prepareScores(t.q, t.k, shape, resolved);
  const a = resolved.coefficients;
  const out = new Map();
  for (const i of rows) {
    const limit = keyLimit(0, i, shape, resolved);
    const num = new Float64Array(D);
    let den = 0;
    for (let j = 0; j < limit; j++) {
      let dot = 0;
      for (let d = 0; d < D; d++) dot += x[i * D + d] * y[j * D + d];
      const s = sigma[i] * dot;
      let w = 0;
      for (let l = a.length - 1; l >= 0; l--) w = w * s + a[l];
      den += w;
      for (let d = 0; d < D; d++) num[d] += w * t.v.data[j * D + d];
    }
    out.set(
      i,
      Array.from(num, (value) => value / den),
    );
  }
  return out;
}

async function errors() {
  const fm = await createFastmax({ backend: cpuBackend() });
  const results = [];
  for (const N of [4096, 65536, 1048576]) {
    const t = inputs(N, 7);
    for (const causal of [true, false]) {
      const options = { order: 2, causal };
      const start = performance.now();
      const result = await fm.attention(t.q, t.k, t.v, options);
      const ms = performance.now() - start;
      const got = result.output.data;
      let maxError = 0;
      let scale = 0;
      let rowsChecked = 0;
      if (N <= 4096) {
        const expected = referenceAttention(t.q, t.k, t.v, options).output;
        for (let i = 0; i < expected.length; i++) {
          maxError = Math.max(maxError, Math.abs(got[i] - expected[i]));
          scale = Math.max(scale, Math.abs(expected[i]));
        }
        rowsChecked = N;
      } else {
        const rows = new Set();
        for (let r = 0; r < 256; r++) rows.add(Math.round((r * (N - 1)) / 255));
        const expected = sampledOracle(t, options, [...rows]);
        for (const [i, row] of expected) {
          for (let d = 0; d < D; d++) {
            maxError = Math.max(maxError, Math.abs(got[i * D + d] - row[d]));
            scale = Math.max(scale, Math.abs(row[d]));
          }
        }
        rowsChecked = rows.size;
      }
      const line = { N, causal, rowsChecked, relativeError: maxError / scale, forwardMs: Math.round(ms) };
      results.push(line);
      console.log(JSON.stringify(line));
    }
  }
  await fm.dispose();
  return results;
}

async function rss(N) {
  const before = process.memoryUsage().rss;
  const t = inputs(N, 7);
  const afterInputs = process.memoryUsage().rss;
  const threads = Number(process.env.THREADS ?? '0') || undefined;
  const fm = await createFastmax({ backend: cpuBackend(threads === undefined ? {} : { threads }) });
  const result = await fm.attention(t.q, t.k, t.v, { order: 2, causal: true });
  const peak = process.resourceUsage().maxRSS * 1024;
  console.log(
    JSON.stringify({
      N,
      threads: await fm.backend.threadCount(),
      inputsMiB: Math.round((afterInputs - before) / 2 ** 20),
      outputMiB: Math.round(result.output.data.byteLength / 2 ** 20),
      peakRssMiB: Math.round(peak / 2 ** 20),
    }),
  );
  await fm.dispose();
}

const rssIndex = process.argv.indexOf('--rss');
if (rssIndex >= 0) await rss(Number(process.argv[rssIndex + 1] ?? 1048576));
else await errors();
