import { createFastmax, isFastmaxError } from '@fastmax/core';
import { afterEach, describe, expect, it } from 'vitest';
import { webgpuBackend } from '../src/index.js';

/** A stand-in navigator.gpu whose requestAdapter() behaves like a browser without a driver. */
function withNavigatorGpu(gpu: unknown): () => void {
  const previous = Object.getOwnPropertyDescriptor(globalThis, 'navigator');
  Object.defineProperty(globalThis, 'navigator', { value: { gpu }, configurable: true, writable: true });
  return () => {
    if (previous === undefined) delete (globalThis as { navigator?: unknown }).navigator;
    else Object.defineProperty(globalThis, 'navigator', previous);
  };
}

describe('availability without an adapter', () => {
  let restore: (() => void) | undefined;
  afterEach(() => restore?.());

  it('says why when requestAdapter() returns null, and createFastmax skips it with that reason', async () => {
    restore = withNavigatorGpu({ requestAdapter: async () => null });
    const backend = webgpuBackend();
    const availability = await backend.isAvailable();
    expect(availability.available).toBe(false);
    expect(availability.available ? '' : availability.reason).toMatch(/requestAdapter\(\) returned null/);
    const error = await createFastmax({ backend }).catch((e: unknown) => e);
    expect(isFastmaxError(error, 'BACKEND_UNAVAILABLE')).toBe(true);
    expect(String(error)).toMatch(/webgpu: requestAdapter\(\) returned null/);
  });

  it('says why when requestAdapter() throws', async () => {
    restore = withNavigatorGpu({
      requestAdapter: async () => {
        throw new Error('driver crashed');
      },
    });
    const availability = await webgpuBackend().isAvailable();
    expect(availability.available ? '' : availability.reason).toMatch(/driver crashed/);
  });

  it('refuses calls on an unavailable backend with BACKEND_UNAVAILABLE', async () => {
    restore = withNavigatorGpu({ requestAdapter: async () => null });
    const backend = webgpuBackend();
    const error = await backend.device().catch((e: unknown) => e);
    expect(isFastmaxError(error, 'BACKEND_UNAVAILABLE')).toBe(true);
  });
});

describe('software (fallback) adapters', () => {
  let restore: (() => void) | undefined;
  afterEach(() => restore?.());

  const fallbackAdapter = {
    info: { isFallbackAdapter: true, description: 'llvmpipe' },
    features: new Set<string>(),
    limits: {},
    requestDevice: async () => {
      throw new Error('requestDevice must not be reached when the adapter is rejected');
    },
  };

  it("are refused with a reason under fallbackAdapter: 'reject'", async () => {
    restore = withNavigatorGpu({ requestAdapter: async () => fallbackAdapter });
    const availability = await webgpuBackend({ fallbackAdapter: 'reject' }).isAvailable();
    expect(availability.available).toBe(false);
    expect(availability.available ? '' : availability.reason).toMatch(
      /software \(fallback\) adapter.*llvmpipe/,
    );
  });

  it('are used by default', async () => {
    restore = withNavigatorGpu({ requestAdapter: async () => fallbackAdapter });
    const availability = await webgpuBackend().isAvailable();
    // The stand-in adapter cannot make a device, so the reason is requestDevice's, not the fallback's.
    expect(availability.available ? '' : availability.reason).toMatch(/requestDevice\(\) failed/);
  });
});
