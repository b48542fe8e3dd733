import { type HostTensor, type Shape4, shapeSize } from '@fastmax/core';

/**
 * A small seeded PRNG (mulberry32): the suite's inputs must be identical on every machine and every
 * run so that a failure names a case that reproduces. Not for cryptography.
 */
export function createRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface RandomTensorOptions {
  /** Values are drawn uniformly from [-range, range]. Default 1. */
  readonly range?: number;
  /**
   * Round every value to a multiple of 1/grid (e.g. 64). The finite-difference check uses it so that
   * x ± h·u stays exactly representable in float32 and the float64 oracle sees exactly x ± h·u.
   */
  readonly grid?: number;
}

/** A host tensor of the given shape with deterministic values from `seed` (uniform in [-1, 1] by default). */
export function randomTensor(shape: Shape4, seed: number, options: RandomTensorOptions = {}): HostTensor {
  const range = options.range ?? 1;
  const random = createRandom(seed);
  const data = new Float32Array(shapeSize(shape));
  for (let i = 0; i < data.length; i++) {
    const value = (2 * random() - 1) * range;
    data[i] = options.grid === undefined ? value : Math.round(value * options.grid) / options.grid;
  }
  return { shape: [shape[0], shape[1], shape[2], shape[3]], data };
}
