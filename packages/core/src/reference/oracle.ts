import { kernelDerivative, kernelValue } from '../algebra.js';
import { FastmaxError } from '../errors.js';
import { type FastmaxOptions, type ResolvedOptions, resolveOptions } from '../options.js';
import { type PreparedScores, prepareScores, prepareScoresBackward } from '../prepare.js';
import { type HostTensor, isDeviceTensor, type Tensor } from '../tensor.js';
import {
  type AttentionShape,
  keyLimit,
  kvHeadOf,
  validateAttentionInputs,
  validateOutputGradient,
} from '../validate.js';

/**
 * The float64 oracle: every score s_ij and weight f(s_ij) is evaluated one by one, straight from
 * the definition in docs/math.md, in O(B·H·N·M·(D+Dv)). It is slow on purpose: backends are
 * checked against it, so it must be obviously right rather than fast.
 */
export interface ReferenceAttentionResult {
  /** B×H×N×Dv. Degenerate rows are exactly 0. */
  readonly output: Float64Array;
  /** B×H×N×M row-normalized weights f(s_ij)/den_i; 0 for keys the row cannot see and for degenerate rows. */
  readonly attention?: Float64Array;
  /** Rows whose denominator was <= 0 (their output is 0). The caller applies `onDegenerateRow`. */
  readonly degenerateRows: number;
  /** den_i = Σ_j f(s_ij) over the visible keys, B×H×N, as computed (<= 0 for degenerate rows). */
  readonly denominators: Float64Array;
  readonly shape: AttentionShape;
  /** The oracle has no plan: it always evaluates every score directly. */
  readonly plan?: never;
}

/** The reference code reads `.data` directly, so a device tensor must be refused, not crash later. */
export function requireHostTensors(tensors: Record<string, Tensor>): void {
  for (const [name, tensor] of Object.entries(tensors)) {
    if (typeof tensor === 'object' && tensor !== null && isDeviceTensor(tensor)) {
      throw new FastmaxError(
        'UNSUPPORTED_CAPABILITY',
        `the reference needs host tensors; read ${name} first`,
        {
          argument: name,
          expected: 'a host tensor { shape, data: Float32Array }',
          actual: `a device tensor of backend ${JSON.stringify(tensor.backend)}`,
        },
      );
    }
  }
}

/** s_ij = σ_i · (x_i · y_j) for query row `row` (flat B×H×N index) and key row `keyRow` (flat B×Hkv×M). */
function score(prepared: PreparedScores, row: number, keyRow: number, D: number): number {
  return prepared.sigma[row]! * dot(prepared.x, row * D, prepared.y, keyRow * D, D);
}

function dot(a: Float64Array, aOffset: number, b: Float64Array, bOffset: number, length: number): number {
  let sum = 0;
  for (let d = 0; d < length; d++) sum += a[aOffset + d]! * b[bOffset + d]!;
  return sum;
}

/** Called once per query row with its visible weights w_j = f(s_ij), j < limit, and their sum. */
type RowVisitor = (row: number, keyHead: number, limit: number, weights: Float64Array, den: number) => void;

/** Walks every query row, evaluating its weights over the keys it may see (the one mask rule: `keyLimit`). */
function forEachRow(
  prepared: PreparedScores,
  shape: AttentionShape,
  options: ResolvedOptions,
  visit: RowVisitor,
): void {
  const { batch: B, heads: H, queryLength: N, keyLength: M, headDim: D } = shape;
  const weights = new Float64Array(M);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const keyHead = (b * shape.kvHeads + kvHeadOf(h, shape)) * M;
      for (let i = 0; i < N; i++) {
        const row = (b * H + h) * N + i;
        const limit = keyLimit(b, i, shape, options);
        let den = 0;
        for (let j = 0; j < limit; j++) {
          weights[j] = kernelValue(options.coefficients, score(prepared, row, keyHead + j, D));
          den += weights[j]!;
        }
        visit(row, keyHead, limit, weights, den);
      }
    }
  }
}

/**
 * A row is degenerate when its denominator is not > 0: that includes rows that see no key (den = 0)
 * and a NaN denominator (possible only with checkFinite: false), handled like the backends do.
 */
function isDegenerate(den: number): boolean {
  return !(den > 0);
}

export function referenceAttention(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  options?: FastmaxOptions,
  extra: { readonly returnAttention?: boolean } = {},
): ReferenceAttentionResult {
  requireHostTensors({ q, k, v });
  const resolved = resolveOptions(options);
  const shape = validateAttentionInputs(q, k, v, resolved);
  const { batch: B, heads: H, queryLength: N, keyLength: M, valueDim: Dv } = shape;
  const prepared = prepareScores(q, k, shape, resolved);
  const output = new Float64Array(B * H * N * Dv);
  const denominators = new Float64Array(B * H * N);
  const attention = extra.returnAttention === true ? new Float64Array(B * H * N * M) : undefined;
  let degenerateRows = 0;

  forEachRow(prepared, shape, resolved, (row, keyHead, limit, weights, den) => {
    denominators[row] = den;
    if (isDegenerate(den)) {
      degenerateRows++;
      return;
    }
    for (let j = 0; j < limit; j++) {
      const a = weights[j]! / den;
      if (attention !== undefined) attention[row * M + j] = a;
      for (let c = 0; c < Dv; c++) output[row * Dv + c]! += a * v.data[(keyHead + j) * Dv + c]!;
    }
  });

  return attention === undefined
    ? { output, degenerateRows, denominators, shape }
    : { output, attention, degenerateRows, denominators, shape };
}

/**
 * Analytic gradients of L = Σ dOut·output with respect to q, k, v (float64), O(N·M) per head.
 * With A_ij = w_ij/den_i and o_i = Σ_j A_ij v_j: ∂L/∂w_ij = dO_i·(v_j − o_i)/den_i, so
 * ds_ij = f'(s_ij)·dO_i·(v_j − o_i)/den_i and, since s_ij = σ_i (x_i·y_j),
 * dx_i = Σ_j ds_ij σ_i y_j, dy_j = Σ_i ds_ij σ_i x_i, dσ_i = Σ_j ds_ij (x_i·y_j);
 * `prepareScoresBackward` chains dx, dy, dσ through the normalization to dq, dk.
 * Degenerate rows output a constant 0, so they contribute nothing; keys a row cannot see get nothing from it.
 */
export function referenceBackward(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  dOut: HostTensor,
  options?: FastmaxOptions,
): { dq: Float64Array; dk: Float64Array; dv: Float64Array } {
  requireHostTensors({ q, k, v, dOut });
  const resolved = resolveOptions(options);
  const shape = validateAttentionInputs(q, k, v, resolved);
  validateOutputGradient(dOut, shape, resolved);
  const { headDim: D, valueDim: Dv } = shape;
  const prepared = prepareScores(q, k, shape, resolved);
  const { x, y, sigma } = prepared;
  const dx = new Float64Array(x.length);
  const dy = new Float64Array(y.length);
  const dsigma = new Float64Array(sigma.length);
  const dv = new Float64Array(v.data.length);
  const o = new Float64Array(Dv);

  forEachRow(prepared, shape, resolved, (row, keyHead, limit, weights, den) => {
    if (isDegenerate(den)) return;
    o.fill(0);
    for (let j = 0; j < limit; j++) {
      for (let c = 0; c < Dv; c++) o[c]! += (weights[j]! / den) * v.data[(keyHead + j) * Dv + c]!;
    }
    for (let j = 0; j < limit; j++) {
      const keyRow = keyHead + j;
      let g = 0;
      for (let c = 0; c < Dv; c++) {
        const dO = dOut.data[row * Dv + c]!;
        g += dO * (v.data[keyRow * Dv + c]! - o[c]!);
        dv[keyRow * Dv + c]! += (weights[j]! * dO) / den;
      }
      g /= den;
      const xy = dot(x, row * D, y, keyRow * D, D);
      const ds = g * kernelDerivative(resolved.coefficients, sigma[row]! * xy);
      for (let d = 0; d < D; d++) {
        dx[row * D + d]! += ds * sigma[row]! * y[keyRow * D + d]!;
        dy[keyRow * D + d]! += ds * sigma[row]! * x[row * D + d]!;
      }
      dsigma[row]! += ds * xy;
    }
  });

  const { dq, dk } = prepareScoresBackward(prepared, shape, resolved, dx, dy, dsigma);
  return { dq, dk, dv };
}
