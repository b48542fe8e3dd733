import { Worker } from 'node:worker_threads';
import { expect, it } from 'vitest';
import { type AttentionJob, KEY_ROWS, QUERY_ROWS } from '../src/engine.js';
import { causalHead } from './head-job.js';

const shared = (length: number): Float32Array => new Float32Array(new SharedArrayBuffer(length * 4));

// A worker's engine reads staged rows only once the calling thread has counted them
// (AttentionJob.stagedRows). Here this thread plays the worker and a helper thread the caller,
// staging 200 rows at a time with pauses: the engine must wait (Atomics.wait) at every block and
// give exactly what it gives on data staged in full before it starts.
it('an engine waits for rows staged while it runs, and gives what it gives on data staged first', async () => {
  const N = 1000;
  const D = 16;
  const { q, k, v, engine, job: headJob } = await causalHead(1, N, D, 32);
  const job = (inputs: Float32Array[], stagedRows: Int32Array | null): AttentionJob =>
    headJob({ q: inputs[0]!, k: inputs[1]!, v: inputs[2]!, stagedRows });
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
