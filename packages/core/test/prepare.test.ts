import { afterAll, describe, expect, it } from 'vitest';
import {
  centerDivideRowRange,
  dividedSides,
  divideRowRangeBackward,
  type FastmaxOptions,
  type HostTensor,
  keyLimit,
  kvHeadOf,
  normAndCenterRowRangeBackward,
  preparationArrays,
  prepareDivisors,
  prepareScores,
  prepareScoresBackward,
  resolveOptions,
  rowStatsRange,
  type Shape4,
  sumNormGradients,
  validateAttentionInputs,
} from '../src/index.js';
import { referenceAttention, referenceBackward } from '../src/reference/oracle.js';
import {
  dotProduct,
  dyadicTensor,
  finiteDifferenceGradient,
  maxAbs,
  scaledError,
  seededRandom,
  tensorOf,
  tieFreeTensor,
} from './fixtures/numeric.js';

function setup(q: HostTensor, k: HostTensor, v: HostTensor, options: FastmaxOptions) {
  const resolved = resolveOptions(options);
  const shape = validateAttentionInputs(q, k, v, resolved);
  return { resolved, shape };
}

/** Every visible score s_ij = σ_i (x_i·y_j), row by row. */
function visibleScores(q: HostTensor, k: HostTensor, v: HostTensor, options: FastmaxOptions): number[] {
  const { resolved, shape } = setup(q, k, v, options);
  const { x, y, sigma } = prepareScores(q, k, shape, resolved);
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D } = shape;
  const scores: number[] = [];
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      for (let i = 0; i < N; i++) {
        const row = (b * H + h) * N + i;
        for (let j = 0; j < keyLimit(b, i, shape, resolved); j++) {
          const keyRow = (b * Hkv + kvHeadOf(h, shape)) * M + j;
          let dot = 0;
          for (let d = 0; d < D; d++) dot += x[row * D + d]! * y[keyRow * D + d]!;
          scores.push(sigma[row]! * dot);
        }
      }
    }
  }
  return scores;
}

function inputs(seed: number, q: Shape4, k: Shape4, range = 1) {
  const random = seededRandom(seed);
  return {
    q: tieFreeTensor(q, random, range),
    k: tieFreeTensor(k, random, range),
    v: dyadicTensor([k[0], k[1], k[2], 2], random, range),
  };
}

describe('prepareScores bounds every score by 1', () => {
  // Inputs of size up to 4 would give raw dot products up to ~50; the normalizations must cut that to 1.
  const { q, k, v } = inputs(11, [2, 4, 6, 5], [2, 2, 7, 5], 4);
  const cases: [string, FastmaxOptions][] = [
    ['max-norm', { normalization: 'max-norm' }],
    ['max-norm, padded', { normalization: 'max-norm', keyLengths: [3, 7] }],
    ['prefix-max-norm, causal', { normalization: 'prefix-max-norm', causal: true }],
    [
      'prefix-max-norm, causal, padded',
      { normalization: 'prefix-max-norm', causal: true, keyLengths: [4, 6] },
    ],
    ['prefix-max-norm, non-causal', { normalization: 'prefix-max-norm' }],
    ['l2', { normalization: 'l2' }],
  ];
  it.each(cases)('%s', (_, options) => {
    const scores = visibleScores(q, k, v, options);
    expect(scores.length).toBeGreaterThan(0);
    // Cauchy-Schwarz makes the bound exact; 1e-12 leaves room for float64 rounding of norms and dots.
    expect(maxAbs(scores)).toBeLessThanOrEqual(1 + 1e-12);
    expect(maxAbs(scores)).toBeGreaterThan(0.3);
  });
  it('l2 scores are cosines: a token with itself scores exactly 1', () => {
    const token = tensorOf([1, 1, 1, 3], [0.5, -2, 1]);
    expect(visibleScores(token, token, tensorOf([1, 1, 1, 1], [1]), { normalization: 'l2' })[0]).toBeCloseTo(
      1,
      15,
    );
  });
  it('temperature divides every score', () => {
    const plain = visibleScores(q, k, v, { normalization: 'l2' });
    const hot = visibleScores(q, k, v, { normalization: 'l2', temperature: 4 });
    hot.forEach((s, index) => {
      expect(s).toBeCloseTo(plain[index]! / 4, 15);
    });
  });
});

describe('causality of the normalization', () => {
  // Self-attention, N = M = 6: changing every token after position t must leave rows 0..t untouched.
  const N = 6;
  const base = inputs(21, [1, 2, N, 4], [1, 2, N, 4]);
  const changedAfter = (t: number): { q: HostTensor; k: HostTensor; v: HostTensor } => {
    const grow = (tensor: HostTensor): HostTensor => {
      const data = Float32Array.from(tensor.data);
      const [, heads, length, dim] = tensor.shape;
      for (let h = 0; h < heads; h++) {
        for (let i = t + 1; i < length; i++) {
          // A much larger token: it becomes the new maximum norm of the head.
          for (let d = 0; d < dim; d++) data[(h * length + i) * dim + d] = (d % 2 === 0 ? 8 : -5) + i;
        }
      }
      return { shape: tensor.shape, data };
    };
    return { q: grow(base.q), k: grow(base.k), v: grow(base.v) };
  };
  const rowsUpTo = (output: Float64Array, t: number, Dv: number): number[] => {
    const rows: number[] = [];
    for (let h = 0; h < 2; h++) rows.push(...output.subarray(h * N * Dv, (h * N + t + 1) * Dv));
    return rows;
  };

  it.each([0, 2, 4])('prefix-max-norm: rows 0..%i do not see later tokens', (t) => {
    const options: FastmaxOptions = { causal: true, normalization: 'prefix-max-norm' };
    const before = referenceAttention(base.q, base.k, base.v, options).output;
    const after = referenceAttention(changedAfter(t).q, changedAfter(t).k, changedAfter(t).v, options).output;
    // Bit-for-bit: the same float64 operations run on the same prefix.
    expect(rowsUpTo(after, t, 2)).toEqual(rowsUpTo(before, t, 2));
    // And the change is real: the later rows did move.
    expect(after[(N - 1) * 2]).not.toBe(before[(N - 1) * 2]);
  });

  it('global max-norm with causal: true leaks later tokens into earlier rows (why causal defaults to prefix-max-norm)', () => {
    // The maxima of max-norm run over the whole sequence, so a large future token rescales every
    // earlier query and key. The causal mask still hides future keys, but not their norms. The
    // authors' code has the same property (normalize over the sequence, then mask=True).
    const options: FastmaxOptions = { causal: true, normalization: 'max-norm' };
    const t = 2;
    const before = referenceAttention(base.q, base.k, base.v, options).output;
    const after = referenceAttention(changedAfter(t).q, changedAfter(t).k, changedAfter(t).v, options).output;
    const moved = Math.max(
      ...rowsUpTo(after, t, 2).map((value, index) => Math.abs(value - rowsUpTo(before, t, 2)[index]!)),
    );
    expect(moved).toBeGreaterThan(1e-3);
  });
});

describe('zero-norm tokens', () => {
  // Constant tokens center to 0: the divisor becomes 1, scores are 0 and nothing is NaN.
  const constantQ = tensorOf([1, 1, 2, 3], [0.5, 0.5, 0.5, 1, 2, 3]);
  const constantK = tensorOf([1, 1, 3, 3], [2, 2, 2, -1, -1, -1, 0.25, 0.25, 0.25]);
  const v = tensorOf([1, 1, 3, 2], [1, 2, 3, 4, 5, 7]);
  const dOut = tensorOf([1, 1, 2, 2], [1, -1, 0.5, 2]);

  it.each(['max-norm', 'prefix-max-norm', 'l2'] as const)(
    '%s: every key constant gives uniform weights',
    (normalization) => {
      const result = referenceAttention(constantQ, constantK, v, { normalization });
      // f(0) = a_0 = 1 for every key, so each row is the mean of v: ((1+3+5)/3, (2+4+7)/3).
      expect(Array.from(result.output)).toEqual([3, 13 / 3, 3, 13 / 3]);
      const { resolved, shape } = setup(constantQ, constantK, v, { normalization });
      const prepared = prepareScores(constantQ, constantK, shape, resolved);
      for (const values of [prepared.x, prepared.y, prepared.sigma])
        expect(values.every(Number.isFinite)).toBe(true);
    },
  );

  it.each(['max-norm', 'prefix-max-norm', 'l2'] as const)('%s: gradients stay finite', (normalization) => {
    const { resolved, shape } = setup(constantQ, constantK, v, { normalization });
    const prepared = prepareScores(constantQ, constantK, shape, resolved);
    const random = seededRandom(3);
    const dx = Float64Array.from(prepared.x, () => random() - 0.5);
    const dy = Float64Array.from(prepared.y, () => random() - 0.5);
    const dsigma = Float64Array.from(prepared.sigma, () => random() - 0.5);
    const { dq, dk } = prepareScoresBackward(prepared, shape, resolved, dx, dy, dsigma);
    expect(dq.every(Number.isFinite) && dk.every(Number.isFinite)).toBe(true);
  });

  it('a zero norm is replaced by the constant 1 for queries and keys alike (l2)', () => {
    // y = c(k)/1 at a zero-norm key, so ∂L/∂k is the centered dy, the same rule as for queries.
    const { resolved, shape } = setup(constantQ, constantK, v, { normalization: 'l2' });
    const prepared = prepareScores(constantQ, constantK, shape, resolved);
    const dx = Float64Array.from([1, 2, 6, 0, 0, 3]);
    const dy = Float64Array.from([3, 0, 0, 1, 1, 4, 0, 0, 0]);
    const { dq, dk } = prepareScoresBackward(prepared, shape, resolved, dx, dy, new Float64Array(2));
    // Query 0 is constant: dq = centered dx = [1, 2, 6] − 3.
    expect(Array.from(dq.subarray(0, 3))).toEqual([-2, -1, 3]);
    // Every key is constant: dk = centered dy, e.g. [3, 0, 0] − 1 and [1, 1, 4] − 2.
    expect(Array.from(dk)).toEqual([2, -1, -1, -1, -1, 2, 0, 0, 0]);
  });

  it('referenceBackward stays finite on zero-norm tokens', () => {
    for (const normalization of ['max-norm', 'prefix-max-norm', 'l2'] as const) {
      const { dq, dk, dv } = referenceBackward(constantQ, constantK, v, dOut, { normalization });
      expect([...dq, ...dk, ...dv].every(Number.isFinite)).toBe(true);
    }
  });
});

describe('prepareScoresBackward matches central finite differences of prepareScores', () => {
  /**
   * Loss L = Σ cx·x + Σ cy·y + Σ cσ·σ with fixed random weights, so ∂L/∂(x, y, σ) = (cx, cy, cσ).
   * Inputs are dyadic and tie-free (see fixtures/numeric.ts), so every stencil point is an exact
   * float32 input with the same argmax. The five-point stencil at h = 2^-12 is accurate to ~1e-11 here
   * (see fixtures/numeric.ts; FASTMAX_REPORT_ERRORS=1 prints the worst case seen); 1e-8 of the gradient
   * scale leaves a wide margin while any wrong term (an O(1) error) still fails by orders of magnitude.
   */
  let worst = 0;
  afterAll(() => {
    if (process.env.FASTMAX_REPORT_ERRORS)
      console.info(`prepareScoresBackward vs finite differences: worst ${worst.toExponential(2)}`);
  });
  const tolerance = 1e-8;
  const cases: [string, FastmaxOptions][] = [
    ['max-norm', { normalization: 'max-norm' }],
    ['max-norm, causal, padded', { normalization: 'max-norm', causal: true, keyLengths: [4, 2] }],
    ['prefix-max-norm, causal', { normalization: 'prefix-max-norm', causal: true }],
    [
      'prefix-max-norm, causal, padded',
      { normalization: 'prefix-max-norm', causal: true, keyLengths: [3, 5] },
    ],
    ['prefix-max-norm, non-causal', { normalization: 'prefix-max-norm' }],
    ['l2', { normalization: 'l2', temperature: 0.5 }],
    ['scale', { normalization: { scale: 0.3 }, temperature: 2 }],
  ];
  it.each(cases)('%s (GQA 4 query heads on 2 kv heads, N = 4, M = 5)', (_, options) => {
    const { q, k, v } = inputs(101, [2, 4, 4, 3], [2, 2, 5, 3]);
    const { resolved, shape } = setup(q, k, v, options);
    const random = seededRandom(7);
    const first = prepareScores(q, k, shape, resolved);
    const cx = Float64Array.from(first.x, () => random() - 0.5);
    const cy = Float64Array.from(first.y, () => random() - 0.5);
    const cs = Float64Array.from(first.sigma, () => random() - 0.5);
    const loss = (): number => {
      const { x, y, sigma } = prepareScores(q, k, shape, resolved);
      return dotProduct(cx, x) + dotProduct(cy, y) + dotProduct(cs, sigma);
    };
    // The call computes dq and dk in the memory of its dx and dy: give it copies of the weights.
    const dx = cx.slice();
    const dy = cy.slice();
    const analytic = prepareScoresBackward(first, shape, resolved, dx, dy, cs);
    expect(analytic.dq).toBe(dx);
    expect(analytic.dk).toBe(dy);
    const numericQ = finiteDifferenceGradient(q.data, loss);
    const numericK = finiteDifferenceGradient(k.data, loss);
    expect(maxAbs(analytic.dq)).toBeGreaterThan(0.01);
    expect(maxAbs(analytic.dk)).toBeGreaterThan(0.01);
    worst = Math.max(worst, scaledError(analytic.dq, numericQ), scaledError(analytic.dk, numericK));
    expect(scaledError(analytic.dq, numericQ)).toBeLessThan(tolerance);
    expect(scaledError(analytic.dk, numericK)).toBeLessThan(tolerance);
  });
});

describe('prepareScores with a scratch allocator', () => {
  it.each(['max-norm', 'prefix-max-norm', 'l2'] as const)(
    '%s: writes every array into the scratch, equal to fresh arrays, whatever the memory held',
    (normalization) => {
      const { q, k, v } = inputs(5, [2, 4, 6, 3], [2, 2, 6, 3]);
      const { resolved, shape } = setup(q, k, v, { normalization, causal: true, keyLengths: [6, 4] });
      const fresh = prepareScores(q, k, shape, resolved);
      // Memory full of garbage, as a reused buffer would be: every element must be overwritten.
      const handed: (Float64Array | Int32Array)[] = [];
      const scratch = {
        float64: (_: string, length: number) => {
          const array = new Float64Array(length).fill(Number.NaN);
          handed.push(array);
          return array;
        },
        int32: (_: string, length: number) => {
          const array = new Int32Array(length).fill(12345);
          handed.push(array);
          return array;
        },
      };
      const reused = prepareScores(q, k, shape, resolved, scratch);
      for (const name of ['x', 'y', 'sigma'] as const) {
        expect(handed).toContain(reused[name]);
        expect(Array.from(reused[name])).toEqual(Array.from(fresh[name]));
      }
      for (const name of [
        'queryNorms',
        'keyNorms',
        'queryArgmax',
        'keyArgmax',
        'queryDivisors',
        'keyDivisors',
      ] as const) {
        expect(handed).toContain(reused.trace[name]);
        expect(Array.from(reused.trace[name])).toEqual(Array.from(fresh.trace[name]));
      }
    },
  );
});

describe('the row steps of the preparation, range by range', () => {
  // Backends run these over ranges of rows on several threads (backend-cpu's backward): each range
  // must write its own rows and nothing else, and the steps must give prepareScores's and
  // prepareScoresBackward's numbers bit for bit.
  const cases: [string, FastmaxOptions][] = [
    ['max-norm, padded', { normalization: 'max-norm', keyLengths: [6, 4] }],
    [
      'prefix-max-norm, causal, padded',
      { normalization: 'prefix-max-norm', causal: true, keyLengths: [6, 4] },
    ],
    ['l2', { normalization: 'l2' }],
    ['scale', { normalization: { scale: 0.5 } }],
  ];
  const D = 3;
  /** Ranges of [0, rows) of uneven sizes, some empty. */
  const splits = (rows: number): [number, number][] => {
    const cuts = [0, 0, Math.floor(rows / 5), Math.floor(rows / 2) + 1, rows, rows];
    return cuts.slice(1).map((end, i) => [cuts[i]!, end]);
  };
  /** Runs `step` on one middle range of NaN-filled copies: rows outside it must stay NaN. */
  const onlyItsRows = (
    target: Float64Array | Float32Array,
    rows: number,
    step: (start: number, end: number) => void,
    width = D,
  ) => {
    target.fill(Number.NaN);
    const start = Math.floor(rows / 3);
    const end = Math.floor((2 * rows) / 3);
    step(start, end);
    target.forEach((value, i) => {
      const row = Math.floor(i / width);
      expect(Number.isNaN(value)).toBe(row < start || row >= end);
    });
  };
  it.each(cases)('%s', (_, options) => {
    const { q, k, v } = inputs(8, [2, 4, 6, D], [2, 2, 6, D]);
    const { resolved, shape } = setup(q, k, v, options);
    const queryRows = 2 * 4 * 6;
    const keyRows = 2 * 2 * 6;
    const random = seededRandom(21);
    const dx = Float64Array.from({ length: queryRows * D }, () => random() - 0.5);
    const dy = Float64Array.from({ length: keyRows * D }, () => random() - 0.5);
    const dsigma = Float64Array.from({ length: queryRows }, () => random() - 0.5);
    const whole = prepareScores(q, k, shape, resolved);
    const wholeGradients = prepareScoresBackward(whole, shape, resolved, dx.slice(), dy.slice(), dsigma);

    const arrays = preparationArrays(shape, resolved);
    for (const [start, end] of splits(queryRows))
      rowStatsRange(q.data, D, arrays.centered, arrays.queryMeans, arrays.queryNorms, start, end);
    for (const [start, end] of splits(keyRows))
      rowStatsRange(k.data, D, arrays.centered, arrays.keyMeans, arrays.keyNorms, start, end);
    prepareDivisors(arrays, shape, resolved);
    const { queriesDivided, keysDivided } = dividedSides(resolved);
    const z = new Float32Array(queryRows * D);
    for (const [start, end] of splits(queryRows))
      centerDivideRowRange(
        q.data,
        arrays.queryMeans,
        arrays.queryDivisors,
        D,
        arrays.x,
        start,
        end,
        z,
        arrays.sigma,
      );
    for (const [start, end] of splits(keyRows))
      centerDivideRowRange(k.data, arrays.keyMeans, arrays.keyDivisors, D, arrays.y, start, end);
    for (const name of ['x', 'y', 'sigma'] as const)
      expect(Array.from(arrays[name])).toEqual(Array.from(whole[name]));
    expect(Array.from(z)).toEqual(
      Array.from(arrays.x, (value, i) => Math.fround(arrays.sigma[Math.floor(i / D)]! * value)),
    );

    const gx = dx.slice();
    const gy = dy.slice();
    const queryParts = new Float64Array(queryRows);
    const keyParts = new Float64Array(keyRows);
    for (const [start, end] of splits(queryRows))
      if (queriesDivided)
        divideRowRangeBackward(gx, arrays.x, arrays.queryDivisors, D, queryParts, start, end);
    for (const [start, end] of splits(keyRows))
      if (keysDivided) divideRowRangeBackward(gy, arrays.y, arrays.keyDivisors, D, keyParts, start, end);
    const norms = sumNormGradients(whole, shape, resolved, queryParts, keyParts, dsigma);
    const dq = new Float64Array(queryRows * D);
    const dk32 = new Float32Array(keyRows * D);
    const finishQueries = (out: Float64Array | Float32Array, start: number, end: number) =>
      normAndCenterRowRangeBackward(
        gx,
        arrays.x,
        arrays.queryDivisors,
        arrays.queryNorms,
        norms.queries,
        D,
        arrays.centered,
        out,
        start,
        end,
      );
    for (const [start, end] of splits(queryRows)) finishQueries(dq, start, end);
    for (const [start, end] of splits(keyRows))
      normAndCenterRowRangeBackward(
        gy,
        arrays.y,
        arrays.keyDivisors,
        arrays.keyNorms,
        norms.keys,
        D,
        arrays.centered,
        dk32,
        start,
        end,
      );
    expect(Array.from(dq)).toEqual(Array.from(wholeGradients.dq));
    expect(Array.from(dk32)).toEqual(Array.from(wholeGradients.dk, Math.fround));

    // One range writes its rows and no other.
    const rowNorms = new Float64Array(queryRows);
    onlyItsRows(
      rowNorms,
      queryRows,
      (start, end) =>
        rowStatsRange(q.data, D, arrays.centered, new Float64Array(queryRows), rowNorms, start, end),
      1,
    );
    const x = new Float64Array(queryRows * D);
    onlyItsRows(x, queryRows, (start, end) =>
      centerDivideRowRange(q.data, arrays.queryMeans, arrays.queryDivisors, D, x, start, end),
    );
    const inPlace = dx.slice();
    onlyItsRows(inPlace, queryRows, (start, end) => {
      const before = dx.slice();
      inPlace.set(before);
      divideRowRangeBackward(inPlace, arrays.x, arrays.queryDivisors, D, queryParts, start, end);
      // Rows outside the range must be untouched: mark them after the step to check it.
      for (let i = 0; i < inPlace.length; i++) {
        const row = Math.floor(i / D);
        if (row < start || row >= end) {
          expect(inPlace[i]).toBe(before[i]);
          inPlace[i] = Number.NaN;
        }
      }
    });
    const out = new Float32Array(queryRows * D);
    onlyItsRows(out, queryRows, (start, end) => finishQueries(out, start, end));
  });
});
