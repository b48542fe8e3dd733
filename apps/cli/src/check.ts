import { createRandom } from '@fastmax/conformance/kit';
import {
  type FastmaxOptions,
  type HostTensor,
  prepareScores,
  resolveOptions,
  validateAttentionInputs,
} from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';

export interface OracleCheck {
  /** Largest per-row relative error max_d |o − o_ref| / max_d |o_ref| over the rows checked. */
  readonly maxRelativeError: number;
  /** Query rows (per batch and head) compared with the oracle. */
  readonly rowsChecked: number;
  /** True when only a sample of the rows was compared. */
  readonly sampled: boolean;
}

export interface OracleCheckOptions {
  /** Compare every row up to this many query rows; sample above it. */
  readonly fullCheckLimit: number;
  /** Rows compared when sampling (the first and last always included). */
  readonly sampleRows: number;
  readonly seed: number;
}

/**
 * Compares a Fastmax output with the float64 oracle `referenceAttention`. The oracle is O(N²) like
 * the softmax baseline it stands beside, so for long sequences only a sample of query rows is
 * checked, each exactly (see `sampledOracleRows`).
 */
export function checkAgainstOracle(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  output: HostTensor,
  options: FastmaxOptions,
  check: OracleCheckOptions,
): OracleCheck {
  const resolved = resolveOptions(options);
  const shape = validateAttentionInputs(q, k, v, resolved);
  const { batch: B, heads: H, queryLength: N, valueDim: Dv } = shape;
  // The cases `sampledOracleRows` can split into exact sub-problems; anything else is checked in full.
  const sampleable =
    N === shape.keyLength &&
    resolved.keyLengths === null &&
    !(resolved.causal && resolved.normalization.kind === 'max-norm');
  if (N <= check.fullCheckLimit || check.sampleRows >= N || !sampleable) {
    const reference = referenceAttention(q, k, v, options).output;
    let worst = 0;
    for (let row = 0; row < B * H * N; row++) {
      worst = Math.max(worst, rowError(output.data, reference, row, row, Dv));
    }
    return { maxRelativeError: worst, rowsChecked: N, sampled: false };
  }
  const rows = sampleRowIndices(N, check.sampleRows, check.seed);
  const reference = sampledOracleRows(q, k, v, options, rows);
  let worst = 0;
  rows.forEach((i, r) => {
    for (let bh = 0; bh < B * H; bh++) {
      worst = Math.max(worst, rowError(output.data, reference, bh * N + i, bh * rows.length + r, Dv));
    }
  });
  return { maxRelativeError: worst, rowsChecked: rows.length, sampled: true };
}

/**
 * Per-row relative error; a reference row of zeros (a degenerate row) must be matched exactly. An
 * output too short for its shape reads undefined, which turns into NaN and fails the check.
 */
function rowError(
  actual: Float32Array,
  reference: Float64Array,
  actualRow: number,
  referenceRow: number,
  dim: number,
): number {
  let scale = 0;
  let diff = 0;
  for (let d = 0; d < dim; d++) {
    const expected = reference[referenceRow * dim + d]!;
    scale = Math.max(scale, Math.abs(expected));
    // Math.max rather than a comparison: a NaN output must propagate and fail the check.
    diff = Math.max(diff, Math.abs(actual[actualRow * dim + d]! - expected));
  }
  return scale > 0 ? diff / scale : diff;
}

/** First, last, evenly spread and seeded random rows, sorted and distinct. */
export function sampleRowIndices(length: number, count: number, seed: number): number[] {
  if (count >= length) return Array.from({ length }, (_, i) => i);
  const chosen = new Set<number>([0, length - 1]);
  const spread = Math.max(2, Math.ceil(count / 2));
  for (let s = 0; s < spread; s++) chosen.add(Math.round((s * (length - 1)) / (spread - 1)));
  // Random rows land inside causal chunks and between spread rows, where off-by-one masks hide.
  const random = createRandom(seed);
  while (chosen.size < count) chosen.add(Math.floor(random() * length));
  return [...chosen].sort((a, b) => a - b);
}

function copyRows(tensor: HostTensor, rows: readonly number[]): HostTensor {
  const [B, H, N, D] = tensor.shape;
  const data = new Float32Array(B * H * rows.length * D);
  for (let bh = 0; bh < B * H; bh++) {
    rows.forEach((row, r) => {
      data.set(tensor.data.subarray((bh * N + row) * D, (bh * N + row + 1) * D), (bh * rows.length + r) * D);
    });
  }
  return { shape: [B, H, rows.length, D], data };
}

function prefix(tensor: HostTensor, length: number): HostTensor {
  return copyRows(
    tensor,
    Array.from({ length }, (_, j) => j),
  );
}

/**
 * Oracle outputs for the query rows `rows` only, as [B, H, rows.length, Dv], each computed on the
 * smallest sub-problem whose answer for that row is exactly the full problem's:
 *
 * - A row's output depends on other query rows only through the query norm that divides it (the
 *   head's largest for max-norm, the running largest for prefix-max-norm); `prepareScores` names
 *   that row (`trace.queryArgmax`), and keeping it in the sub-problem keeps the divisor.
 * - Non-causal: every row sees every key, so one sub-problem holds the sampled rows, the rows that
 *   set their divisors, and all keys.
 * - Causal (N = M, normalizations other than max-norm, whose key divisor spans future keys): row i
 *   sees keys 0..i and its key divisor is their largest norm, so its sub-problem is [divisor rows,
 *   i] against keys 0..i; with N' <= M' the causal mask lets the last row see all i + 1 of them.
 */
export function sampledOracleRows(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  options: FastmaxOptions,
  rows: readonly number[],
): Float64Array {
  const resolved = resolveOptions(options);
  const shape = validateAttentionInputs(q, k, v, resolved);
  const { batch: B, heads: H, queryLength: N, valueDim: Dv } = shape;
  const argmax = prepareScores(q, k, shape, resolved).trace.queryArgmax;
  const rowsSettingDivisor = (i: number): number[] => {
    const found: number[] = [];
    for (let bh = 0; bh < B * H; bh++) {
      const index = argmax[bh * N + i]!;
      if (index >= 0) found.push(index);
    }
    return found;
  };
  const out = new Float64Array(B * H * rows.length * Dv);
  const place = (subOutput: Float64Array, subRows: readonly number[], i: number, r: number): void => {
    const at = subRows.indexOf(i);
    for (let bh = 0; bh < B * H; bh++) {
      out.set(
        subOutput.subarray((bh * subRows.length + at) * Dv, (bh * subRows.length + at + 1) * Dv),
        (bh * rows.length + r) * Dv,
      );
    }
  };
  if (!resolved.causal) {
    const subRows = [...new Set([...rows, ...rows.flatMap(rowsSettingDivisor)])].sort((a, b) => a - b);
    const subOutput = referenceAttention(copyRows(q, subRows), k, v, options).output;
    rows.forEach((i, r) => {
      place(subOutput, subRows, i, r);
    });
    return out;
  }
  rows.forEach((i, r) => {
    const subRows = [...new Set([...rowsSettingDivisor(i), i])].sort((a, b) => a - b);
    const subOutput = referenceAttention(
      copyRows(q, subRows),
      prefix(k, i + 1),
      prefix(v, i + 1),
      options,
    ).output;
    place(subOutput, subRows, i, r);
  });
  return out;
}
