import { afterAll, describe, expect, it } from 'vitest';
import {
  type AttentionPath,
  createFastmax,
  type FastmaxOptions,
  type HostTensor,
  hostTensor,
  isFastmaxError,
  type Normalization,
  type Order,
  planAttention,
  resolveOptions,
  type Shape4,
  validateAttentionInputs,
} from '../src/index.js';
import { referenceBackend, referenceBackwardPass, referenceForward } from '../src/reference/backend.js';
import { referenceAttention, referenceBackward } from '../src/reference/oracle.js';

/**
 * Tolerances.
 * - Float64 paths (factorized, direct, oracle) differ only in summation order: the factorized path
 *   sums F monomial products instead of N pair weights. With inputs in [-1, 1], |s| <= 1 after
 *   normalization and the a_l of exp, every term is O(1), so the rounding error is ~1e-15 times a
 *   few thousand terms. 1e-10 of the largest entry leaves headroom while still catching any wrong
 *   mask, chunk boundary or missing term (those show up at 1e-3 or more).
 * - Float32 outputs: a correct float32 result is the float64 value rounded to nearest, so it is within
 *   half an ulp (2^-24 relative) of it; we allow 2^-24·|value| plus 1e-11 of the tensor's largest
 *   entry for the float64 differences above.
 */
const FLOAT64_TOLERANCE = 1e-10;
const HALF_ULP = 2 ** -24;

const worst = { forward: 0, backward: 0, state: 0 };
afterAll(() => {
  console.log(
    `largest relative errors vs the oracle: forward ${worst.forward.toExponential(2)}, backward ${worst.backward.toExponential(2)}, state (float32) ${worst.state.toExponential(2)}`,
  );
});

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

function randomTensor(random: () => number, shape: Shape4): HostTensor {
  const size = shape[0] * shape[1] * shape[2] * shape[3];
  return hostTensor(shape, Float32Array.from({ length: size }, random));
}

/** max |actual - expected| / max |expected| (absolute when expected is all zeros). */
function relativeError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  expect(actual.length).toBe(expected.length);
  let largest = 0;
  let difference = 0;
  for (let i = 0; i < expected.length; i++) {
    largest = Math.max(largest, Math.abs(expected[i]!));
    difference = Math.max(difference, Math.abs(actual[i]! - expected[i]!));
  }
  return largest > 0 ? difference / largest : difference;
}

function expectFloat64Close(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  kind: 'forward' | 'backward',
): void {
  const error = relativeError(actual, expected);
  worst[kind] = Math.max(worst[kind], error);
  expect(error).toBeLessThanOrEqual(FLOAT64_TOLERANCE);
}

/** Each float32 entry must be the float64 value rounded to nearest, up to float64 noise. */
function expectFloat32Rounding(actual: Float32Array, expected: ArrayLike<number>): number {
  expect(actual.length).toBe(expected.length);
  let largest = 0;
  for (let i = 0; i < expected.length; i++) largest = Math.max(largest, Math.abs(expected[i]!));
  for (let i = 0; i < expected.length; i++) {
    const allowed = HALF_ULP * Math.abs(expected[i]!) + 1e-11 * largest;
    const error = Math.abs(actual[i]! - expected[i]!);
    expect(error, `entry ${i}`).toBeLessThanOrEqual(allowed);
  }
  return largest > 0 ? relativeError(actual, expected) : 0;
}

interface Case {
  readonly name: string;
  readonly shape: { B: number; H: number; Hkv: number; N: number; M: number; D: number; Dv: number };
  readonly keyLengths?: readonly number[];
}

const CASES: readonly Case[] = [
  { name: 'one token, D = 1', shape: { B: 1, H: 1, Hkv: 1, N: 1, M: 1, D: 1, Dv: 1 } },
  { name: 'N = 2, D = 16, Dv = 3', shape: { B: 1, H: 1, Hkv: 1, N: 2, M: 2, D: 16, Dv: 3 } },
  {
    name: 'GQA 4:2, padding, N = 7, D = 3, Dv = 2',
    shape: { B: 2, H: 4, Hkv: 2, N: 7, M: 7, D: 3, Dv: 2 },
    keyLengths: [7, 4],
  },
  {
    name: 'cross N = 7 < M = 12, padding, MQA',
    shape: { B: 2, H: 2, Hkv: 1, N: 7, M: 12, D: 3, Dv: 5 },
    keyLengths: [12, 9],
  },
  {
    name: 'cross N = 9 > M = 4 (early causal rows see no key)',
    shape: { B: 1, H: 2, Hkv: 2, N: 9, M: 4, D: 3, Dv: 2 },
  },
  { name: 'N = 65, D = 3, Dv = 4, MQA', shape: { B: 1, H: 2, Hkv: 1, N: 65, M: 65, D: 3, Dv: 4 } },
  { name: 'N = 65, D = 16, Dv = 5', shape: { B: 1, H: 1, Hkv: 1, N: 65, M: 65, D: 16, Dv: 5 } },
];

const ORDERS: readonly Order[] = [1, 2, 3, 4];

function normalizationsFor(D: number): readonly Normalization[] {
  // |q·k| <= D for entries in [-1, 1]: this scale keeps |s| <= 0.5, like the normalized modes.
  return ['max-norm', 'prefix-max-norm', 'l2', { scale: 0.5 / D }];
}

function describeNormalization(normalization: Normalization): string {
  return typeof normalization === 'string' ? normalization : `scale ${normalization.scale.toPrecision(3)}`;
}

/** Chunk sizes to try: 1 (every key through the state but its own), a few odd ones, and > N. */
function chunkSizesFor(N: number, causal: boolean): readonly (number | undefined)[] {
  if (!causal) return [undefined];
  return [...new Set([1, 3, 16, N + 5])].filter((C) => C <= N + 5);
}

function inputsFor(testCase: Case, seed: number) {
  const random = randomSource(seed);
  const { B, H, Hkv, N, M, D, Dv } = testCase.shape;
  return {
    q: randomTensor(random, [B, H, N, D]),
    k: randomTensor(random, [B, Hkv, M, D]),
    v: randomTensor(random, [B, Hkv, M, Dv]),
    dOut: randomTensor(random, [B, H, N, Dv]),
  };
}

/** Resolves and plans as createFastmax does, with the path forced. */
function planned(q: HostTensor, k: HostTensor, v: HostTensor, options: FastmaxOptions, path: AttentionPath) {
  const resolved = resolveOptions({ ...options, path });
  const shape = validateAttentionInputs(q, k, v, resolved);
  const plan = planAttention(shape, resolved);
  expect(plan.path).toBe(path);
  return { resolved, shape, plan };
}

function forward64(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  options: FastmaxOptions,
  path: AttentionPath,
) {
  const { resolved, shape, plan } = planned(q, k, v, options, path);
  return referenceForward(q, k, v, shape, resolved, plan);
}

function backward64(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  dOut: HostTensor,
  options: FastmaxOptions,
  path: AttentionPath,
) {
  const { resolved, shape, plan } = planned(q, k, v, options, path);
  return referenceBackwardPass(q, k, v, dOut, shape, resolved, plan);
}

describe('referenceForward: factorized == direct == oracle (float64)', () => {
  CASES.forEach((testCase, caseIndex) => {
    it(testCase.name, () => {
      const { q, k, v } = inputsFor(testCase, 100 + caseIndex);
      for (const order of ORDERS) {
        for (const normalization of normalizationsFor(testCase.shape.D)) {
          for (const causal of [false, true]) {
            const options: FastmaxOptions = {
              order,
              normalization,
              causal,
              ...(testCase.keyLengths === undefined ? {} : { keyLengths: testCase.keyLengths }),
            };
            const label = `p=${order} ${describeNormalization(normalization)} causal=${causal}`;
            const oracle = referenceAttention(q, k, v, options);
            const direct = forward64(q, k, v, options, 'direct');
            expect(direct.degenerateRows, label).toBe(oracle.degenerateRows);
            expectFloat64Close(direct.output, oracle.output, 'forward');
            expectFloat64Close(direct.denominators, oracle.denominators, 'forward');
            for (const chunkSize of chunkSizesFor(testCase.shape.N, causal)) {
              const chunked = chunkSize === undefined ? options : { ...options, chunkSize };
              const factorized = forward64(q, k, v, chunked, 'factorized');
              expect(factorized.degenerateRows, `${label} C=${chunkSize}`).toBe(oracle.degenerateRows);
              expectFloat64Close(factorized.output, oracle.output, 'forward');
              expectFloat64Close(factorized.denominators, oracle.denominators, 'forward');
            }
          }
        }
      }
    });
  });

  it('counts the rows that see no key as degenerate, with exact zeros', () => {
    const testCase = CASES[4]!; // N = 9 > M = 4, causal: rows 0..4 see no key
    const { q, k, v } = inputsFor(testCase, 7);
    for (const path of ['factorized', 'direct'] as const) {
      const result = forward64(q, k, v, { causal: true, keyLengths: [4], chunkSize: 2 }, path);
      expect(result.degenerateRows).toBe(2 * 5);
      for (let row = 0; row < 5; row++) {
        expect(Array.from(result.output.subarray(row * 2, row * 2 + 2))).toEqual([0, 0]);
      }
    }
    const noKeys = forward64(q, k, v, { keyLengths: [0] }, 'factorized');
    expect(noKeys.degenerateRows).toBe(2 * 9);
    expect(noKeys.output.every((value) => value === 0)).toBe(true);
  });

  it('counts rows with a negative denominator (p = 1, s = -2) as degenerate', () => {
    const q = hostTensor([1, 1, 2, 1], Float32Array.from([1, 1]));
    const k = hostTensor([1, 1, 2, 1], Float32Array.from([-1, 0.5]));
    const v = hostTensor([1, 1, 2, 1], Float32Array.from([3, 4]));
    // Row 0 sees key 0 only: f(-2) = -1. Row 1 sees both: f(-2) + f(1) = 1 > 0.
    const options: FastmaxOptions = { order: 1, normalization: { scale: 2 }, causal: true };
    for (const path of ['factorized', 'direct'] as const) {
      const result = forward64(q, k, v, options, path);
      expect(result.degenerateRows).toBe(1);
      expect(result.output[0]).toBe(0);
      expect(result.output[1]).toBeCloseTo((-1 * 3 + 2 * 4) / 1, 12);
    }
    expect(referenceAttention(q, k, v, options).degenerateRows).toBe(1);
  });

  it('follows temperature and custom coefficients', () => {
    const testCase = CASES[3]!;
    const { q, k, v } = inputsFor(testCase, 8);
    const options: FastmaxOptions = {
      order: 3,
      coefficients: [1, 0.9, 0.4, 0.1],
      temperature: 0.7,
      causal: true,
      keyLengths: testCase.keyLengths!,
      chunkSize: 4,
    };
    const oracle = referenceAttention(q, k, v, options);
    expectFloat64Close(forward64(q, k, v, options, 'factorized').output, oracle.output, 'forward');
  });
});

describe('referenceBackwardPass: factorized == direct == referenceBackward (float64)', () => {
  const backwardCases = [CASES[0]!, CASES[2]!, CASES[3]!, CASES[4]!, CASES[5]!];
  backwardCases.forEach((testCase, caseIndex) => {
    it(testCase.name, () => {
      const { q, k, v, dOut } = inputsFor(testCase, 200 + caseIndex);
      for (const order of ORDERS) {
        for (const normalization of normalizationsFor(testCase.shape.D)) {
          for (const causal of [false, true]) {
            const options: FastmaxOptions = {
              order,
              normalization,
              causal,
              ...(testCase.keyLengths === undefined ? {} : { keyLengths: testCase.keyLengths }),
            };
            const oracle = referenceBackward(q, k, v, dOut, options);
            const direct = backward64(q, k, v, dOut, options, 'direct');
            const runs = [direct];
            for (const chunkSize of chunkSizesFor(testCase.shape.N, causal)) {
              runs.push(
                backward64(
                  q,
                  k,
                  v,
                  dOut,
                  chunkSize === undefined ? options : { ...options, chunkSize },
                  'factorized',
                ),
              );
            }
            for (const run of runs) {
              expectFloat64Close(run.dq, oracle.dq, 'backward');
              expectFloat64Close(run.dk, oracle.dk, 'backward');
              expectFloat64Close(run.dv, oracle.dv, 'backward');
            }
          }
        }
      }
    });
  });

  it('D = 16, order 4, causal with chunks: the largest feature map', () => {
    const testCase: Case = { name: 'D16', shape: { B: 1, H: 2, Hkv: 1, N: 20, M: 20, D: 16, Dv: 3 } };
    const { q, k, v, dOut } = inputsFor(testCase, 300);
    for (const normalization of normalizationsFor(16)) {
      const options: FastmaxOptions = { order: 4, normalization, causal: true, chunkSize: 6 };
      const oracle = referenceBackward(q, k, v, dOut, options);
      const factorized = backward64(q, k, v, dOut, options, 'factorized');
      expectFloat64Close(factorized.dq, oracle.dq, 'backward');
      expectFloat64Close(factorized.dk, oracle.dk, 'backward');
      expectFloat64Close(factorized.dv, oracle.dv, 'backward');
    }
  });

  it('passes no gradient through degenerate rows', () => {
    const q = hostTensor([1, 1, 2, 1], Float32Array.from([1, 1]));
    const k = hostTensor([1, 1, 2, 1], Float32Array.from([-1, 0.5]));
    const v = hostTensor([1, 1, 2, 1], Float32Array.from([3, 4]));
    const dOut = hostTensor([1, 1, 2, 1], Float32Array.from([5, 1]));
    const options: FastmaxOptions = { order: 1, normalization: { scale: 2 }, causal: true };
    const oracle = referenceBackward(q, k, v, dOut, options);
    for (const path of ['factorized', 'direct'] as const) {
      const result = backward64(q, k, v, dOut, options, path);
      expect(result.dq[0]).toBe(0);
      expectFloat64Close(result.dq, oracle.dq, 'backward');
      expectFloat64Close(result.dk, oracle.dk, 'backward');
      expectFloat64Close(result.dv, oracle.dv, 'backward');
    }
  });
});

describe('referenceBackend through createFastmax', () => {
  it('declares every capability and is always available', async () => {
    const backend = referenceBackend();
    expect(backend.name).toBe('reference');
    expect(backend.specVersion).toBe(1);
    expect(backend.capabilities).toEqual({
      orders: [1, 2, 3, 4],
      normalizations: ['max-norm', 'prefix-max-norm', 'l2', 'scale'],
      maxHeadDim: 256,
      causal: true,
      keyPadding: true,
      groupedQuery: true,
      crossAttention: true,
      backward: true,
      state: true,
      dtypes: ['float32'],
      paths: ['factorized', 'direct'],
      deviceTensors: false,
    });
    expect(await backend.isAvailable()).toEqual({ available: true });
  });

  it('attention and backward return float32 tensors rounded from the oracle', async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const testCase = CASES[3]!;
    const { q, k, v, dOut } = inputsFor(testCase, 400);
    for (const path of ['factorized', 'direct'] as const) {
      for (const causal of [false, true]) {
        const options = { order: 2 as const, causal, keyLengths: testCase.keyLengths!, path, chunkSize: 3 };
        const result = await fm.attention(q, k, v, options);
        expect(result.backend).toBe('reference');
        expect(result.plan.path).toBe(path);
        expect(result.output.shape).toEqual([2, 2, 7, 5]);
        const output = (result.output as HostTensor).data;
        expect(output).toBeInstanceOf(Float32Array);
        expectFloat32Rounding(output, referenceAttention(q, k, v, options).output);

        const gradients = await fm.backward(q, k, v, dOut, options);
        const oracle = referenceBackward(q, k, v, dOut, options);
        expect(gradients.dq.shape).toEqual([2, 2, 7, 3]);
        expect(gradients.dk.shape).toEqual([2, 1, 12, 3]);
        expect(gradients.dv.shape).toEqual([2, 1, 12, 5]);
        expectFloat32Rounding((gradients.dq as HostTensor).data, oracle.dq);
        expectFloat32Rounding((gradients.dk as HostTensor).data, oracle.dk);
        expectFloat32Rounding((gradients.dv as HostTensor).data, oracle.dv);
      }
    }
    await fm.dispose();
  });

  it('reports degenerate rows, and throws DEGENERATE_DENOMINATOR when asked to', async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const testCase = CASES[2]!;
    const { q, k, v } = inputsFor(testCase, 401);
    const result = await fm.attention(q, k, v, { keyLengths: [0, 4] });
    expect(result.degenerateRows).toBe(4 * 7);
    const output = (result.output as HostTensor).data;
    expect(output.subarray(0, 4 * 7 * 2).every((value) => value === 0)).toBe(true);
    await expect(
      fm.attention(q, k, v, { keyLengths: [0, 4], onDegenerateRow: 'throw' }),
    ).rejects.toMatchObject({
      code: 'DEGENERATE_DENOMINATOR',
    });
  });

  it('plans large head dims onto the direct path, and refuses a forced factorized one it cannot hold', async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const testCase: Case = { name: 'D256', shape: { B: 1, H: 1, Hkv: 1, N: 3, M: 3, D: 256, Dv: 4 } };
    const { q, k, v } = inputsFor(testCase, 402);
    const result = await fm.attention(q, k, v, { order: 4, causal: true });
    expect(result.plan.path).toBe('direct');
    expectFloat32Rounding(
      (result.output as HostTensor).data,
      referenceAttention(q, k, v, { order: 4, causal: true }).output,
    );
    try {
      await fm.attention(q, k, v, { order: 4, path: 'factorized' });
      expect.unreachable('D = 256, p = 4 has 1.8e8 features');
    } catch (error) {
      expect(isFastmaxError(error, 'RESOURCE_EXHAUSTED')).toBe(true);
    }
  });
});

describe('referenceBackend state: stepping == parallel causal attention', () => {
  const stateShape = { B: 2, H: 4, Hkv: 2, D: 3, Dv: 2 };
  const tokens = 8;

  async function stepAll(
    normalization: 'prefix-max-norm' | { scale: number },
    order: Order,
    stepSize: number,
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
  ) {
    const fm = await createFastmax({ backend: referenceBackend() });
    const { B, H, Hkv, D, Dv } = stateShape;
    const state = await fm.createState({
      batch: B,
      heads: H,
      kvHeads: Hkv,
      headDim: D,
      valueDim: Dv,
      order,
      normalization,
    });
    const output = new Float32Array(B * H * tokens * Dv);
    let degenerateRows = 0;
    for (let start = 0; start < tokens; start += stepSize) {
      const T = Math.min(stepSize, tokens - start);
      const slice = (tensor: HostTensor, heads: number, width: number) => {
        const data = new Float32Array(B * heads * T * width);
        for (let row = 0; row < B * heads; row++) {
          data.set(
            tensor.data.subarray((row * tokens + start) * width, (row * tokens + start + T) * width),
            row * T * width,
          );
        }
        return hostTensor([B, heads, T, width], data);
      };
      const result = await state.step(slice(q, H, D), slice(k, Hkv, D), slice(v, Hkv, Dv));
      degenerateRows += result.degenerateRows;
      const stepped = (result.output as HostTensor).data;
      for (let row = 0; row < B * H; row++) {
        output.set(stepped.subarray(row * T * Dv, (row + 1) * T * Dv), (row * tokens + start) * Dv);
      }
      expect(state.tokens).toBe(start + T);
    }
    return { fm, state, output, degenerateRows };
  }

  const normalizations: readonly ('prefix-max-norm' | { scale: number })[] = [
    'prefix-max-norm',
    { scale: 0.4 },
  ];
  for (const normalization of normalizations) {
    for (const stepSize of [1, 3]) {
      it(`${describeNormalization(normalization)}, steps of ${stepSize}, orders 1-4`, async () => {
        const random = randomSource(500 + stepSize);
        const { B, H, Hkv, D, Dv } = stateShape;
        const q = randomTensor(random, [B, H, tokens, D]);
        const k = randomTensor(random, [B, Hkv, tokens, D]);
        const v = randomTensor(random, [B, Hkv, tokens, Dv]);
        for (const order of ORDERS) {
          const { fm, output, degenerateRows } = await stepAll(normalization, order, stepSize, q, k, v);
          const options = { order, normalization, causal: true };
          const oracle = referenceAttention(q, k, v, options);
          expect(degenerateRows).toBe(oracle.degenerateRows);
          worst.state = Math.max(worst.state, expectFloat32Rounding(output, oracle.output));
          const parallel = await fm.attention(q, k, v, { ...options, chunkSize: 3 });
          // Both are float32 roundings of float64 values that agree to ~1e-13: equal or adjacent floats.
          const parallelOutput = (parallel.output as HostTensor).data;
          output.forEach((value, i) => {
            expect(Math.abs(value - parallelOutput[i]!)).toBeLessThanOrEqual(
              2 * HALF_ULP * Math.abs(parallelOutput[i]!) + 1e-12,
            );
          });
        }
      });
    }
  }

  it('D = 16, order 2, prefix-max-norm, token by token', async () => {
    const random = randomSource(600);
    const q = randomTensor(random, [1, 1, 12, 16]);
    const k = randomTensor(random, [1, 1, 12, 16]);
    const v = randomTensor(random, [1, 1, 12, 5]);
    const state = referenceBackend().createState!({
      batch: 1,
      heads: 1,
      kvHeads: 1,
      headDim: 16,
      valueDim: 5,
      options: resolveOptions({ causal: true, normalization: 'prefix-max-norm', order: 2 }),
    });
    const backendState = await state;
    const output = new Float32Array(12 * 5);
    for (let t = 0; t < 12; t++) {
      const token = (tensor: HostTensor, width: number) =>
        hostTensor([1, 1, 1, width], tensor.data.slice(t * width, (t + 1) * width));
      const result = await backendState.step(token(q, 16), token(k, 16), token(v, 5));
      output.set((result.output as HostTensor).data, t * 5);
    }
    worst.state = Math.max(
      worst.state,
      expectFloat32Rounding(output, referenceAttention(q, k, v, { causal: true, order: 2 }).output),
    );
  });

  it('reset() starts over, tokens counts, dispose() refuses further steps', async () => {
    const random = randomSource(700);
    const { B, H, Hkv, D, Dv } = stateShape;
    const q = randomTensor(random, [B, H, tokens, D]);
    const k = randomTensor(random, [B, Hkv, tokens, D]);
    const v = randomTensor(random, [B, Hkv, tokens, Dv]);
    const first = await stepAll('prefix-max-norm', 2, 3, q, k, v);
    expect(first.state.tokens).toBe(tokens);
    first.state.reset();
    expect(first.state.tokens).toBe(0);
    const whole = await first.state.step(q, k, v);
    expect(Array.from((whole.output as HostTensor).data)).toEqual(Array.from(first.output));
    first.state.dispose();
    await expect(first.state.step(q, k, v)).rejects.toMatchObject({ code: 'DISPOSED' });
  });

  it('counts degenerate rows while decoding (p = 1, s = -2)', async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const config = { batch: 1, heads: 1, headDim: 1, order: 1 as const, normalization: { scale: 2 } };
    const state = await fm.createState(config);
    const one = (value: number) => hostTensor([1, 1, 1, 1], Float32Array.from([value]));
    const first = await state.step(one(1), one(-1), one(3));
    expect(first.degenerateRows).toBe(1);
    expect((first.output as HostTensor).data[0]).toBe(0);
    // Second token: f(-2)·3 + f(1)·4 over f(-2) + f(1) = (-3 + 8) / 1.
    const second = await state.step(one(1), one(0.5), one(4));
    expect(second.degenerateRows).toBe(0);
    expect((second.output as HostTensor).data[0]).toBeCloseTo(5, 6);
    const strict = await fm.createState({ ...config, onDegenerateRow: 'throw' });
    await expect(strict.step(one(1), one(-1), one(3))).rejects.toMatchObject({
      code: 'DEGENERATE_DENOMINATOR',
    });
  });
});
