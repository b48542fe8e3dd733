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
  /** Prepared queries, B×H×N×D. */
  readonly x: Float64Array;
  /** Prepared keys, B×Hkv×M×D. */
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
  /** Per query row: the query index whose norm divides x_i (-1 when no division). */
  readonly queryArgmax: Int32Array;
  /** Per query row: the key index whose norm scales σ_i or divides every y of the head (-1: none). */
  readonly keyArgmax: Int32Array;
}

function center(
  source: Float32Array | Float64Array,
  rows: number,
  dim: number,
  centered: boolean,
): Float64Array {
  const out = new Float64Array(rows * dim);
  for (let r = 0; r < rows; r++) out.set(prepareToken(source, r * dim, dim, centered).vector, r * dim);
  return out;
}

function rowNorm(values: Float64Array, row: number, dim: number): number {
  let sum = 0;
  const base = row * dim;
  for (let d = 0; d < dim; d++) sum += values[base + d]! * values[base + d]!;
  return Math.sqrt(sum);
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
): PreparedScores {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D } = shape;
  const mode = options.normalization.kind;
  const centered = mode !== 'scale';
  const cq = center(q.data, B * H * N, D, centered);
  const ck = center(k.data, B * Hkv * M, D, centered);
  const x = new Float64Array(cq.length);
  const y = new Float64Array(ck.length);
  const sigma = new Float64Array(B * H * N);
  const queryArgmax = new Int32Array(B * H * N).fill(-1);
  const keyArgmax = new Int32Array(B * H * N).fill(-1);
  const T = options.temperature;
  const groupSize = H / Hkv;

  const qNorms = new Float64Array(B * H * N);
  for (let r = 0; r < qNorms.length; r++) qNorms[r] = rowNorm(cq, r, D);
  const kNorms = new Float64Array(B * Hkv * M);
  for (let r = 0; r < kNorms.length; r++) kNorms[r] = rowNorm(ck, r, D);

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
      for (let j = 0; j < M; j++) {
        const row = head + j;
        const divisor =
          mode === 'max-norm' ? nonZeroDivisor(maxNorm) : mode === 'l2' ? nonZeroDivisor(kNorms[row]!) : 1;
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
        for (let d = 0; d < D; d++) x[row * D + d] = cq[row * D + d]! / divisor;
      }
    }
  }
  return { x, y, sigma, trace: { centeredQ: cq, centeredK: ck, queryArgmax, keyArgmax } };
}

function uncenter(dc: Float64Array, rows: number, dim: number, centered: boolean): Float64Array {
  if (!centered) return dc;
  const out = new Float64Array(dc.length);
  for (let r = 0; r < rows; r++) {
    const base = r * dim;
    let mean = 0;
    for (let d = 0; d < dim; d++) mean += dc[base + d]!;
    mean /= dim;
    for (let d = 0; d < dim; d++) out[base + d] = dc[base + d]! - mean;
  }
  return out;
}

/**
 * Chains gradients of the prepared quantities (dx, dy, dσ) back to q and k through centering,
 * norms and maxima. dx is B×H×N×D, dy is B×Hkv×M×D, dσ is B×H×N; returns float64 dq and dk.
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
  const { centeredQ: cq, centeredK: ck, queryArgmax, keyArgmax } = trace;
  const mode = options.normalization.kind;
  if (mode === 'scale') return { dq: Float64Array.from(dx), dk: Float64Array.from(dy) };
  const dcq = new Float64Array(cq.length);
  const dck = new Float64Array(ck.length);
  const groupSize = H / Hkv;
  const T = options.temperature;

  // Adds g · ∂|c_row|/∂c_row = g · c_row/|c_row| to the centered gradient of that row.
  const addNormGradient = (target: Float64Array, source: Float64Array, row: number, g: number): void => {
    const norm = rowNorm(source, row, D);
    if (norm === 0) return;
    for (let d = 0; d < D; d++) target[row * D + d]! += (g * source[row * D + d]!) / norm;
  };

  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const head = (b * H + h) * N;
      for (let i = 0; i < N; i++) {
        const row = head + i;
        const argmax = queryArgmax[row]!;
        if (argmax < 0) {
          // x is c(q) divided by the constant 1.
          for (let d = 0; d < D; d++) dcq[row * D + d]! += dx[row * D + d]!;
          continue;
        }
        const divisor = rowNorm(cq, head + argmax, D);
        // x = c/m: ∂x/∂c = 1/m and ∂x/∂m = -x/m.
        let dDivisor = 0;
        for (let d = 0; d < D; d++) {
          dcq[row * D + d]! += dx[row * D + d]! / divisor;
          dDivisor -= (dx[row * D + d]! * x[row * D + d]!) / divisor;
        }
        addNormGradient(dcq, cq, head + argmax, dDivisor);
      }
    }
  }

  for (let b = 0; b < B; b++) {
    for (let g = 0; g < Hkv; g++) {
      const head = (b * Hkv + g) * M;
      if (mode === 'max-norm') {
        // The key argmax is stored per query row; with no query row (N = 0) dy is 0 anyway.
        const argmax = N > 0 ? keyArgmax[(b * H + g * groupSize) * N]! : -1;
        const divisor = argmax < 0 ? 1 : rowNorm(ck, head + argmax, D);
        let dDivisor = 0;
        for (let j = 0; j < M; j++) {
          const row = head + j;
          for (let d = 0; d < D; d++) {
            dck[row * D + d]! += dy[row * D + d]! / divisor;
            dDivisor -= (dy[row * D + d]! * y[row * D + d]!) / divisor;
          }
        }
        if (argmax >= 0) addNormGradient(dck, ck, head + argmax, dDivisor);
      } else if (mode === 'l2') {
        for (let j = 0; j < M; j++) {
          const row = head + j;
          const norm = rowNorm(ck, row, D);
          if (norm === 0) {
            // The norm was replaced by the constant 1 (y = c), exactly as for a zero-norm query.
            for (let d = 0; d < D; d++) dck[row * D + d]! += dy[row * D + d]!;
            continue;
          }
          let projection = 0;
          for (let d = 0; d < D; d++) projection += dy[row * D + d]! * y[row * D + d]!;
          for (let d = 0; d < D; d++) {
            dck[row * D + d]! += (dy[row * D + d]! - projection * y[row * D + d]!) / norm;
          }
        }
      } else {
        for (let j = 0; j < M; j++) {
          const row = head + j;
          for (let d = 0; d < D; d++) dck[row * D + d]! += dy[row * D + d]!;
        }
      }
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
          if (argmax < 0) continue;
          addNormGradient(dck, ck, kvHead + argmax, -dsigma[row]! * sigma[row]! * sigma[row]! * T);
        }
      }
    }
  }
  return { dq: uncenter(dcq, B * H * N, D, true), dk: uncenter(dck, B * Hkv * M, D, true) };
}
