import type { ResolvedOptions } from './options.js';
import {
  centerDivideRowRange,
  divideRowRangeBackward,
  normAndCenterRowRangeBackward,
  rowStatsRange,
} from './prepare-rows.js';
import type { HostTensor } from './tensor.js';
import { type AttentionShape, keyLimit } from './validate.js';

/**
 * Every normalization reduces to one form: s_ij = σ_i · (x_i · y_j), with prepared queries x,
 * prepared keys y and one scale σ per query row. Backends implement only this polynomial kernel
 * (with the per-row key limit from `keyLimit`) and share the normalization defined here:
 *
 * - `'max-norm'`:        x = c(q)/Mq,   y = c(k)/Mk,   σ = 1/T   (Mq, Mk: largest centered norm of the head)
 * - `'prefix-max-norm'`: x_i = c(q_i)/Mq_i, y = c(k), σ_i = 1/(Mk_i·T)  (running maxima; Mk_i over the
 *                        keys query i may see, so moments stay unscaled and decoding works)
 * - `'l2'`:              x = c(q)/|c(q)|, y = c(k)/|c(k)|, σ = 1/T
 * - `{ scale }`:         x = q, y = k, σ = scale/T
 *
 * c(·) centers a token over its features. A maximum or a norm that is 0 is replaced by 1 (the
 * centered vector is 0 then, so every score is 0 and the weights are uniform). Padded keys are left
 * out of every maximum. On ties the lowest index is the argmax, which fixes where gradients flow.
 */
export interface PreparedScores {
  /** Prepared queries, B×H×N×D: c(q) divided by `trace.queryDivisors` (q itself under `scale`). */
  readonly x: Float64Array;
  /** Prepared keys, B×Hkv×M×D: c(k) divided by `trace.keyDivisors` (1 unless max-norm or l2). */
  readonly y: Float64Array;
  /** σ per query row, B×H×N. */
  readonly sigma: Float64Array;
  /** Per-row argmax bookkeeping, used by `prepareScoresBackward`. */
  readonly trace: PreparationTrace;
}

/**
 * What the backward pass needs to route gradients through maxima and norms. The centered rows are
 * not kept: c = x · divisor (and c = y · divisor) gives them back where a norm's gradient needs them.
 */
export interface PreparationTrace {
  /** |c(q)| per query row, B×H×N, and |c(k)| per key row, B×Hkv×M. */
  readonly queryNorms: Float64Array;
  readonly keyNorms: Float64Array;
  /** Per query row: the query index whose norm divides x_i (-1 when no division). */
  readonly queryArgmax: Int32Array;
  /** Per query row: the key index whose norm scales σ_i or divides every y of the head (-1: none). */
  readonly keyArgmax: Int32Array;
  /** What divides each row of x (B×H×N) and of y (B×Hkv×M): a norm, or 1. */
  readonly queryDivisors: Float64Array;
  readonly keyDivisors: Float64Array;
}

/**
 * Where `prepareScores` puts the arrays it returns. By default fresh ones; a backend that calls it
 * on every backward can hand out memory it reuses between calls instead (fresh arrays of N×D
 * float64 cost their page faults on first touch, several times the arithmetic done on them). Each
 * role is asked for once per call and every element is written, so the memory need not be cleared;
 * the results live until the backend hands the same memory out again.
 */
export interface PrepareScratch {
  float64(role: string, length: number): Float64Array;
  int32(role: string, length: number): Int32Array;
}

const FRESH: PrepareScratch = {
  float64: (_, length) => new Float64Array(length),
  int32: (_, length) => new Int32Array(length),
};

/** A norm or maximum of 0 divides by 1 instead (the vector it divides is 0 then). */
export function nonZeroDivisor(norm: number): number {
  return norm > 0 ? norm : 1;
}

/**
 * One token as `prepareScores` sees it: centered over its features (unless `centered` is false, as
 * for `scale`), with its L2 norm. Decoding states prepare tokens one at a time with it.
 */
export function prepareToken(
  source: Float32Array | Float64Array,
  offset: number,
  dim: number,
  centered: boolean,
): { vector: Float64Array; norm: number } {
  const row = source.subarray(offset, offset + dim);
  const vector = new Float64Array(dim);
  const mean = new Float64Array(1);
  const norm = new Float64Array(1);
  rowStatsRange(row, dim, centered, mean, norm, 0, 1);
  centerDivideRowRange(row, mean, Float64Array.of(1), dim, vector, 0, 1);
  return { vector, norm: norm[0]! };
}

/**
 * Every array of a preparation (taken from the scratch, nothing computed yet), for a backend that
 * runs its steps itself, row range by row range on several threads (prepare-rows.ts), in this order:
 * 1. `rowStatsRange` of q into `queryMeans` and `queryNorms`, and of k into `keyMeans` and
 *    `keyNorms` (`centered` says whether to center);
 * 2. `prepareDivisors` (scalar work per row, one thread);
 * 3. `centerDivideRowRange` of q by `queryMeans` and `queryDivisors` into `x`, and of k by
 *    `keyMeans` and `keyDivisors` into `y`.
 * `preparedScores` then gives what `prepareScores` would have returned. `queriesDivided` and
 * `keysDivided` say which sides a norm divides (the other's divisors are all 1), so that the
 * backward can skip the division's backward there.
 */
export interface PreparationArrays extends PreparationTrace {
  readonly x: Float64Array;
  readonly y: Float64Array;
  readonly sigma: Float64Array;
  readonly queryMeans: Float64Array;
  readonly keyMeans: Float64Array;
  readonly centered: boolean;
  readonly queriesDivided: boolean;
  readonly keysDivided: boolean;
}

export function preparationArrays(
  shape: AttentionShape,
  options: ResolvedOptions,
  scratch: PrepareScratch = FRESH,
): PreparationArrays {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D } = shape;
  const queryRows = B * H * N;
  const keyRows = B * Hkv * M;
  return {
    centered: options.normalization.kind !== 'scale',
    ...dividedSides(options),
    queryMeans: scratch.float64('queryMeans', queryRows),
    keyMeans: scratch.float64('keyMeans', keyRows),
    queryNorms: scratch.float64('queryNorms', queryRows),
    keyNorms: scratch.float64('keyNorms', keyRows),
    x: scratch.float64('x', queryRows * D),
    y: scratch.float64('y', keyRows * D),
    sigma: scratch.float64('sigma', queryRows),
    queryArgmax: scratch.int32('queryArgmax', queryRows),
    keyArgmax: scratch.int32('keyArgmax', queryRows),
    queryDivisors: scratch.float64('queryDivisors', queryRows),
    keyDivisors: scratch.float64('keyDivisors', keyRows),
  };
}

/** The `PreparedScores` of arrays whose three steps have run (see PreparationArrays). */
export function preparedScores(arrays: PreparationArrays): PreparedScores {
  return { x: arrays.x, y: arrays.y, sigma: arrays.sigma, trace: arrays };
}

/**
 * The scalar part of the preparation, from the norms: σ, the argmaxes and each row's divisor.
 */
export function prepareDivisors(
  arrays: PreparationArrays,
  shape: AttentionShape,
  options: ResolvedOptions,
): void {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M } = shape;
  const mode = options.normalization.kind;
  const {
    queryNorms: qNorms,
    keyNorms: kNorms,
    sigma,
    queryArgmax,
    keyArgmax,
    queryDivisors,
    keyDivisors,
  } = arrays;
  queryArgmax.fill(-1);
  keyArgmax.fill(-1);
  keyDivisors.fill(1);
  const T = options.temperature;
  const groupSize = H / Hkv;

  // Keys: only max-norm and l2 divide them; prefix-max-norm divides through σ.
  for (let b = 0; b < B; b++) {
    const valid = options.keyLengths === null ? M : options.keyLengths[b]!;
    for (let g = 0; g < Hkv; g++) {
      const head = (b * Hkv + g) * M;
      let maxIndex = -1;
      let maxNorm = 0;
      for (let j = 0; j < valid; j++) {
        if (kNorms[head + j]! > maxNorm) {
          maxNorm = kNorms[head + j]!;
          maxIndex = j;
        }
      }
      if (mode === 'max-norm') {
        keyDivisors.fill(nonZeroDivisor(maxNorm), head, head + M);
        for (let h = g * groupSize; h < (g + 1) * groupSize; h++) {
          keyArgmax.fill(maxIndex, (b * H + h) * N, (b * H + h + 1) * N);
        }
      } else if (mode === 'l2') {
        for (let row = head; row < head + M; row++) keyDivisors[row] = nonZeroDivisor(kNorms[row]!);
      }
    }
  }

  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const head = (b * H + h) * N;
      const kvHead = (b * Hkv + Math.floor(h / groupSize)) * M;
      let globalIndex = -1;
      let globalMax = 0;
      for (let i = 0; i < N; i++) {
        if (qNorms[head + i]! > globalMax) {
          globalMax = qNorms[head + i]!;
          globalIndex = i;
        }
      }
      let runningIndex = -1;
      let runningMax = 0;
      let keyRunningIndex = -1;
      let keyRunningMax = 0;
      let keysScanned = 0;
      for (let i = 0; i < N; i++) {
        const row = head + i;
        if (qNorms[row]! > runningMax) {
          runningMax = qNorms[row]!;
          runningIndex = i;
        }
        let divisor = 1;
        let s = 1 / T;
        switch (mode) {
          case 'max-norm':
            divisor = nonZeroDivisor(globalMax);
            queryArgmax[row] = globalIndex;
            break;
          case 'l2':
            divisor = nonZeroDivisor(qNorms[row]!);
            queryArgmax[row] = qNorms[row]! > 0 ? i : -1;
            break;
          case 'prefix-max-norm': {
            divisor = nonZeroDivisor(runningMax);
            queryArgmax[row] = runningIndex;
            // Keys visible to row i form a prefix that only grows with i (causal) or is fixed.
            const limit = keyLimit(b, i, shape, options);
            for (; keysScanned < limit; keysScanned++) {
              if (kNorms[kvHead + keysScanned]! > keyRunningMax) {
                keyRunningMax = kNorms[kvHead + keysScanned]!;
                keyRunningIndex = keysScanned;
              }
            }
            s = 1 / (nonZeroDivisor(keyRunningMax) * T);
            keyArgmax[row] = keyRunningIndex;
            break;
          }
          case 'scale':
            s = options.normalization.kind === 'scale' ? options.normalization.scale / T : s;
            break;
        }
        sigma[row] = s;
        queryDivisors[row] = divisor;
      }
    }
  }
}

export function prepareScores(
  q: HostTensor,
  k: HostTensor,
  shape: AttentionShape,
  options: ResolvedOptions,
  scratch: PrepareScratch = FRESH,
): PreparedScores {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D } = shape;
  const arrays = preparationArrays(shape, options, scratch);
  const queryRows = B * H * N;
  const keyRows = B * Hkv * M;
  rowStatsRange(q.data, D, arrays.centered, arrays.queryMeans, arrays.queryNorms, 0, queryRows);
  rowStatsRange(k.data, D, arrays.centered, arrays.keyMeans, arrays.keyNorms, 0, keyRows);
  prepareDivisors(arrays, shape, options);
  centerDivideRowRange(q.data, arrays.queryMeans, arrays.queryDivisors, D, arrays.x, 0, queryRows);
  centerDivideRowRange(k.data, arrays.keyMeans, arrays.keyDivisors, D, arrays.y, 0, keyRows);
  return preparedScores(arrays);
}

/**
 * The scalar part of `prepareScoresBackward`: ∂L/∂|c| per row, from the parts of every row a norm
 * divides (`divideRowRangeBackward`'s divisorGradients, summed at the row whose norm divided them:
 * a running maximum is one row's norm for many rows, so the sum keeps the backward O(rows + distinct
 * maxima · dim)) and, under prefix-max-norm, from σ_i = 1/(Mk_i·T): ∂σ/∂Mk = -σ/Mk = -1/(Mk²·T).
 * Null for a side no norm divides. The sums are zeroed and added up in `scratch`'s arrays.
 */
export function sumNormGradients(
  prepared: PreparedScores,
  shape: AttentionShape,
  options: ResolvedOptions,
  queryDivisorGradients: Float64Array,
  keyDivisorGradients: Float64Array,
  dsigma: Float64Array,
  scratch: PrepareScratch = FRESH,
): { queries: Float64Array | null; keys: Float64Array | null } {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M } = shape;
  const { sigma, trace } = prepared;
  const { keyNorms: kNorms, queryArgmax, keyArgmax } = trace;
  const mode = options.normalization.kind;
  if (mode === 'scale') return { queries: null, keys: null };
  const groupSize = H / Hkv;
  const T = options.temperature;

  const queries = scratch.float64('queryNormGradients', B * H * N).fill(0);
  for (let row = 0; row < B * H * N; row++) {
    const argmax = queryArgmax[row]!;
    if (argmax >= 0) queries[row - (row % N) + argmax]! += queryDivisorGradients[row]!;
  }

  const keys = scratch.float64('keyNormGradients', B * Hkv * M).fill(0);
  for (let b = 0; b < B; b++) {
    for (let g = 0; g < Hkv; g++) {
      const head = (b * Hkv + g) * M;
      if (mode === 'max-norm') {
        // The key argmax is stored per query row; with no query row (N = 0) dy is 0 anyway.
        const argmax = N > 0 ? keyArgmax[(b * H + g * groupSize) * N]! : -1;
        if (argmax < 0) continue;
        let sum = 0;
        for (let row = head; row < head + M; row++) sum += keyDivisorGradients[row]!;
        keys[head + argmax] = sum;
      } else if (mode === 'l2') {
        // A zero norm was replaced by the constant 1: nothing flows into it.
        for (let row = head; row < head + M; row++)
          if (kNorms[row]! > 0) keys[row] = keyDivisorGradients[row]!;
      } else if (mode === 'prefix-max-norm') {
        for (let h = g * groupSize; h < (g + 1) * groupSize; h++) {
          for (let row = (b * H + h) * N; row < (b * H + h + 1) * N; row++) {
            const argmax = keyArgmax[row]!;
            if (argmax >= 0) keys[head + argmax]! -= dsigma[row]! * sigma[row]! * sigma[row]! * T;
          }
        }
      }
    }
  }
  return { queries, keys };
}

/**
 * Chains gradients of the prepared quantities (dx, dy, dσ) back to q and k through centering,
 * norms and maxima. dx is B×H×N×D, dy is B×Hkv×M×D, dσ is B×H×N; returns float64 dq and dk,
 * computed in the memory of dx and dy (which the call consumes): the chain is a few passes over
 * arrays as large as the inputs, and fresh memory of that size costs more than those passes.
 * The norms are the ones `prepareScores` computed (the trace keeps them). In three steps, which a
 * backend can run itself over row ranges: `divideRowRangeBackward` of each divided side,
 * `sumNormGradients`, `normAndCenterRowRangeBackward` of each side.
 */
export function prepareScoresBackward(
  prepared: PreparedScores,
  shape: AttentionShape,
  options: ResolvedOptions,
  dx: Float64Array,
  dy: Float64Array,
  dsigma: Float64Array,
): { dq: Float64Array; dk: Float64Array } {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D } = shape;
  const { x, y, trace } = prepared;
  if (options.normalization.kind === 'scale') return { dq: dx, dk: dy };
  const queryRows = B * H * N;
  const keyRows = B * Hkv * M;
  const { queriesDivided, keysDivided } = dividedSides(options);
  const queryParts = new Float64Array(queryRows);
  const keyParts = new Float64Array(keyRows);
  if (queriesDivided) divideRowRangeBackward(dx, x, trace.queryDivisors, D, queryParts, 0, queryRows);
  if (keysDivided) divideRowRangeBackward(dy, y, trace.keyDivisors, D, keyParts, 0, keyRows);
  const norms = sumNormGradients(prepared, shape, options, queryParts, keyParts, dsigma);
  normAndCenterRowRangeBackward(
    dx,
    x,
    trace.queryDivisors,
    trace.queryNorms,
    norms.queries,
    D,
    true,
    dx,
    0,
    queryRows,
  );
  normAndCenterRowRangeBackward(
    dy,
    y,
    trace.keyDivisors,
    trace.keyNorms,
    norms.keys,
    D,
    true,
    dy,
    0,
    keyRows,
  );
  return { dq: dx, dk: dy };
}

/** Which sides a normalization divides by a norm: queries unless `scale`, keys under max-norm and l2. */
export function dividedSides(options: ResolvedOptions): { queriesDivided: boolean; keysDivided: boolean } {
  const mode = options.normalization.kind;
  return { queriesDivided: mode !== 'scale', keysDivided: mode === 'max-norm' || mode === 'l2' };
}
