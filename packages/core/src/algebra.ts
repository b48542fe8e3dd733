import type { Order } from './options.js';

/** C(n, r) as a float64 (exact for every size Fastmax uses). */
export function binomial(n: number, r: number): number {
  if (r < 0 || r > n) return 0;
  let result = 1;
  for (let i = 1; i <= r; i++) result = (result * (n - r + i)) / i;
  return Math.round(result);
}

/** Features of degree l with symmetric packing: monomials x_{i1}…x_{il}, i1 <= … <= il. */
export function degreeFeatureCount(headDim: number, degree: number): number {
  return binomial(headDim + degree - 1, degree);
}

/** F = Σ_{l<=p} C(D+l-1, l): p = 2, D = 64 gives 2145. */
export function featureCount(headDim: number, order: Order): number {
  let total = 0;
  for (let l = 0; l <= order; l++) total += degreeFeatureCount(headDim, l);
  return total;
}

/**
 * The Fastmax kernel f(s) = Σ_{l<=p} a_l s^l, by Horner's rule (p + 1 multiply-adds, and the most
 * accurate ordering for a short polynomial). `coefficients` holds a_0..a_p.
 */
export function kernelValue(coefficients: ArrayLike<number>, s: number): number {
  let value = 0;
  for (let l = coefficients.length - 1; l >= 0; l--) value = value * s + coefficients[l]!;
  return value;
}

/** f'(s) = Σ_{l>=1} l·a_l s^(l-1): how a weight moves with its score, used by every backward pass. */
export function kernelDerivative(coefficients: ArrayLike<number>, s: number): number {
  let slope = 0;
  for (let l = coefficients.length - 1; l >= 1; l--) slope = slope * s + l * coefficients[l]!;
  return slope;
}
