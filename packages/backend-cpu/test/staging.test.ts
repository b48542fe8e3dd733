import { Worker } from 'node:worker_threads';
import {
  type HostTensor,
  planAttention,
  querySchedule,
  resolveOptions,
  type Shape4,
  validateAttentionInputs,
} from '@fastmax/core';
import { expect, it } from 'vitest';
import { type AttentionJob, Engine, KEY_ROWS, QUERY_ROWS } from '../src/engine.js';
import { KERNELS_SIMD } from '../src/generated/kernels.js';
import { kernelSetup, packedSchedule } from '../src/setup.js';

function tensor(shape: Shape4, seed: number): HostTensor {
  let state = seed >>> 0 || 1;
  const data = new Float32Array(shape[0] * shape[1] * shape[2] * shape[3]);
  for (let i = 0; i < data.length; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    data[i] = state / 2 ** 31 - 1;
  }
  return { shape, data };
}

const shared = (length: number): Float32Array => new Float32Array(new SharedArrayBuffer(length * 4));

// A worker's engine reads staged rows only once the calling thread has counted them
// (AttentionJob.stagedRows). Here this thread plays the worker and a helper thread the caller,
// staging 200 rows at a time with pauses: the engine must wait (Atomics.wait) at every block and
// give exactly what it gives on data staged in full before it starts.
it('an engine waits for rows staged while it runs, and gives what it gives on data staged first', async () => {
  const N = 1000;
  const D = 16;
  const [q, k, v] = [tensor([1, 1, N, D], 1), tensor([1, 1, N, D], 2), tensor([1, 1, N, D], 3)];
  const resolved = resolveOptions({ order: 1, causal: true, chunkSize: 32 });
  const shape = validateAttentionInputs(q, k, v, resolved);
  const plan = planAttention(shape, resolved, ['factorized']);
  const schedule = packedSchedule(querySchedule(0, shape, resolved, 'factorized', plan.chunkSize));
  const binary = Uint8Array.from(atob(KERNELS_SIMD), (c) => c.charCodeAt(0));
  const engine = new Engine(await WebAssembly.compile(binary));
  const job = (inputs: Float32Array[], stagedRows: Int32Array | null): AttentionJob => ({
    q: inputs[0]!,
    k: inputs[1]!,
    v: inputs[2]!,
    out: new Float32Array(N * D),
    batch: 1,
    heads: 1,
    kvHeads: 1,
    queryLength: N,
    keyLength: N,
    headDim: D,
    valueDim: D,
    normalization: { kind: 'prefix-max-norm' },
    temperature: resolved.temperature,
    causal: true,
    validKeys: Int32Array.of(N),
    path: 'factorized',
    schedules: [schedule],
    chunkSize: plan.chunkSize,
    setup: kernelSetup(D, 1, resolved.coefficients, true),
    shares: 1,
    featureBounds: null,
    partialOut: null,
    partialDen: null,
    queryBounds: null,
    stagedRows,
  });
  const whole = job([q.data, k.data, v.data], null);
  engine.runUnit(whole, { head: 0 });

  const staged = [shared(N * D), shared(N * D), shared(N * D)];
  const rows = new Int32Array(new SharedArrayBuffer(8));
  const helper = new Worker(
    `
    const { workerData: w } = require('node:worker_threads');
    const pause = new Int32Array(new SharedArrayBuffer(4));
    for (let from = 0; from < ${N}; from += 200) {
      Atomics.wait(pause, 0, 0, 15);
      for (let t = 0; t < 3; t++) w.staged[t].set(w.sources[t].subarray(from * ${D}, (from + 200) * ${D}), from * ${D});
      Atomics.store(w.rows, ${QUERY_ROWS}, from + 200);
      Atomics.store(w.rows, ${KEY_ROWS}, from + 200);
      Atomics.notify(w.rows, ${QUERY_ROWS});
      Atomics.notify(w.rows, ${KEY_ROWS});
    }`,
    { eval: true, workerData: { staged, sources: [q.data, k.data, v.data], rows } },
  );
  const progressive = job(staged, rows);
  // An engine that read ahead of the counts would meet rows still zero, and differ.
  engine.runUnit(progressive, { head: 0 });
  await helper.terminate();
  expect(Array.from(progressive.out)).toEqual(Array.from(whole.out));
});
