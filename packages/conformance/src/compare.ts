/**
 * Tolerances, and how errors are measured.
 *
 * Output scale: the largest magnitude of the float64 expected tensor, max_i |expected_i|, floored
 * at SCALE_FLOOR. The error of a comparison is max_i |actual_i - expected_i| / scale. One scale per
 * tensor (not per element) because a float32 kernel's rounding error is proportional to the
 * magnitudes it accumulates, not to each element's own size: an element that is small by
 * cancellation carries the absolute error of its neighbours. The floor only matters when the
 * expected tensor is all zeros (every row degenerate): then the backend must return zeros up to
 * 1e-10, which is what the contract asks ("exactly 0").
 *
 * FORWARD_TOLERANCE = 1e-4 for float32 backends. Float32 rounds at u = 2^-24 ≈ 6e-8. A kernel sums
 * up to M = 4096 weighted terms (or F moment features), then divides; a naive sum's worst-case
 * bound is M·u ≈ 2.4e-4, but rounding errors of independent terms behave like a random walk,
 * √M·u ≈ 4e-6, and blocked or pairwise sums do better still. Measured: the float32 CPU backend's
 * worst forward error over the whole suite is 1.8e-6 (D = 64, factorized) and 1.6e-6 at N = 4096,
 * so 1e-4 leaves a ~50× margin; meanwhile the bugs we inject (a padded key leaking in, a missing
 * causal mask, a wrong kv head, a float16 intermediate at 2^-11 ≈ 5e-4) move the output by far more
 * than 1e-4 of its scale (test/faults.test.ts shows each one caught).
 *
 * GRADIENT_TOLERANCE = 1e-3 of each gradient's scale (dq, dk, dv separately). The backward pass
 * chains more float32 steps than the forward: g_ij = dO·(v_j - o_i)/den_i subtracts nearly equal
 * numbers, ds = g·f'(s) and Σ_j ds_ij y_j cancel (Σ_j w_ij g_ij = 0), and the chain through
 * centering, norms and maxima divides by norms again. Measured conditioning: perturbing every
 * input by a relative 2^-23 moves the float64 gradients of the suite's cases by at most 6e-7
 * (forward outputs: 1.7e-7), i.e. the problem amplifies input rounding about 5×; a backward-stable
 * float32 implementation should land around 1e-6 to 1e-5. The CPU backend measures 1.0e-6 at
 * worst, but it accumulates the gradient chain in float64; a backend that keeps the normalization
 * chain in float32 (WGSL) has more roundings to absorb, and 1e-3 leaves room for them while
 * still catching a 1% error. The three gradients of one call share a scale floor, the largest of
 * their three scales: a gradient that is zero by cancellation (dq and dk when every row sees a
 * single key, so its weight is constant) carries the rounding of the terms that cancelled, whose
 * size is that of the other gradients of the same call, just as a small element carries its
 * neighbours' error above. It is a property of float32 arithmetic, not a knob: never raise it
 * to make a backend pass.
 */
export const FORWARD_TOLERANCE = 1e-4;
export const GRADIENT_TOLERANCE = 1e-3;
export const SCALE_FLOOR = 1e-6;

export interface Comparison {
  /** max_i |actual_i - expected_i| (Infinity when a value is not finite or the lengths differ). */
  readonly maxAbsError: number;
  /** maxAbsError / scale. */
  readonly maxRelError: number;
  /** max(max_i |expected_i|, SCALE_FLOOR). */
  readonly scale: number;
  /** Flat index of the worst element (-1 when the tensors are empty). */
  readonly worstIndex: number;
  /** Values in `actual` that are NaN or ±Infinity. */
  readonly nonFinite: number;
  readonly lengthMismatch: boolean;
  /** maxRelError <= tolerance, no non-finite value, same length. */
  readonly ok: boolean;
  readonly tolerance: number;
}

type Numbers = ArrayLike<number>;

/** Compares a backend's result with the float64 expectation under the measure described above. */
export function compareTensors(
  actual: Numbers,
  expected: Numbers,
  tolerance = FORWARD_TOLERANCE,
  scaleFloor = SCALE_FLOOR,
): Comparison {
  let scale = Math.max(SCALE_FLOOR, scaleFloor);
  for (let i = 0; i < expected.length; i++) scale = Math.max(scale, Math.abs(expected[i]!));
  const lengthMismatch = actual.length !== expected.length;
  let maxAbsError = 0;
  let worstIndex = -1;
  let nonFinite = 0;
  const length = Math.min(actual.length, expected.length);
  for (let i = 0; i < length; i++) {
    const value = actual[i]!;
    if (!Number.isFinite(value)) {
      nonFinite++;
      if (maxAbsError !== Number.POSITIVE_INFINITY) worstIndex = i;
      maxAbsError = Number.POSITIVE_INFINITY;
      continue;
    }
    const error = Math.abs(value - expected[i]!);
    if (error > maxAbsError) {
      maxAbsError = error;
      worstIndex = i;
    }
  }
  if (lengthMismatch) maxAbsError = Number.POSITIVE_INFINITY;
  const maxRelError = maxAbsError / scale;
  return {
    maxAbsError,
    maxRelError,
    scale,
    worstIndex,
    nonFinite,
    lengthMismatch,
    ok: !lengthMismatch && nonFinite === 0 && maxRelError <= tolerance,
    tolerance,
  };
}

export interface Gradients {
  readonly dq: Numbers;
  readonly dk: Numbers;
  readonly dv: Numbers;
}

function maxMagnitude(values: Numbers): number {
  let largest = 0;
  for (let i = 0; i < values.length; i++) largest = Math.max(largest, Math.abs(values[i]!));
  return largest;
}

/**
 * Compares the three gradients of one backward call, each against its own scale floored at the
 * largest of the three (see GRADIENT_TOLERANCE above for why they share a floor).
 */
export function compareGradients(
  actual: Gradients,
  expected: Gradients,
  tolerance = GRADIENT_TOLERANCE,
): { readonly dq: Comparison; readonly dk: Comparison; readonly dv: Comparison } {
  const floor = Math.max(maxMagnitude(expected.dq), maxMagnitude(expected.dk), maxMagnitude(expected.dv));
  return {
    dq: compareTensors(actual.dq, expected.dq, tolerance, floor),
    dk: compareTensors(actual.dk, expected.dk, tolerance, floor),
    dv: compareTensors(actual.dv, expected.dv, tolerance, floor),
  };
}

/** One line for a failure message: where and by how much. */
export function describeComparison(
  label: string,
  comparison: Comparison,
  actual?: Numbers,
  expected?: Numbers,
): string {
  if (comparison.lengthMismatch) return `${label}: length ${actual?.length} != expected ${expected?.length}`;
  if (comparison.nonFinite > 0) {
    return `${label}: ${comparison.nonFinite} non-finite values (first at ${comparison.worstIndex})`;
  }
  const at = comparison.worstIndex;
  const detail =
    actual !== undefined && expected !== undefined && at >= 0
      ? ` (index ${at}: got ${actual[at]}, expected ${expected[at]})`
      : '';
  return `${label}: relative error ${comparison.maxRelError.toExponential(2)} > ${comparison.tolerance} of scale ${comparison.scale.toExponential(2)}${detail}`;
}
