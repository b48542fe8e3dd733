import { createFastmax } from '@fastmax/core';
import { referenceAttention, referenceBackward } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import { webgpuBackend } from '../src/index.js';
import { adapterMissing, maxRelativeError, randomTensor, skipNote } from './support.js';

const missing = await adapterMissing();

describe.skipIf(missing !== undefined)(
  `work is split by device limits, never refused${skipNote(missing)}`,
  () => {
    // B·Hkv = 6 units of G = 2 query heads; one query head's q takes 40·8·4 = 1280 bytes, the whole q
    // 15 360 bytes. A binding limit of 2560 bytes fits one unit per pass; 1280 bytes fits not even one
    // unit's two query heads, so each unit is done in two passes of one head. Every grid dimension is
    // capped at 2 workgroups, so every dispatch is also split on every axis.
    const configurations = [
      {
        split: 'units',
        passes: 6,
        limits: {
          maxStorageBufferBindingSize: 2560,
          maxComputeWorkgroupsPerDimension: 2,
          maxComputeWorkgroupStorageSize: 2048,
        },
      },
      {
        split: 'query heads',
        passes: 12,
        limits: {
          maxStorageBufferBindingSize: 1280,
          maxComputeWorkgroupsPerDimension: 2,
          maxComputeWorkgroupStorageSize: 2048,
        },
      },
    ];
    const q = randomTensor([2, 6, 40, 8], 11);
    const k = randomTensor([2, 3, 40, 8], 12);
    const v = randomTensor([2, 3, 40, 4], 13);

    it.each(configurations)(
      'forward, both paths, causal and padded, split by $split',
      async ({ limits, passes }) => {
        const backend = webgpuBackend({ limits });
        const fm = await createFastmax({ backend });
        // Each pass submits three command buffers: its kernels, the output readback and the readback
        // of its degenerate-row count.
        const queue = (await backend.device()).queue;
        const submit = queue.submit.bind(queue);
        let submissions = 0;
        queue.submit = (buffers) => {
          submissions++;
          submit(buffers);
        };
        await fm.attention(q, k, v, { path: 'factorized' });
        expect(submissions).toBe(3 * passes);
        queue.submit = submit;
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
        expect(maxRelativeError(host.data, referenceAttention(q, k, v, { order: 1 }).output)).toBeLessThan(
          1e-4,
        );
        await fm.dispose();
      },
      120_000,
    );

    it.each(configurations)(
      'backward, split by $split',
      async ({ limits }) => {
        const fm = await createFastmax({ backend: webgpuBackend({ limits }) });
        const dOut = randomTensor([2, 6, 40, 4], 14);
        for (const path of ['factorized', 'direct'] as const) {
          for (const causal of [false, true]) {
            const options = { path, causal, keyLengths: [40, 31], chunkSize: 16 };
            const got = await fm.backward(q, k, v, dOut, options);
            const want = referenceBackward(q, k, v, dOut, options);
            const label = `${path} ${causal}`;
            expect(maxRelativeError((got.dq as { data: Float32Array }).data, want.dq), label).toBeLessThan(
              1e-3,
            );
            expect(maxRelativeError((got.dk as { data: Float32Array }).data, want.dk), label).toBeLessThan(
              1e-3,
            );
            expect(maxRelativeError((got.dv as { data: Float32Array }).data, want.dv), label).toBeLessThan(
              1e-3,
            );
          }
        }
        await fm.dispose();
      },
      120_000,
    );
  },
);
