import { createFastmax, isFastmaxError } from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import { type WebGpuTensor, webgpuBackend } from '../src/index.js';
import { adapterMissing, maxRelativeError, randomTensor } from './support.js';

const missing = await adapterMissing();
const backend = missing === undefined ? webgpuBackend() : undefined;
const float16 = backend === undefined ? false : (await backend.device()).features.has('shader-f16');

/**
 * float16 is storage only: inputs and outputs are rounded to half precision (unit roundoff
 * u = 2^-11 ≈ 4.9e-4), every kernel computes in float32.
 * - Against the oracle run on the rounded inputs (read back from the f16 tensors), the only extra
 *   error is the output's own rounding, at most u of each element, so u + the float32 tolerance
 *   (1e-4) bounds it relative to the output scale.
 * - Against the oracle on the original float32 inputs, input rounding moves each normalized score
 *   by a few u, each weight f(s) by about as much, and the output by a few u of its scale: the
 *   stated float16 tolerance is 8u ≈ 3.9e-3.
 */
const HALF_ULP = 2 ** -11;

describe.skipIf(!float16)(`float16 storage${float16 ? '' : ' (skipped: no shader-f16 adapter)'}`, () => {
  it('stores inputs and outputs in half precision and computes in float32', async () => {
    const fm = await createFastmax({ backend: backend! });
    const q = randomTensor([1, 2, 33, 8], 41);
    const k = randomTensor([1, 2, 33, 8], 42);
    const v = randomTensor([1, 2, 33, 8], 43);
    const [hq, hk, hv] = [
      await backend!.toDevice(q, 'float16'),
      await backend!.toDevice(k, 'float16'),
      await backend!.toDevice(v, 'float16'),
    ];
    expect(hq.dtype).toBe('float16');
    expect(hq.byteLength).toBe(q.data.length * 2);
    for (const causal of [false, true]) {
      const result = await fm.attention(hq, hk, hv, { causal, output: 'device' });
      const output = result.output as WebGpuTensor;
      expect(output.dtype).toBe('float16');
      const got = (await output.read()).data;
      const [rq, rk, rv] = [await hq.read(), await hk.read(), await hv.read()];
      expect(maxRelativeError(rq.data, q.data)).toBeLessThan(HALF_ULP);
      const onRounded = referenceAttention(rq, rk, rv, { causal }).output;
      expect(maxRelativeError(got, onRounded)).toBeLessThan(HALF_ULP + 1e-4);
      const onOriginal = referenceAttention(q, k, v, { causal }).output;
      expect(maxRelativeError(got, onOriginal)).toBeLessThan(8 * HALF_ULP);
      output.dispose();
    }
    // Host output from float16 inputs is float32.
    const host = await fm.attention(hq, hk, hv);
    expect((host.output as { data: Float32Array }).data).toBeInstanceOf(Float32Array);
  });
});

describe.skipIf(missing !== undefined || float16)('float16 without shader-f16', () => {
  it('is refused by name', async () => {
    const error = await backend!.toDevice(randomTensor([1, 1, 2, 2], 1), 'float16').catch((e: unknown) => e);
    expect(isFastmaxError(error, 'UNSUPPORTED_CAPABILITY')).toBe(true);
  });
});
