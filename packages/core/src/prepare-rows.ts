/**
 * The row-local steps of `prepareScores` and `prepareScoresBackward` (prepare.ts, where the math
 * is), each over a range of rows [start, end), so that a backend can spread them over threads.
 * Between them only scalar work per row remains (maxima, argmaxes, σ, and summing the gradients of
 * the norms that divide other rows), which prepare.ts does; it composes these over every row, so
 * both ways give the same numbers.
 *
 * This file imports nothing: backend-cpu bundles it into its worker script as it is.
 */

/**
 * Each row's mean over its `dim` features (0 when `centered` is false) and the L2 norm of the row
 * centered by it, for rows [start, end) of `source`. Reads the rows and writes two numbers per row:
 * the centered rows themselves are never stored (centerDivideRowRange forms them again from
 * `source`, which reads fewer bytes than a float64 copy would).
 */
export function rowStatsRange(
  source: Float32Array | Float64Array,
  dim: number,
  centered: boolean,
  means: Float64Array,
  norms: Float64Array,
  start: number,
  end: number,
): void {
  for (let r = start; r < end; r++) {
    const base = r * dim;
    let mean = 0;
    if (centered) {
      for (let d = 0; d < dim; d++) mean += source[base + d]!;
      mean /= dim;
    }
    let squares = 0;
    for (let d = 0; d < dim; d++) {
      const value = source[base + d]! - mean;
      squares += value * value;
    }
    means[r] = mean;
    norms[r] = Math.sqrt(squares);
  }
}

/**
 * Row r of `target` = (row r of `source` − means[r]) / divisors[r], for rows [start, end): the
 * centered row divided by its divisor; with `scaled`, also scaled row r = scales[r] · target row r
 * (scales null: 1), in the same pass (a backend's kernels may take σx, or take it in float32).
 */
export function centerDivideRowRange(
  source: Float32Array | Float64Array,
  means: Float64Array,
  divisors: Float64Array,
  dim: number,
  target: Float64Array,
  start: number,
  end: number,
  scaled: Float32Array | Float64Array | null = null,
  scales: Float64Array | null = null,
): void {
  for (let r = start; r < end; r++) {
    const mean = means[r]!;
    const divisor = divisors[r]!;
    const first = r * dim;
    if (scaled === null) {
      for (let i = first; i < first + dim; i++) target[i] = (source[i]! - mean) / divisor;
      continue;
    }
    const scale = scales === null ? 1 : scales[r]!;
    for (let i = first; i < first + dim; i++) {
      const value = (source[i]! - mean) / divisor;
      target[i] = value;
      scaled[i] = scale * value;
    }
  }
}

/**
 * The backward of `centerDivideRowRange`'s division, in place, for rows [start, end): with m = divisors[r] and x_r
 * the divided row, dx_r becomes ∂L/∂c_r = dx_r/m and divisorGradients[r] = -(dx_r·x_r)/m, the row's
 * part of ∂L/∂m (prepare.ts adds the parts up at the row whose norm m is). A row divided by the
 * constant 1 gets dx_r unchanged and a part nobody reads.
 */
export function divideRowRangeBackward(
  dx: Float64Array,
  x: Float64Array,
  divisors: Float64Array,
  dim: number,
  divisorGradients: Float64Array,
  start: number,
  end: number,
): void {
  for (let r = start; r < end; r++) {
    const inverse = 1 / divisors[r]!;
    let dot = 0;
    for (let i = r * dim, last = i + dim; i < last; i++) {
      dot += dx[i]! * x[i]!;
      dx[i] = dx[i]! * inverse;
    }
    divisorGradients[r] = -(dot * inverse);
  }
}

/**
 * For rows [start, end) of `gradients` (∂L/∂c, read only): adds, where g_r = normGradients[r] ≠ 0,
 * g_r · ∂|c_r|/∂c_r = g_r · c_r/|c_r| (nothing when the norm is 0: it was replaced by the constant
 * 1), with the centered row c_r = divided_r · divisors[r] formed from the prepared row, then takes
 * the row through the centering backward (c = u - mean(u) is self-adjoint: the row's mean is
 * subtracted; skipped when `centered` is false, under `scale`), and writes it to `out` (which may be
 * `gradients` itself, or a float32 array: one pass writes the result).
 */
export function normAndCenterRowRangeBackward(
  gradients: Float64Array,
  divided: Float64Array,
  divisors: Float64Array,
  norms: Float64Array,
  normGradients: Float64Array | null,
  dim: number,
  centered: boolean,
  out: Float64Array | Float32Array,
  start: number,
  end: number,
): void {
  for (let r = start; r < end; r++) {
    const base = r * dim;
    const norm = norms[r]!;
    const gradient = normGradients === null ? 0 : normGradients[r]!;
    // g_r/|c_r| times c_r = divided_r · divisor_r.
    const scale = gradient !== 0 && norm !== 0 ? (gradient / norm) * divisors[r]! : 0;
    let mean = 0;
    if (centered) {
      if (scale !== 0) for (let d = base; d < base + dim; d++) mean += gradients[d]! + scale * divided[d]!;
      else for (let d = base; d < base + dim; d++) mean += gradients[d]!;
      mean /= dim;
    }
    if (scale !== 0)
      for (let d = base; d < base + dim; d++) out[d] = gradients[d]! + scale * divided[d]! - mean;
    else for (let d = base; d < base + dim; d++) out[d] = gradients[d]! - mean;
  }
}

/**
 * Whether values [start, end) of `data` hold a NaN or an infinity. x·0 is 0 for every finite x and
 * NaN for NaN and ±Infinity, so four branch-free sums answer at about twice the speed of a test per
 * value (core's `checkFinite` then locates the value).
 */
export function hasNonFinite(data: Float32Array | Float64Array, start: number, end: number): boolean {
  let sum0 = 0;
  let sum1 = 0;
  let sum2 = 0;
  let sum3 = 0;
  let i = start;
  for (; i + 3 < end; i += 4) {
    sum0 += data[i]! * 0;
    sum1 += data[i + 1]! * 0;
    sum2 += data[i + 2]! * 0;
    sum3 += data[i + 3]! * 0;
  }
  for (; i < end; i++) sum0 += data[i]! * 0;
  return sum0 + sum1 + sum2 + sum3 !== 0;
}
