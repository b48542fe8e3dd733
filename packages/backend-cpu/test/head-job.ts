import {
  type HostTensor,
  type Order,
  planAttention,
  querySchedule,
  resolveOptions,
  validateAttentionInputs,
} from '@fastmax/core';
import { type AttentionJob, Engine } from '../src/engine.js';
import { KERNELS_SIMD } from '../src/generated/kernels.js';
import { kernelSetup, packedSchedule } from '../src/setup.js';

/**
 * One causal head (prefix-max-norm, D = Dv) with seeded inputs in [-1, 1), an engine of its own,
 * and `job(fields)`: the whole head as one AttentionJob unless `fields` says otherwise. For tests
 * that drive Engine.runUnit the way the backend's workers do. `M` keys (default N; with more, the
 * first M − N are seen by every query); key 0 is `firstKeyScale` times longer than the others, so
 * that the largest key norm is the first key's.
 */
export async function causalHead(
  order: Order,
  N: number,
  D: number,
  chunkSize: number,
  M = N,
  firstKeyScale = 1,
) {
  const tensor = (seed: number, rows: number): HostTensor => {
    let state = seed;
    const data = new Float32Array(rows * D);
    for (let i = 0; i < data.length; i++) {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
      data[i] = state / 2 ** 31 - 1;
    }
    return { shape: [1, 1, rows, D], data };
  };
  const [q, k, v] = [tensor(1, N), tensor(2, M), tensor(3, M)];
  for (let d = 0; d < D; d++) k.data[d]! *= firstKeyScale;
  const resolved = resolveOptions({ order, causal: true, chunkSize });
  const shape = validateAttentionInputs(q, k, v, resolved);
  const plan = planAttention(shape, resolved, ['factorized']);
  const schedule = packedSchedule(querySchedule(0, shape, resolved, 'factorized', plan.chunkSize));
  const setup = kernelSetup(D, order, resolved.coefficients, true);
  const binary = Uint8Array.from(atob(KERNELS_SIMD), (c) => c.charCodeAt(0));
  const engine = new Engine(await WebAssembly.compile(binary));
  const job = (fields: Partial<AttentionJob> = {}): AttentionJob => ({
    q: q.data,
    k: k.data,
    v: v.data,
    out: new Float32Array(N * D),
    batch: 1,
    heads: 1,
    kvHeads: 1,
    queryLength: N,
    keyLength: M,
    headDim: D,
    valueDim: D,
    normalization: { kind: 'prefix-max-norm' },
    temperature: resolved.temperature,
    causal: true,
    validKeys: Int32Array.of(M),
    path: 'factorized',
    schedules: [schedule],
    chunkSize: plan.chunkSize,
    setup,
    shares: 1,
    featureBounds: null,
    partialOut: null,
    partialDen: null,
    queryBounds: null,
    scan: null,
    keySplit: null,
    stagedRows: null,
    ...fields,
  });
  return { q, k, v, setup, engine, job };
}
