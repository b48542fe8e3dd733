import { featureCount } from './algebra.js';
import { FastmaxError } from './errors.js';
import type { AttentionPath, Order, ResolvedOptions } from './options.js';
import type { AttentionShape } from './validate.js';

/**
 * Largest moment state F × (Dv + 1) the planner sends to the factorized path on its own: 2^25
 * values (128 MiB in float32, 256 MiB in float64). Beyond it `'auto'` picks the direct path, which
 * needs no state; a forced factorized call is left to the backend, which may refuse it with
 * RESOURCE_EXHAUSTED.
 */
export const MAX_MOMENT_VALUES = 2 ** 25;

/** The planner's decision for one call; backends follow `path` and `chunkSize`. */
export interface AttentionPlan {
  readonly path: AttentionPath;
  /** Chunk length C of the causal factorized algorithm (also a useful tile size otherwise). */
  readonly chunkSize: number;
  /** F, the packed feature count Σ_l C(D+l-1, l). */
  readonly featureCount: number;
  /** Estimated multiply-adds per (batch, head) of each path. */
  readonly cost: { readonly factorized: number; readonly direct: number };
  /** Why this path, in one sentence (shown by `fastmax demo` and in results). */
  readonly reason: string;
}

/**
 * Chunk length for the causal factorized algorithm. Each chunk costs C²·(D+Dv)/2 multiply-adds for
 * its own block of f(s) and 2·C·F·(Dv+1) for reading and updating the moment state; the state work
 * is the same for any C, but only turns into matrix products (rather than per-token rank-1 updates
 * of an F×(Dv+1) state) when C is large enough. We take the largest power of two whose intra-chunk
 * block stays under a quarter of the state work, clamped to [16, 256] and to N.
 */
export function chooseChunkSize(
  headDim: number,
  valueDim: number,
  order: Order,
  queryLength: number,
): number {
  const features = featureCount(headDim, order);
  const budget = (features * (valueDim + 1)) / (headDim + valueDim);
  let chunk = 16;
  while (chunk * 2 <= 256 && chunk * 2 <= budget) chunk *= 2;
  return Math.max(1, Math.min(chunk, Math.max(1, queryLength)));
}

/** Multiply-add estimates for one (batch, head); see docs/math.md, "Complexity". */
export function estimateCosts(
  shape: AttentionShape,
  options: ResolvedOptions,
  chunkSize: number,
): { factorized: number; direct: number } {
  const { queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
  const F = featureCount(D, options.order);
  // Causal row i sees min(M, max(0, i + M - N + 1)) keys: with M >= N that sums to
  // N(N+1)/2 + N(M-N); with M < N only the last M rows see any key, M(M+1)/2 pairs in all.
  const pairs = !options.causal ? N * M : M >= N ? (N * (N + 1)) / 2 + N * (M - N) : (M * (M + 1)) / 2;
  const direct = pairs * (D + Dv + options.order);
  const moments = (N + M) * F * (Dv + 1) + (N + M) * F * options.order;
  const intraChunk = options.causal ? N * chunkSize * (D + Dv) * 0.5 : 0;
  return { factorized: moments + intraChunk, direct };
}

export function planAttention(
  shape: AttentionShape,
  options: ResolvedOptions,
  paths: readonly AttentionPath[] = ['factorized', 'direct'],
): AttentionPlan {
  const chunkSize =
    options.chunkSize ?? chooseChunkSize(shape.headDim, shape.valueDim, options.order, shape.queryLength);
  const cost = estimateCosts(shape, options, chunkSize);
  const features = featureCount(shape.headDim, options.order);
  if (options.path !== 'auto') {
    if (!paths.includes(options.path)) {
      throw new FastmaxError('UNSUPPORTED_CAPABILITY', `this backend has no ${options.path} path`, {
        argument: 'options.path',
        expected: paths.map((p) => `'${p}'`).join(' | '),
        actual: `'${options.path}'`,
      });
    }
    return {
      path: options.path,
      chunkSize,
      featureCount: features,
      cost,
      reason: `path forced by options.path`,
    };
  }
  const only = paths.length === 1 ? paths[0] : undefined;
  if (only !== undefined) {
    return {
      path: only,
      chunkSize,
      featureCount: features,
      cost,
      reason: `the backend implements only ${only}`,
    };
  }
  const momentValues = features * (shape.valueDim + 1);
  if (momentValues > MAX_MOMENT_VALUES && paths.includes('direct')) {
    return {
      path: 'direct',
      chunkSize,
      featureCount: features,
      cost,
      reason: `the moment state (${momentValues} values) exceeds ${MAX_MOMENT_VALUES}; direct needs none`,
    };
  }
  const path: AttentionPath = cost.factorized <= cost.direct ? 'factorized' : 'direct';
  const ratio = path === 'factorized' ? cost.direct / cost.factorized : cost.factorized / cost.direct;
  return {
    path,
    chunkSize,
    featureCount: features,
    cost,
    reason: `${path} is estimated ${ratio.toFixed(1)}× cheaper (F = ${features}, N = ${shape.queryLength}, M = ${shape.keyLength})`,
  };
}
