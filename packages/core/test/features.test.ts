import { describe, expect, it } from 'vitest';
import { binomial, featureCount, kernelDerivative, kernelValue } from '../src/algebra.js';
import { chunkRanges, querySchedule } from '../src/chunked.js';
import {
  featureCoefficients,
  featureLayout,
  keyFeatures,
  keyFeaturesBackward,
  monomialTable,
  multinomialWeights,
  queryFeatures,
} from '../src/features.js';
import { isFastmaxError, type Order, resolveOptions } from '../src/index.js';
import { type AttentionShape, keyLimit } from '../src/validate.js';

const ORDERS: readonly Order[] = [1, 2, 3, 4];
const HEAD_DIMS = [1, 3, 16];

/** Deterministic uniform numbers in [-1, 1) (mulberry32), so a failure reproduces. */
function randomSource(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1;
  };
}

function randomVector(random: () => number, length: number): Float64Array {
  return Float64Array.from({ length }, random);
}

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i]! * b[i]!;
  return sum;
}

/** Every non-decreasing tuple of `degree` coordinates below D, by nested loops (lexicographic). */
function bruteForceTuples(D: number, degree: number): number[][] {
  if (degree === 0) return [[]];
  const tuples: number[][] = [];
  for (const head of bruteForceTuples(D, degree - 1)) {
    for (let d = head.length === 0 ? 0 : head[head.length - 1]!; d < D; d++) tuples.push([...head, d]);
  }
  return tuples;
}

function tableRows(table: Int32Array, degree: number): number[][] {
  const rows: number[][] = [];
  const count = degree === 0 ? 1 : table.length / degree;
  for (let r = 0; r < count; r++) rows.push(Array.from(table.subarray(r * degree, (r + 1) * degree)));
  return rows;
}

function factorial(n: number): number {
  return n <= 1 ? 1 : n * factorial(n - 1);
}

describe('monomialTable and multinomialWeights', () => {
  it('list every multiset once, in lexicographic order, C(D+l-1, l) of them', () => {
    for (const D of [1, 2, 3, 5, 16]) {
      for (let l = 0; l <= 4; l++) {
        const rows = tableRows(monomialTable(D, l), l);
        expect(rows.length).toBe(binomial(D + l - 1, l));
        expect(rows).toEqual(bruteForceTuples(D, l));
      }
    }
  });

  it('weights are l!/Π(multiplicity!) and sum to D^l (multinomial theorem with all-ones vectors)', () => {
    for (const D of HEAD_DIMS) {
      for (let l = 0; l <= 4; l++) {
        const weights = multinomialWeights(D, l);
        const rows = tableRows(monomialTable(D, l), l);
        rows.forEach((tuple, r) => {
          const multiplicities = new Map<number, number>();
          for (const i of tuple) multiplicities.set(i, (multiplicities.get(i) ?? 0) + 1);
          let expected = factorial(l);
          for (const m of multiplicities.values()) expected /= factorial(m);
          expect(weights[r]).toBe(expected);
        });
        expect(weights.reduce((a, b) => a + b, 0)).toBe(D ** l);
      }
    }
  });

  it('(x·y)^l = Σ_m w_m x^m y^m for random vectors', () => {
    const random = randomSource(1);
    for (const D of HEAD_DIMS) {
      const x = randomVector(random, D);
      const y = randomVector(random, D);
      for (let l = 0; l <= 4; l++) {
        const weights = multinomialWeights(D, l);
        const rows = tableRows(monomialTable(D, l), l);
        let sum = 0;
        rows.forEach((tuple, r) => {
          let term = weights[r]!;
          for (const i of tuple) term *= x[i]! * y[i]!;
          sum += term;
        });
        const exact = dot(x, y) ** l;
        // Float64 with at most C(19, 4) = 3876 terms of size <= (|x||y|)^l: 1e-12 relative to that bound.
        const bound = (Math.sqrt(dot(x, x) * dot(y, y)) ** l) as number;
        expect(Math.abs(sum - exact)).toBeLessThanOrEqual(1e-12 * Math.max(bound, 1));
      }
    }
  });

  it('returns fresh copies: writing into them does not corrupt the cached layout', () => {
    const table = monomialTable(3, 2);
    table.fill(-7);
    expect(tableRows(monomialTable(3, 2), 2)).toEqual(bruteForceTuples(3, 2));
  });

  it('refuses an unsupported degree or head dim with a FastmaxError', () => {
    expect(() => monomialTable(3, 5)).toThrow(expect.objectContaining({ code: 'UNSUPPORTED_ORDER' }));
    expect(() => multinomialWeights(-1, 2)).toThrow(expect.objectContaining({ code: 'INVALID_OPTION' }));
    expect(() => monomialTable(2.5, 2)).toThrow(expect.objectContaining({ argument: 'headDim' }));
  });
});

describe('featureLayout', () => {
  it('p = 2, D = 64 packs 2145 features; counts match featureCount for every order', () => {
    expect(featureLayout(64, 2).featureCount).toBe(2145);
    for (const D of [...HEAD_DIMS, 64]) {
      for (const p of ORDERS) {
        const layout = featureLayout(D, p);
        expect(layout.featureCount).toBe(featureCount(D, p));
        for (let l = 0; l <= p; l++) {
          expect(layout.degreeOffsets[l + 1]! - layout.degreeOffsets[l]!).toBe(binomial(D + l - 1, l));
        }
      }
    }
  });

  it('describes each feature consistently: degree, table, weight, prefix and last factor', () => {
    for (const D of HEAD_DIMS) {
      const layout = featureLayout(D, 4);
      expect(layout.tables.length).toBe(5);
      for (let l = 0; l <= 4; l++) {
        expect(Array.from(layout.tables[l]!)).toEqual(Array.from(monomialTable(D, l)));
        const weights = layout.weights.subarray(layout.degreeOffsets[l]!, layout.degreeOffsets[l + 1]!);
        expect(Array.from(weights)).toEqual(Array.from(multinomialWeights(D, l)));
        for (let f = layout.degreeOffsets[l]!; f < layout.degreeOffsets[l + 1]!; f++) {
          expect(layout.degreeOf[f]).toBe(l);
          if (l === 0) continue;
          const row = f - layout.degreeOffsets[l]!;
          const tuple = Array.from(layout.tables[l]!.subarray(row * l, (row + 1) * l));
          expect(layout.lastFactor[f]).toBe(tuple[l - 1]);
          const parent = layout.prefix[f]!;
          expect(layout.degreeOf[parent]).toBe(l - 1);
          const parentRow = parent - layout.degreeOffsets[l - 1]!;
          const parentTuple = Array.from(
            layout.tables[l - 1]!.subarray(parentRow * (l - 1), (parentRow + 1) * (l - 1)),
          );
          expect(parentTuple).toEqual(tuple.slice(0, -1));
        }
      }
    }
  });

  it('is cached per (D, p)', () => {
    expect(featureLayout(16, 3)).toBe(featureLayout(16, 3));
    expect(featureLayout(16, 3)).not.toBe(featureLayout(16, 2));
  });

  it('refuses layouts too large to build with RESOURCE_EXHAUSTED, before allocating', () => {
    try {
      featureLayout(128, 4);
      expect.unreachable('D = 128, p = 4 has 11.7 M features');
    } catch (error) {
      expect(isFastmaxError(error, 'RESOURCE_EXHAUSTED')).toBe(true);
    }
    expect(() => featureLayout(8, 5 as Order)).toThrow(
      expect.objectContaining({ code: 'UNSUPPORTED_ORDER' }),
    );
  });
});

describe('keyFeatures and queryFeatures', () => {
  it('⟨φQ(x, σ), φK(y)⟩ = f(σ x·y) for random vectors, all orders, D in {1, 3, 16}', () => {
    const random = randomSource(2);
    for (const p of ORDERS) {
      for (const D of HEAD_DIMS) {
        const layout = featureLayout(D, p);
        for (let trial = 0; trial < 5; trial++) {
          const coefficients = randomVector(random, p + 1);
          const sigma = 1 + 0.5 * random();
          const x = randomVector(random, D);
          const y = randomVector(random, D);
          const phiQ = queryFeatures(layout, x, sigma, coefficients, new Float64Array(layout.featureCount));
          const phiK = keyFeatures(layout, y, new Float64Array(layout.featureCount));
          const s = sigma * dot(x, y);
          // Float64 sums of <= 5814 terms, each bounded by |a_l| (σ|x||y|)^l.
          let bound = 0;
          const magnitude = sigma * Math.sqrt(dot(x, x) * dot(y, y));
          for (let l = 0; l <= p; l++) bound += Math.abs(coefficients[l]!) * magnitude ** l;
          expect(Math.abs(dot(phiQ, phiK) - kernelValue(coefficients, s))).toBeLessThanOrEqual(1e-13 * bound);
        }
      }
    }
  });

  it('reads vectors at an offset', () => {
    const layout = featureLayout(3, 2);
    const packed = Float64Array.from([9, 9, 0.5, -1, 2, 9]);
    const atOffset = keyFeatures(layout, packed, new Float64Array(layout.featureCount), 2);
    const alone = keyFeatures(layout, [0.5, -1, 2], new Float64Array(layout.featureCount));
    expect(Array.from(atOffset)).toEqual(Array.from(alone));
  });

  it('φQ(x, σ) = featureCoefficients ⊙ φK(σx)', () => {
    const random = randomSource(3);
    const layout = featureLayout(3, 4);
    const coefficients = randomVector(random, 5);
    const x = randomVector(random, 3);
    const sigma = 0.7;
    const phiQ = queryFeatures(layout, x, sigma, coefficients, new Float64Array(layout.featureCount));
    const phiZ = keyFeatures(
      layout,
      x.map((value) => sigma * value),
      new Float64Array(layout.featureCount),
    );
    const weights = featureCoefficients(layout, coefficients);
    phiQ.forEach((value, f) => {
      expect(Math.abs(value - weights[f]! * phiZ[f]!)).toBeLessThanOrEqual(
        1e-15 * Math.max(1, Math.abs(value)),
      );
    });
  });

  it('keyFeaturesBackward gives ∇_y f(σ x·y) = f′(s) σ x when fed φQ(x, σ) as the feature gradient', () => {
    const random = randomSource(4);
    for (const p of ORDERS) {
      for (const D of HEAD_DIMS) {
        const layout = featureLayout(D, p);
        const coefficients = randomVector(random, p + 1);
        const sigma = 0.9;
        const x = randomVector(random, D);
        const y = randomVector(random, D);
        const phiK = keyFeatures(layout, y, new Float64Array(layout.featureCount));
        const gradient = queryFeatures(layout, x, sigma, coefficients, new Float64Array(layout.featureCount));
        const dy = new Float64Array(D + 2);
        keyFeaturesBackward(layout, y, phiK, gradient, dy, 0, 2);
        const slope = kernelDerivative(coefficients, sigma * dot(x, y));
        expect(dy[0]).toBe(0);
        expect(dy[1]).toBe(0);
        for (let d = 0; d < D; d++) {
          expect(Math.abs(dy[2 + d]! - slope * sigma * x[d]!)).toBeLessThanOrEqual(
            1e-12 * (1 + Math.abs(slope)),
          );
        }
      }
    }
  });

  it('refuses short vectors and wrong coefficient counts by name', () => {
    const layout = featureLayout(3, 2);
    expect(() => keyFeatures(layout, [1, 2], new Float64Array(layout.featureCount))).toThrow(
      expect.objectContaining({ code: 'INVALID_SHAPE', argument: 'y' }),
    );
    expect(() => keyFeatures(layout, [1, 2, 3], new Float64Array(3))).toThrow(
      expect.objectContaining({ argument: 'out' }),
    );
    expect(() => queryFeatures(layout, [1, 2, 3], 1, [1, 1], new Float64Array(layout.featureCount))).toThrow(
      expect.objectContaining({ code: 'INVALID_COEFFICIENTS' }),
    );
  });
});

describe('kernelValue and kernelDerivative', () => {
  it('evaluate f(s) = Σ a_l s^l and f′(s)', () => {
    const a = [0.5, -1, 2, 0.25];
    for (const s of [-1.5, 0, 0.3, 2]) {
      expect(kernelValue(a, s)).toBeCloseTo(0.5 - s + 2 * s * s + 0.25 * s ** 3, 14);
      expect(kernelDerivative(a, s)).toBeCloseTo(-1 + 4 * s + 0.75 * s * s, 14);
    }
  });
});

function shapeOf(N: number, M: number): AttentionShape {
  return { batch: 2, heads: 1, kvHeads: 1, queryLength: N, keyLength: M, headDim: 2, valueDim: 2 };
}

describe('chunkRanges and querySchedule', () => {
  const lengths = [1, 2, 5, 7, 16];
  const chunkSizes = [1, 2, 3, 8, 64];

  it('cover the queries in order and line up with keyLimit (causal, any M - N, padding)', () => {
    for (const N of lengths) {
      for (const M of lengths) {
        for (const valid of new Set([0, 1, Math.floor(M / 2), M])) {
          const shape = shapeOf(N, M);
          const options = resolveOptions({ causal: true, keyLengths: [M, valid] });
          for (const C of chunkSizes) {
            const chunks = chunkRanges(N, M, C, valid);
            expect(querySchedule(1, shape, options, 'factorized', C)).toEqual(chunks);
            let expectedStart = 0;
            let previousStateEnd = 0;
            for (const chunk of chunks) {
              expect(chunk.queryStart).toBe(expectedStart);
              expect(chunk.queryEnd - chunk.queryStart).toBeLessThanOrEqual(C);
              expect(chunk.queryEnd).toBeGreaterThan(chunk.queryStart);
              expect(chunk.stateKeyEnd).toBeGreaterThanOrEqual(previousStateEnd);
              expect(chunk.directKeyEnd - chunk.stateKeyEnd).toBeLessThanOrEqual(C);
              for (let i = chunk.queryStart; i < chunk.queryEnd; i++) {
                const limit = keyLimit(1, i, shape, options);
                expect(chunk.stateKeyEnd).toBeLessThanOrEqual(limit);
                expect(limit).toBeLessThanOrEqual(chunk.directKeyEnd);
              }
              // The last row reaches the block's end: no key evaluated past what a row may see.
              expect(keyLimit(1, chunk.queryEnd - 1, shape, options)).toBe(chunk.directKeyEnd);
              expectedStart = chunk.queryEnd;
              previousStateEnd = chunk.stateKeyEnd;
            }
            expect(expectedStart).toBe(N);
          }
        }
      }
    }
  });

  it('puts the M - N keys every query sees into the state before the first chunk', () => {
    expect(chunkRanges(4, 10, 2)).toEqual([
      { queryStart: 0, queryEnd: 2, stateKeyEnd: 6, directKeyEnd: 8 },
      { queryStart: 2, queryEnd: 4, stateKeyEnd: 8, directKeyEnd: 10 },
    ]);
    // M < N: the first rows see nothing, and nothing is read for them.
    expect(chunkRanges(5, 2, 2)).toEqual([
      { queryStart: 0, queryEnd: 2, stateKeyEnd: 0, directKeyEnd: 0 },
      { queryStart: 2, queryEnd: 4, stateKeyEnd: 0, directKeyEnd: 1 },
      { queryStart: 4, queryEnd: 5, stateKeyEnd: 1, directKeyEnd: 2 },
    ]);
  });

  it('gives one chunk for the direct path and for non-causal factorized attention', () => {
    const shape = shapeOf(6, 9);
    const padded = resolveOptions({ keyLengths: [9, 4] });
    expect(querySchedule(1, shape, padded, 'factorized', 2)).toEqual([
      { queryStart: 0, queryEnd: 6, stateKeyEnd: 4, directKeyEnd: 4 },
    ]);
    expect(querySchedule(1, shape, padded, 'direct', 2)).toEqual([
      { queryStart: 0, queryEnd: 6, stateKeyEnd: 0, directKeyEnd: 4 },
    ]);
    const causal = resolveOptions({ causal: true });
    expect(querySchedule(0, shape, causal, 'direct', 2)).toEqual([
      { queryStart: 0, queryEnd: 6, stateKeyEnd: 0, directKeyEnd: 9 },
    ]);
  });

  it('refuses a bad chunk size or valid key count by name', () => {
    expect(() => chunkRanges(4, 4, 0)).toThrow(expect.objectContaining({ argument: 'chunkSize' }));
    expect(() => chunkRanges(4, 4, 2, 5)).toThrow(expect.objectContaining({ code: 'INVALID_KEY_LENGTHS' }));
  });
});
