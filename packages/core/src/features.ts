import { degreeFeatureCount } from './algebra.js';
import { describeValue, FastmaxError } from './errors.js';
import { type Order, SUPPORTED_ORDERS } from './options.js';

/**
 * The feature maps that turn the Fastmax kernel into a dot product of two vectors:
 *
 *     f(σ x·y) = Σ_l a_l σ^l (x·y)^l = Σ_f φQ_f(x, σ) φK_f(y) = ⟨φQ(x, σ), φK(y)⟩
 *
 * because (x·y)^l = Σ_m w_m x^m y^m over the multisets m = {i1 <= … <= il} of l coordinates, with
 * the multinomial weight w_m = l!/Π(multiplicity!) and x^m = x_i1·…·x_il. Each multiset is stored
 * once (symmetric packing), so degree l has C(D+l-1, l) features instead of D^l.
 *
 * - Key features are the plain monomials: φK_f(y) = y^m. They carry no σ and no a_l, so moments
 *   Σ_j φK(y_j) v_j never need rescaling when σ changes from row to row (prefix-max-norm, decoding).
 * - Query features fold everything else in: φQ_f(x, σ) = a_l σ^l w_m x^m.
 *
 * Feature order: degree 0 (the constant 1), then degree 1, …, degree p; inside a degree the index
 * tuples (i1 <= … <= il) are in lexicographic order. Every backend that exchanges features or
 * moments with another one (or with tests) relies on this order.
 */
export interface FeatureLayout {
  readonly headDim: number;
  readonly order: Order;
  /** F = Σ_{l<=p} C(D+l-1, l). */
  readonly featureCount: number;
  /** Features of degree l are [degreeOffsets[l], degreeOffsets[l+1]); length order + 2. */
  readonly degreeOffsets: Int32Array;
  /** Degree of each feature. */
  readonly degreeOf: Uint8Array;
  /** tables[l]: the index tuples of degree l, C(D+l-1, l) rows of l entries (see `monomialTable`). */
  readonly tables: readonly Int32Array[];
  /** Multinomial weight w_m of each feature (1 for the constant). */
  readonly weights: Float64Array;
  /**
   * The feature whose monomial is this one without its last factor (-1 for the constant). A
   * monomial of degree l is its prefix times one coordinate, so all F monomials cost F multiplies.
   */
  readonly prefix: Int32Array;
  /** The coordinate of the last factor (-1 for the constant). */
  readonly lastFactor: Int32Array;
}

/**
 * Largest layout we build. A layout costs about (4p + 17) bytes per feature, so this is < 150 MB;
 * D = 64, p = 4 (814,385 features) fits, D = 128, p = 4 (11.7 M) does not: such shapes belong on the
 * direct path, whose cost does not grow with F.
 */
export const MAX_LAYOUT_FEATURES = 2 ** 22;

function requireHeadDim(headDim: unknown): number {
  if (typeof headDim !== 'number' || !Number.isInteger(headDim) || headDim < 0) {
    throw new FastmaxError('INVALID_OPTION', 'headDim must be a non-negative integer', {
      argument: 'headDim',
      expected: 'an integer >= 0',
      actual: describeValue(headDim),
    });
  }
  return headDim;
}

function requireOrder(order: unknown, argument: string, allowZero: boolean): number {
  const valid = SUPPORTED_ORDERS.includes(order as Order) || (allowZero && order === 0);
  if (!valid) {
    throw new FastmaxError('UNSUPPORTED_ORDER', `${argument} must be ${allowZero ? '0, ' : ''}1, 2, 3 or 4`, {
      argument,
      expected: allowZero ? '0 | 1 | 2 | 3 | 4' : '1 | 2 | 3 | 4',
      actual: describeValue(order),
    });
  }
  return order as number;
}

function buildLayout(headDim: number, order: Order): FeatureLayout {
  const degreeOffsets = new Int32Array(order + 2);
  let total = 0;
  for (let l = 0; l <= order; l++) {
    degreeOffsets[l] = total;
    total += degreeFeatureCount(headDim, l);
  }
  degreeOffsets[order + 1] = total;
  if (total > MAX_LAYOUT_FEATURES) {
    throw new FastmaxError('RESOURCE_EXHAUSTED', 'too many features for a factorized layout', {
      argument: 'headDim',
      expected: `at most ${MAX_LAYOUT_FEATURES} features (use the direct path for this head dim and order)`,
      actual: `${total} features for D = ${headDim}, p = ${order}`,
    });
  }
  const prefix = new Int32Array(total);
  const lastFactor = new Int32Array(total);
  const weights = new Float64Array(total);
  const degreeOf = new Uint8Array(total);
  // How many times the last factor repeats at the end of the tuple: the multiplicity that grows
  // when the same coordinate is appended again.
  const trailingRun = new Uint8Array(total);
  prefix[0] = -1;
  lastFactor[0] = -1;
  weights[0] = 1;

  // Degree-l tuples in lexicographic order are: for each degree-(l-1) tuple in lexicographic order,
  // that tuple followed by every coordinate >= its last one, ascending. So each degree is generated
  // from the previous one in order, and the prefix of every feature is known as it is created.
  let next = 1;
  for (let l = 1; l <= order; l++) {
    for (let parent = degreeOffsets[l - 1]!; parent < degreeOffsets[l]!; parent++) {
      const parentLast = lastFactor[parent]!;
      for (let d = Math.max(parentLast, 0); d < headDim; d++) {
        prefix[next] = parent;
        lastFactor[next] = d;
        degreeOf[next] = l;
        trailingRun[next] = d === parentLast ? trailingRun[parent]! + 1 : 1;
        // l!/Π(mult!) from (l-1)!/Π(mult!): the degree grows to l and d's multiplicity to
        // trailingRun. Both sides are integers, so the division is exact in float64.
        weights[next] = (weights[parent]! * l) / trailingRun[next]!;
        next++;
      }
    }
  }

  const tables: Int32Array[] = [];
  for (let l = 0; l <= order; l++) {
    const first = degreeOffsets[l]!;
    const count = degreeOffsets[l + 1]! - first;
    const table = new Int32Array(count * l);
    for (let row = 0; row < count; row++) {
      let feature = first + row;
      for (let position = l - 1; position >= 0; position--) {
        table[row * l + position] = lastFactor[feature]!;
        feature = prefix[feature]!;
      }
    }
    tables.push(table);
  }
  return {
    headDim,
    order,
    featureCount: total,
    degreeOffsets,
    degreeOf,
    tables,
    weights,
    prefix,
    lastFactor,
  };
}

// Memoized layouts, keyed by (D, p). Building one is O(F·p), cheap next to a single attention call,
// but backends ask for the same few layouts on every call. Bounded so that a long-lived process
// trying many head dims does not keep every layout alive.
const LAYOUT_CACHE_SIZE = 8;
const layoutCache = new Map<string, FeatureLayout>();

/**
 * The feature layout of the whole Taylor polynomial of order p for head dim D (cached per (D, p)).
 * The layout is shared between callers: never write into its arrays.
 */
export function featureLayout(headDim: number, order: Order): FeatureLayout {
  requireHeadDim(headDim);
  requireOrder(order, 'order', false);
  const key = `${headDim}/${order}`;
  const cached = layoutCache.get(key);
  if (cached !== undefined) return cached;
  const layout = buildLayout(headDim, order);
  if (layoutCache.size >= LAYOUT_CACHE_SIZE) layoutCache.delete(layoutCache.keys().next().value!);
  layoutCache.set(key, layout);
  return layout;
}

/**
 * The index tuples i1 <= … <= il of degree l, in lexicographic order, as a fresh Int32Array of
 * C(D+l-1, l) rows × l entries (row r, position t at [r·l + t]). Degree 0 has one empty tuple.
 */
export function monomialTable(headDim: number, degree: number): Int32Array {
  requireHeadDim(headDim);
  const l = requireOrder(degree, 'degree', true);
  return featureLayout(headDim, Math.max(l, 1) as Order).tables[l]!.slice();
}

/**
 * l!/Π(multiplicity!) for each tuple of `monomialTable(headDim, degree)`, in the same order, so that
 * (x·y)^l = Σ_m w_m x^m y^m.
 */
export function multinomialWeights(headDim: number, degree: number): Float64Array {
  requireHeadDim(headDim);
  const l = requireOrder(degree, 'degree', true);
  const layout = featureLayout(headDim, Math.max(l, 1) as Order);
  return layout.weights.slice(layout.degreeOffsets[l]!, layout.degreeOffsets[l + 1]!);
}

/**
 * a_l · w_m for every feature: the part of φQ that does not depend on the query. Backends that work
 * with z = σx (where φQ(x, σ) = featureCoefficients ⊙ φK(z)) compute this once per call.
 */
export function featureCoefficients(layout: FeatureLayout, coefficients: ArrayLike<number>): Float64Array {
  requireCoefficients(layout, coefficients);
  const out = new Float64Array(layout.featureCount);
  for (let f = 0; f < out.length; f++) out[f] = coefficients[layout.degreeOf[f]!]! * layout.weights[f]!;
  return out;
}

function requireCoefficients(layout: FeatureLayout, coefficients: ArrayLike<number>): void {
  if (coefficients.length !== layout.order + 1) {
    throw new FastmaxError('INVALID_COEFFICIENTS', 'coefficients must hold a_0..a_p of the layout order', {
      argument: 'coefficients',
      expected: `${layout.order + 1} values`,
      actual: `${coefficients.length} values`,
    });
  }
}

function requireVector(vector: ArrayLike<number>, offset: number, length: number, argument: string): void {
  if (!Number.isInteger(offset) || offset < 0 || offset + length > vector.length) {
    throw new FastmaxError('INVALID_SHAPE', `${argument} is too short for the layout`, {
      argument,
      expected: `${length} values from offset ${describeValue(offset)}`,
      actual: `${vector.length} values`,
    });
  }
}

/**
 * φK(y) = y^m for every feature, written to `out` (length >= F); y is read at [offset, offset + D).
 * Returns `out`.
 */
export function keyFeatures(
  layout: FeatureLayout,
  y: ArrayLike<number>,
  out: Float64Array,
  offset = 0,
): Float64Array {
  requireVector(y, offset, layout.headDim, 'y');
  requireVector(out, 0, layout.featureCount, 'out');
  const { prefix, lastFactor } = layout;
  out[0] = 1;
  for (let f = 1; f < layout.featureCount; f++) out[f] = out[prefix[f]!]! * y[offset + lastFactor[f]!]!;
  return out;
}

/**
 * φQ(x, σ) = a_l σ^l w_m x^m for every feature, written to `out` (length >= F); x is read at
 * [offset, offset + D). σ is folded in per degree here, on the query side, so that the key moments
 * stay unscaled. Returns `out`.
 */
export function queryFeatures(
  layout: FeatureLayout,
  x: ArrayLike<number>,
  sigma: number,
  coefficients: ArrayLike<number>,
  out: Float64Array,
  offset = 0,
): Float64Array {
  requireCoefficients(layout, coefficients);
  keyFeatures(layout, x, out, offset);
  const { degreeOffsets, weights } = layout;
  let sigmaPower = 1;
  for (let l = 0; l <= layout.order; l++) {
    const degreeScale = coefficients[l]! * sigmaPower;
    for (let f = degreeOffsets[l]!; f < degreeOffsets[l + 1]!; f++)
      out[f] = out[f]! * degreeScale * weights[f]!;
    sigmaPower *= sigma;
  }
  return out;
}

/**
 * The backward pass of `keyFeatures`: adds Σ_f g_f ∇_y φK_f(y) to dy[dyOffset, dyOffset + D).
 * `features` must hold keyFeatures(y). `featureGradient` (g) is used as the running adjoint and is
 * overwritten.
 *
 * Reverse-mode through the prefix tree: φ_f = φ_prefix(f) · y_last(f), so the adjoint of φ_f flows
 * to y_last(f) (times φ_prefix(f)) and to φ_prefix(f) (times y_last(f)). Prefixes come before their
 * extensions, so one sweep from the last feature to the first is O(F). For the query side, use it
 * with z = σx and g ⊙ featureCoefficients: then ∇_z gives dx = σ·∇_z and dσ = x·∇_z.
 */
export function keyFeaturesBackward(
  layout: FeatureLayout,
  y: ArrayLike<number>,
  features: Float64Array,
  featureGradient: Float64Array,
  dy: Float64Array,
  offset = 0,
  dyOffset = 0,
): void {
  requireVector(y, offset, layout.headDim, 'y');
  requireVector(features, 0, layout.featureCount, 'features');
  requireVector(featureGradient, 0, layout.featureCount, 'featureGradient');
  requireVector(dy, dyOffset, layout.headDim, 'dy');
  const { prefix, lastFactor } = layout;
  for (let f = layout.featureCount - 1; f >= 1; f--) {
    const adjoint = featureGradient[f]!;
    if (adjoint === 0) continue;
    const parent = prefix[f]!;
    const coordinate = lastFactor[f]!;
    dy[dyOffset + coordinate]! += adjoint * features[parent]!;
    featureGradient[parent]! += adjoint * y[offset + coordinate]!;
  }
}
