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
});
