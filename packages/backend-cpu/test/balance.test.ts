import { describe, expect, it } from 'vitest';
import type { BackwardEngine, BackwardHead } from '../src/backward-engine.js';
import { balancedFeatureBounds, sharesPerHead, unevenSpeeds, updatedSpeeds } from '../src/balance.js';
import { batchUnits, combineShares, featureShare } from '../src/engine.js';
import { kernelSetup } from '../src/setup.js';
import { type BackwardJob, backwardHead } from '../src/worker.js';
import { causalHead } from './head-job.js';

describe('updatedSpeeds', () => {
  it('rates workers by work per millisecond, scaled to mean 1', () => {
    // Worker 1 did twice the work in the same time: twice as fast.
    const speeds = updatedSpeeds(null, [100, 200], [10, 10])!;
    expect(speeds[0]).toBeCloseTo(2 / 3, 12);
    expect(speeds[1]).toBeCloseTo(4 / 3, 12);
  });

  it('averages a new call with the estimate before it', () => {
    const first = updatedSpeeds(null, [100, 100], [10, 10])!;
    expect([...first]).toEqual([1, 1]);
    // The new call alone says 2/3 and 4/3; half of each, kept at mean 1.
    const second = updatedSpeeds(first, [100, 200], [10, 10])!;
    expect(second[0]).toBeCloseTo(5 / 6, 12);
    expect(second[1]).toBeCloseTo(7 / 6, 12);
  });

  it('bounds one extreme sample, keeping the mean at 1', () => {
    const speeds = updatedSpeeds(null, [1, 1000], [10, 10])!;
    expect(speeds[0]).toBe(1 / 4);
    expect(speeds[1]).toBeCloseTo(7 / 4, 12);
    // Several workers: the slow one at the bound, the rest at their ratios, the mean still 1.
    const four = updatedSpeeds(null, [1, 500, 500, 1000], [10, 10, 10, 10])!;
    expect(four[0]).toBe(1 / 4);
    expect(four[1]! + four[2]! + four[3]! + four[0]!).toBeCloseTo(4, 12);
    expect(four[3]! / four[1]!).toBeCloseTo(2, 12);
    // A blend of an extreme estimate with a new one stays at mean 1 too.
    const blended = updatedSpeeds(speeds, [1, 1000], [10, 10])!;
    expect(blended[0]! + blended[1]!).toBeCloseTo(2, 12);
  });

  it('moves the estimate halfway back to equal when a timing is unusable', () => {
    // A share left empty (0 work in 0 ms) cannot be timed: without this the estimate that emptied
    // it would never change again.
    const previous = Float64Array.of(0.6, 1.4);
    const unusable: [number[], number[]][] = [
      [
        [0, 100],
        [0, 10],
      ],
      [
        [100, 100],
        [10, Number.NaN],
      ],
      [[100, 100], [10]],
    ];
    for (const [work, millis] of unusable) {
      const speeds = updatedSpeeds(previous, work, millis)!;
      expect(speeds[0]).toBeCloseTo(0.8, 12);
      expect(speeds[1]).toBeCloseTo(1.2, 12);
    }
    expect(updatedSpeeds(null, [0, 100], [0, 10])).toBeNull();
    expect(updatedSpeeds(null, [], [])).toBeNull();
  });
});

describe('unevenSpeeds', () => {
  it('gives the first shares speeds only when they are at least 8% apart', () => {
    const speeds = Float64Array.of(0.9, 1.1, 1.05);
    expect([...unevenSpeeds(speeds, 2)!]).toEqual([0.9, 1.1]);
    expect(unevenSpeeds(speeds.subarray(1), 2)).toBeNull();
    expect(unevenSpeeds(Float64Array.of(0.97, 1.03), 2)).toBeNull();
    // No estimate, or one of fewer threads than the split has.
    expect(unevenSpeeds(null, 2)).toBeNull();
    expect(unevenSpeeds(Float64Array.of(0.5, 1.5), 3)).toBeNull();
  });
});

describe('batchUnits', () => {
  const units = (count: number) => Array.from({ length: count }, (_, head) => ({ head }));

  it('gives each unit a batch of its own until there are more than 4 per thread', () => {
    // 10 whole heads on 2 workers: batches of 3 would leave one worker 6 heads, one each 5.
    expect(batchUnits(units(10), 2).map((batch) => batch.length)).toEqual(Array(10).fill(1));
    expect(batchUnits(units(8), 2)).toHaveLength(8);
  });

  it('batches many units in order, every one once, in at least 4 batches per thread', () => {
    const batches = batchUnits(units(100), 2);
    expect(batches.map((batch) => batch.length)).toEqual([...Array(8).fill(12), 4]);
    expect(batches.flat()).toEqual(units(100));
    expect(batchUnits(units(0), 3)).toEqual([]);
  });
});

describe('sharesPerHead', () => {
  const none = () => 0;

  it('keeps whole heads when they divide evenly over the threads, and one head in a share per thread', () => {
    expect(sharesPerHead(4, 4, 100, none)).toBe(1);
    expect(sharesPerHead(12, 4, 100, none)).toBe(1);
    expect(sharesPerHead(1, 4, 100, none)).toBe(4);
    expect(sharesPerHead(1, 16, 100, (s) => 0.01 * s)).toBe(16);
  });

  it('picks the count that leaves no thread idle in the last round', () => {
    // 2 heads on 3 threads: 3 shares each run in 2 full rounds (2/3 of a head), where 2 shares
    // each take 2 rounds of half a head with one thread idle in the second.
    expect(sharesPerHead(2, 3, 100, none)).toBe(3);
    // 12 heads on 16 threads: 4 shares, 3 rounds of a quarter (0.75), against 2 rounds of a half.
    expect(sharesPerHead(12, 16, 100, none)).toBe(4);
    // 7 heads on 16 threads: 4 shares (28 units, 2 rounds of a quarter) beat 3 (21 units, 2 rounds
    // of a third); 6 shares tie with 4 and lose to it for their extra shares.
    expect(sharesPerHead(7, 16, 100, none)).toBe(4);
    // 4 heads on 5 threads: 2, 3 and 4 shares all take one head's time; the fewest wins.
    expect(sharesPerHead(4, 5, 100, none)).toBe(2);
  });

  it('splits heads that leave threads idle in the last round when there are more heads than threads', () => {
    // 3 heads on 2 threads: 3 rounds of half a head (1.5) against 2 rounds of a whole one.
    expect(sharesPerHead(3, 2, 100, none)).toBe(2);
    // 9 heads on 4 threads: 4 shares, 9 rounds of a quarter (2.25), against 2.33 for 3 shares, 2.5
    // for 2 and 3 for whole heads.
    expect(sharesPerHead(9, 4, 100, none)).toBe(4);
    // 5 heads on 2 threads, at most 1 share a head (the limit): whole heads.
    expect(sharesPerHead(5, 2, 1, none)).toBe(1);
    // When every share repeats 0.6 of a head's work, 2 shares cost 3 × 1.1 = 3.3 against 2 × 1.
    expect(sharesPerHead(3, 2, 100, () => 0.6)).toBe(1);
  });

  it('takes fewer shares when what every share repeats outweighs the idle threads', () => {
    // 3 heads on 4 threads: 4 shares each run in 3 rounds of a quarter (0.75 of a head) against 2
    // rounds of a half for 2 shares (1). When every share also repeats 0.3 of a head's work, that is
    // 3 × 0.55 = 1.65 against 2 × 0.8 = 1.6.
    expect(sharesPerHead(3, 4, 100, none)).toBe(4);
    expect(sharesPerHead(3, 4, 100, () => 0.3)).toBe(2);
  });

  it('never exceeds the limit (one share per 4 features)', () => {
    expect(sharesPerHead(2, 3, 2, none)).toBe(2);
    expect(sharesPerHead(1, 8, 3, none)).toBe(3);
    expect(sharesPerHead(1, 8, 0, none)).toBe(1);
  });
});

describe('balancedFeatureBounds', () => {
  const F = 2148;

  it('keeps equal shares (null) without speeds or with speeds within 8% of each other', () => {
    expect(balancedFeatureBounds(F, null, 0)).toBeNull();
    expect(balancedFeatureBounds(F, Float64Array.of(0.97, 1.03), 90)).toBeNull();
  });

  it('gives each worker work in proportion to its speed, its fixed part included', () => {
    const fixed = 90;
    const speeds = Float64Array.of(0.6, 1.4);
    const bounds = balancedFeatureBounds(F, speeds, fixed)!;
    expect(bounds[0]).toBe(0);
    expect(bounds[2]).toBe(F);
    for (const bound of bounds) expect(bound % 4).toBe(0);
    const time = (s: number): number => (bounds[s + 1]! - bounds[s]! + fixed) / speeds[s]!;
    // Equal to rounding to a group of 4 features.
    expect(Math.abs(time(0) - time(1))).toBeLessThan(4 / 0.6);
    // Equal shares would have kept the slow worker busy for much longer.
    const equal = featureShare(F, 0, 2);
    expect((equal.end - equal.start + fixed) / speeds[0]!).toBeGreaterThan(1.5 * time(0));
  });

  it('leaves every share at least one group of 4 features, in order', () => {
    const bounds = balancedFeatureBounds(64, Float64Array.of(0.25, 3.5, 0.25), 200)!;
    expect([...bounds]).toEqual([0, 4, 60, 64]);
    expect(balancedFeatureBounds(12, Float64Array.of(0.5, 1.5), 0)).toBeNull();
  });

  it('reads back through featureShare', () => {
    const bounds = Int32Array.of(0, 400, 2148);
    expect(featureShare(F, 1, 2, bounds)).toEqual({ start: 400, end: 2148 });
    expect(featureShare(F, 1, 2, null)).toEqual({ start: 1072, end: 2148 });
    // A query split (one feature share) uses every feature whatever the bounds say.
    expect(featureShare(F, 0, 1, bounds)).toEqual({ start: 0, end: 2148 });
  });
});

// The engine must run exactly the features the bounds give a share: share 0's denominators cover
// only its features (so they differ from the equal split's), and the two shares still sum to the
// same rows.
it('an engine runs the features featureBounds gives its share, and the shares still sum to the whole', async () => {
  const N = 90;
  const D = 16;
  const { setup, engine, job: headJob } = await causalHead(2, N, D, 16);
  const run = (featureBounds: Int32Array | null): { out: Float32Array; den: Float32Array } => {
    const job = headJob({
      shares: 2,
      featureBounds,
      partialOut: new Float32Array(N * D),
      partialDen: new Float32Array(2 * N),
    });
    engine.runUnit(job, { head: 0, share: 0 });
    const den = job.partialDen!.slice(0, N);
    engine.runUnit(job, { head: 0, share: 1 });
    combineShares(job, { start: 0, end: N });
    return { out: job.out, den };
  };
  const equal = run(null);
  const skewed = run(Int32Array.of(0, 8, setup.paddedFeatures));
  // Share 0 holds 8 of the 156 padded features instead of half of them. The constant feature, in
  // both, carries most of a denominator, so the sums move by a few percent (2.5% here), not by
  // half; with the bounds ignored the two runs would be bit-identical.
  let moved = 0;
  let largest = 0;
  for (let i = 0; i < N; i++) {
    moved = Math.max(moved, Math.abs(skewed.den[i]! - equal.den[i]!));
    largest = Math.max(largest, Math.abs(equal.den[i]!));
  }
  expect(moved).toBeGreaterThan(0.01 * largest);
  let error = 0;
  for (let i = 0; i < equal.out.length; i++)
    error = Math.max(error, Math.abs(equal.out[i]! - skewed.out[i]!));
  expect(error).toBeLessThan(1e-5);
});

/** A stand-in backward engine that records the tasks backwardHead gives it. */
function recordingEngine(): { engine: BackwardEngine; tasks: BackwardHead[] } {
  const tasks: BackwardHead[] = [];
  const engine = {
    gradients: (task: BackwardHead) => tasks.push(task),
    keyGradients: (task: BackwardHead) => tasks.push(task),
  } as unknown as BackwardEngine;
  return { engine, tasks };
}

/** A pass-1 BackwardJob with `fields` and empty data arrays (backwardHead only slices them). */
function backwardJob(fields: Partial<Record<keyof BackwardJob, unknown>>): BackwardJob {
  const empty = new Float32Array(0);
  return {
    pass: 1,
    ...Object.fromEntries(['z', 'y', 'v', 'dOut', 'gradA', 'gradB'].map((name) => [name, empty])),
    ...fields,
  } as unknown as BackwardJob;
}

// The backward's passes read their features through the same bounds: each share's task covers
// exactly the features its bounds give it (a stand-in engine records the tasks).
it('a backward share works on the features featureBounds gives it', () => {
  const { engine, tasks } = recordingEngine();
  const setup = kernelSetup(16, 2, Float32Array.of(1, 1, 0.5), true);
  const job = backwardJob({
    setup,
    shares: 2,
    featureBounds: Int32Array.of(0, 40, setup.paddedFeatures),
    queryBounds: null,
    sequenceSplit: null,
    heads: 1,
    kvHeads: 1,
    queryLength: 8,
    keyLength: 8,
    headDim: 16,
    valueDim: 16,
    validKeys: Int32Array.of(8),
    schedules: [Int32Array.of(0, 8, 0, 8)],
  });
  backwardHead(engine, job, { head: 0, share: 0 });
  backwardHead(engine, { ...job, pass: 2 }, { head: 0, share: 1 });
  expect(tasks.map(({ featureStart, featureEnd, share }) => [featureStart, featureEnd, share])).toEqual([
    [0, 40, 0],
    [40, setup.paddedFeatures, 1],
  ]);
});

it("a backward share by queries answers the chunks queryBounds gives it, in the head's one slot", () => {
  const { engine, tasks } = recordingEngine();
  const setup = kernelSetup(16, 1, Float32Array.of(1, 1), true);
  // Chunks of 16 rows starting at 0, 16, 32, 48; shares [0, 32), [32, 32) (empty), [32, 64).
  const schedule = Int32Array.of(0, 16, 0, 16, 16, 32, 16, 32, 32, 48, 32, 48, 48, 64, 48, 64);
  const job = backwardJob({
    setup,
    shares: 1,
    featureBounds: null,
    queryBounds: Int32Array.of(0, 32, 32, 64),
    sequenceSplit: null,
    heads: 1,
    kvHeads: 1,
    queryLength: 64,
    keyLength: 64,
    headDim: 16,
    valueDim: 16,
    validKeys: Int32Array.of(64),
    schedules: [schedule],
  });
  for (let share = 0; share < 3; share++) backwardHead(engine, job, { head: 0, share });
  // The empty share runs nothing; the others take all features and write slot 0.
  expect(
    tasks.map((t) => [t.firstChunk, t.endChunk, t.featureStart, t.featureEnd, t.share, t.shares, t.rowBase]),
  ).toEqual([
    [0, 2, 0, setup.paddedFeatures, 0, 1, 0],
    [2, 4, 0, setup.paddedFeatures, 0, 1, 0],
  ]);
});

it("a backward share by sequence answers its queries and keys, in the head's one slot", () => {
  const { engine, tasks } = recordingEngine();
  const setup = kernelSetup(16, 1, Float32Array.of(1, 1), true);
  const states = new Float32Array(0);
  // Two heads of 10 queries, 7 valid keys of 9 in batch 1, three shares a head.
  const job = backwardJob({
    setup,
    shares: 1,
    featureBounds: null,
    queryBounds: null,
    sequenceSplit: { phase: 'readout', parts: 3, states },
    heads: 2,
    kvHeads: 1,
    queryLength: 10,
    keyLength: 9,
    headDim: 16,
    valueDim: 16,
    validKeys: Int32Array.of(7),
    schedules: [Int32Array.of(0, 10, 7, 7)],
  });
  for (let share = 0; share < 3; share++) backwardHead(engine, job, { head: 1, share });
  expect(
    tasks.map((t) => {
      const split = t.sequenceSplit!;
      return [
        split.slot,
        split.firstSlot,
        split.queries.start,
        split.queries.end,
        split.keys.start,
        split.keys.end,
        split.last,
      ];
    }),
  ).toEqual([
    [3, 3, 0, 3, 0, 2, false],
    [4, 3, 3, 6, 2, 4, false],
    [5, 3, 6, 10, 4, 7, true],
  ]);
  // All features, the head's one slot, and pass 1's readout as a schedule of the share's queries.
  expect(tasks.map((t) => [t.featureStart, t.featureEnd, t.share, t.shares, t.rowBase])).toEqual(
    [0, 1, 2].map(() => [0, setup.paddedFeatures, 0, 1, 10]),
  );
  expect(tasks.map((t) => Array.from(t.schedule))).toEqual([
    [0, 3, 7, 7],
    [3, 6, 7, 7],
    [6, 10, 7, 7],
  ]);
});
