import {
  createFastmax,
  type FastmaxError,
  type FastmaxOptions,
  type HostTensor,
  isFastmaxError,
  prepareScores,
  resolveOptions,
  type Shape4,
  validateAttentionInputs,
} from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';
import { afterAll, describe, expect, it } from 'vitest';
import type { WorkUnit } from '../src/engine.js';
import { type CpuBackendOptions, cpuBackend } from '../src/index.js';
import type { WorkerPool } from '../src/pool.js';

function tensor(shape: Shape4, seed: number, scale = 1): HostTensor {
  let state = seed >>> 0 || 1;
  const data = new Float32Array(shape[0] * shape[1] * shape[2] * shape[3]);
  for (let i = 0; i < data.length; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    data[i] = (state / 2 ** 31 - 1) * scale;
  }
  return { shape, data };
}

/** Largest |actual − expected| over the largest |expected|: the conformance suite's measure. */
function relativeError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  let error = 0;
  let scale = 0;
  for (let i = 0; i < expected.length; i++) {
    error = Math.max(error, Math.abs(actual[i]! - expected[i]!));
    scale = Math.max(scale, Math.abs(expected[i]!));
  }
  return error / scale;
}

/** Largest |x − y| over the elements. */
function largestDifference(x: ArrayLike<number>, y: ArrayLike<number>): number {
  let error = 0;
  for (let i = 0; i < y.length; i++) error = Math.max(error, Math.abs(x[i]! - y[i]!));
  return error;
}

/**
 * A split call's output `x` against one thread's `y` and the oracle: the splits group float32 sums
 * otherwise than one thread, so both within 1e-5, not bit for bit.
 */
function expectLikeOneThread(
  x: Float32Array,
  y: Float32Array,
  [q, k, v]: readonly [HostTensor, HostTensor, HostTensor],
  options: FastmaxOptions,
): void {
  expect(largestDifference(x, y)).toBeLessThan(1e-5);
  expect(relativeError(x, referenceAttention(q, k, v, options).output)).toBeLessThan(1e-5);
}

/** The units of each run the backend's pool receives from now on, one list a run. */
async function recordUnits(backend: ReturnType<typeof cpuBackend>): Promise<WorkUnit[][]> {
  const pool = await (
    backend as typeof backend & { poolForTesting(): Promise<WorkerPool | null> }
  ).poolForTesting();
  const runs: WorkUnit[][] = [];
  if (pool === null) return runs;
  const run = pool.run.bind(pool);
  pool.run = (job, batches, alongside) => {
    runs.push(batches.flat());
    return run(job, batches, alongside);
  };
  return runs;
}

describe('normalization', () => {
  // The engine re-derives z = σ·x per chunk in float64 from the float32 inputs; with order 1 and
  // a_0 = 0 the output of a single key is o = f(s)·v / f(s) = v, so instead compare through
  // attention with one value column per key that reads back Σ_j w_ij·e_j = the weights themselves.
  for (const normalization of ['max-norm', 'prefix-max-norm', 'l2', { scale: 0.3 }] as const) {
    it(`matches core's prepareScores (${JSON.stringify(normalization)})`, async () => {
      const N = 9;
      const M = 7;
      const D = 5;
      const q = tensor([1, 1, N, D], 3, 2);
      const k = tensor([1, 1, M, D], 4, 2);
      // One-hot values: output row i = w_i / Σ_j w_ij, the normalized weights of row i.
      const v: HostTensor = { shape: [1, 1, M, M], data: new Float32Array(M * M) };
      for (let j = 0; j < M; j++) v.data[j * M + j] = 1;
      const options: FastmaxOptions = { order: 1, coefficients: [2, 1], normalization, causal: true };
      const fm = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
      const result = await fm.attention(q, k, v, options);
      await fm.dispose();
      const resolved = resolveOptions(options);
      const shape = validateAttentionInputs(q, k, v, resolved);
      const prepared = prepareScores(q, k, shape, resolved);
      const output = (result.output as HostTensor).data;
      for (let i = 0; i < N; i++) {
        const limit = Math.max(0, Math.min(M, i + M - N + 1));
        let den = 0;
        const w: number[] = [];
        for (let j = 0; j < limit; j++) {
          let dot = 0;
          for (let d = 0; d < D; d++) dot += prepared.x[i * D + d]! * prepared.y[j * D + d]!;
          w.push(2 + prepared.sigma[i]! * dot);
          den += w[j]!;
        }
        for (let j = 0; j < M; j++) {
          const expected = j < limit ? w[j]! / den : 0;
          expect(Math.abs(output[i * M + j]! - expected)).toBeLessThan(1e-6);
        }
      }
    });
  }
});

describe('options', () => {
  for (const [argument, value] of [
    ['threads', 0],
    ['threads', 1.5],
    ['parallelThreshold', -1],
    ['parallelThreshold', Number.NaN],
    ['scanKeepBytes', -1],
    ['scanKeepBytes', '64'],
    ['stagingKeepBytes', -1],
    ['stagingIdleMillis', Number.NaN],
  ] as const) {
    it(`refuses ${argument}: ${String(value)} with INVALID_OPTION naming it`, () => {
      let error: unknown = null;
      try {
        cpuBackend({ [argument]: value } as CpuBackendOptions);
      } catch (caught) {
        error = caught;
      }
      expect(isFastmaxError(error, 'INVALID_OPTION')).toBe(true);
      expect((error as FastmaxError).argument).toBe(argument);
      expect((error as FastmaxError).actual).toBe(String(value));
    });
  }
});

describe('threads', () => {
  const backend = cpuBackend({ threads: 2, parallelThreshold: 0 });
  afterAll(() => backend.dispose());

  it('spreads heads over workers and matches one thread exactly', async () => {
    const q = tensor([2, 3, 70, 16], 1);
    const k = tensor([2, 1, 70, 16], 2);
    const v = tensor([2, 1, 70, 40], 3);
    const options: FastmaxOptions = { order: 2, causal: true, keyLengths: [70, 33] };
    const parallel = await createFastmax({ backend });
    const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
    const a = await parallel.attention(q, k, v, options);
    const b = await serial.attention(q, k, v, options);
    expect(a.degenerateRows).toBe(b.degenerateRows);
    expect((a.output as HostTensor).data).toEqual((b.output as HostTensor).data);
    const reference = referenceAttention(q, k, v, options);
    expect(relativeError((a.output as HostTensor).data, reference.output)).toBeLessThan(1e-5);
    await serial.dispose();
  });

  // Fewer heads than threads: each head is split over the workers (3 threads: one head in 3 shares,
  // two heads in 3 shares each, 2 rounds on the 3 workers (sharesPerHead), so that the shares of
  // several heads are laid out side by side).
  // Causal calls with fewer than 256 features (p = 1, or p = 2 at D = 16: F = 153) split by queries:
  // each share gets the state of the keys before its queries from the share before it (queryScan,
  // the default from 3 shares on; with scanKeepBytes: 0 the shares keep nothing between the scan's
  // phases and add their own keys twice) or builds it itself (queryScan: false). The others (p = 2 at D = 32:
  // F = 561, causal or not) split by features: the diagonal blocks alternate between shares and a
  // second pass sums numerators and denominators (non-causal heads with fewer features stay whole,
  // tested below). Both reorder float32 sums, so results match one thread to float32 rounding, not
  // bit for bit.
  for (const [batch, causal, order, headDim, extraKeys] of [
    [2, true, 2, 32, 5],
    [2, false, 2, 32, 5],
    [1, true, 2, 32, 5],
    [2, true, 1, 16, 5],
    [1, true, 2, 16, 5],
    // Fewer keys than queries: the first causal rows see no key at all.
    [1, true, 1, 16, -30],
    [1, true, 2, 32, -30],
  ] as const) {
    const shares = 3;
    const features = order === 1 ? headDim + 1 : ((headDim + 1) * (headDim + 2)) / 2;
    const by = causal && features < 256 ? 'queries' : 'features';
    const ways =
      by === 'queries' ? (['scan', 'scan keeping nothing', 'fold'] as const) : ([undefined] as const);
    for (const way of ways) {
      const how = {
        scan: ' as a prefix scan',
        'scan keeping nothing': ' as a prefix scan keeping nothing',
        fold: ', each folding its prefix',
        none: '',
      }[way ?? 'none'];
      it(`splits ${batch} head(s) into ${shares} shares by ${by}${how} (p = ${order}, D = ${headDim}, ${causal ? 'causal' : 'non-causal'}, M = N ${extraKeys > 0 ? '+' : '-'} ${Math.abs(extraKeys)})`, async () => {
        const split = cpuBackend({
          threads: 3,
          parallelThreshold: 0,
          ...(way === undefined ? {} : { queryScan: way !== 'fold' }),
          ...(way === 'scan keeping nothing' ? { scanKeepBytes: 0 } : {}),
        });
        const N = 75;
        const q = tensor([batch, 1, N, headDim], 31);
        // Cross-attention (M ≠ N) so that the causal shift is exercised too.
        const k = tensor([batch, 1, N + extraKeys, headDim], 32);
        const v = tensor([batch, 1, N + extraKeys, 12], 33);
        // With two batches, the second sees no key: its rows are degenerate and must be counted once,
        // not once per share.
        const options: FastmaxOptions = {
          order,
          causal,
          keyLengths: batch === 2 ? [60, 0] : [Math.min(60, N + extraKeys)],
          chunkSize: 8,
          path: 'factorized',
        };
        const parallel = await createFastmax({ backend: split });
        const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
        expect(await split.threadCount()).toBe(3);
        const a = await parallel.attention(q, k, v, options);
        const b = await serial.attention(q, k, v, options);
        expect(a.degenerateRows).toBe(b.degenerateRows);
        const reference = referenceAttention(q, k, v, options);
        // A batch without keys: all its N rows; fewer keys than queries: the 30 causal rows before the
        // first key.
        expect(a.degenerateRows).toBe(reference.degenerateRows);
        expect(a.degenerateRows).toBe((batch === 2 ? N : 0) + (extraKeys < 0 ? -extraKeys : 0));
        expect(relativeError((a.output as HostTensor).data, reference.output)).toBeLessThan(1e-5);
        const x = (a.output as HostTensor).data;
        const y = (b.output as HostTensor).data;
        expect(largestDifference(x, y)).toBeLessThan(1e-5);
        await serial.dispose();
        await parallel.dispose();
      });
    }
  }

  // More heads than threads, not a multiple of them: whole heads would leave a thread idle in the
  // last round, so each head is split as when there are fewer heads than threads (sharesPerHead),
  // except by queries, where a later share folds its prefix again: there the heads that fill
  // whole rounds run whole, and only the rest are split. The splits group float32 sums otherwise
  // than one thread: 1e-5, as above.
  for (const [label, threads, heads, order, D, causal, path, shares, wholeHeads] of [
    ['the direct path, by queries', 2, 3, 2, 16, true, 'direct', 2, 0],
    ['features (F = 561)', 2, 3, 2, 32, false, 'factorized', 2, 0],
    ['keys, then queries (p = 1, non-causal)', 2, 3, 1, 16, false, 'factorized', 2, 0],
    ['2 whole heads, the third by queries (p = 1, causal)', 2, 3, 1, 16, true, 'factorized', 2, 2],
    // The last head in 3 query shares: a prefix scan beside the whole heads (default from 3).
    ['3 whole heads, the fourth as a prefix scan (p = 1, causal)', 3, 4, 1, 16, true, 'factorized', 3, 3],
  ] as const) {
    it(`splits ${heads} heads on ${threads} workers: ${label}`, async () => {
      const backend = cpuBackend({ threads, parallelThreshold: 0 });
      // The units of the first run (a split by keys runs a second, the readout, over the same).
      const runs = await recordUnits(backend);
      // 600 rows: the direct path splits in blocks of 256 queries.
      const q = tensor([1, heads, 600, D], 91);
      const k = tensor([1, heads, 600, D], 92);
      const v = tensor([1, heads, 600, 12], 93);
      // prefix-max-norm (the causal default) starts a later query share from the rows before it.
      const options: FastmaxOptions = { order, causal, path, chunkSize: 16 };
      const parallel = await createFastmax({ backend });
      const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
      const a = await parallel.attention(q, k, v, options);
      const b = await serial.attention(q, k, v, options);
      const units = runs[0]!;
      expect(new Set(units.map((unit) => unit.head)).size).toBe(heads);
      expect(Math.max(...units.map((unit) => unit.share ?? 0)) + 1).toBe(shares);
      expect(units.filter((unit) => unit.whole).map((unit) => unit.head)).toEqual(
        Array.from({ length: wholeHeads }, (_, head) => head),
      );
      expect(units).toHaveLength(wholeHeads + (heads - wholeHeads) * shares);
      const x = (a.output as HostTensor).data;
      const y = (b.output as HostTensor).data;
      expectLikeOneThread(x, y, [q, k, v], options);
      await serial.dispose();
      await parallel.dispose();
    });
  }

  // Grouped-query attention: the query heads that read one key head run as one unit (WorkUnit.heads)
  // in the calling thread and, when the model prefers it, on the workers: each key enters the state
  // once for all of them. prefix-max-norm's per-row key maximum must be each row's own, not the
  // maximum the previous head of the group reached. Bit for bit what the heads give one by one
  // (the same sums in the same order), so equal to the oracle within the one-head tolerance.
  for (const [order, causal, normalization] of [
    [1, true, 'prefix-max-norm'],
    [2, true, 'prefix-max-norm'],
    [2, true, 'l2'],
    [1, false, 'max-norm'],
    [2, false, { scale: 0.3 }],
  ] as const) {
    for (const threads of [1, 2]) {
      it(`runs 2 query heads per key head together (p = ${order}, ${causal ? 'causal' : 'non-causal'}, ${typeof normalization === 'string' ? normalization : 'scale'}, ${threads} thread(s))`, async () => {
        const backend = cpuBackend({ threads, parallelThreshold: 0 });
        const runs = await recordUnits(backend);
        // 4 query heads over 2 key heads in each of 2 batches: 4 groups, 2 per worker.
        const q = tensor([2, 4, 300, 16], 101, 2);
        const k = tensor([2, 2, 300, 16], 102, 2);
        const v = tensor([2, 2, 300, 12], 103);
        const options: FastmaxOptions = {
          order,
          causal,
          normalization,
          path: 'factorized',
          chunkSize: 16,
          keyLengths: [300, 170],
        };
        const fm = await createFastmax({ backend });
        const result = await fm.attention(q, k, v, options);
        if (threads > 1) expect(runs[0]).toEqual([0, 2, 4, 6].map((head) => ({ head, heads: 2, share: 0 })));
        const reference = referenceAttention(q, k, v, options);
        expect(result.degenerateRows).toBe(reference.degenerateRows);
        expect(relativeError((result.output as HostTensor).data, reference.output)).toBeLessThan(1e-5);
        await fm.dispose();
      });
    }
  }

  // Fewer groups than threads, with many features: each group is split by features, and every
  // feature share still adds each key once for the group's heads (F = 561 at p = 2, D = 32; one key
  // head read by 4 query heads on 2 workers: 2 shares of the one group).
  for (const causal of [true, false]) {
    it(`splits a group of 4 query heads on one key head by features (${causal ? 'causal' : 'non-causal'})`, async () => {
      const backend = cpuBackend({ threads: 2, parallelThreshold: 0 });
      const runs = await recordUnits(backend);
      const q = tensor([1, 4, 300, 32], 111, 2);
      const k = tensor([1, 1, 300, 32], 112, 2);
      const v = tensor([1, 1, 300, 12], 113);
      const options: FastmaxOptions = { order: 2, causal, path: 'factorized', chunkSize: 16 };
      const fm = await createFastmax({ backend });
      const result = await fm.attention(q, k, v, options);
      expect(runs[0]).toEqual([0, 1].map((share) => ({ head: 0, heads: 4, share })));
      const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
      const alone = await serial.attention(q, k, v, options);
      const x = (result.output as HostTensor).data;
      const y = (alone.output as HostTensor).data;
      expectLikeOneThread(x, y, [q, k, v], options);
      await serial.dispose();
      await fm.dispose();
    });
  }

  // A non-causal head with fewer than 256 features splits by keys, then by queries
  // (AttentionJob.keySplit): each share adds its keys to a partial state, then sums the head's
  // partial states and reads its queries out. max-norm's key divisor moves onto the queries. The
  // sums are grouped otherwise than in one thread: 1e-5, as for the other splits.
  for (const [batch, heads, N, M, D, Dv, normalization, keyLengths, threads] of [
    [1, 1, 300, 300, 16, 8, 'max-norm', null, 2],
    [1, 1, 300, 340, 16, 12, 'l2', null, 3],
    [2, 1, 200, 180, 8, 5, 'max-norm', [150, 0], 3],
    [1, 1, 129, 100, 16, 16, { scale: 0.3 }, null, 2],
    [1, 2, 257, 257, 32, 8, 'max-norm', null, 3],
  ] as const) {
    it(`splits ${batch * heads} non-causal head(s) with few features by keys, then queries (${typeof normalization === 'string' ? normalization : 'scale'}, N = ${N}, M = ${M}${keyLengths ? ', key padding' : ''}, ${threads} workers)`, async () => {
      const q = tensor([batch, heads, N, D], 81, 3);
      const k = tensor([batch, heads, M, D], 82, 3);
      const v = tensor([batch, heads, M, Dv], 83);
      const options: FastmaxOptions = {
        order: 1,
        normalization,
        path: 'factorized',
        ...(keyLengths === null ? {} : { keyLengths: [...keyLengths] }),
      };
      const parallel = await createFastmax({ backend: cpuBackend({ threads, parallelThreshold: 0 }) });
      const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
      const a = await parallel.attention(q, k, v, options);
      const b = await serial.attention(q, k, v, options);
      const reference = referenceAttention(q, k, v, options);
      expect(a.degenerateRows).toBe(b.degenerateRows);
      expect(a.degenerateRows).toBe(reference.degenerateRows);
      const x = (a.output as HostTensor).data;
      expect(x.every(Number.isFinite)).toBe(true);
      expect(relativeError(x, (b.output as HostTensor).data)).toBeLessThan(1e-5);
      expect(relativeError(x, reference.output)).toBeLessThan(1e-5);
      await serial.dispose();
      await parallel.dispose();
    });
  }

  // The direct path splits a head by queries as well, in chunks of 256 rows: it keeps no state, so
  // each share computes its rows exactly as one thread does (the same blocks in the same order),
  // and the result is one thread's bit for bit. prefix-max-norm's running maximum crosses the
  // shares; key padding and M ≠ N shift the causal limits.
  for (const [causal, normalization, N, M, keyLength, threads] of [
    [true, 'prefix-max-norm', 700, 700, null, 2],
    [true, 'max-norm', 1100, 1160, 1130, 3],
    [false, 'max-norm', 900, 830, 800, 2],
    [true, 'l2', 800, 760, null, 3],
  ] as const) {
    it(`splits a direct-path head by queries (${causal ? 'causal' : 'non-causal'}, ${normalization}, N = ${N}, M = ${M}${keyLength === null ? '' : ', key padding'}, ${threads} workers), equal to one thread`, async () => {
      const q = tensor([1, 1, N, 16], 71, 2);
      const k = tensor([1, 1, M, 16], 72, 2);
      const v = tensor([1, 1, M, 24], 73);
      const options: FastmaxOptions = {
        order: 2,
        causal,
        normalization,
        path: 'direct',
        ...(keyLength === null ? {} : { keyLengths: [keyLength] }),
      };
      const parallel = await createFastmax({ backend: cpuBackend({ threads, parallelThreshold: 0 }) });
      const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
      const a = await parallel.attention(q, k, v, options);
      const b = await serial.attention(q, k, v, options);
      expect(a.plan.path).toBe('direct');
      expect(a.degenerateRows).toBe(b.degenerateRows);
      const x = (a.output as HostTensor).data;
      const y = (b.output as HostTensor).data;
      expect(x.every(Number.isFinite)).toBe(true);
      expect(Array.from(x)).toEqual(Array.from(y));
      await serial.dispose();
      await parallel.dispose();
    });
  }

  // One head in two shares sized to the threads' measured speeds (balance.ts): by features at
  // p = 2 (two workers), by queries at p = 1 (a worker and the calling thread, or two workers).
  // Skewed either way, the shares still cover every feature and every query once, so the result is
  // the equal split's to float32 rounding (sums grouped differently; 1e-5 as for the splits above).
  for (const [order, causal, shareCallingThread, queryScan] of [
    [2, true, true, false],
    [2, false, true, false],
    [1, true, true, false],
    [1, true, false, false],
    [1, true, true, true],
    [1, true, false, true],
  ] as const) {
    const split = order === 2 ? 'features' : 'queries';
    it(`sizes ${split} shares to the measured speeds (p = ${order}, ${causal ? 'causal' : 'non-causal'}${shareCallingThread ? '' : ', shareCallingThread: false'}${queryScan ? ', prefix scan' : ''})`, async () => {
      type Balanced = ReturnType<typeof cpuBackend> & {
        speedsForTesting(split: 'features' | 'queries'): Float64Array | null;
        setSpeedsForTesting(split: 'features' | 'queries', speeds: Float64Array | null): void;
      };
      const common = { threads: 2, parallelThreshold: 0, shareCallingThread, queryScan };
      const balanced = cpuBackend(common) as Balanced;
      const equal = cpuBackend({ ...common, balanceShares: false }) as Balanced;
      const D = order === 2 ? 32 : 16;
      const q = tensor([1, 1, 75, D], 41);
      const k = tensor([1, 1, 75, D], 42);
      const v = tensor([1, 1, 75, 12], 43);
      const options: FastmaxOptions = { order, causal, chunkSize: 8, path: 'factorized' };
      const withBalanced = await createFastmax({ backend: balanced });
      const withEqual = await createFastmax({ backend: equal });
      const reference = referenceAttention(q, k, v, options);
      const expected = ((await withEqual.attention(q, k, v, options)).output as HostTensor).data;
      expect(equal.speedsForTesting(split)).toBeNull();
      for (const speeds of [null, [0.3, 1.7], [1.7, 0.3]]) {
        balanced.setSpeedsForTesting(split, speeds === null ? null : Float64Array.from(speeds));
        const result = await withBalanced.attention(q, k, v, options);
        const data = (result.output as HostTensor).data;
        expect(relativeError(data, reference.output)).toBeLessThan(1e-5);
        expect(relativeError(data, expected)).toBeLessThan(1e-5);
        // The call timed its two shares: the estimate is there, at mean 1 (a share without rows
        // leaves the estimate as it was).
        const measured = balanced.speedsForTesting(split);
        if (measured !== null) {
          expect(measured).toHaveLength(2);
          expect(measured[0]! + measured[1]!).toBeCloseTo(2, 9);
        }
      }
      expect(balanced.speedsForTesting(split)).not.toBeNull();
      await withBalanced.dispose();
      await withEqual.dispose();
    });
  }

  // An estimate that rates the calling thread so slow that its share is empty leaves nothing to
  // time it by: it must drift back toward equal speeds rather than stay (balance.ts). N = 80, a
  // multiple of the chunk, so that the boundary can reach N and leave that share no rows.
  it('lets an estimate that emptied a share recover', async () => {
    const balanced = cpuBackend({ threads: 2, parallelThreshold: 0 }) as ReturnType<typeof cpuBackend> & {
      speedsForTesting(split: 'queries'): Float64Array | null;
      setSpeedsForTesting(split: 'queries', speeds: Float64Array | null): void;
    };
    const fm = await createFastmax({ backend: balanced });
    const q = tensor([1, 1, 80, 16], 51);
    balanced.setSpeedsForTesting('queries', Float64Array.of(1.9, 0.1));
    await fm.attention(q, q, q, { order: 1, causal: true, chunkSize: 8, path: 'factorized' });
    // Halfway back (0.55) if the share was empty; measured and averaged (at least 0.175) if not.
    expect(balanced.speedsForTesting('queries')![1]).toBeGreaterThan(0.15);
    await fm.dispose();
  });

  // One head split by queries: the calling thread answers one share from the caller's arrays (the
  // last when the shares fold, the first when they scan) and only the others' rows are staged for
  // the workers, block by block while they run, so staging left over from an earlier, larger call
  // holds stale rows outside them, which no worker may read. With fresh output pages (the probe
  // says 1 ms a page) the calling thread takes no rows, and a scan's first share still runs.
  for (const normalization of ['prefix-max-norm', 'max-norm', 'l2', { scale: 0.3 }] as const) {
    for (const probe of ['recycled', 'fresh', 'no calling thread'] as const) {
      for (const [queryScan, scanKeepBytes] of [
        [false, undefined],
        [true, undefined],
        [true, 0],
      ] as const) {
        const label = typeof normalization === 'string' ? normalization : 'scale';
        const setting = probe === 'no calling thread' ? 'shareCallingThread: false' : `${probe} output pages`;
        const how = queryScan
          ? scanKeepBytes === 0
            ? ', prefix scan keeping nothing'
            : ', prefix scan'
          : '';
        it(`splits one head by queries over stale staging (${label}, ${setting}${how})`, async () => {
          const split = cpuBackend({
            threads: 2,
            parallelThreshold: 0,
            shareCallingThread: probe !== 'no calling thread',
            queryScan,
            ...(scanKeepBytes === undefined ? {} : { scanKeepBytes }),
          });
          (
            split as typeof split & { setFirstTouchProbeForTesting(p: () => number): void }
          ).setFirstTouchProbeForTesting(() => (probe === 'fresh' ? 1 : 0));
          const parallel = await createFastmax({ backend: split });
          const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
          const options: FastmaxOptions = { order: 1, causal: true, chunkSize: 16, normalization };
          const large = tensor([1, 1, 3200, 16], 51, 40);
          await parallel.attention(large, large, large, options);
          // Past STAGE_BLOCK_ROWS (1024): the workers start while the calling thread stages the rest.
          const N = 2600;
          const q = tensor([1, 1, N, 16], 52);
          const k = tensor([1, 1, N + 9, 16], 53);
          const v = tensor([1, 1, N + 9, 12], 54);
          const a = await parallel.attention(q, k, v, options);
          const b = await serial.attention(q, k, v, options);
          const x = (a.output as HostTensor).data;
          const y = (b.output as HostTensor).data;
          expectLikeOneThread(x, y, [q, k, v], options);
          await serial.dispose();
          await parallel.dispose();
        });
      }
    }
  }

  // options.out arrives prefilled with NaN: every path must write every element of it, the zero
  // rows of batches without keys and of queries before the first key included.
  const outPaths: {
    label: string;
    threads: number;
    heads: number;
    order: 1 | 2;
    probe?: number;
    share?: boolean;
    scan?: boolean;
    direct?: boolean;
  }[] = [
    { label: 'one unit in the calling thread', threads: 1, heads: 2, order: 2 },
    { label: 'whole heads on workers', threads: 2, heads: 2, order: 2 },
    { label: 'one head split by features', threads: 2, heads: 1, order: 2 },
    { label: 'one direct-path head split by queries', threads: 2, heads: 1, order: 2, direct: true },
    { label: 'split by queries, recycled pages', threads: 2, heads: 1, order: 1, probe: 0 },
    { label: 'split by queries, fresh pages', threads: 2, heads: 1, order: 1, probe: 1 },
    { label: 'split by queries, no calling thread', threads: 2, heads: 1, order: 1, share: false },
    { label: 'prefix scan, recycled pages', threads: 2, heads: 1, order: 1, probe: 0, scan: true },
    { label: 'prefix scan, fresh pages', threads: 2, heads: 1, order: 1, probe: 1, scan: true },
    { label: 'prefix scan, no calling thread', threads: 2, heads: 1, order: 1, share: false, scan: true },
    {
      label: 'prefix scan, four heads in two shares each on five workers',
      threads: 5,
      heads: 2,
      order: 1,
      scan: true,
    },
  ];
  for (const { label, threads, heads, order, probe, share, scan, direct } of outPaths) {
    it(`writes every element of options.out (${label})`, async () => {
      const tested = cpuBackend({
        threads,
        parallelThreshold: 0,
        shareCallingThread: share !== false,
        queryScan: scan ?? false,
      });
      if (probe !== undefined) {
        (
          tested as typeof tested & { setFirstTouchProbeForTesting(p: () => number): void }
        ).setFirstTouchProbeForTesting(() => probe);
      }
      const fm = await createFastmax({ backend: tested });
      const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
      const batch = heads === 1 ? 1 : 2;
      const N = 1500;
      // At p = 2, D = 32 has F = 561 features, enough for a split by features (16 would not be).
      const D = order === 2 ? 32 : 16;
      const q = tensor([batch, heads, N, D], 61);
      // Fewer keys than queries: causal rows before the first key see none and are zero.
      const k = tensor([batch, heads, N - 20, D], 62);
      const v = tensor([batch, heads, N - 20, 12], 63);
      const options: FastmaxOptions = {
        order,
        causal: true,
        chunkSize: 16,
        ...(batch === 2 ? { keyLengths: [N - 20, 0] } : {}),
        ...(direct ? { path: 'direct' as const } : {}),
      };
      const expected = await serial.attention(q, k, v, options);
      const out = new Float32Array(batch * heads * N * 12).fill(Number.NaN);
      const result = await fm.attention(q, k, v, { ...options, out });
      expect((result.output as HostTensor).data).toBe(out);
      expect(result.degenerateRows).toBe(expected.degenerateRows);
      expect(result.degenerateRows).toBeGreaterThan(0);
      const y = (expected.output as HostTensor).data;
      let error = 0;
      for (let i = 0; i < y.length; i++) error = Math.max(error, Math.abs(out[i]! - y[i]!));
      expect(out.every(Number.isFinite)).toBe(true);
      expect(error).toBeLessThan(1e-5);
      await serial.dispose();
      await fm.dispose();
    });
  }

  for (const queryScan of [false, true]) {
    it(`hands an output above 64 MiB over in the shared memory the workers wrote, equal to one thread${queryScan ? ' (prefix scan)' : ''}`, async () => {
      // 240000 × 72 floats = 69 MB: staged, it would be copied out and doubled; small D keeps it fast.
      const N = 240000;
      const q = tensor([1, 1, N, 4], 41);
      const k = tensor([1, 1, N, 4], 42);
      const v = tensor([1, 1, N, 72], 43);
      const options: FastmaxOptions = { order: 1, causal: true };
      // Equal shares on every call, so that the two parallel calls below split alike and agree bit
      // for bit (balanced shares follow the timings of the calls before).
      const parallel = await createFastmax({
        backend: cpuBackend({ threads: 2, parallelThreshold: 0, balanceShares: false, queryScan }),
      });
      const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
      const a = (await parallel.attention(q, k, v, options)).output as HostTensor;
      const b = (await serial.attention(q, k, v, options)).output as HostTensor;
      expect(a.data.buffer).toBeInstanceOf(SharedArrayBuffer);
      expect(b.data.buffer).not.toBeInstanceOf(SharedArrayBuffer);
      // The query split builds the second share's state in other blocks than one thread does.
      expect(relativeError(a.data, b.data)).toBeLessThan(1e-5);
      // Given options.out, the shared memory is copied into it instead.
      const out = new Float32Array(N * 72).fill(Number.NaN);
      const c = (await parallel.attention(q, k, v, { ...options, out })).output as HostTensor;
      expect(c.data).toBe(out);
      expect(relativeError(out, a.data)).toBe(0);
      await serial.dispose();
      await parallel.dispose();
    });
  }

  it('splits the backward of one head by features, matching one thread', async () => {
    // D = 32, p = 2: F = 561 features, enough for the feature split: each worker owns half of them
    // and every other query block's direct part, in both passes.
    const q = tensor([1, 1, 90, 32], 21);
    const k = tensor([1, 1, 90, 32], 22);
    const v = tensor([1, 1, 90, 40], 23);
    const dOut = tensor([1, 1, 90, 40], 24);
    // The planner would pick the direct path at this N; the split applies to the factorized one.
    const options: FastmaxOptions = { order: 2, causal: true, chunkSize: 16, path: 'factorized' };
    const parallel = await createFastmax({ backend });
    const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
    const a = await parallel.backward(q, k, v, dOut, options);
    const b = await serial.backward(q, k, v, dOut, options);
    for (const name of ['dq', 'dk', 'dv'] as const) {
      // Every gradient is a sum of the two shares' parts (float32 kernels, summed in float64), so
      // they differ from one thread by float32 rounding only.
      expect(relativeError((a[name] as HostTensor).data, (b[name] as HostTensor).data)).toBeLessThan(1e-5);
    }
    await serial.dispose();
  });

  /** The backward on `threads` workers is finite and one thread's to float32 rounding (1e-5). */
  async function expectBackwardOfOneThread(
    threads: number,
    [q, k, v, dOut]: HostTensor[],
    options: FastmaxOptions,
  ): Promise<void> {
    const parallel = await createFastmax({ backend: cpuBackend({ threads, parallelThreshold: 0 }) });
    const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
    const a = await parallel.backward(q!, k!, v!, dOut!, options);
    const b = await serial.backward(q!, k!, v!, dOut!, options);
    for (const name of ['dq', 'dk', 'dv'] as const) {
      const x = (a[name] as HostTensor).data;
      expect(x.every(Number.isFinite)).toBe(true);
      expect(relativeError(x, (b[name] as HostTensor).data)).toBeLessThan(1e-5);
    }
    await serial.dispose();
    await parallel.dispose();
  }

  // The backward's feature shares sized to the workers' speeds as the forward's are: skewed either
  // way, every feature is still some share's, so the gradients are the equal split's to float32
  // rounding (1e-5, as above).
  // A causal head with few features (p = 1) splits its backward by queries: each pass's shares take
  // whole chunks, pass 1's later ones folding the keys before them and pass 2's earlier ones the
  // queries after them. Every row and key is written by one share, so the result is one thread's
  // to float32 rounding (states summed in other groupings); 1e-5 as for the other splits. Shapes:
  // more keys than queries (the keys every query sees go to share 0), fewer (the first rows see
  // none), key padding over two heads on three workers, and chunks that end mid-block.
  for (const [batch, N, M, D, Dv, threads, keyLengths] of [
    [1, 300, 300, 16, 8, 2, null],
    [1, 300, 340, 16, 12, 3, null],
    [1, 300, 260, 12, 12, 2, null],
    [2, 200, 200, 8, 5, 3, [150, 0]],
    [1, 129, 129, 16, 16, 3, null],
  ] as const) {
    it(`splits the backward of a p = 1 causal head by queries (B = ${batch}, N = ${N}, M = ${M}, D = ${D}, Dv = ${Dv}, ${threads} workers${keyLengths ? ', key padding' : ''}), matching one thread`, async () => {
      const q = tensor([batch, 1, N, D], 61);
      const k = tensor([batch, 1, M, D], 62);
      const v = tensor([batch, 1, M, Dv], 63);
      const dOut = tensor([batch, 1, N, Dv], 64);
      const options: FastmaxOptions = {
        order: 1,
        causal: true,
        chunkSize: 16,
        path: 'factorized',
        ...(keyLengths === null ? {} : { keyLengths: [...keyLengths] }),
      };
      await expectBackwardOfOneThread(threads, [q, k, v, dOut], options);
    });
  }

  // A non-causal head with few features splits its backward by sequence: in each pass every share
  // adds its tokens (keys, then queries) to partial moments and reads its rows (queries, then keys)
  // out against their sum. One thread's to float32 rounding (the partial states are summed in
  // another grouping); 1e-5 as above. Shapes: more keys than queries and fewer, key padding with a
  // batch of no valid key, two heads of one kv head on three workers, each normalization.
  for (const [batch, H, N, M, D, Dv, threads, keyLengths, normalization] of [
    [1, 1, 300, 300, 16, 8, 2, null, 'max-norm'],
    [1, 1, 300, 340, 16, 12, 3, null, 'l2'],
    [1, 1, 1000, 40, 12, 12, 3, null, 'max-norm'],
    [2, 1, 200, 200, 8, 5, 3, [150, 0], 'prefix-max-norm'],
    [1, 2, 130, 170, 16, 24, 3, [150], 'max-norm'],
  ] as const) {
    it(`splits the backward of a p = 1 non-causal head by sequence (B = ${batch}, H = ${H}, N = ${N}, M = ${M}, D = ${D}, Dv = ${Dv}, ${threads} workers, ${normalization}${keyLengths ? ', key padding' : ''}), matching one thread`, async () => {
      const q = tensor([batch, H, N, D], 71);
      const k = tensor([batch, 1, M, D], 72);
      const v = tensor([batch, 1, M, Dv], 73);
      const dOut = tensor([batch, H, N, Dv], 74);
      const options: FastmaxOptions = {
        order: 1,
        causal: false,
        normalization,
        path: 'factorized',
        ...(keyLengths === null ? {} : { keyLengths: [...keyLengths] }),
      };
      await expectBackwardOfOneThread(threads, [q, k, v, dOut], options);
    });
  }

  it('sizes the backward feature shares to the measured speeds, matching equal shares', async () => {
    type Balanced = ReturnType<typeof cpuBackend> & {
      speedsForTesting(split: 'backward'): Float64Array | null;
      setSpeedsForTesting(split: 'backward', speeds: Float64Array | null): void;
    };
    const balanced = cpuBackend({ threads: 2, parallelThreshold: 0 }) as Balanced;
    const equal = cpuBackend({ threads: 2, parallelThreshold: 0, balanceShares: false }) as Balanced;
    const q = tensor([1, 1, 90, 32], 21);
    const k = tensor([1, 1, 90, 32], 22);
    const v = tensor([1, 1, 90, 40], 23);
    const dOut = tensor([1, 1, 90, 40], 24);
    const options: FastmaxOptions = { order: 2, causal: true, chunkSize: 16, path: 'factorized' };
    const withBalanced = await createFastmax({ backend: balanced });
    const withEqual = await createFastmax({ backend: equal });
    const expected = await withEqual.backward(q, k, v, dOut, options);
    expect(equal.speedsForTesting('backward')).toBeNull();
    for (const speeds of [null, [0.3, 1.7], [1.7, 0.3]]) {
      balanced.setSpeedsForTesting('backward', speeds === null ? null : Float64Array.from(speeds));
      const result = await withBalanced.backward(q, k, v, dOut, options);
      for (const name of ['dq', 'dk', 'dv'] as const) {
        expect(
          relativeError((result[name] as HostTensor).data, (expected[name] as HostTensor).data),
        ).toBeLessThan(1e-5);
      }
      // The call timed its two workers: the estimate is there, at mean 1.
      const measured = balanced.speedsForTesting('backward');
      expect(measured).toHaveLength(2);
      expect(measured![0]! + measured![1]!).toBeCloseTo(2, 9);
    }
    await withBalanced.dispose();
    await withEqual.dispose();
  });

  it('runs the backward of several heads on workers, equal to one thread (GQA: dk, dv summed)', async () => {
    const q = tensor([2, 4, 50, 8], 11);
    const k = tensor([2, 2, 50, 8], 12);
    const v = tensor([2, 2, 50, 12], 13);
    const dOut = tensor([2, 4, 50, 12], 14);
    const options: FastmaxOptions = { order: 2, causal: true, chunkSize: 16 };
    const parallel = await createFastmax({ backend });
    const serial = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
    const a = await parallel.backward(q, k, v, dOut, options);
    const b = await serial.backward(q, k, v, dOut, options);
    for (const name of ['dq', 'dk', 'dv'] as const) {
      // Same kernels and order of operations per head; only the per-kv-head sum of dk, dv is
      // grouped differently (float64), so the results agree to float32 rounding.
      expect(relativeError((a[name] as HostTensor).data, (b[name] as HostTensor).data)).toBeLessThan(1e-6);
    }
    await serial.dispose();
  });

  it('writes the gradients into options.gradientsOut, the same as into fresh arrays, on workers or not', async () => {
    expect(backend.capabilities.writesGradientsIntoOut).toBe(true);
    const q = tensor([1, 2, 70, 8], 81);
    const k = tensor([1, 1, 90, 8], 82);
    const v = tensor([1, 1, 90, 12], 83);
    const dOut = tensor([1, 2, 70, 12], 84);
    for (const [threads, options] of [
      [1, { order: 2, causal: true, chunkSize: 16 }],
      [2, { order: 1, causal: false, path: 'factorized' }],
      [2, { order: 2, causal: true, chunkSize: 16, keyLengths: [80] }],
    ] as const) {
      const fm = await createFastmax({
        backend: cpuBackend({ threads, parallelThreshold: 0, balanceShares: false }),
      });
      const want = await fm.backward(q, k, v, dOut, options);
      const gradientsOut = {
        dq: new Float32Array(2 * 70 * 8).fill(Number.NaN),
        dk: new Float32Array(90 * 8).fill(Number.NaN),
        dv: new Float32Array(90 * 12).fill(Number.NaN),
      };
      const got = await fm.backward(q, k, v, dOut, { ...options, gradientsOut });
      for (const name of ['dq', 'dk', 'dv'] as const) {
        expect((got[name] as HostTensor).data).toBe(gradientsOut[name]);
        expect(Array.from(gradientsOut[name])).toEqual(Array.from((want[name] as HostTensor).data));
      }
      await fm.dispose();
    }
  });

  it('gives the same backward on staging reused from other calls as a fresh backend', async () => {
    // The staged arrays are not cleared between calls: every pass writes each row it owns, and pass
    // 2 zeroes the key rows its state part does not reach; the normalization's row steps write every
    // row, and the sums of its scalar steps are zeroed first. Calls of other shapes first leave other
    // values there (causal, key padding, non-causal, the direct path, a second head).
    const calls: [FastmaxOptions, Shape4, Shape4, number][] = [
      [{ order: 2, causal: true, path: 'factorized', chunkSize: 16 }, [1, 1, 150, 32], [1, 1, 150, 32], 40],
      // Split by sequence (p = 1, non-causal, two shares), after a call that left nonzero dz and dy
      // in its rows: the split writes its dz and zeroes the padded keys' dy and dv itself.
      [
        { order: 1, causal: false, path: 'factorized', keyLengths: [140] },
        [1, 1, 130, 32],
        [1, 1, 150, 32],
        40,
      ],
      [{ order: 2, causal: false, path: 'factorized', keyLengths: [61] }, [1, 1, 50, 32], [1, 1, 80, 32], 40],
      [
        { order: 2, causal: true, path: 'factorized', keyLengths: [47], chunkSize: 16 },
        [1, 1, 90, 32],
        [1, 1, 70, 32],
        40,
      ],
      [{ order: 1, causal: true, path: 'direct' }, [1, 2, 40, 32], [1, 2, 40, 32], 40],
      // Normalizations that divide keys too, one with GQA (dk, dv summed per kv head).
      [
        { order: 2, causal: false, path: 'factorized', normalization: 'max-norm' },
        [1, 4, 40, 16],
        [1, 2, 40, 16],
        24,
      ],
      [
        { order: 1, causal: true, path: 'factorized', normalization: 'l2', chunkSize: 16 },
        [1, 2, 60, 16],
        [1, 2, 60, 16],
        24,
      ],
    ];
    // Equal shares on both (balanced ones follow the timings of the calls before, which would move
    // the split of the reused backend and its float32 rounding).
    const threads = { threads: 2, parallelThreshold: 0, balanceShares: false };
    const reused = await createFastmax({ backend: cpuBackend(threads) });
    for (const [index, [options, qShape, kShape, Dv]] of [...calls, ...calls.slice().reverse()].entries()) {
      const q = tensor(qShape, 31 + index);
      const k = tensor(kShape, 32 + index);
      const v = tensor([kShape[0], kShape[1], kShape[2], Dv], 33 + index);
      const dOut = tensor([qShape[0], qShape[1], qShape[2], Dv], 34 + index);
      const fresh = await createFastmax({ backend: cpuBackend(threads) });
      const want = await fresh.backward(q, k, v, dOut, options);
      await fresh.dispose();
      const got = await reused.backward(q, k, v, dOut, options);
      for (const name of ['dq', 'dk', 'dv'] as const) {
        expect(Array.from((got[name] as HostTensor).data), `${name} of call ${index}`).toEqual(
          Array.from((want[name] as HostTensor).data),
        );
      }
    }
    await reused.dispose();
  });

  // The backend declares checksFiniteInputs: core leaves the scan to it, and it scans in the calling
  // thread while the workers compute. The error must be core's, the call must not settle before
  // the workers are done with the staged memory, and the pool must be usable right after.
  it('refuses a non-finite input found while the workers compute with core’s error, then recovers', async () => {
    expect(backend.capabilities.checksFiniteInputs).toBe(true);
    const fm = await createFastmax({ backend });
    const q = tensor([1, 2, 600, 16], 11);
    const k = tensor([1, 2, 600, 16], 12);
    const v = tensor([1, 2, 600, 16], 13);
    const cases: [HostTensor, number, string][] = [
      [q, q.data.length - 1, 'q'],
      [k, 7000, 'k'],
      [v, 0, 'v'],
    ];
    for (const [target, index, name] of cases) {
      const saved = target.data[index]!;
      target.data[index] = Number.NaN;
      const error = await fm.attention(q, k, v, { order: 2, causal: true }).then(
        () => null,
        (e: unknown) => e,
      );
      target.data[index] = saved;
      expect(isFastmaxError(error, 'NON_FINITE_INPUT')).toBe(true);
      expect((error as { argument?: string }).argument).toBe(`${name}.data[${index}]`);
      const clean = await fm.attention(q, k, v, { order: 2, causal: true });
      const reference = referenceAttention(q, k, v, { order: 2, causal: true });
      expect(relativeError((clean.output as HostTensor).data, reference.output)).toBeLessThan(1e-5);
    }
    // Opting out skips the scan: the call settles, with the NaN's rows degenerate or NaN.
    q.data[5] = Number.NaN;
    const unchecked = await fm.attention(q, k, v, { order: 2, causal: true, checkFinite: false });
    expect(unchecked.output.shape).toEqual([1, 2, 600, 16]);
  });

  // The kernels flag the rows they load that hold a NaN or an infinity; core's checkFinite then
  // names the value. Every way a call is laid out loads every row once at least: one thread, whole
  // heads, one head split by features, one head split by queries (a worker's rows and the calling
  // thread's). Key rows past a batch's valid length are never loaded and are scanned apart.
  const layouts: [string, ReturnType<typeof cpuBackend>, FastmaxOptions, Shape4][] = [
    ['one thread', cpuBackend({ threads: 1 }), { order: 1, causal: true }, [1, 1, 300, 16]],
    ['whole heads', backend, { order: 2, causal: false }, [1, 2, 300, 16]],
    ['split by features', backend, { order: 2, causal: true, path: 'factorized' }, [1, 1, 300, 32]],
    ['split by queries', backend, { order: 1, causal: true, chunkSize: 16 }, [1, 1, 300, 16]],
    ['padded keys', backend, { order: 1, causal: false, keyLengths: [250] }, [1, 1, 300, 16]],
  ];
  for (const [layout, owner, options, shape] of layouts) {
    it(`refuses NaN and infinities the kernels meet, naming the value (${layout})`, async () => {
      const fm = await createFastmax({ backend: owner });
      const q = tensor(shape, 61);
      const k = tensor(shape, 62);
      const v = tensor(shape, 63);
      const row = shape[3];
      const last = q.data.length - 1;
      const cases: [HostTensor, number, string, number][] = [
        [q, 3 * row + 2, 'q', Number.NaN],
        [q, last, 'q', Number.POSITIVE_INFINITY],
        [k, 5, 'k', Number.NEGATIVE_INFINITY],
        [k, last - row, 'k', Number.NaN],
        [v, 0, 'v', Number.NaN],
        [v, last, 'v', Number.POSITIVE_INFINITY],
      ];
      for (const [target, index, name, bad] of cases) {
        const saved = target.data[index]!;
        target.data[index] = bad;
        const error = await fm.attention(q, k, v, options).then(
          () => null,
          (e: unknown) => e,
        );
        target.data[index] = saved;
        expect(isFastmaxError(error, 'NON_FINITE_INPUT'), `${name}[${index}] = ${bad}`).toBe(true);
        expect((error as { argument?: string }).argument).toBe(`${name}.data[${index}]`);
      }
      // Finite values whose squared norm overflows float32 make the kernels flag their row; core's
      // scan then finds nothing to name, and the call goes on.
      const huge = tensor(shape, 64, 1e25);
      await expect(fm.attention(huge, k, v, options)).resolves.toBeDefined();
      if (owner !== backend) await owner.dispose();
    });
  }

  it('reports a crashed worker as BACKEND_ERROR and recovers', async () => {
    const pool = await (
      backend as typeof backend & { poolForTesting(): Promise<WorkerPool | null> }
    ).poolForTesting();
    expect(pool).not.toBeNull();
    const q = tensor([1, 4, 2048, 64], 5);
    const fm = await createFastmax({ backend });
    const running = fm.attention(q, q, q, { order: 2 });
    // Let the run reach the workers, then end one as a crash would.
    await new Promise((resolve) => setTimeout(resolve, 20));
    pool!.crashWorkerForTesting(0);
    const error = await running.then(
      () => null,
      (e: unknown) => e,
    );
    expect(isFastmaxError(error, 'BACKEND_ERROR')).toBe(true);
    const small = tensor([1, 2, 40, 8], 6);
    const after = await fm.attention(small, small, small, { order: 2 });
    const reference = referenceAttention(small, small, small, { order: 2 });
    expect(relativeError((after.output as HostTensor).data, reference.output)).toBeLessThan(1e-5);
  });

  // A prefix scan's shares wait for the one before them: a crash there must fail the call and wake
  // the shares still waiting (they would otherwise hold their workers for good). The calling thread
  // takes no share here, so that the crash comes on time, while share 0 is still building its
  // moments (about 40k rows of D = 64 on three workers) and the other two wait for them.
  it('reports a worker crashed in a prefix scan as BACKEND_ERROR and frees the workers waiting for it', async () => {
    const scanning = cpuBackend({ threads: 3, queryScan: true, shareCallingThread: false });
    const pool = await (
      scanning as typeof scanning & { poolForTesting(): Promise<WorkerPool | null> }
    ).poolForTesting();
    const fm = await createFastmax({ backend: scanning });
    const small = tensor([1, 1, 3000, 16], 8);
    const options: FastmaxOptions = { order: 1, causal: true, chunkSize: 16 };
    // Started and warm, so that the crash below meets the workers inside the large call.
    await fm.attention(small, small, small, options);
    const q = tensor([1, 1, 120000, 64], 7);
    const running = fm.attention(q, q, q, { order: 1, causal: true });
    await new Promise((resolve) => setTimeout(resolve, 10));
    pool!.crashWorkerForTesting(0);
    const error = await running.then(
      () => null,
      (e: unknown) => e,
    );
    expect(isFastmaxError(error, 'BACKEND_ERROR')).toBe(true);
    for (let waited = 0; pool!.busyWorkersForTesting() > 0 && waited < 100; waited++)
      await new Promise((resolve) => setTimeout(resolve, 20));
    expect(pool!.busyWorkersForTesting()).toBe(0);
    for (let call = 0; call < 2; call++) {
      const after = await fm.attention(small, small, small, options);
      const reference = referenceAttention(small, small, small, options);
      expect(relativeError((after.output as HostTensor).data, reference.output)).toBeLessThan(1e-5);
    }
    await fm.dispose();
  });

  it('lets the process exit without dispose (idle workers and a pending staging release are unref-ed)', async () => {
    const { execFileSync } = await import('node:child_process');
    // Every staged byte is above stagingKeepBytes: its release is pending for a minute at exit.
    const script = `
      import { cpuBackend } from '@fastmax/backend-cpu';
      import { createFastmax } from '@fastmax/core';
      const fm = await createFastmax({
        backend: cpuBackend({ threads: 2, parallelThreshold: 0, stagingKeepBytes: 0, stagingIdleMillis: 60000 }),
      });
      // Two heads: two units on the workers, which read staged inputs.
      const t = { shape: [1, 2, 64, 8], data: new Float32Array(1024).fill(0.5) };
      const r = await fm.attention(t, t, t, {});
      console.log(r.output.data[0]);
    `;
    // Runs the built package (dist): \`pnpm test\` builds before it tests.
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
      cwd: new URL('..', import.meta.url),
      timeout: 20000,
      stdio: 'pipe',
    }).toString();
    expect(out.trim()).toBe('0.5');
  });
});

describe('limits', () => {
  it('refuses a factorized call whose state cannot fit with RESOURCE_EXHAUSTED; direct still works', async () => {
    // D = 128, p = 4: F = 11.7 M features, an F × Dv state of several GB per thread.
    const fm = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
    const q = tensor([1, 1, 3, 128], 1);
    const v = tensor([1, 1, 3, 8], 2);
    const error = await fm.attention(q, q, v, { order: 4, path: 'factorized' }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(isFastmaxError(error, 'RESOURCE_EXHAUSTED')).toBe(true);
    const direct = await fm.attention(q, q, v, { order: 4, path: 'direct' });
    const reference = referenceAttention(q, q, v, { order: 4 });
    expect(relativeError((direct.output as HostTensor).data, reference.output)).toBeLessThan(1e-5);
    await fm.dispose();
  });

  it('keeps one decoding state per key head: 128 query heads on 2 key heads fit where 128 states do not', async () => {
    // p = 3, D = Dv = 64: F = 47,905 features, about 25 MB a state: 128 of them pass the 2 GiB
    // limit, 2 (one per key head, read by 64 query heads each) do not.
    const fm = await createFastmax({ backend: cpuBackend({ threads: 1 }) });
    const options = { batch: 1, heads: 128, headDim: 64, valueDim: 64, order: 3 } as const;
    const error = await fm.createState({ ...options, kvHeads: 128 }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(isFastmaxError(error, 'RESOURCE_EXHAUSTED')).toBe(true);
    const state = await fm.createState({ ...options, kvHeads: 2 });
    const q = tensor([1, 128, 2, 64], 5);
    const k = tensor([1, 2, 2, 64], 6);
    const v = tensor([1, 2, 2, 64], 7);
    const step = await state.step(q, k, v);
    const reference = referenceAttention(q, k, v, { order: 3, causal: true });
    expect(relativeError((step.output as HostTensor).data, reference.output)).toBeLessThan(1e-5);
    state.dispose();
    await fm.dispose();
  });
});
