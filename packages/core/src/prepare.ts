import type { ResolvedOptions } from './options.js';
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
  /** Prepared queries, B×H×N×D (`trace.centeredQ` itself under `scale`: treat both as read-only). */
  readonly x: Float64Array;
  /** Prepared keys, B×Hkv×M×D (`trace.centeredK` itself unless max-norm or l2 divide them). */
  readonly y: Float64Array;
  /** σ per query row, B×H×N. */
  readonly sigma: Float64Array;
  /** Per-row argmax bookkeeping, used by `prepareScoresBackward`. */
  readonly trace: PreparationTrace;
}

/** What the backward pass needs to route gradients through maxima and norms. */
export interface PreparationTrace {
  /** Centered queries c(q) (raw q for `scale`), B×H×N×D. */
  readonly centeredQ: Float64Array;
  /** Centered keys c(k) (raw k for `scale`), B×Hkv×M×D. */
  readonly centeredK: Float64Array;
  /** |c(q)| per query row, B×H×N, and |c(k)| per key row, B×Hkv×M. */
  readonly queryNorms: Float64Array;
  readonly keyNorms: Float64Array;
  /** Per query row: the query index whose norm divides x_i (-1 when no division). */
  readonly queryArgmax: Int32Array;
  /** Per query row: the key index whose norm scales σ_i or divides every y of the head (-1: none). */
  readonly keyArgmax: Int32Array;
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

/**
 * Centers every row (as `prepareToken` does, unless `centered` is false) and returns the rows with
 * their norms. Written as one pass over a flat array, without a temporary per row: this runs on
 * every backward call at N×D elements, where per-row allocations dominated its cost.
 */
function centerRows(
  source: Float32Array | Float64Array,
  rows: number,
  dim: number,
  centered: boolean,
  values: Float64Array,
  norms: Float64Array,
): { values: Float64Array; norms: Float64Array } {
  for (let r = 0; r < rows; r++) {
    const base = r * dim;
    let mean = 0;
    if (centered) {
      for (let d = 0; d < dim; d++) mean += source[base + d]!;
      mean /= dim;
    }
    let squares = 0;
    for (let d = 0; d < dim; d++) {
      const value = source[base + d]! - mean;
      values[base + d] = value;
      squares += value * value;
    }
    norms[r] = Math.sqrt(squares);
  }
  return { values, norms };
}

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
  const vector = new Float64Array(dim);
  let mean = 0;
  if (centered) {
    for (let d = 0; d < dim; d++) mean += source[offset + d]!;
    mean /= dim;
  }
  let squares = 0;
  for (let d = 0; d < dim; d++) {
    vector[d] = source[offset + d]! - mean;
    squares += vector[d]! * vector[d]!;
  }
  return { vector, norm: Math.sqrt(squares) };
}

export function prepareScores(
  q: HostTensor,
  k: HostTensor,
  shape: AttentionShape,
  options: ResolvedOptions,
  scratch: PrepareScratch = FRESH,
): PreparedScores {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D } = shape;
  const mode = options.normalization.kind;
  const centered = mode !== 'scale';
  const queryRows = B * H * N;
  const keyRows = B * Hkv * M;
  const { values: cq, norms: qNorms } = centerRows(
    q.data,
    queryRows,
    D,
    centered,
    scratch.float64('centeredQ', queryRows * D),
    scratch.float64('queryNorms', queryRows),
  );
  const { values: ck, norms: kNorms } = centerRows(
    k.data,
    keyRows,
    D,
    centered,
    scratch.float64('centeredK', keyRows * D),
    scratch.float64('keyNorms', keyRows),
  );
  // Where nothing divides them, x and y are the centered arrays themselves rather than copies
  // (every consumer only reads them): queries under `scale`, keys under prefix-max-norm and `scale`.
  const queriesDivided = mode !== 'scale';
  const keysDivided = mode === 'max-norm' || mode === 'l2';
  const x = queriesDivided ? scratch.float64('x', cq.length) : cq;
  const y = keysDivided ? scratch.float64('y', ck.length) : ck;
  const sigma = scratch.float64('sigma', queryRows);
  const queryArgmax = scratch.int32('queryArgmax', queryRows).fill(-1);
  const keyArgmax = scratch.int32('keyArgmax', queryRows).fill(-1);
  const T = options.temperature;
  const groupSize = H / Hkv;

  // Keys: one y per kv head. Only max-norm and l2 divide keys; prefix-max-norm divides through σ.
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
      for (let j = 0; keysDivided && j < M; j++) {
        const row = head + j;
        const divisor = mode === 'max-norm' ? nonZeroDivisor(maxNorm) : nonZeroDivisor(kNorms[row]!);
        for (let d = 0; d < D; d++) y[row * D + d] = ck[row * D + d]! / divisor;
      }
      if (mode === 'max-norm') {
        for (let h = g * groupSize; h < (g + 1) * groupSize; h++) {
          keyArgmax.fill(maxIndex, (b * H + h) * N, (b * H + h + 1) * N);
        }
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
        if (queriesDivided) for (let d = 0; d < D; d++) x[row * D + d] = cq[row * D + d]! / divisor;
      }
    }
  }
  return {
    x,
    y,
    sigma,
    trace: { centeredQ: cq, centeredK: ck, queryNorms: qNorms, keyNorms: kNorms, queryArgmax, keyArgmax },
  };
}

/** Gradient through centering, in place: subtracts each row's mean (c = u - mean(u) is self-adjoint). */
function uncenterInPlace(dc: Float64Array, rows: number, dim: number): Float64Array {
  for (let r = 0; r < rows; r++) {
    const base = r * dim;
    let mean = 0;
    for (let d = 0; d < dim; d++) mean += dc[base + d]!;
    mean /= dim;
    for (let d = 0; d < dim; d++) dc[base + d] = dc[base + d]! - mean;
  }
  return dc;
}

/**
 * Adds g_r · ∂|c_r|/∂c_r = g_r · c_r/|c_r| to the centered gradient of every row r with g_r ≠ 0
 * (nothing when the norm is 0: it was replaced by the constant 1). g holds, per row, the summed
 * gradient of every quantity that row's norm divides or scales: a running maximum is one row's
 * norm for many rows, and adding their sum once keeps this pass O(rows + distinct maxima · dim)
 * rather than O(rows · dim).
 */
function addNormGradients(
  target: Float64Array,
  centered: Float64Array,
  norms: Float64Array,
  g: Float64Array,
  dim: number,
): void {
  for (let row = 0; row < g.length; row++) {
    const norm = norms[row]!;
    if (g[row] === 0 || norm === 0) continue;
    const scale = g[row]! / norm;
    const base = row * dim;
    for (let d = 0; d < dim; d++) target[base + d]! += scale * centered[base + d]!;
  }
}

/**
 * Chains gradients of the prepared quantities (dx, dy, dσ) back to q and k through centering,
 * norms and maxima. dx is B×H×N×D, dy is B×Hkv×M×D, dσ is B×H×N; returns float64 dq and dk,
 * computed in the memory of dx and dy (which the call consumes): the chain is a few passes over
 * arrays as large as the inputs, and fresh memory of that size costs more than those passes.
 * The norms are the ones `prepareScores` computed (the trace keeps them).
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
  const { x, y, sigma, trace } = prepared;
  const {
    centeredQ: cq,
    centeredK: ck,
    queryNorms: qNorms,
    keyNorms: kNorms,
    queryArgmax,
    keyArgmax,
  } = trace;
  const mode = options.normalization.kind;
  if (mode === 'scale') return { dq: dx, dk: dy };
  const groupSize = H / Hkv;
  const T = options.temperature;

  // Queries, in two passes because a row's divisor is another row's norm: first x = c/m gives
  // ∂/∂c = dx/m for every row (in place) and the row's ∂L/∂m = -(dx·x)/m, summed at the row m came
  // from, m = |c_argmax|; then those sums flow into the norms, once every row's own part is in place.
  const dQueryNorms = new Float64Array(B * H * N);
  for (let row = 0; row < B * H * N; row++) {
    const argmax = queryArgmax[row]!;
    // x is c(q) divided by the constant 1: dx is already ∂L/∂c.
    if (argmax < 0) continue;
    const owner = row - (row % N) + argmax;
    const inverse = 1 / qNorms[owner]!;
    const base = row * D;
    let dot = 0;
    for (let d = base; d < base + D; d++) {
      dot += dx[d]! * x[d]!;
      dx[d] = dx[d]! * inverse;
    }
    dQueryNorms[owner]! -= dot * inverse;
  }
  addNormGradients(dx, cq, qNorms, dQueryNorms, D);

  const dKeyNorms = new Float64Array(B * Hkv * M);

  for (let b = 0; b < B; b++) {
    for (let g = 0; g < Hkv; g++) {
      const head = (b * Hkv + g) * M;
      if (mode === 'max-norm') {
        // The key argmax is stored per query row; with no query row (N = 0) dy is 0 anyway.
        const argmax = N > 0 ? keyArgmax[(b * H + g * groupSize) * N]! : -1;
        const inverse = argmax < 0 ? 1 : 1 / kNorms[head + argmax]!;
        let dot = 0;
        for (let j = head * D; j < (head + M) * D; j++) {
          dot += dy[j]! * y[j]!;
          dy[j] = dy[j]! * inverse;
        }
        if (argmax >= 0) dKeyNorms[head + argmax] = -dot * inverse;
      } else if (mode === 'l2') {
        for (let j = 0; j < M; j++) {
          const row = head + j;
          const base = row * D;
          const norm = kNorms[row]!;
          // A zero norm was replaced by the constant 1 (y = c), exactly as for a zero-norm query.
          if (norm === 0) continue;
          const inverse = 1 / norm;
          let projection = 0;
          for (let d = 0; d < D; d++) projection += dy[base + d]! * y[base + d]!;
          for (let d = 0; d < D; d++) dy[base + d] = (dy[base + d]! - projection * y[base + d]!) * inverse;
        }
      }
      // prefix-max-norm: y is c(k) itself, dy is already ∂L/∂c.
    }
  }

  if (mode === 'prefix-max-norm') {
    // σ_i = 1/(Mk_i·T): ∂σ/∂Mk = -σ/Mk = -1/(Mk²·T).
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const kvHead = (b * Hkv + Math.floor(h / groupSize)) * M;
        for (let i = 0; i < N; i++) {
          const row = (b * H + h) * N + i;
          const argmax = keyArgmax[row]!;
          if (argmax >= 0) dKeyNorms[kvHead + argmax]! -= dsigma[row]! * sigma[row]! * sigma[row]! * T;
        }
      }
    }
  }
  addNormGradients(dy, ck, kNorms, dKeyNorms, D);
  return { dq: uncenterInPlace(dx, B * H * N, D), dk: uncenterInPlace(dy, B * Hkv * M, D) };
}
