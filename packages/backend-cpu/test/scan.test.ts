import { describe, expect, it } from 'vitest';
import { type QueryScan, SCAN_ABORTED, scanPrefixFloats, scanStoreBytes } from '../src/engine.js';
import { causalHead } from './head-job.js';

// The split by queries as a prefix scan (AttentionJob.scan), driven share by share in one thread
// the way the backend's workers run it: share s waits for share s − 1's moments, so running them
// in order never waits. Compared with the whole head as one unit, which sums the same terms in
// another grouping: 1e-5 of the output's scale, the tolerance of the backend's other split tests.
describe('prefix scan over query shares', () => {
  const shared = (floats: number, cells: number, keep = true): QueryScan => ({
    prefixes: new Float32Array(new SharedArrayBuffer(floats * 4)),
    ready: new Int32Array(new SharedArrayBuffer(cells * 4)),
    keep,
  });

  // Empty shares hand the prefix on; with more keys than queries, share 0 also folds the keys every
  // query sees, whose largest norm (key 0, made 6 times longer) sets every later row's scale.
  for (const [order, N, D, chunk, bounds, M] of [
    [1, 300, 16, 16, [0, 96, 208, 300], 300],
    [1, 300, 16, 16, [0, 0, 160, 300], 300],
    [1, 300, 16, 16, [0, 144, 144, 300], 300],
    [1, 257, 32, 32, [0, 128, 257], 257],
    [2, 200, 8, 8, [0, 64, 136, 200], 200],
    [1, 300, 16, 16, [0, 96, 208, 300], 340],
    [1, 300, 16, 16, [0, 0, 160, 300], 340],
  ] as const) {
    for (const keep of [true, false])
      it(`gives the sequential result (p = ${order}, N = ${N}, M = ${M}, D = ${D}, shares [${bounds.join(', ')}]${keep ? '' : ', keeping nothing'})`, async () => {
        const { setup, engine, job } = await causalHead(order, N, D, chunk, M, M > N ? 6 : 1);
        const whole = job();
        engine.runUnit(whole, { head: 0 });
        const shares = bounds.length - 1;
        const scan = shared((shares - 1) * scanPrefixFloats(setup.paddedFeatures, D), shares - 1, keep);
        const split = job({ queryBounds: Int32Array.from(bounds), scan, shares });
        for (let share = 0; share < shares; share++) engine.runUnit(split, { head: 0, share });
        // Every prefix was handed on.
        expect([...scan.ready]).toEqual(new Array(shares - 1).fill(1));
        let error = 0;
        let scale = 0;
        for (let i = 0; i < whole.out.length; i++) {
          error = Math.max(error, Math.abs(split.out[i]! - whole.out[i]!));
          scale = Math.max(scale, Math.abs(whole.out[i]!));
        }
        expect(error / scale).toBeLessThan(1e-5);
      });
  }

  it('keeps no more WebAssembly memory than scanStoreBytes says (above a limit, the backend keeps nothing)', async () => {
    const N = 4096;
    const D = 32;
    const { setup, engine, job } = await causalHead(1, N, D, 32);
    // The engine's scratch first, so that what the scan adds can be told apart.
    engine.runUnit(job(), { head: 0 });
    const before = engine.memoryBytes;
    const bounds = Int32Array.of(0, 1024, N);
    const scan = shared(scanPrefixFloats(setup.paddedFeatures, D), 1);
    const split = job({ queryBounds: bounds, scan, shares: 2 });
    engine.runUnit(split, { head: 0, share: 0 });
    engine.runUnit(split, { head: 0, share: 1 });
    const largest = scanStoreBytes(setup.paddedFeatures, D, D, N - 1024, 32);
    expect(engine.memoryBytes - before).toBeGreaterThan(0);
    // Memory grows in 64 KiB pages.
    expect(engine.memoryBytes - before).toBeLessThanOrEqual(largest + 65536);
  });

  it('grows no WebAssembly memory past the engine scratch when it keeps nothing', async () => {
    const N = 4096;
    const D = 32;
    const { setup, engine, job } = await causalHead(1, N, D, 32);
    engine.runUnit(job(), { head: 0 });
    const before = engine.memoryBytes;
    const scan = shared(scanPrefixFloats(setup.paddedFeatures, D), 1, false);
    const split = job({ queryBounds: Int32Array.of(0, 1024, N), scan, shares: 2 });
    engine.runUnit(split, { head: 0, share: 0 });
    engine.runUnit(split, { head: 0, share: 1 });
    expect(engine.memoryBytes).toBe(before);
  });

  for (const keep of [true, false])
    it(`stops a share whose prefix will not come (a failed call), with an error${keep ? '' : ' (keeping nothing)'}`, async () => {
      const { setup, engine, job } = await causalHead(1, 128, 16, 16);
      const scan = shared(scanPrefixFloats(setup.paddedFeatures, 16), 1, keep);
      Atomics.store(scan.ready, 0, SCAN_ABORTED);
      const split = job({ queryBounds: Int32Array.of(0, 64, 128), scan, shares: 2 });
      expect(() => engine.runUnit(split, { head: 0, share: 1 })).toThrow(/failed before handing on/);
    });
});
