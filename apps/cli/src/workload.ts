import type { HostTensor, Shape4 } from '@fastmax/core';

/**
 * Seeded inputs, so a failing demo or benchmark row can be rerun with the very same numbers
 * (`--seed`). mulberry32: tiny, fast, and plenty for test data (not for cryptography).
 */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Standard normal entries (Box–Muller), like activations after a layer norm. */
export function randomTensor(shape: Shape4, seed: number): HostTensor {
  const random = seededRandom(seed);
  const data = new Float32Array(shape[0] * shape[1] * shape[2] * shape[3]);
  for (let i = 0; i < data.length; i += 2) {
    // 1 - u keeps the logarithm's argument in (0, 1].
    const radius = Math.sqrt(-2 * Math.log(1 - random()));
    const angle = 2 * Math.PI * random();
    data[i] = radius * Math.cos(angle);
    if (i + 1 < data.length) data[i + 1] = radius * Math.sin(angle);
  }
  return { shape: [shape[0], shape[1], shape[2], shape[3]], data };
}

export interface WorkloadShape {
  readonly batch: number;
  readonly heads: number;
  /** Default: `heads`. */
  readonly kvHeads?: number;
  readonly queryLength: number;
  /** Default: `queryLength` (self-attention). */
  readonly keyLength?: number;
  readonly headDim: number;
  /** Default: `headDim`. */
  readonly valueDim?: number;
}

export interface Workload {
  readonly q: HostTensor;
  readonly k: HostTensor;
  readonly v: HostTensor;
}

/** q, k and v for one attention call; q, k and v draw from three different seeds. */
export function attentionWorkload(shape: WorkloadShape, seed: number): Workload {
  const kvHeads = shape.kvHeads ?? shape.heads;
  const keyLength = shape.keyLength ?? shape.queryLength;
  return {
    q: randomTensor([shape.batch, shape.heads, shape.queryLength, shape.headDim], seed),
    k: randomTensor([shape.batch, kvHeads, keyLength, shape.headDim], seed + 1),
    v: randomTensor([shape.batch, kvHeads, keyLength, shape.valueDim ?? shape.headDim], seed + 2),
  };
}
