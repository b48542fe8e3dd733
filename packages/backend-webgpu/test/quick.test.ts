import { createFastmax, resolveOptions } from '@fastmax/core';
import { referenceAttention, referenceBackward } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import { causalChunk } from '../src/backend.js';
import { webgpuBackend } from '../src/index.js';
import { adapterMissing, maxRelativeError, randomTensor, skipNote } from './support.js';

const missing = await adapterMissing();

describe('the causal chunk on the GPU', () => {
  it("grows the planner's chunk to at least N/64 rows, only when the caller left it to the planner", () => {
    const causal = resolveOptions({ causal: true, order: 1 });
    expect(causalChunk(32, causal, 1024)).toBe(32);
    expect(causalChunk(32, causal, 4096)).toBe(64);
    expect(causalChunk(32, causal, 65536)).toBe(1024);
    expect(causalChunk(256, causal, 1 << 20)).toBe(4096);
    expect(causalChunk(32, resolveOptions({ causal: true, order: 1, chunkSize: 32 }), 65536)).toBe(32);
    expect(causalChunk(32, resolveOptions({ causal: false, order: 1 }), 65536)).toBe(32);
  });
});

describe.skipIf(missing !== undefined)(`webgpu forward smoke${skipNote(missing)}`, () => {
  it('matches the float64 oracle, both paths, causal and not', async () => {
    const fm = await createFastmax({ backend: webgpuBackend({ debug: true }) });
    const q = randomTensor([1, 2, 37, 8], 1);
    const k = randomTensor([1, 2, 37, 8], 2);
    const v = randomTensor([1, 2, 37, 5], 3);
    for (const causal of [false, true]) {
      for (const path of ['factorized', 'direct'] as const) {
        const options = { causal, path, chunkSize: 8 };
        const got = await fm.attention(q, k, v, options);
        const want = referenceAttention(q, k, v, options);
        const data = (got.output as { data: Float32Array }).data;
        expect(maxRelativeError(data, want.output), `${path} causal=${causal}`).toBeLessThan(1e-5);
      }
    }
    await fm.dispose();
  });

  it('with a grown causal chunk (N = 4096, p = 1: 16 rows by the planner, 64 here), forward and backward match the float64 oracle', async () => {
    const fm = await createFastmax({ backend: webgpuBackend({ debug: true }) });
    const q = randomTensor([1, 1, 4096, 8], 21);
    const k = randomTensor([1, 1, 4096, 8], 22);
    const v = randomTensor([1, 1, 4096, 4], 23);
    const dOut = randomTensor([1, 1, 4096, 4], 24);
    const options = { causal: true, order: 1, path: 'factorized' } as const;
    expect(fm.plan(q, k, v, options).chunkSize).toBe(16);
    const got = await fm.attention(q, k, v, options);
    const want = referenceAttention(q, k, v, options);
    expect(maxRelativeError((got.output as { data: Float32Array }).data, want.output)).toBeLessThan(1e-5);
    const grads = await fm.backward(q, k, v, dOut, options);
    const wantGrads = referenceBackward(q, k, v, dOut, options);
    for (const name of ['dq', 'dk', 'dv'] as const) {
      const data = (grads[name] as { data: Float32Array }).data;
      expect(maxRelativeError(data, wantGrads[name]), name).toBeLessThan(1e-4);
    }
    await fm.dispose();
  });

  it('runs concurrent calls on one backend independently (pooled buffers, shared pipelines)', async () => {
    const fm = await createFastmax({ backend: webgpuBackend({ debug: true }) });
    const inputs = [1, 2, 3, 4].map((seed) => ({
      q: randomTensor([1, 2, 21, 8], 10 * seed),
      k: randomTensor([1, 2, 21, 8], 10 * seed + 1),
      v: randomTensor([1, 2, 21, 3], 10 * seed + 2),
      options: { causal: seed % 2 === 0, path: seed > 2 ? 'direct' : 'factorized' } as const,
    }));
    const results = await Promise.all(inputs.map(({ q, k, v, options }) => fm.attention(q, k, v, options)));
    results.forEach((result, index) => {
      const { q, k, v, options } = inputs[index]!;
      const want = referenceAttention(q, k, v, options).output;
      expect(maxRelativeError((result.output as { data: Float32Array }).data, want)).toBeLessThan(1e-5);
    });
    await fm.dispose();
  });
});
