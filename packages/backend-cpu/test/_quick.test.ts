import { createFastmax, type FastmaxOptions } from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';
import { expect, it } from 'vitest';
import { cpuBackend } from '../src/index.js';

function rand(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) % 2147483648;
    a[i] = (s / 2147483648) * 2 - 1;
  }
  return a;
}
const cases: [string, number, number, number, number, number, number, number, FastmaxOptions][] = [
  ['nc p2', 1, 1, 1, 37, 41, 8, 5, { order: 2 }],
  ['c p2', 1, 2, 1, 300, 300, 16, 12, { order: 2, causal: true }],
  ['c p2 chunk5', 2, 2, 2, 50, 60, 6, 9, { order: 2, causal: true, chunkSize: 5 }],
  ['direct', 2, 4, 2, 50, 70, 6, 9, { order: 3, causal: true, path: 'direct' }],
  ['l2 p1', 1, 1, 1, 20, 20, 4, 4, { order: 1, normalization: 'l2' }],
  ['scale p4', 1, 1, 1, 20, 33, 4, 4, { order: 4, normalization: { scale: 0.3 }, keyLengths: [20] }],
  ['prefix nc', 2, 1, 1, 40, 33, 4, 8, { order: 2, normalization: 'prefix-max-norm', keyLengths: [20, 0] }],
];
for (const [name, B, H, Hkv, N, M, D, Dv, opts] of cases) {
  for (const threads of [1, 2]) {
    it(`${name} threads ${threads}`, async () => {
      const q = { shape: [B, H, N, D] as const, data: rand(B * H * N * D, 1) };
      const k = { shape: [B, Hkv, M, D] as const, data: rand(B * Hkv * M * D, 2) };
      const v = { shape: [B, Hkv, M, Dv] as const, data: rand(B * Hkv * M * Dv, 3) };
      const fm = await createFastmax({ backend: cpuBackend({ threads, parallelThreshold: 0 }) });
      const r = await fm.attention(q, k, v, opts);
      const ref = referenceAttention(q, k, v, opts);
      let err = 0;
      let scale = 0;
      const out = (r.output as { data: Float32Array }).data;
      for (let i = 0; i < ref.output.length; i++) {
        err = Math.max(err, Math.abs(out[i]! - ref.output[i]!));
        scale = Math.max(scale, Math.abs(ref.output[i]!));
      }
      expect(r.degenerateRows).toBe(ref.degenerateRows);
      expect(err / scale).toBeLessThan(1e-5);
      await fm.dispose();
    });
  }
}
