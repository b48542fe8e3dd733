import {
  type FastmaxOptions,
  type HostTensor,
  resolveOptions,
  type Shape4,
  validateAttentionInputs,
} from '@fastmax/core';
import { recordPrepare } from '../src/backend.js';
import { webgpuBackend } from '../src/index.js';
import type { Runtime } from '../src/runtime.js';

/** Deterministic uniform values in [-1, 1). */
export function randomTensor(shape: Shape4, seed: number): HostTensor {
  let state = seed >>> 0 || 1;
  const size = shape[0] * shape[1] * shape[2] * shape[3];
  const data = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    data[i] = state / 2 ** 31 - 1;
  }
  return { shape, data };
}

/** Why GPU tests are skipped here, or undefined when an adapter is available. */
export async function adapterMissing(): Promise<string | undefined> {
  const backend = webgpuBackend();
  const availability = await backend.isAvailable();
  await backend.dispose();
  return availability.available ? undefined : availability.reason;
}

export function maxRelativeError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  let scale = 0;
  for (let i = 0; i < expected.length; i++) scale = Math.max(scale, Math.abs(expected[i]!));
  let worst = 0;
  for (let i = 0; i < expected.length; i++) worst = Math.max(worst, Math.abs(actual[i]! - expected[i]!));
  return worst / Math.max(scale, 1e-30);
}

/** Appended to a describe title so the report says why GPU tests were skipped. */
export function skipNote(missing: string | undefined): string {
  return missing === undefined ? '' : ` (skipped: ${missing})`;
}

/**
 * Records the GPU prepare kernels for q and k (values of k's shape stand in for v) into a new
 * encoder, as the backend does for one unit range covering everything; the caller adds its own
 * passes and submits. Tests of the prepare kernels and of their backward share it.
 */
export function recordTestPrepare(runtime: Runtime, q: HostTensor, k: HostTensor, options: FastmaxOptions) {
  const resolved = resolveOptions(options);
  const shape = validateAttentionInputs(q, k, k, resolved);
  const units = shape.batch * shape.kvHeads;
  const G = shape.heads / shape.kvHeads;
  const geometry = {
    units,
    G,
    N: shape.queryLength,
    M: shape.keyLength,
    D: shape.headDim,
    Dv: shape.headDim,
  };
  const borrowed: GPUBuffer[] = [];
  const temporaries: GPUBuffer[] = [];
  const encoder = runtime.device.createCommandEncoder();
  const slice = (data: Float32Array) => ({ buffer: runtime.upload(data), size: data.byteLength });
  const valid = new Uint32Array(units).map((_, u) =>
    resolved.keyLengths === null ? shape.keyLength : resolved.keyLengths[Math.floor(u / shape.kvHeads)]!,
  );
  const validKeys = runtime.upload(valid);
  const zeros = () => runtime.upload(new Float32Array(units * G));
  const prepared = recordPrepare(
    runtime,
    encoder,
    temporaries,
    geometry,
    resolved,
    slice(q.data),
    slice(k.data),
    validKeys,
    zeros(),
    zeros(),
    borrowed,
  );
  return { resolved, shape, geometry, encoder, borrowed, temporaries, validKeys, prepared, slice };
}
