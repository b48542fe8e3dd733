import type { HostTensor, Shape4 } from '@fastmax/core';
import { webgpuBackend } from '../src/index.js';

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
