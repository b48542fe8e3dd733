import { Worker } from 'node:worker_threads';
import { describe, expect, it, vi } from 'vitest';
import { type AttentionJob, KEY_ROWS, QUERY_ROWS } from '../src/engine.js';
import { SharedStaging } from '../src/staging.js';
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

describe('SharedStaging', () => {
  // What a call staged above keepBytes stays while calls keep coming (a training loop over long
  // sequences would otherwise pay every page fault again on every call) and goes once none has
  // come for idleMillis.
  it('keeps staging above keepBytes while calls keep coming, and lets it go once idle', async () => {
    vi.useFakeTimers();
    try {
      const staging = new SharedStaging(1024, 1000);
      const memoryOf = (): SharedArrayBuffer => staging.take('a', 1024).buffer as SharedArrayBuffer;
      let first: SharedArrayBuffer | null = null;
      await staging.exclusive(async () => {
        first = memoryOf();
      });
      expect(staging.heldBytes).toBe(4096);
      vi.advanceTimersByTime(999);
      // A call within the idle time finds the same memory and puts the release off.
      await staging.exclusive(async () => {
        expect(memoryOf()).toBe(first);
      });
      vi.advanceTimersByTime(999);
      expect(staging.heldBytes).toBe(4096);
      vi.advanceTimersByTime(1);
      expect(staging.heldBytes).toBe(0);
      await staging.exclusive(async () => {
        expect(memoryOf()).not.toBe(first);
      });
      staging.release();
    } finally {
      vi.useRealTimers();
    }
  });

  it('keeps up to keepBytes for good, and with idleMillis 0 lets more go right after the call', async () => {
    vi.useFakeTimers();
    try {
      const small = new SharedStaging(4096, 1000);
      await small.exclusive(async () => void small.take('a', 1024));
      vi.advanceTimersByTime(10_000);
      expect(small.heldBytes).toBe(4096);
      const eager = new SharedStaging(1024, 0);
      await eager.exclusive(async () => void eager.take('a', 1024));
      expect(eager.heldBytes).toBe(0);
      // release() (dispose) lets everything go at once, pending release or not.
      const pending = new SharedStaging(0, 1000);
      await pending.exclusive(async () => void pending.take('a', 16));
      expect(pending.heldBytes).toBe(64);
      pending.release();
      expect(pending.heldBytes).toBe(0);
      expect(vi.getTimerCount()).toBe(0);
    } finally {
      vi.useRealTimers();
    }
  });
});
