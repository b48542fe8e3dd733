import { createRandom } from '@fastmax/conformance/kit';
import type { HostTensor, Shape4 } from '@fastmax/core';

/**
 * Standard normal entries (Box–Muller), like activations after a layer norm, seeded so a failing
 * demo or benchmark row reruns with the very same numbers (`--seed`).
 */
export function randomTensor(shape: Shape4, seed: number): HostTensor {
  const random = createRandom(seed);
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
