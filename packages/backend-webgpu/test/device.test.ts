import { createFastmax, isDeviceTensor, isFastmaxError } from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import { WebGpuTensor, webgpuBackend } from '../src/index.js';
import { Runtime } from '../src/runtime.js';
import { adapterMissing, maxRelativeError, randomTensor, skipNote } from './support.js';

const missing = await adapterMissing();

describe.skipIf(missing !== undefined)(`device tensors, errors and device loss${skipNote(missing)}`, () => {
  it('chains two layers on device tensors and reads back only at the end', async () => {
    const backend = webgpuBackend();
    const fm = await createFastmax({ backend });
    const q = randomTensor([2, 2, 24, 8], 1);
    const k = randomTensor([2, 2, 24, 8], 2);
    const v = randomTensor([2, 2, 24, 8], 3);
    const first = await fm.attention(q, k, v, { output: 'device' });
    expect(isDeviceTensor(first.output)).toBe(true);
    expect(first.output).toBeInstanceOf(WebGpuTensor);
    // The first layer's output feeds the second as queries and values without leaving the GPU.
    const readSpy = first.output as WebGpuTensor;
    let reads = 0;
    const originalRead = readSpy.read.bind(readSpy);
    readSpy.read = async () => {
      reads++;
      return originalRead();
    };
    const second = await fm.attention(first.output, k, first.output, { output: 'device', causal: true });
    expect(reads).toBe(0);
    const firstHost = await originalRead();
    const want = referenceAttention(firstHost, k, firstHost, { causal: true });
    const got = await (second.output as WebGpuTensor).read();
    expect(maxRelativeError(got.data, want.output)).toBeLessThan(1e-4);
    (first.output as WebGpuTensor).dispose();
    await expect((first.output as WebGpuTensor).read()).rejects.toSatisfy((e) =>
      isFastmaxError(e, 'DISPOSED'),
    );
    await fm.dispose();
  });

  it('accepts the user device, and uploads host tensors with toDevice', async () => {
    const owner = webgpuBackend();
    const device = await owner.device();
    const backend = webgpuBackend({ device });
    const fm = await createFastmax({ backend });
    const q = randomTensor([1, 2, 9, 4], 4);
    const onDevice = await backend.toDevice(q);
    const result = await fm.attention(onDevice, onDevice, onDevice, { order: 3 });
    const want = referenceAttention(q, q, q, { order: 3 });
    expect(maxRelativeError((result.output as { data: Float32Array }).data, want.output)).toBeLessThan(1e-4);
    await fm.dispose();
    // Disposing a backend built on the user's device leaves the device alive.
    expect((await owner.isAvailable()).available).toBe(true);
    await owner.dispose();
  });

  it('turns device loss into DEVICE_LOST and can be created again afterwards', async () => {
    const backend = webgpuBackend();
    const fm = await createFastmax({ backend });
    const q = randomTensor([1, 1, 8, 4], 5);
    await fm.attention(q, q, q);
    (await backend.device()).destroy();
    await new Promise((resolve) => setTimeout(resolve, 50));
    const error = await fm.attention(q, q, q).catch((e: unknown) => e);
    expect(isFastmaxError(error, 'DEVICE_LOST')).toBe(true);
    expect((await backend.isAvailable()).available).toBe(false);
    const again = await createFastmax({ backend: webgpuBackend() });
    const result = await again.attention(q, q, q);
    expect(
      maxRelativeError((result.output as { data: Float32Array }).data, referenceAttention(q, q, q).output),
    ).toBeLessThan(1e-4);
    await again.dispose();
  });

  it('reports validation errors as BACKEND_ERROR in debug mode', async () => {
    const backend = webgpuBackend();
    const device = await backend.device();
    const runtime = new Runtime(device, 'test', {}, true);
    const encoder = device.createCommandEncoder();
    // Copying past the end of a buffer is a validation error that only surfaces at submit.
    const small = device.createBuffer({ size: 16, usage: 0x4 | 0x8 });
    encoder.copyBufferToBuffer(small, 0, small, 0, 64);
    const error = await runtime.submit(encoder, []).catch((e: unknown) => e);
    expect(isFastmaxError(error, 'BACKEND_ERROR')).toBe(true);
    expect(String(error)).toMatch(/copy|size|range|overflow/i);
    await backend.dispose();
  });

  it('reports a pipeline that fails to build as BACKEND_ERROR even outside debug mode', async () => {
    const backend = webgpuBackend();
    const device = await backend.device();
    const runtime = new Runtime(device, 'test', {}, false);
    const encoder = device.createCommandEncoder();
    const broken = {
      key: 'broken',
      uniforms: [],
      bindings: [{ name: 'values', access: 'read_write', element: 'f32' }] as const,
      workgroupSize: [1, 1, 1] as const,
      body: '  values[0] = undefinedName;',
    };
    const buffer = runtime.acquire(4);
    runtime.dispatch(encoder, broken, { values: buffer }, {}, [1, 1, 1], []);
    const error = await runtime.submit(encoder, []).catch((e: unknown) => e);
    expect(isFastmaxError(error, 'BACKEND_ERROR')).toBe(true);
    expect(String(error)).toMatch(/undefinedName/);
    await backend.dispose();
  });
});
