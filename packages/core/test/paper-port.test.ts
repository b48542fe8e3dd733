import { readFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import type { FastmaxOptions, HostTensor, Order, Shape4 } from '../src/index.js';
import { referenceAttention, referenceBackward } from '../src/reference/oracle.js';
import { scaledError } from './fixtures/numeric.js';

/**
 * Agreement with the FAST paper authors' implementation (fastattention_einops.py in
 * armingerami/reproducing_fastmax_results). scripts/paper-golden.py restates their factorized
 * forward, their `normalize` and their hand-derived backward in numpy float64 with the same einsum
 * subscripts, and writes the values this test reads, so CI needs no Python or PyTorch.
 *
 * Their code: q, k, v are [B, H, N, D], f(s) = 1 + s (+ s²/2), s = q·k / t with t = 8·sqrt(D) by
 * default, or t = 1 after `normalize` (center each token, divide the head by its largest token norm:
 * our 'max-norm'); mask = true is causal on top of that sequence-wide normalization.
 *
 * Tolerance: 1e-12 of the largest expected value. Both sides are float64 evaluations of the same
 * rational function of the same float32 inputs, in a different order (their moments, our direct
 * sums), so they differ by a few ulps (measured worst: 2.2e-16 forward, 2.8e-16 gradients;
 * FASTMAX_REPORT_ERRORS=1 prints it); a wrong term or a mask off by one key differs by more than 1e-3.
 */
const tolerance = 1e-12;

interface GoldenCase {
  readonly name: string;
  readonly normalization: 'scale' | 'max-norm';
  readonly order: Order;
  readonly causal: boolean;
  readonly shape: [number, number, number, number];
  readonly normalizeTerm: number;
  readonly q: number[];
  readonly k: number[];
  readonly v: number[];
  readonly dOut: number[];
  readonly output: number[];
  readonly dq: number[];
  readonly dk: number[];
  readonly dv: number[];
  readonly finiteDifferenceError: number;
  /** max-norm only: their forward and backward at their normalized q, k (rounded to float32), t = 1. */
  readonly normalized?: {
    readonly q: number[];
    readonly k: number[];
    readonly output: number[];
    readonly dq: number[];
    readonly dk: number[];
    readonly dv: number[];
  };
}

const golden = JSON.parse(readFileSync(new URL('./fixtures/paper-golden.json', import.meta.url), 'utf8')) as {
  readonly cases: GoldenCase[];
};

function tensor(shape: Shape4, values: readonly number[]): HostTensor {
  return { shape, data: Float32Array.from(values) };
}

let worstForward = 0;
let worstGradient = 0;
function expectAgreement(
  actual: Float64Array,
  expected: readonly number[],
  kind: 'forward' | 'gradient',
): void {
  const error = scaledError(actual, expected);
  if (kind === 'forward') worstForward = Math.max(worstForward, error);
  else worstGradient = Math.max(worstGradient, error);
  expect(error).toBeLessThan(tolerance);
}

afterAll(() => {
  if (process.env.FASTMAX_REPORT_ERRORS) {
    console.info(
      `paper port: worst forward ${worstForward.toExponential(2)}, gradient ${worstGradient.toExponential(2)}`,
    );
  }
});

describe('the golden file', () => {
  it('covers p = 1, 2, causal and not, both normalizations', () => {
    const keys = new Set(golden.cases.map((c) => `${c.normalization}/${c.order}/${c.causal}`));
    expect(keys.size).toBe(8);
  });
  it.each(golden.cases)(
    'their analytic backward agrees with finite differences of their forward ($name)',
    (c) => {
      // Checked by the generator with a five-point stencil at h = 1e-3 (error ~1e-12 expected).
      expect(c.finiteDifferenceError).toBeLessThan(1e-10);
    },
  );
  it.each(golden.cases)('inputs are exact float32 values, so both sides see the same point ($name)', (c) => {
    for (const values of [c.q, c.k, c.v, c.dOut, c.normalized?.q ?? [], c.normalized?.k ?? []]) {
      expect(Array.from(Float32Array.from(values))).toEqual(values);
    }
  });
});

describe.each(golden.cases)('$name', (c) => {
  const [B, H, N, D] = c.shape;
  const shape: Shape4 = [B, H, N, D];
  const q = tensor(shape, c.q);
  const k = tensor(shape, c.k);
  const v = tensor(shape, c.v);
  const dOut = tensor(shape, c.dOut);
  const base = { order: c.order, causal: c.causal } as const;

  if (c.normalization === 'scale') {
    // Their s = q·k / (8·sqrt(D)) is our { scale: 1/(8·sqrt(D)) } without centering.
    const options: FastmaxOptions = { ...base, normalization: { scale: 1 / (8 * Math.sqrt(D)) } };

    it('forward', () => {
      expect(c.normalizeTerm).toBeCloseTo(8 * Math.sqrt(D), 14);
      const result = referenceAttention(q, k, v, options);
      expect(result.degenerateRows).toBe(0);
      expectAgreement(result.output, c.output, 'forward');
    });
    it('dq, dk, dv equal their analytic backward', () => {
      const grads = referenceBackward(q, k, v, dOut, options);
      expectAgreement(grads.dq, c.dq, 'gradient');
      expectAgreement(grads.dk, c.dk, 'gradient');
      expectAgreement(grads.dv, c.dv, 'gradient');
    });
    return;
  }

  const normalized = c.normalized!;
  it("forward: our 'max-norm' equals their normalize, then t = 1", () => {
    const result = referenceAttention(q, k, v, { ...base, normalization: 'max-norm' });
    expect(result.degenerateRows).toBe(0);
    expectAgreement(result.output, c.output, 'forward');
  });

  it('gradients w.r.t. the normalized tensors equal their analytic backward', () => {
    // Their backward stops at the normalized q, k: in their training code autograd differentiates
    // `normalize`. So we compare at the normalized point with { scale: 1 } (s = q_n·k_n).
    const qn = tensor(shape, normalized.q);
    const kn = tensor(shape, normalized.k);
    const options: FastmaxOptions = { ...base, normalization: { scale: 1 } };
    expectAgreement(referenceAttention(qn, kn, v, options).output, normalized.output, 'forward');
    const grads = referenceBackward(qn, kn, v, dOut, options);
    expectAgreement(grads.dq, normalized.dq, 'gradient');
    expectAgreement(grads.dk, normalized.dk, 'gradient');
    expectAgreement(grads.dv, normalized.dv, 'gradient');
  });

  it("full chain: our 'max-norm' gradients equal theirs chained through `normalize` by hand", () => {
    // The generator differentiates `normalize` by hand (centering, division by the largest norm,
    // gradient of that norm to its argmax token), i.e. what autograd does in their setup. This is a
    // second, independent derivation of prepareScoresBackward for 'max-norm'; the finite-difference
    // tests in oracle.test.ts and prepare.test.ts check the same chain numerically.
    const grads = referenceBackward(q, k, v, dOut, { ...base, normalization: 'max-norm' });
    expectAgreement(grads.dq, c.dq, 'gradient');
    expectAgreement(grads.dk, c.dk, 'gradient');
    expectAgreement(grads.dv, c.dv, 'gradient');
  });
});
