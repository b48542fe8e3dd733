import { featureShare } from './engine.js';
import type { BatchTiming } from './pool.js';

/**
 * Sizing the shares a head is split into to the speeds of the threads that run them.
 *
 * Equal shares suit equal cores. On a hybrid CPU (performance and efficiency cores), or on a
 * virtual machine whose vCPUs lose throughput unevenly to other tenants (docs/benchmarks.md: one
 * of two vCPUs at 17 to 32 GFLOP/s for a minute while the other ran at 42 to 47), a call split
 * into equal shares waits for the slowest one. Neither split can hand out work as it goes
 * without repeating work per piece (a feature share prepares every token, a query share folds
 * every key before it), so instead each call times its shares and the next one sizes them from
 * those speeds (backend.ts: feature bounds from balancedFeatureBounds, query bounds from
 * sequenceBounds with each share's cost divided by its speed).
 */

/** Weight of the newest call in a worker's speed estimate (an exponential moving average). */
const SPEED_SMOOTHING = 0.5;

/**
 * Speeds within this factor of each other get equal shares: call-to-call noise on equal cores
 * stays within it, and equal shares are what the split was tuned with.
 */
const EQUAL_WITHIN = 1.08;

/** No worker is rated more than this factor faster or slower than the mean (one bad sample). */
const SPEED_LIMIT = 4;

/**
 * Relative speeds (mean 1) of the workers after a call in which worker s did `work[s]` (any unit)
 * in `millis[s]` ms, folded into the previous estimate. When a timing is unusable (not positive or
 * not finite: typically a share the last estimate left empty, which then can never be timed again)
 * the estimate moves back toward equal speeds instead, so that it cannot stay stuck.
 */
export function updatedSpeeds(
  previous: Float64Array | null,
  work: readonly number[],
  millis: readonly number[],
): Float64Array | null {
  const n = previous?.length ?? work.length;
  let measured: Float64Array | null = null;
  if (n > 0 && work.length === n && millis.length === n) {
    const rates = new Float64Array(n);
    for (let s = 0; s < n; s++) rates[s] = work[s]! / millis[s]!;
    if (rates.every((rate) => rate > 0 && Number.isFinite(rate))) measured = normalizedSpeeds(rates);
  }
  if (previous === null) return measured;
  const blended = new Float64Array(n);
  for (let s = 0; s < n; s++) {
    blended[s] = (1 - SPEED_SMOOTHING) * previous[s]! + SPEED_SMOOTHING * (measured?.[s] ?? 1);
  }
  return normalizedSpeeds(blended);
}

/**
 * Scales `rates` to mean 1 with each in [1/SPEED_LIMIT, SPEED_LIMIT]: a rate outside is set to the
 * bound and the others are scaled again, so that the mean stays 1 (two workers rated 0.05 and
 * 1.95 become 0.25 and 1.75, not 0.25 and 1.95).
 */
function normalizedSpeeds(rates: Float64Array): Float64Array {
  const n = rates.length;
  const speeds = Float64Array.from(rates);
  const bounded = new Uint8Array(n);
  // Each round bounds at least one more rate, or is the last.
  for (let round = 0; round <= n; round++) {
    let boundedSum = 0;
    let freeSum = 0;
    for (let s = 0; s < n; s++) {
      if (bounded[s]) boundedSum += speeds[s]!;
      else freeSum += speeds[s]!;
    }
    if (freeSum === 0) break;
    const scale = (n - boundedSum) / freeSum;
    let changed = false;
    for (let s = 0; s < n; s++) {
      if (bounded[s]) continue;
      const speed = speeds[s]! * scale;
      const limited = Math.min(SPEED_LIMIT, Math.max(1 / SPEED_LIMIT, speed));
      speeds[s] = limited;
      if (limited !== speed) {
        bounded[s] = 1;
        changed = true;
      }
    }
    if (!changed) break;
  }
  return speeds;
}

/**
 * The first `shares` speeds of an estimate when they differ enough to size shares by; null when
 * there is no such estimate or the speeds are close enough for the model's shares.
 */
export function unevenSpeeds(speeds: Float64Array | null, shares: number): Float64Array | null {
  if (speeds === null || speeds.length < shares || shares < 2) return null;
  const first = speeds.subarray(0, shares);
  let slowest = Number.POSITIVE_INFINITY;
  let fastest = 0;
  for (const speed of first) {
    slowest = Math.min(slowest, speed);
    fastest = Math.max(fastest, speed);
  }
  return fastest < slowest * EQUAL_WITHIN ? null : first;
}

/**
 * Padded-feature boundaries (speeds.length + 1 of them, multiples of 4, at least 4 features per
 * share) such that share s, which also carries `fixedFeatures` worth of work whatever its size
 * (preparing every token, its part of the diagonal blocks), finishes with the others when it runs
 * at `speeds[s]`. Null when the speeds are close enough for equal shares (featureShare, see
 * unevenSpeeds), or there are too few features to move.
 */
export function balancedFeatureBounds(
  paddedFeatures: number,
  speeds: Float64Array | null,
  fixedFeatures: number,
): Int32Array | null {
  if (speeds === null || unevenSpeeds(speeds, speeds.length) === null) return null;
  const n = speeds.length;
  if (paddedFeatures < 8 * n) return null;
  let sum = 0;
  for (const speed of speeds) sum += speed;
  // Share s gets speeds[s]/sum of all the work, its fixed part included.
  const total = paddedFeatures + n * fixedFeatures;
  const bounds = new Int32Array(n + 1);
  let position = 0;
  for (let s = 1; s < n; s++) {
    position += (speeds[s - 1]! / sum) * total - fixedFeatures;
    const lowest = bounds[s - 1]! + 4;
    const highest = paddedFeatures - 4 * (n - s);
    bounds[s] = Math.min(highest, Math.max(lowest, Math.round(position / 4) * 4));
  }
  bounds[n] = paddedFeatures;
  return bounds;
}

/**
 * Cost of preparing one input element (centering, norm, transpose or panel packing), in
 * multiply-adds of the product kernels: those run near the machine's SIMD peak while preparation is
 * bound by memory traffic. Measured from a profile of the p = 1 causal forward at D = 64, where
 * preparation is about a third of the time.
 */
export const PREPARATION_COST = 40;

/**
 * Each worker's work in features (its feature share's count, plus `fixedFeatures`: the work a share
 * has whatever its features) and milliseconds, from the timings of the runs of one call that split
 * one head into feature shares, batch s being share s (summed over the runs, e.g. the backward's
 * two passes): what updatedSpeeds takes.
 */
export function featureShareWork(
  runs: readonly (readonly BatchTiming[])[],
  paddedFeatures: number,
  shares: number,
  bounds: Int32Array | null,
  fixedFeatures: number,
): { work: number[]; millis: number[] } {
  const work: number[] = [];
  const millis: number[] = [];
  for (const timings of runs) {
    for (const { batch, slot, millis: taken } of timings) {
      const { start, end } = featureShare(paddedFeatures, batch, shares, bounds);
      work[slot] = end - start + fixedFeatures;
      millis[slot] = (millis[slot] ?? 0) + taken;
    }
  }
  return { work, millis };
}

/**
 * What a call that splits one head into feature shares over the workers needs to size them: the
 * speeds measured on the calls before, and where to report this call's (see updatedSpeeds).
 */
export interface ShareBalance {
  /** Relative speed of each worker, or null before any measurement. */
  readonly speeds: Float64Array | null;
  /** Each worker's work in features (its fixed part included) and the milliseconds it took. */
  learn(work: readonly number[], millis: readonly number[]): void;
}

/**
 * Shares to split each of `heads` heads into when they do not divide evenly over `threads`, for a
 * split whose shares of a head are equal: a share costs 1 / shares of a head's divisible work plus
 * `fixedWork(shares)` (what every share repeats, as a fraction of that work), and the heads · shares
 * units run in ceil(heads · shares / threads) rounds. Of the counts from enough to give every
 * thread work to twice that (with more heads than threads, from 1 to `threads`; at most `limit`),
 * the one with the least modelled time: 2 heads on 3 threads in 3 shares each (2 rounds of a third
 * of a head) rather than 2 each (2 rounds of a half); 3 heads on 2 threads in 2 shares each (3
 * rounds of a half) rather than whole (2 rounds, one thread idle in the second).
 */
export function sharesPerHead(
  heads: number,
  threads: number,
  limit: number,
  fixedWork: (shares: number) => number,
): number {
  if (heads % threads === 0) return 1;
  const fewest = Math.ceil(threads / heads);
  // With more heads than threads, whole heads leave threads idle in the last round; up to `threads`
  // shares a head fill it.
  const most = Math.min(heads > threads ? threads : 2 * fewest, limit);
  if (most <= fewest) return Math.max(1, most);
  let best = fewest;
  let bestTime = Number.POSITIVE_INFINITY;
  for (let shares = fewest; shares <= most; shares++) {
    const time = Math.ceil((heads * shares) / threads) * (1 / shares + fixedWork(shares));
    // A count wins only by a clear margin: more shares cost what the model leaves out (staging,
    // scheduling, a second pass over more partial sums).
    if (time < bestTime * 0.97) {
      best = shares;
      bestTime = time;
    }
  }
  return best;
}

/**
 * Query boundaries of a sequence split into `shares`, at multiples of `chunk`: share s costs
 * `prefixCost` per key before its first query (building the state it starts from, when the shares
 * fold) plus `queryCost` per query it answers, plus `extras[s]` (the calling thread's own duties),
 * all of it `factors[s]` times (see STAGED_SLOWDOWN in backend.ts, and the thread's measured
 * speed); the boundaries make those totals equal.
 */
export function sequenceBounds(
  rows: number,
  shares: number,
  chunk: number,
  queryCost: number,
  prefixCost: number,
  extras: readonly number[],
  factors: readonly number[],
): Int32Array {
  const endFor = (budget: number): number[] => {
    const bounds = [0];
    for (let s = 0; s < shares; s++) {
      const start = bounds[s]!;
      const factor = factors[s]!;
      bounds.push(start + Math.max(0, budget / factor - extras[s]! - prefixCost * start) / queryCost);
    }
    return bounds;
  };
  let low = 0;
  let high =
    ((queryCost + prefixCost) * rows + extras.reduce((sum, extra) => sum + extra, 0)) *
    Math.max(1, ...factors);
  for (let step = 0; step < 60; step++) {
    const middle = (low + high) / 2;
    if (endFor(middle)[shares]! < rows) low = middle;
    else high = middle;
  }
  const bounds = endFor(high).map((b) => Math.min(rows, Math.round(b / chunk) * chunk));
  bounds[shares] = rows;
  return Int32Array.from(bounds);
}
