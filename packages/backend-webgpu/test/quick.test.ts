import { createFastmax } from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import { webgpuBackend } from '../src/index.js';
import { adapterMissing, maxRelativeError, randomTensor, skipNote } from './support.js';

const missing = await adapterMissing();

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
