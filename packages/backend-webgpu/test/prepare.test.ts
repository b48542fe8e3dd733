import { type FastmaxOptions, type HostTensor, keyLimit, prepareScores } from '@fastmax/core';
import { describe, expect, it } from 'vitest';
import { webgpuBackend } from '../src/index.js';
import { Runtime } from '../src/runtime.js';
import { adapterMissing, maxRelativeError, randomTensor, recordTestPrepare, skipNote } from './support.js';

const missing = await adapterMissing();

async function prepareOnDevice(runtime: Runtime, q: HostTensor, k: HostTensor, options: FastmaxOptions) {
  const { shape, resolved, encoder, temporaries, prepared } = recordTestPrepare(runtime, q, k, options);
  await runtime.submit(encoder, temporaries);
  const read = (s: { buffer: GPUBuffer; size: number }) => runtime.read(s.buffer, s.size);
  return {
    shape,
    resolved,
    x: await read(prepared.x),
    y: await read(prepared.y),
    sigma: await read(prepared.sigma),
  };
}

describe.skipIf(missing !== undefined)(
  `the WGSL prepare kernels against core prepareScores${skipNote(missing)}`,
  () => {
    const q = randomTensor([2, 4, 13, 6], 21);
    const k = randomTensor([2, 2, 11, 6], 22);
    const cases: FastmaxOptions[] = [
      { normalization: 'max-norm' },
      { normalization: 'max-norm', keyLengths: [11, 4] },
      { normalization: 'prefix-max-norm', causal: true, keyLengths: [9, 0] },
      { normalization: 'prefix-max-norm' },
      { normalization: 'l2', temperature: 2 },
      { normalization: { scale: 0.3 }, temperature: 1.5 },
    ];
    it.each(cases)('%o', async (options) => {
      const backend = webgpuBackend();
      const runtime = new Runtime(await backend.device(), 'test', {}, true);
      const got = await prepareOnDevice(runtime, q, k, options);
      const want = prepareScores(q, k, got.shape, got.resolved);
      // Float32 centering and norms of 6 values: a few ulps.
      expect(maxRelativeError(got.x, want.x)).toBeLessThan(1e-6);
      expect(maxRelativeError(got.y, want.y)).toBeLessThan(1e-6);
      expect(maxRelativeError(got.sigma, want.sigma)).toBeLessThan(1e-6);
      // The key limit drives the prefix maxima: a sanity check that the case exercises it.
      if (got.resolved.causal)
        expect(keyLimit(0, 0, got.shape, got.resolved)).toBeLessThan(got.shape.keyLength);
      await backend.dispose();
    });
  },
);
