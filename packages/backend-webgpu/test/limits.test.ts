import { createFastmax } from '@fastmax/core';
import { referenceAttention, referenceBackward } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import { webgpuBackend } from '../src/index.js';
import { adapterMissing, maxRelativeError, randomTensor } from './support.js';

const missing = await adapterMissing();

describe.skipIf(missing !== undefined)('work is split by device limits, never refused', () => {
  // B·Hkv = 6 units of G = 2 query heads; one unit's queries take 2·40·8·4 = 2560 bytes, the whole q
  // 15 360 bytes, six times the binding limit below, so each pass holds one unit. Every grid
  // dimension is capped at 2 workgroups, so every dispatch is split on every axis.
  const limits = {
    maxStorageBufferBindingSize: 2560,
    maxComputeWorkgroupsPerDimension: 2,
    maxComputeWorkgroupStorageSize: 2048,
  };
  const q = randomTensor([2, 6, 40, 8], 11);
  const k = randomTensor([2, 3, 40, 8], 12);
  const v = randomTensor([2, 3, 40, 4], 13);

  it('forward, both paths, causal and padded, under tiny limits', async () => {
    const fm = await createFastmax({ backend: webgpuBackend({ limits }) });
    for (const path of ['factorized', 'direct'] as const) {
      for (const causal of [false, true]) {
        const options = { path, causal, keyLengths: [40, 31], chunkSize: 16 };
        const got = await fm.attention(q, k, v, options);
        const want = referenceAttention(q, k, v, options);
        expect(
          maxRelativeError((got.output as { data: Float32Array }).data, want.output),
          `${path} ${causal}`,
        ).toBeLessThan(1e-4);
      }
    }
    const device = await fm.attention(q, k, v, { output: 'device', order: 1 });
    const host = await (device.output as { read(): Promise<{ data: Float32Array }> }).read();
    expect(maxRelativeError(host.data, referenceAttention(q, k, v, { order: 1 }).output)).toBeLessThan(1e-4);
    await fm.dispose();
  }, 120_000);

  it('backward under tiny limits', async () => {
    const fm = await createFastmax({ backend: webgpuBackend({ limits }) });
    const dOut = randomTensor([2, 6, 40, 4], 14);
    const got = await fm.backward(q, k, v, dOut, { causal: true });
    const want = referenceBackward(q, k, v, dOut, { causal: true });
    expect(maxRelativeError((got.dq as { data: Float32Array }).data, want.dq)).toBeLessThan(1e-3);
    expect(maxRelativeError((got.dk as { data: Float32Array }).data, want.dk)).toBeLessThan(1e-3);
    expect(maxRelativeError((got.dv as { data: Float32Array }).data, want.dv)).toBeLessThan(1e-3);
    await fm.dispose();
  }, 120_000);
});
