import { afterAll, describe, expect, it } from 'vitest';
import { FastmaxError, type FastmaxOptions, type HostTensor, type Order, type Shape4 } from '../src/index.js';
import { referenceAttention, referenceBackward } from '../src/reference/oracle.js';
import { softmaxAttention } from '../src/reference/softmax.js';
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

function expectCloseArray(actual: ArrayLike<number>, expected: readonly number[], digits = 14): void {
  expect(actual.length).toBe(expected.length);
  expected.forEach((value, index) => {
    expect(actual[index]).toBeCloseTo(value, digits);
  });
}

function expectFastmaxError(run: () => unknown, code: string, argument: string): void {
  try {
    run();
  } catch (error) {
    expect(error).toBeInstanceOf(FastmaxError);
    expect((error as FastmaxError).code).toBe(code);
    expect((error as FastmaxError).argument).toBe(argument);
    return;
  }
  throw new Error(`expected FastmaxError ${code}`);
}

describe('referenceAttention on hand-computed cases', () => {
  it('N = M = 1: a single visible key is copied whatever its weight', () => {
    // q·k = 1·3 + 2·(−1) = 1, s = 0.5, f(s) = 1 + 0.5 + 0.125 = 1.625, A = 1.625/1.625 = 1, o = v.
    const result = referenceAttention(
      tensorOf([1, 1, 1, 2], [1, 2]),
      tensorOf([1, 1, 1, 2], [3, -1]),
      tensorOf([1, 1, 1, 2], [4, -3]),
      { normalization: { scale: 0.5 } },
      { returnAttention: true },
    );
    expect(Array.from(result.output)).toEqual([4, -3]);
    expect(Array.from(result.denominators)).toEqual([1.625]);
    expect(Array.from(result.attention ?? [])).toEqual([1]);
    expect(result.degenerateRows).toBe(0);
    expect(result.shape).toEqual({
      batch: 1,
      heads: 1,
      kvHeads: 1,
      queryLength: 1,
      keyLength: 1,
      headDim: 2,
      valueDim: 2,
    });
  });

  // D = Dv = 1, scale 1: q = [1, −0.5], k = [0.5, 0.25], v = [2, 6].
  const q = tensorOf([1, 1, 2, 1], [1, -0.5]);
  const k = tensorOf([1, 1, 2, 1], [0.5, 0.25]);
  const v = tensorOf([1, 1, 2, 1], [2, 6]);

  it('N = 2, order 1', () => {
    // Row 0: s = [0.5, 0.25], w = 1 + s = [1.5, 1.25], den = 2.75, o = (3 + 7.5)/2.75 = 42/11.
    // Row 1: s = [−0.25, −0.125], w = [0.75, 0.875], den = 1.625, o = (1.5 + 5.25)/1.625 = 54/13.
    const result = referenceAttention(
      q,
      k,
      v,
      { order: 1, normalization: { scale: 1 } },
      { returnAttention: true },
    );
    expectCloseArray(result.output, [42 / 11, 54 / 13]);
    expectCloseArray(result.denominators, [2.75, 1.625]);
    expectCloseArray(result.attention ?? [], [1.5 / 2.75, 1.25 / 2.75, 0.75 / 1.625, 0.875 / 1.625]);
  });

  it('N = 2, order 2 (default coefficients 1, 1, 1/2)', () => {
    // Row 0: w = [1 + 0.5 + 0.125, 1 + 0.25 + 0.03125] = [1.625, 1.28125], den = 2.90625,
    // o = (3.25 + 7.6875)/2.90625 = 350/93 (numerator and denominator times 32).
    // Row 1: w = [1 − 0.25 + 0.03125, 1 − 0.125 + 0.0078125] = [0.78125, 0.8828125], den = 1.6640625,
    // o = (1.5625 + 5.296875)/1.6640625 = 878/213 (times 128).
    const result = referenceAttention(q, k, v, { normalization: { scale: 1 } });
    expectCloseArray(result.output, [350 / 93, 878 / 213]);
    expectCloseArray(result.denominators, [2.90625, 1.6640625]);
  });

  it('N = 2, causal: row 0 sees only key 0', () => {
    // Row 0: one key, o = v_0 = 2, den = f(0.5) = 1.5. Row 1 sees both keys, as without the mask.
    const result = referenceAttention(q, k, v, { order: 1, normalization: { scale: 1 }, causal: true });
    expectCloseArray(result.output, [2, 54 / 13]);
    expectCloseArray(result.denominators, [1.5, 1.625]);
  });

  it('custom coefficients and temperature', () => {
    // f(s) = 2 − s, T = 2: row 0 s = [0.25, 0.125], w = [1.75, 1.875], den = 3.625,
    // o = (3.5 + 11.25)/3.625 = 118/29 (times 8).
    const result = referenceAttention(q, k, v, {
      order: 1,
      coefficients: [2, -1],
      normalization: { scale: 1 },
      temperature: 2,
    });
    expect(result.output[0]).toBeCloseTo(118 / 29, 14);
  });

  it('max-norm centers tokens and divides by the largest norm', () => {
    // c(q) = [1, −1] (norm √2), c(k) = [1, −1] and [−1, 1] (both √2, argmax the first):
    // x = [1, −1]/√2, y = ±[1, −1]/√2, s = ±1, f(1) = 2.5, f(−1) = 0.5, A = [5/6, 1/6], o = 5/6·6 = 5.
    const result = referenceAttention(
      tensorOf([1, 1, 1, 2], [1, -1]),
      tensorOf([1, 1, 2, 2], [2, 0, 0, 2]),
      tensorOf([1, 1, 2, 1], [6, 0]),
      { normalization: 'max-norm' },
      { returnAttention: true },
    );
    expectCloseArray(result.attention ?? [], [5 / 6, 1 / 6]);
    expectCloseArray(result.output, [5]);
    expectCloseArray(result.denominators, [3]);
  });
});

describe('degenerate rows', () => {
  it('p = 1, s = −1 gives f(s) = 0 exactly: output 0, counted', () => {
    const result = referenceAttention(
      tensorOf([1, 1, 1, 1], [1]),
      tensorOf([1, 1, 1, 1], [-1]),
      tensorOf([1, 1, 1, 3], [5, 6, 7]),
      { order: 1, normalization: { scale: 1 } },
      { returnAttention: true },
    );
    expect(Array.from(result.output)).toEqual([0, 0, 0]);
    expect(Array.from(result.attention ?? [])).toEqual([0]);
    expect(Array.from(result.denominators)).toEqual([0]);
    expect(result.degenerateRows).toBe(1);
  });

  it('a negative denominator is degenerate too, and its gradients are 0', () => {
    // f(s) = 1 + s with s = 2·(−1)·1 = −2 gives den = −1.
    const args = [
      tensorOf([1, 1, 1, 1], [-1]),
      tensorOf([1, 1, 1, 1], [1]),
      tensorOf([1, 1, 1, 1], [3]),
    ] as const;
    const options: FastmaxOptions = { order: 1, normalization: { scale: 2 } };
    const result = referenceAttention(...args, options);
    expect(result.denominators[0]).toBe(-1);
    expect(result.degenerateRows).toBe(1);
    expect(Array.from(result.output)).toEqual([0]);
    const grads = referenceBackward(...args, tensorOf([1, 1, 1, 1], [1]), options);
    expect([...grads.dq, ...grads.dk, ...grads.dv]).toEqual([0, 0, 0]);
  });

  it('keyLengths = 0 makes every row of that batch degenerate', () => {
    const random = seededRandom(5);
    const q = dyadicTensor([2, 3, 4, 2], random);
    const k = dyadicTensor([2, 3, 5, 2], random);
    const v = dyadicTensor([2, 3, 5, 2], random);
    const result = referenceAttention(q, k, v, { keyLengths: [0, 5] });
    expect(result.degenerateRows).toBe(3 * 4);
    expect(maxAbs(result.output.subarray(0, 3 * 4 * 2))).toBe(0);
    expect(maxAbs(result.output.subarray(3 * 4 * 2))).toBeGreaterThan(0);
  });

  it('causal with M < N: the first N − M rows see no key', () => {
    // keyLimit(i) = min(M, i + M − N + 1) = i − 1 for N = 4, M = 2: rows 0, 1 see nothing, row 2 sees key 0.
    const random = seededRandom(6);
    const q = dyadicTensor([1, 2, 4, 3], random);
    const k = dyadicTensor([1, 2, 2, 3], random);
    const v = dyadicTensor([1, 2, 2, 2], random);
    const result = referenceAttention(q, k, v, { causal: true }, { returnAttention: true });
    expect(result.degenerateRows).toBe(2 * 2);
    for (let h = 0; h < 2; h++) {
      const rows = result.output.subarray(h * 8, h * 8 + 8);
      expect(Array.from(rows.subarray(0, 4))).toEqual([0, 0, 0, 0]);
      // A single visible key has weight exactly 1.
      expect(Array.from(rows.subarray(4, 6))).toEqual(Array.from(v.data.subarray(h * 4, h * 4 + 2)));
      const attention = result.attention!.subarray(h * 8, h * 8 + 8);
      expect(Array.from(attention)).toEqual([0, 0, 0, 0, 1, 0, attention[6]!, attention[7]!]);
      expect(attention[6]! + attention[7]!).toBeCloseTo(1, 15);
    }
  });

  it('the oracle reports degenerate rows but leaves onDegenerateRow to the caller', () => {
    const result = referenceAttention(
      tensorOf([1, 1, 1, 1], [1]),
      tensorOf([1, 1, 1, 1], [-1]),
      tensorOf([1, 1, 1, 1], [5]),
      { order: 1, normalization: { scale: 1 }, onDegenerateRow: 'throw' },
    );
    expect(result.degenerateRows).toBe(1);
  });
});

describe('masks and heads', () => {
  const random = seededRandom(8);
  const q = tieFreeTensor([2, 4, 5, 3], random);
  const k = tieFreeTensor([2, 2, 6, 3], random);
  const v = dyadicTensor([2, 2, 6, 2], random);
  const dOut = dyadicTensor([2, 4, 5, 2], random);
  const normalizations = ['max-norm', 'prefix-max-norm', 'l2', { scale: 0.4 }] as const;

  it.each(normalizations)('padded keys contribute nothing (%o)', (normalization) => {
    const options: FastmaxOptions = { normalization, keyLengths: [4, 6], causal: true };
    const scrambled = (tensor: HostTensor): HostTensor => {
      const data = Float32Array.from(tensor.data);
      const [, heads, length, dim] = tensor.shape;
      // Batch 0, keys 4 and 5 are padding: give them huge values (largest norm, far from the rest).
      for (let h = 0; h < heads; h++) {
        for (let j = 4; j < length; j++)
          for (let d = 0; d < dim; d++) data[(h * length + j) * dim + d] = 50 * (d + 1) - 7 * j;
      }
      return { shape: tensor.shape, data };
    };
    const plain = referenceAttention(q, k, v, options, { returnAttention: true });
    const changed = referenceAttention(q, scrambled(k), scrambled(v), options);
    expect(Array.from(changed.output)).toEqual(Array.from(plain.output));
    for (let h = 0; h < 4; h++) {
      for (let i = 0; i < 5; i++) {
        const row = plain.attention!.subarray((h * 5 + i) * 6, (h * 5 + i + 1) * 6);
        expect([row[4], row[5]]).toEqual([0, 0]);
      }
    }
    const grads = referenceBackward(q, k, v, dOut, options);
    for (let h = 0; h < 2; h++) {
      expect(Array.from(grads.dk.subarray((h * 6 + 4) * 3, (h * 6 + 6) * 3))).toEqual([0, 0, 0, 0, 0, 0]);
      expect(Array.from(grads.dv.subarray((h * 6 + 4) * 2, (h * 6 + 6) * 2))).toEqual([0, 0, 0, 0]);
    }
    expect(maxAbs(grads.dk)).toBeGreaterThan(0);
  });

  it.each(normalizations)(
    'GQA equals running every query head on a repeated kv head (%o)',
    (normalization) => {
      const repeat = (tensor: HostTensor): HostTensor => {
        const [B, Hkv, M, dim] = tensor.shape;
        const data = new Float32Array(B * 4 * M * dim);
        for (let b = 0; b < B; b++) {
          for (let h = 0; h < 4; h++) {
            const source = (b * Hkv + Math.floor(h / 2)) * M * dim;
            data.set(tensor.data.subarray(source, source + M * dim), (b * 4 + h) * M * dim);
          }
        }
        return { shape: [B, 4, M, dim], data };
      };
      const options: FastmaxOptions = { normalization, causal: true, keyLengths: [5, 6] };
      const grouped = referenceAttention(q, k, v, options);
      const repeated = referenceAttention(q, repeat(k), repeat(v), options);
      // Same scores, same order of operations: identical bits.
      expect(Array.from(grouped.output)).toEqual(Array.from(repeated.output));
      expect(grouped.degenerateRows).toBe(repeated.degenerateRows);
      // The kv gradient of a group is the sum over its query heads (summation order differs: 1e-14).
      const groupedGrads = referenceBackward(q, k, v, dOut, options);
      const repeatedGrads = referenceBackward(q, repeat(k), repeat(v), dOut, options);
      expect(scaledError(groupedGrads.dq, repeatedGrads.dq)).toBeLessThan(1e-14);
      const summed = (values: Float64Array, dim: number): Float64Array => {
        const out = new Float64Array(2 * 2 * 6 * dim);
        for (let b = 0; b < 2; b++) {
          for (let h = 0; h < 4; h++) {
            for (let e = 0; e < 6 * dim; e++)
              out[(b * 2 + Math.floor(h / 2)) * 6 * dim + e]! += values[(b * 4 + h) * 6 * dim + e]!;
          }
        }
        return out;
      };
      // Every step from dy back to dk is linear in dy, so summing per-head key gradients is exact math.
      expect(scaledError(groupedGrads.dk, summed(repeatedGrads.dk, 3))).toBeLessThan(1e-13);
      expect(scaledError(groupedGrads.dv, summed(repeatedGrads.dv, 2))).toBeLessThan(1e-13);
    },
  );

  it('rows of the returned attention sum to 1 and reproduce the output', () => {
    const result = referenceAttention(
      q,
      k,
      v,
      { causal: true, keyLengths: [3, 6] },
      { returnAttention: true },
    );
    const attention = result.attention!;
    for (let row = 0; row < 2 * 4 * 5; row++) {
      let sum = 0;
      for (let j = 0; j < 6; j++) sum += attention[row * 6 + j]!;
      expect(sum).toBeCloseTo(1, 14);
    }
    expect('attention' in referenceAttention(q, k, v)).toBe(false);
  });
});

describe('referenceAttention rejects bad input with FastmaxErrors', () => {
  const ok = tensorOf([1, 1, 2, 2], [1, 2, 3, 4]);
  it('checks shapes, options and values like the core does', () => {
    expectFastmaxError(
      () => referenceAttention(ok, tensorOf([1, 1, 2, 3], [1, 2, 3, 4, 5, 6]), ok),
      'SHAPE_MISMATCH',
      'k.shape[3]',
    );
    expectFastmaxError(
      () => referenceAttention(ok, ok, ok, { order: 5 as Order }),
      'UNSUPPORTED_ORDER',
      'options.order',
    );
    expectFastmaxError(
      () => referenceAttention(ok, ok, ok, { keyLengths: [3] }),
      'INVALID_KEY_LENGTHS',
      'options.keyLengths[0]',
    );
    expectFastmaxError(
      () => referenceAttention(tensorOf([1, 1, 2, 2], [1, Number.NaN, 3, 4]), ok, ok),
      'NON_FINITE_INPUT',
      'q.data[1]',
    );
    expectFastmaxError(
      () => referenceAttention(tensorOf([1, 1, 0, 2], []), ok, ok),
      'INVALID_SHAPE',
      'q.shape[2]',
    );
    expectFastmaxError(
      () => referenceBackward(ok, ok, ok, tensorOf([1, 1, 1, 2], [1, 2])),
      'SHAPE_MISMATCH',
      'dOut.shape[2]',
    );
    const device = {
      location: 'device',
      backend: 'gpu',
      shape: [1, 1, 2, 2],
      dtype: 'float32',
    } as unknown as HostTensor;
    expectFastmaxError(() => referenceAttention(ok, device, ok), 'UNSUPPORTED_CAPABILITY', 'k');
    expectFastmaxError(() => referenceBackward(ok, ok, ok, device), 'UNSUPPORTED_CAPABILITY', 'dOut');
    expectFastmaxError(() => softmaxAttention(ok, ok, device), 'UNSUPPORTED_CAPABILITY', 'v');
    expectFastmaxError(() => softmaxAttention(ok, ok, ok, { scale: -1 }), 'INVALID_OPTION', 'options.scale');
    expectFastmaxError(
      () => softmaxAttention(ok, ok, ok, { causal: 1 as unknown as boolean }),
      'INVALID_OPTION',
      'options.causal',
    );
  });
});

describe('referenceBackward matches central finite differences of Σ dOut·output', () => {
  /**
   * Inputs are dyadic and tie-free (fixtures/numeric.ts), so every stencil point is an exact float32
   * input on the same side of every maximum. The five-point stencil at h = 2^-12 is accurate to about
   * 1e-11 of the gradient scale (FASTMAX_REPORT_ERRORS=1 prints the worst case: 5.6e-11 over these
   * 160 cases); 1e-8 keeps a margin of ~180, while a missing or wrong term is an O(1e-2..1) error.
   * No scenario sits on the degenerate boundary den = 0, where the output is discontinuous.
   */
  const tolerance = 1e-8;
  interface Scenario {
    readonly name: string;
    readonly q: Shape4;
    readonly kv: readonly [number, number, number];
    readonly dim: number;
    readonly valueDim: number;
    readonly keyLengths?: readonly number[];
  }
  const scenarios: Scenario[] = [
    { name: 'self-attention N = M = 4', q: [2, 2, 4, 3], kv: [2, 2, 4], dim: 3, valueDim: 2 },
    { name: 'padding', q: [2, 2, 4, 3], kv: [2, 2, 4], dim: 3, valueDim: 2, keyLengths: [2, 4] },
    { name: 'GQA 4 on 2', q: [1, 4, 4, 3], kv: [1, 2, 4], dim: 3, valueDim: 2 },
    { name: 'cross N = 3 < M = 5, MQA', q: [1, 2, 3, 3], kv: [1, 1, 5], dim: 3, valueDim: 3 },
    { name: 'cross N = 5 > M = 3', q: [2, 1, 5, 3], kv: [2, 1, 3], dim: 3, valueDim: 2, keyLengths: [3, 2] },
  ];
  const normalizations = ['max-norm', 'prefix-max-norm', 'l2', { scale: 0.25 }] as const;
  const cases = normalizations.flatMap((normalization) =>
    scenarios.flatMap((scenario) =>
      [false, true].flatMap((causal) =>
        ([1, 2, 3, 4] as const).map((order) => ({ normalization, scenario, causal, order })),
      ),
    ),
  );
  let worst = 0;

  it.each(cases)(
    '$normalization, $scenario.name, causal $causal, order $order',
    ({ normalization, scenario, causal, order }) => {
      const random = seededRandom(1000 + order * 17 + (causal ? 1 : 0) + scenario.q[2] * 3);
      const q = tieFreeTensor(scenario.q, random);
      const k = tieFreeTensor([...scenario.kv, scenario.dim], random);
      const v = dyadicTensor([...scenario.kv, scenario.valueDim], random);
      const dOut = dyadicTensor([scenario.q[0], scenario.q[1], scenario.q[2], scenario.valueDim], random);
      const options: FastmaxOptions = {
        normalization,
        order,
        causal,
        ...(scenario.keyLengths === undefined ? {} : { keyLengths: scenario.keyLengths }),
      };
      const loss = (): number => {
        return dotProduct(referenceAttention(q, k, v, options).output, dOut.data);
      };
      const analytic = referenceBackward(q, k, v, dOut, options);
      const numeric = {
        dq: finiteDifferenceGradient(q.data, loss),
        dk: finiteDifferenceGradient(k.data, loss),
        dv: finiteDifferenceGradient(v.data, loss),
      };
      for (const name of ['dq', 'dk', 'dv'] as const) {
        const error = scaledError(analytic[name], numeric[name]);
        worst = Math.max(worst, error);
        expect(error, name).toBeLessThan(tolerance);
      }
      expect(maxAbs(analytic.dq)).toBeGreaterThan(1e-3);
      expect(maxAbs(analytic.dv)).toBeGreaterThan(1e-3);
    },
  );

  afterAll(() => {
    if (process.env.FASTMAX_REPORT_ERRORS)
      console.info(`referenceBackward vs finite differences: worst ${worst.toExponential(2)}`);
  });
});

describe('softmaxAttention', () => {
  it('equal scores give uniform weights', () => {
    const q = tensorOf([1, 1, 2, 2], [0, 0, 0, 0]);
    const k = tensorOf([1, 1, 3, 2], [1, 2, -3, 4, 5, 6]);
    const v = tensorOf([1, 1, 3, 1], [1, 2, 6]);
    expectCloseArray(softmaxAttention(q, k, v).output, [3, 3], 15);
  });

  it('matches a hand case with the default scale 1/sqrt(D)', () => {
    // D = 4: q·k = [0, 4], scaled by 1/2: [0, 2], A = [1, e²]/(1 + e²), v = [0, 1] → o = e²/(1 + e²).
    const q = tensorOf([1, 1, 1, 4], [1, 1, 1, 1]);
    const k = tensorOf([1, 1, 2, 4], [0, 0, 0, 0, 1, 1, 1, 1]);
    const v = tensorOf([1, 1, 2, 1], [0, 1]);
    const e2 = Math.exp(2);
    expectCloseArray(softmaxAttention(q, k, v).output, [e2 / (1 + e2)], 15);
    expectCloseArray(softmaxAttention(q, k, v, { scale: 1 }).output, [Math.exp(4) / (1 + Math.exp(4))], 15);
  });

  it('is stable for huge scores (row maximum subtracted)', () => {
    // Scores 10000 and 9950: exp would overflow, but A = [1, e^-50]/(1 + e^-50).
    const out = softmaxAttention(
      tensorOf([1, 1, 1, 1], [100]),
      tensorOf([1, 1, 2, 1], [100, 99.5]),
      tensorOf([1, 1, 2, 1], [1, 3]),
      { scale: 1 },
    ).output;
    expect(out[0]).toBeCloseTo((1 + 3 * Math.exp(-50)) / (1 + Math.exp(-50)), 15);
  });

  it('uses the same causal, padding and GQA masks; rows that see nothing output 0', () => {
    // N = 3, M = 2, causal: keyLimit = [0, 1, 2]; batch 1 has one valid key.
    const q = tensorOf([2, 2, 3, 1], [1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2]);
    const k = tensorOf([2, 1, 2, 1], [0, 1, 0, 1]);
    const v = tensorOf([2, 1, 2, 1], [10, 20, 10, 20]);
    const out = softmaxAttention(q, k, v, { causal: true, keyLengths: [2, 1], scale: 1 }).output;
    const mix = (score: number): number => (10 + 20 * Math.exp(score)) / (1 + Math.exp(score));
    expectCloseArray(out, [0, 10, mix(1), 0, 10, mix(2), 0, 10, 10, 0, 10, 10], 13);
  });
});
