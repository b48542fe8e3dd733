import {
  createFastmax,
  type FastmaxOptions,
  type HostTensor,
  isDeviceTensor,
  prepareScores,
  prepareScoresBackward,
} from '@fastmax/core';
import { referenceBackward } from '@fastmax/core/reference';
import { describe, expect, it, vi } from 'vitest';
import { recordPrepareBackward } from '../src/backend.js';
import { WebGpuTensor, webgpuBackend } from '../src/index.js';
import { Runtime } from '../src/runtime.js';
import { adapterMissing, maxRelativeError, randomTensor, recordTestPrepare, skipNote } from './support.js';

const missing = await adapterMissing();

function copyRow(tensor: HostTensor, from: number, to: number): void {
  const D = tensor.shape[3];
  tensor.data.copyWithin(to * D, from * D, (from + 1) * D);
}

function constantRow(tensor: HostTensor, row: number, value: number): void {
  const D = tensor.shape[3];
  tensor.data.fill(value, row * D, (row + 1) * D);
}

/**
 * Queries and keys whose maxima tie (a row copied to a later row, so both have the largest norm
 * and core's lowest-index rule decides where the gradient goes) and that hold zero-norm rows
 * (constant rows center to 0: no argmax, division by 1).
 */
function awkwardInputs(): { q: HostTensor; k: HostTensor } {
  const q = randomTensor([2, 4, 13, 6], 31);
  const k = randomTensor([2, 2, 11, 6], 32);
  const D = 6;
  for (const tensor of [q, k]) {
    const rows = tensor.data.length / D;
    const perHead = tensor.shape[2];
    for (let head = 0; head < rows / perHead; head++) {
      const base = head * perHead;
      // Scale one row up so it is the head's maximum, then tie it with a later row.
      for (let d = 0; d < D; d++) tensor.data[(base + 2) * D + d]! *= 3;
      copyRow(tensor, base + 2, base + 6);
      // Rows 0 and 1 have zero centered norm: prefix maxima stay 0 (no argmax) until row 2.
      constantRow(tensor, base, 0.25 * (head + 1));
      constantRow(tensor, base + 1, 0);
      // A zero row later on (l2 divides it by 1).
      constantRow(tensor, base + 8, -0.5);
    }
  }
  return { q, k };
}

async function chainOnDevice(
  runtime: Runtime,
  q: HostTensor,
  k: HostTensor,
  options: FastmaxOptions,
  dx: Float32Array,
  dy: Float32Array,
  dsigma: Float32Array,
) {
  const { shape, resolved, geometry, encoder, borrowed, temporaries, validKeys, prepared, slice } =
    recordTestPrepare(runtime, q, k, options);
  const chained = recordPrepareBackward(
    runtime,
    encoder,
    temporaries,
    geometry,
    resolved,
    prepared,
    validKeys,
    { dx: slice(dx), dy: slice(dy), dsigma: slice(dsigma) },
    borrowed,
  );
  await runtime.submit(encoder, temporaries);
  return {
    shape,
    resolved,
    dq: await runtime.read(chained.dq.buffer, chained.dq.size),
    dk: await runtime.read(chained.dk.buffer, chained.dk.size),
  };
}

describe.skipIf(missing !== undefined)(
  `the WGSL normalization backward against core prepareScoresBackward${skipNote(missing)}`,
  () => {
    const { q, k } = awkwardInputs();
    const dx = randomTensor([2, 4, 13, 6], 33).data;
    const dy = randomTensor([2, 2, 11, 6], 34).data;
    const dsigma = randomTensor([2, 4, 13, 1], 35).data;
    const cases: FastmaxOptions[] = [
      { normalization: 'max-norm' },
      { normalization: 'max-norm', keyLengths: [11, 4] },
      { normalization: 'max-norm', keyLengths: [11, 0] },
      { normalization: 'prefix-max-norm', causal: true, keyLengths: [9, 0] },
      { normalization: 'prefix-max-norm', causal: true },
      { normalization: 'prefix-max-norm', keyLengths: [7, 11] },
      { normalization: 'l2', temperature: 2 },
      { normalization: { scale: 0.3 }, temperature: 1.5 },
    ];
    it.each(cases)('%o', async (options) => {
      const backend = webgpuBackend();
      const runtime = new Runtime(await backend.device(), 'test', {}, true);
      const got = await chainOnDevice(runtime, q, k, options, dx, dy, dsigma);
      const prepared = prepareScores(q, k, got.shape, got.resolved);
      // The cases must exercise the tie (rows 2 and 6: core routes to 2) and the zero norms.
      const kind = got.resolved.normalization.kind;
      const argmaxes = [...prepared.trace.queryArgmax, ...prepared.trace.keyArgmax];
      if (kind === 'max-norm' || kind === 'prefix-max-norm') {
        expect(argmaxes).toContain(2);
        expect(argmaxes).not.toContain(6);
      }
      if (kind === 'prefix-max-norm' || kind === 'l2') expect(argmaxes).toContain(-1);
      const want = prepareScoresBackward(
        prepared,
        got.shape,
        got.resolved,
        Float64Array.from(dx),
        Float64Array.from(dy),
        Float64Array.from(dsigma),
      );
      // Float32 centering, norms and dot products of 6 values, and sums of up to 13 routed terms:
      // a few ulps of each gradient's scale. Routing to the wrong argmax row is an O(1) error.
      expect(maxRelativeError(got.dq, want.dq)).toBeLessThan(1e-5);
      expect(maxRelativeError(got.dk, want.dk)).toBeLessThan(1e-5);
      await backend.dispose();
    });
  },
);

describe.skipIf(missing !== undefined)(`backward on device tensors${skipNote(missing)}`, () => {
  // The second configuration splits every unit's two query heads into two passes (see
  // limits.test.ts), so key-side gradients are summed on the device across passes.
  const configurations = [
    { split: 'none', limits: {} },
    { split: 'query heads', limits: { maxStorageBufferBindingSize: 1280 } },
  ];
  it.each(configurations)('reads nothing back with output "device" (split: $split)', async ({ limits }) => {
    const backend = webgpuBackend({ limits });
    const fm = await createFastmax({ backend });
    const q = randomTensor([2, 6, 40, 8], 41);
    const k = randomTensor([2, 3, 40, 8], 42);
    const v = randomTensor([2, 3, 40, 4], 43);
    const dOut = randomTensor([2, 6, 40, 4], 44);
    const inputs = await Promise.all([q, k, v, dOut].map((t) => backend.toDevice(t)));
    for (const options of [
      { path: 'factorized', causal: true, keyLengths: [40, 31], chunkSize: 16 },
      { path: 'direct', normalization: 'max-norm' },
      { path: 'factorized', normalization: 'l2' },
    ] as const) {
      const runtimeRead = vi.spyOn(Runtime.prototype, 'read');
      const tensorRead = vi.spyOn(WebGpuTensor.prototype, 'read');
      const got = await fm.backward(inputs[0]!, inputs[1]!, inputs[2]!, inputs[3]!, {
        ...options,
        output: 'device',
      });
      expect(runtimeRead).not.toHaveBeenCalled();
      expect(tensorRead).not.toHaveBeenCalled();
      runtimeRead.mockRestore();
      tensorRead.mockRestore();
      const want = referenceBackward(q, k, v, dOut, options);
      for (const name of ['dq', 'dk', 'dv'] as const) {
        const tensor = got[name];
        expect(isDeviceTensor(tensor)).toBe(true);
        const host = await (tensor as WebGpuTensor).read();
        // Float32 kernels against the float64 oracle: conformance's GRADIENT_TOLERANCE.
        expect(maxRelativeError(host.data, want[name]), `${name} ${JSON.stringify(options)}`).toBeLessThan(
          1e-3,
        );
        (tensor as WebGpuTensor).dispose();
      }
    }
    // The spy sees readbacks: host outputs are read back (and nothing else is).
    const runtimeRead = vi.spyOn(Runtime.prototype, 'read');
    await fm.backward(inputs[0]!, inputs[1]!, inputs[2]!, inputs[3]!);
    expect(runtimeRead).toHaveBeenCalled();
    runtimeRead.mockRestore();
    for (const input of inputs) input.dispose();
    await fm.dispose();
  });
});
