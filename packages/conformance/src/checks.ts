import {
  type BackendCapabilities,
  type BackwardRequest,
  type BackwardResult,
  createFastmax,
  type Fastmax,
  type FastmaxBackend,
  type FastmaxOptions,
  type ForwardRequest,
  type HostTensor,
  isDeviceTensor,
  type Shape4,
  type StateOptions,
  shapeSize,
  type Tensor,
  toHost,
} from '@fastmax/core';
import {
  type ReferenceAttentionResult,
  referenceAttention,
  referenceBackward,
} from '@fastmax/core/reference';
import fc from 'fast-check';
import {
  type AttentionSpec,
  adaptToCapabilities,
  buildSpec,
  type CausalPrefixCase,
  type ConformanceCase,
  type ContractCase,
  type DegenerateCase,
  describeSpec,
  type InvalidInputCase,
  type NonFiniteCase,
  ORDERS,
  type PropertyCase,
  type StateCase,
} from './cases.js';
import {
  type Comparison,
  compareGradients,
  compareTensors,
  describeComparison,
  FORWARD_TOLERANCE,
  GRADIENT_TOLERANCE,
} from './compare.js';
import { createRandom, randomTensor } from './random.js';

export interface CheckSettings {
  /** Forward tolerance, relative to the output scale. Default `FORWARD_TOLERANCE` (1e-4). */
  readonly tolerance: number;
  /** Gradient tolerance, relative to each gradient's scale. Default `GRADIENT_TOLERANCE` (1e-3). */
  readonly gradientTolerance: number;
  /** How long a call on non-finite input (checkFinite: false) may take to resolve or reject. */
  readonly settleTimeoutMs: number;
}

export const DEFAULT_CHECK_SETTINGS: CheckSettings = {
  tolerance: FORWARD_TOLERANCE,
  gradientTolerance: GRADIENT_TOLERANCE,
  settleTimeoutMs: 10_000,
};

/** What a check found: `ok` is false when any failure was recorded; notes are informational. */
export interface CheckReport {
  readonly ok: boolean;
  readonly failures: readonly string[];
  readonly notes: readonly string[];
}

/** Everything the checks share for one backend: the Fastmax instance and a small oracle cache. */
export interface CheckContext {
  readonly fm: Fastmax;
  readonly settings: CheckSettings;
  /** The float64 oracle, memoized on the inputs so a case run on both paths pays for it once. */
  readonly reference: (
    spec: AttentionSpec,
    inputs: CaseInputs,
    options?: FastmaxOptions,
  ) => ReferenceAttentionResult;
}

export function createCheckContext(fm: Fastmax, settings: Partial<CheckSettings> = {}): CheckContext {
  const cache = new Map<string, ReferenceAttentionResult>();
  const full = { ...DEFAULT_CHECK_SETTINGS, ...settings };
  return {
    fm,
    settings: full,
    reference(spec, inputs, options = spec.options) {
      const { path: _path, chunkSize: _chunk, ...semantic } = options;
      const key = `${spec.seed}|${describeSpec({ ...spec, options: semantic })}|${JSON.stringify(semantic)}`;
      const hit = cache.get(key);
      if (hit !== undefined && inputs.fromSeed) return hit;
      const result = referenceAttention(inputs.q, inputs.k, inputs.v, options);
      if (inputs.fromSeed) {
        // The large cases are the only expensive ones; two entries cover their two paths.
        if (cache.size >= 2) cache.delete(cache.keys().next().value as string);
        cache.set(key, result);
      }
      return result;
    },
  };
}

class Report {
  readonly failures: string[] = [];
  readonly notes: string[] = [];
  fail(message: string): void {
    this.failures.push(message);
  }
  note(message: string): void {
    this.notes.push(message);
  }
  compare(label: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number): void {
    this.record(label, compareTensors(actual, expected, tolerance), actual, expected);
  }
  record(
    label: string,
    comparison: Comparison,
    actual: ArrayLike<number>,
    expected: ArrayLike<number>,
  ): void {
    if (comparison.ok) {
      this.note(
        `${label}: relative error ${comparison.maxRelError.toExponential(2)} (scale ${comparison.scale.toExponential(2)})`,
      );
    } else {
      this.fail(describeComparison(label, comparison, actual, expected));
    }
  }
  shape(label: string, actual: readonly number[], expected: readonly number[]): boolean {
    const same = actual.length === expected.length && actual.every((size, axis) => size === expected[axis]);
    if (!same) this.fail(`${label}: shape [${actual.join(', ')}], expected [${expected.join(', ')}]`);
    return same;
  }
  done(): CheckReport {
    return { ok: this.failures.length === 0, failures: this.failures, notes: this.notes };
  }
}

export interface CaseInputs {
  readonly q: HostTensor;
  readonly k: HostTensor;
  readonly v: HostTensor;
  readonly dOut: HostTensor;
  /** True when these are exactly the inputs `spec.seed` generates (the oracle may be cached). */
  readonly fromSeed: boolean;
}

/** The inputs of a spec: q, k, v, dOut drawn from seeds seed .. seed+3 (optionally on a grid). */
export function caseInputs(spec: AttentionSpec, grid?: number): CaseInputs {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = spec;
  const options = grid === undefined ? {} : { grid };
  return {
    q: randomTensor([B, H, N, D], spec.seed, options),
    k: randomTensor([B, Hkv, M, D], spec.seed + 1, options),
    v: randomTensor([B, Hkv, M, Dv], spec.seed + 2, options),
    dOut: randomTensor([B, H, N, Dv], spec.seed + 3, options),
    fromSeed: grid === undefined,
  };
}

function outputShape(spec: AttentionSpec): Shape4 {
  return [spec.batch, spec.heads, spec.queryLength, spec.valueDim];
}

function copy(tensor: HostTensor): HostTensor {
  return { shape: [...tensor.shape] as unknown as Shape4, data: Float32Array.from(tensor.data) };
}

function sameData(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return false;
  return true;
}

/** A backend must not write into the caller's tensors. */
function checkUntouched(
  report: Report,
  inputs: Record<string, HostTensor>,
  before: Record<string, HostTensor>,
): void {
  for (const [name, tensor] of Object.entries(inputs)) {
    if (!sameData(tensor.data, before[name]!.data)) report.fail(`the backend modified its input ${name}`);
  }
}

/** Error objects from any copy of @fastmax/core (a plugin may bundle its own). */
function errorCode(error: unknown): string | undefined {
  if (typeof error !== 'object' || error === null) return undefined;
  const candidate = error as { name?: unknown; code?: unknown };
  return candidate.name === 'FastmaxError' && typeof candidate.code === 'string' ? candidate.code : undefined;
}

function describeError(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}

/** Output against the oracle: shape, degenerate count, degenerate rows exactly 0, then tolerance. */
function verifyOutput(
  report: Report,
  label: string,
  output: HostTensor,
  degenerateRows: number,
  expected: ReferenceAttentionResult,
  spec: AttentionSpec,
  tolerance: number,
): void {
  if (!report.shape(`${label} shape`, output.shape, outputShape(spec))) return;
  if (degenerateRows !== expected.degenerateRows) {
    report.fail(`${label}: degenerateRows = ${degenerateRows}, the oracle counts ${expected.degenerateRows}`);
  }
  const Dv = spec.valueDim;
  for (let row = 0; row < expected.denominators.length; row++) {
    if (expected.denominators[row]! > 0) continue;
    for (let c = 0; c < Dv; c++) {
      if (output.data[row * Dv + c] !== 0) {
        report.fail(
          `${label}: degenerate row ${row} (denominator ${expected.denominators[row]}) is not exactly 0`,
        );
        break;
      }
    }
  }
  report.compare(label, output.data, expected.output, tolerance);
}

async function checkForward(ctx: CheckContext, spec: AttentionSpec): Promise<CheckReport> {
  const report = new Report();
  const inputs = caseInputs(spec);
  const tensors = { q: inputs.q, k: inputs.k, v: inputs.v };
  const before = { q: copy(inputs.q), k: copy(inputs.k), v: copy(inputs.v) };
  const result = await ctx.fm.attention(inputs.q, inputs.k, inputs.v, spec.options);
  const output = await toHost(result.output);
  checkUntouched(report, tensors, before);
  const forced = spec.options.path;
  if (forced !== undefined && forced !== 'auto' && result.plan.path !== forced) {
    report.fail(`the plan says path '${result.plan.path}' although '${forced}' was forced`);
  }
  verifyOutput(
    report,
    'output',
    output,
    result.degenerateRows,
    ctx.reference(spec, inputs),
    spec,
    ctx.settings.tolerance,
  );
  return report.done();
}

async function checkForwardIntoOut(ctx: CheckContext, spec: AttentionSpec): Promise<CheckReport> {
  const report = new Report();
  const inputs = caseInputs(spec);
  const backend = ctx.fm.backend;
  // The same backend seen through a wrapper that keeps what forward returned, so that a backend
  // declaring writesIntoOut is held to it rather than rescued by core's copy.
  let returned: Tensor | undefined;
  const observed: FastmaxBackend = Object.create(backend, {
    forward: {
      value: async (request: ForwardRequest) => {
        const result = await backend.forward(request);
        returned = result.output;
        return result;
      },
    },
  });
  const fm = await createFastmax({ backend: observed });
  const out = new Float32Array(shapeSize(outputShape(spec))).fill(Number.NaN);
  const result = await fm.attention(inputs.q, inputs.k, inputs.v, { ...spec.options, out });
  if (isDeviceTensor(result.output) || result.output.data !== out) {
    report.fail('attention with options.out returned another array than options.out as output.data');
  }
  if (
    backend.capabilities.writesIntoOut === true &&
    (returned === undefined || !('data' in returned) || returned.data !== out)
  ) {
    report.fail('capabilities.writesIntoOut is true but forward returned another array than request.out');
  }
  verifyOutput(
    report,
    'options.out',
    { shape: result.output.shape, data: out },
    result.degenerateRows,
    ctx.reference(spec, inputs),
    spec,
    ctx.settings.tolerance,
  );
  return report.done();
}

/**
 * The backward against the float64 reference; with `intoOut`, into caller arrays prefilled with NaN
 * (`options.gradientsOut`), which must come back as the gradients' data with every element written
 * (a backend declaring `writesGradientsIntoOut` must return those very arrays from `backward`).
 */
async function checkBackward(ctx: CheckContext, spec: AttentionSpec, intoOut = false): Promise<CheckReport> {
  const report = new Report();
  const inputs = caseInputs(spec);
  const tensors = { q: inputs.q, k: inputs.k, v: inputs.v, dOut: inputs.dOut };
  const before = { q: copy(inputs.q), k: copy(inputs.k), v: copy(inputs.v), dOut: copy(inputs.dOut) };
  const sources = { dq: inputs.q, dk: inputs.k, dv: inputs.v };
  const gradientsOut = intoOut
    ? {
        dq: new Float32Array(shapeSize(inputs.q.shape)).fill(Number.NaN),
        dk: new Float32Array(shapeSize(inputs.k.shape)).fill(Number.NaN),
        dv: new Float32Array(shapeSize(inputs.v.shape)).fill(Number.NaN),
      }
    : undefined;
  // Seen through a wrapper that keeps what backward returned, so that a backend declaring
  // writesGradientsIntoOut is held to it rather than rescued by core's copy.
  const backend = ctx.fm.backend;
  let returned: BackwardResult | undefined;
  const observed: FastmaxBackend = Object.create(backend, {
    backward: {
      value: async (request: BackwardRequest) => {
        returned = await backend.backward(request);
        return returned;
      },
    },
  });
  const fm = intoOut ? await createFastmax({ backend: observed }) : ctx.fm;
  const result = await fm.backward(inputs.q, inputs.k, inputs.v, inputs.dOut, {
    ...spec.options,
    ...(gradientsOut === undefined ? {} : { gradientsOut }),
  });
  checkUntouched(report, tensors, before);
  if (gradientsOut !== undefined) {
    for (const name of ['dq', 'dk', 'dv'] as const) {
      const gradient = result[name];
      if (isDeviceTensor(gradient) || gradient.data !== gradientsOut[name])
        report.fail(
          `backward with options.gradientsOut returned another array than gradientsOut.${name} as ${name}.data`,
        );
      const given = returned?.[name];
      if (
        backend.capabilities.writesGradientsIntoOut === true &&
        (given === undefined || !('data' in given) || given.data !== gradientsOut[name])
      )
        report.fail(
          `capabilities.writesGradientsIntoOut is true but backward returned another array than request.out.${name}`,
        );
    }
  }
  const expected = referenceBackward(inputs.q, inputs.k, inputs.v, inputs.dOut, spec.options);
  const actual = {
    dq: await toHost(result.dq),
    dk: await toHost(result.dk),
    dv: await toHost(result.dv),
  };
  const comparisons = compareGradients(
    { dq: actual.dq.data, dk: actual.dk.data, dv: actual.dv.data },
    expected,
    ctx.settings.gradientTolerance,
  );
  for (const name of ['dq', 'dk', 'dv'] as const) {
    if (report.shape(`${name} shape`, actual[name].shape, sources[name].shape)) {
      report.record(name, comparisons[name], actual[name].data, expected[name]);
    }
  }
  return report.done();
}

/** Smallest gap between the centered norms of two rows of the same head (rows of `length` × D). */
function normGap(tensor: HostTensor): number {
  const [B, H, L, D] = tensor.shape;
  let gap = Number.POSITIVE_INFINITY;
  for (let head = 0; head < B * H; head++) {
    const norms: number[] = [];
    for (let i = 0; i < L; i++) {
      const base = (head * L + i) * D;
      let mean = 0;
      for (let d = 0; d < D; d++) mean += tensor.data[base + d]!;
      mean /= D;
      let sum = 0;
      for (let d = 0; d < D; d++) sum += (tensor.data[base + d]! - mean) ** 2;
      norms.push(Math.sqrt(sum));
    }
    norms.sort((a, b) => a - b);
    for (let i = 1; i < norms.length; i++) gap = Math.min(gap, norms[i]! - norms[i - 1]!);
    // A zero centered norm is where l2 normalization is not differentiable.
    if (norms.length > 0) gap = Math.min(gap, norms[0]!);
  }
  return gap;
}

/**
 * Finite differences, float64-friendly. Float32 central differences of the backend's own forward
 * are dominated by rounding (error ≈ u·|L|/h), so instead we difference the float64 ORACLE along a
 * random direction u and compare with the backend's directional derivative Σ g·u:
 * - inputs and u are multiples of 1/64 in [-1, 1] and h = 2^-16, so x ± h·u are multiples of
 *   2^-22 below 2 in magnitude: exactly representable in float32, so the oracle sees exactly x ± h·u;
 * - the central difference's truncation error is h²/6·|L'''| ≈ 4e-11·|L'''| and its rounding error
 *   ≈ 1e-16·|L|/h ≈ 7e-12·|L|, both negligible next to the gradient tolerance;
 * - maxima and norms are not differentiable where two norms tie: the inputs are re-drawn (a
 *   deterministic seed search) until every pair of centered norms in a head differs by > 1e-3,
 *   far more than h·|u| <= 2^-16·√D can move them.
 * The tolerance is the gradient tolerance times Σ|g_ref|·|u|, the scale of the directional derivative.
 * Directions are a random u on the same grid and sign(g) (entries 0, ±1, also exact).
 */
async function checkGradientFiniteDifference(ctx: CheckContext, spec: AttentionSpec): Promise<CheckReport> {
  const report = new Report();
  const grid = 64;
  const h = 2 ** -16;
  let chosen: AttentionSpec | undefined;
  for (let attempt = 0; attempt < 64 && chosen === undefined; attempt++) {
    const candidate = { ...spec, seed: spec.seed + 7919 * attempt };
    const inputs = caseInputs(candidate, grid);
    if (Math.min(normGap(inputs.q), normGap(inputs.k)) > 1e-3) chosen = candidate;
  }
  if (chosen === undefined) {
    report.fail('no seed gave inputs 1e-3 away from a tie of norms (a bug of the suite)');
    return report.done();
  }
  if (chosen.seed !== spec.seed) report.note(`seed ${chosen.seed} (re-drawn away from ties of norms)`);
  const inputs = caseInputs(chosen, grid);
  const shifted = (tensor: HostTensor, u: Float32Array, sign: number): HostTensor => {
    const data = new Float32Array(tensor.data.length);
    for (let i = 0; i < data.length; i++) {
      const exact = tensor.data[i]! + sign * h * u[i]!;
      data[i] = exact;
      if (data[i] !== exact) throw new Error(`x ± h·u is not exact in float32 at ${i} (a bug of the suite)`);
    }
    return { shape: tensor.shape, data };
  };
  type Direction = readonly [Float32Array, Float32Array, Float32Array];
  const finiteDifference = (u: Direction): number => {
    const loss = (sign: number): number => {
      const out = referenceAttention(
        shifted(inputs.q, u[0], sign),
        shifted(inputs.k, u[1], sign),
        shifted(inputs.v, u[2], sign),
        spec.options,
      ).output;
      let sum = 0;
      for (let i = 0; i < out.length; i++) sum += out[i]! * inputs.dOut.data[i]!;
      return sum;
    };
    return (loss(1) - loss(-1)) / (2 * h);
  };
  const result = await ctx.fm.backward(inputs.q, inputs.k, inputs.v, inputs.dOut, spec.options);
  const grads = [await toHost(result.dq), await toHost(result.dk), await toHost(result.dv)] as const;
  const sources = [inputs.q, inputs.k, inputs.v] as const;
  for (let t = 0; t < 3; t++) {
    if (!report.shape(`gradient ${['dq', 'dk', 'dv'][t]}`, grads[t]!.shape, sources[t]!.shape)) {
      return report.done();
    }
  }
  const reference = referenceBackward(inputs.q, inputs.k, inputs.v, inputs.dOut, spec.options);
  const referenceGrads = [reference.dq, reference.dk, reference.dv] as const;
  // Two directions: a random one, and sign(g) of the backend's own gradient. Along a random u a
  // systematic error of the gradient partly cancels in Σ g·u (one scalar for many entries); along
  // sign(g) it cannot: Σ g·sign(g) = Σ|g| while the oracle's difference gives Σ g_true·sign(g).
  const directions: { label: string; u: Direction }[] = [
    {
      label: 'random u',
      u: [
        randomTensor(inputs.q.shape, chosen.seed + 11, { grid }).data,
        randomTensor(inputs.k.shape, chosen.seed + 12, { grid }).data,
        randomTensor(inputs.v.shape, chosen.seed + 13, { grid }).data,
      ],
    },
    {
      label: 'u = sign(g)',
      u: [grads[0].data.map(Math.sign), grads[1].data.map(Math.sign), grads[2].data.map(Math.sign)],
    },
  ];
  for (const { label, u } of directions) {
    let directional = 0;
    let referenceDirectional = 0;
    let scale = 0;
    for (let t = 0; t < 3; t++) {
      const g = grads[t]!.data;
      const ref = referenceGrads[t]!;
      const ut = u[t]!;
      for (let i = 0; i < g.length; i++) {
        directional += g[i]! * ut[i]!;
        referenceDirectional += ref[i]! * ut[i]!;
        scale += Math.abs(ref[i]! * ut[i]!);
      }
    }
    scale = Math.max(scale, 1e-12);
    const difference = finiteDifference(u);
    const error = Math.abs(directional - difference) / scale;
    const oracleError = Math.abs(referenceDirectional - difference) / scale;
    report.note(
      `${label}: Σ g·u = ${directional.toPrecision(8)}, finite difference = ${difference.toPrecision(8)}, relative error ${error.toExponential(2)} (oracle's own: ${oracleError.toExponential(2)})`,
    );
    if (!(error <= ctx.settings.gradientTolerance)) {
      report.fail(
        `${label}: directional derivative Σ g·u = ${directional} but the float64 central difference is ${difference}: relative error ${error.toExponential(2)} > ${ctx.settings.gradientTolerance} of Σ|g_ref·u| = ${scale.toExponential(2)}`,
      );
    }
  }
  return report.done();
}

function keyLengthsOf(spec: AttentionSpec): number[] {
  const lengths = spec.options.keyLengths;
  return lengths === undefined
    ? Array.from({ length: spec.batch }, () => spec.keyLength)
    : Array.from(lengths);
}

/** Rewrites rows [from(b), to(b)) along the sequence axis of every head of batch b. */
function rewriteRows(
  tensor: HostTensor,
  from: (batch: number) => number,
  to: (batch: number) => number,
  seed: number,
  range: number,
): HostTensor {
  const [B, H, L, D] = tensor.shape;
  const data = Float32Array.from(tensor.data);
  const random = createRandom(seed);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      for (let i = Math.max(0, from(b)); i < Math.min(L, to(b)); i++) {
        const base = ((b * H + h) * L + i) * D;
        for (let d = 0; d < D; d++) data[base + d] = (2 * random() - 1) * range + range / 3;
      }
    }
  }
  return { shape: tensor.shape, data };
}

async function checkPaddingInvariance(ctx: CheckContext, spec: AttentionSpec): Promise<CheckReport> {
  const report = new Report();
  const inputs = caseInputs(spec);
  const lengths = keyLengthsOf(spec);
  const first = await ctx.fm.attention(inputs.q, inputs.k, inputs.v, spec.options);
  // Large, off-center padding values: a leaked key would move every row that sees it by O(1).
  const k = rewriteRows(
    inputs.k,
    (b) => lengths[b]!,
    () => spec.keyLength,
    spec.seed + 50,
    40,
  );
  const v = rewriteRows(
    inputs.v,
    (b) => lengths[b]!,
    () => spec.keyLength,
    spec.seed + 51,
    40,
  );
  const second = await ctx.fm.attention(inputs.q, k, v, spec.options);
  const a = await toHost(first.output);
  const b = await toHost(second.output);
  if (first.degenerateRows !== second.degenerateRows) {
    report.fail(`degenerateRows changed from ${first.degenerateRows} to ${second.degenerateRows}`);
  }
  // Not bit-for-bit: a GPU reduction may sum in a different order from one call to the next.
  report.compare('output after changing padded keys vs before', b.data, a.data, ctx.settings.tolerance);
  verifyOutput(
    report,
    'output after changing padded keys vs oracle',
    b,
    second.degenerateRows,
    ctx.reference(spec, inputs),
    spec,
    ctx.settings.tolerance,
  );
  return report.done();
}

async function checkCausalPrefix(ctx: CheckContext, testCase: CausalPrefixCase): Promise<CheckReport> {
  const report = new Report();
  const { spec, prefix } = testCase;
  const inputs = caseInputs(spec);
  const shift = spec.keyLength - spec.queryLength;
  const first = await toHost((await ctx.fm.attention(inputs.q, inputs.k, inputs.v, spec.options)).output);
  // Rows i < prefix see keys j <= i + M - N, so everything from prefix + M - N on is "later".
  // Under prefix-max-norm the later tokens get larger norms (range 3), so a backend that
  // normalizes by a maximum over the whole sequence changes the early rows. |s| <= 1/T holds there
  // whatever the magnitudes; under { scale } it does not, so those keep range 1 and every weight
  // stays positive (f > 0 on the scores reached), which keeps the later rows well conditioned.
  const range = typeof spec.options.normalization === 'object' ? 1 : 3;
  const q = rewriteRows(
    inputs.q,
    () => prefix,
    () => spec.queryLength,
    spec.seed + 60,
    range,
  );
  const k = rewriteRows(
    inputs.k,
    () => prefix + shift,
    () => spec.keyLength,
    spec.seed + 61,
    range,
  );
  const v = rewriteRows(
    inputs.v,
    () => prefix + shift,
    () => spec.keyLength,
    spec.seed + 62,
    range,
  );
  const secondResult = await ctx.fm.attention(q, k, v, spec.options);
  const second = await toHost(secondResult.output);
  const Dv = spec.valueDim;
  const rows = (data: Float32Array) => {
    const out: number[] = [];
    for (let head = 0; head < spec.batch * spec.heads; head++) {
      for (let i = 0; i < prefix; i++) {
        for (let c = 0; c < Dv; c++) out.push(data[(head * spec.queryLength + i) * Dv + c]!);
      }
    }
    return out;
  };
  report.compare(
    `rows < ${prefix} after changing later tokens vs before`,
    rows(second.data),
    rows(first.data),
    ctx.settings.tolerance,
  );
  const altered: CaseInputs = { q, k, v, dOut: inputs.dOut, fromSeed: false };
  verifyOutput(
    report,
    'output after changing later tokens vs oracle',
    second,
    secondResult.degenerateRows,
    ctx.reference(spec, altered),
    spec,
    ctx.settings.tolerance,
  );
  return report.done();
}

function permuteRows(tensor: HostTensor, permutation: readonly number[]): HostTensor {
  const [B, H, L, D] = tensor.shape;
  const data = Float32Array.from(tensor.data);
  for (let head = 0; head < B * H; head++) {
    permutation.forEach((source, target) => {
      data.set(
        tensor.data.subarray((head * L + source) * D, (head * L + source + 1) * D),
        (head * L + target) * D,
      );
    });
  }
  return { shape: tensor.shape, data };
}

async function checkKeyPermutation(ctx: CheckContext, spec: AttentionSpec): Promise<CheckReport> {
  const report = new Report();
  const inputs = caseInputs(spec);
  // Permute only keys valid in every batch, so padding stays where keyLengths says.
  const movable = Math.min(...keyLengthsOf(spec));
  const permutation = Array.from({ length: spec.keyLength }, (_, j) => j);
  const random = createRandom(spec.seed + 70);
  for (let j = movable - 1; j > 0; j--) {
    const other = Math.floor(random() * (j + 1));
    [permutation[j], permutation[other]] = [permutation[other]!, permutation[j]!];
  }
  if (movable >= 2 && permutation.every((source, target) => source === target)) {
    [permutation[0], permutation[1]] = [1, 0];
  }
  const k = permuteRows(inputs.k, permutation);
  const v = permuteRows(inputs.v, permutation);
  const first = await toHost((await ctx.fm.attention(inputs.q, inputs.k, inputs.v, spec.options)).output);
  const secondResult = await ctx.fm.attention(inputs.q, k, v, spec.options);
  const second = await toHost(secondResult.output);
  report.compare(
    'output with permuted keys and values vs unpermuted',
    second.data,
    first.data,
    ctx.settings.tolerance,
  );
  verifyOutput(
    report,
    'output with permuted keys and values vs oracle (unpermuted)',
    second,
    secondResult.degenerateRows,
    ctx.reference(spec, inputs),
    spec,
    ctx.settings.tolerance,
  );
  return report.done();
}

async function checkDegenerate(ctx: CheckContext, testCase: DegenerateCase): Promise<CheckReport> {
  const report = new Report();
  const { q, k, v } = testCase.inputs();
  const expected = referenceAttention(q, k, v, { ...testCase.options, onDegenerateRow: 'zero' });
  if (expected.degenerateRows !== testCase.degenerateRows.length) {
    report.fail(
      `the oracle counts ${expected.degenerateRows} degenerate rows, the case expects ${testCase.degenerateRows.length} (a bug of the suite or of the oracle)`,
    );
  }
  if (testCase.options.onDegenerateRow === 'throw') {
    try {
      await ctx.fm.attention(q, k, v, testCase.options);
      report.fail("onDegenerateRow: 'throw' resolved instead of rejecting with DEGENERATE_DENOMINATOR");
    } catch (error) {
      const code = errorCode(error);
      if (code !== 'DEGENERATE_DENOMINATOR')
        report.fail(`rejected with ${code ?? describeError(error)}, expected DEGENERATE_DENOMINATOR`);
    }
    return report.done();
  }
  const result = await ctx.fm.attention(q, k, v, testCase.options);
  const output = await toHost(result.output);
  const Dv = v.shape[3];
  for (const row of testCase.degenerateRows) {
    const values = Array.from(output.data.subarray(row * Dv, (row + 1) * Dv));
    if (values.some((value) => value !== 0))
      report.fail(`degenerate row ${row} is [${values.join(', ')}], expected exact zeros`);
  }
  if (result.degenerateRows !== testCase.degenerateRows.length) {
    report.fail(`degenerateRows = ${result.degenerateRows}, expected ${testCase.degenerateRows.length}`);
  }
  report.compare('output', output.data, expected.output, ctx.settings.tolerance);
  return report.done();
}

/** Tokens start..end-1 of a B×H×L×D tensor, as one decoding step receives them. */
export function sliceTokens(tensor: HostTensor, start: number, end: number): HostTensor {
  const [B, H, L, D] = tensor.shape;
  const length = end - start;
  const data = new Float32Array(B * H * length * D);
  for (let head = 0; head < B * H; head++) {
    data.set(tensor.data.subarray((head * L + start) * D, (head * L + end) * D), head * length * D);
  }
  return { shape: [B, H, length, D], data };
}

/** The decoding state that replays a causal spec: prefix-max-norm, or its fixed scale. */
export function stateOptionsFor(spec: AttentionSpec): StateOptions {
  const o = spec.options;
  return {
    batch: spec.batch,
    heads: spec.heads,
    kvHeads: spec.kvHeads,
    headDim: spec.headDim,
    valueDim: spec.valueDim,
    ...(o.order === undefined ? {} : { order: o.order }),
    ...(o.coefficients === undefined ? {} : { coefficients: o.coefficients }),
    ...(o.temperature === undefined ? {} : { temperature: o.temperature }),
    normalization: typeof o.normalization === 'object' ? o.normalization : 'prefix-max-norm',
  };
}

async function checkState(ctx: CheckContext, testCase: StateCase): Promise<CheckReport> {
  const report = new Report();
  const { spec } = testCase;
  const inputs = caseInputs(spec);
  const state = await ctx.fm.createState(stateOptionsFor(spec));
  const N = spec.queryLength;
  const Dv = spec.valueDim;
  const expected = ctx.reference(spec, inputs);
  const run = async (stepLength: number, label: string) => {
    const output = new Float32Array(spec.batch * spec.heads * N * Dv);
    let degenerate = 0;
    for (let start = 0; start < N; start += stepLength) {
      const end = Math.min(N, start + stepLength);
      const step = await state.step(
        sliceTokens(inputs.q, start, end),
        sliceTokens(inputs.k, start, end),
        sliceTokens(inputs.v, start, end),
      );
      degenerate += step.degenerateRows;
      const host = await toHost(step.output);
      if (
        !report.shape(`${label}: step output ${start}..${end}`, host.shape, [
          spec.batch,
          spec.heads,
          end - start,
          Dv,
        ])
      )
        return;
      for (let head = 0; head < spec.batch * spec.heads; head++) {
        output.set(
          host.data.subarray(head * (end - start) * Dv, (head + 1) * (end - start) * Dv),
          (head * N + start) * Dv,
        );
      }
      if (state.tokens !== end) report.fail(`${label}: tokens = ${state.tokens} after ${end} tokens`);
    }
    verifyOutput(
      report,
      label,
      { shape: outputShape(spec), data: output },
      degenerate,
      expected,
      spec,
      ctx.settings.tolerance,
    );
  };
  try {
    await run(
      testCase.stepLength,
      testCase.stepLength === 1 ? 'token by token' : `chunks of ${testCase.stepLength}`,
    );
    state.reset();
    if (state.tokens !== 0) report.fail(`tokens = ${state.tokens} after reset()`);
    await run(N, 'after reset(), all tokens in one step');
  } finally {
    state.dispose();
  }
  return report.done();
}

async function checkInvalidInput(ctx: CheckContext, testCase: InvalidInputCase): Promise<CheckReport> {
  const report = new Report();
  const { q, k, v, dOut, options } = testCase.inputs();
  // The inputs are malformed on purpose; the casts only get them past the compiler.
  const call =
    testCase.call === 'attention'
      ? () => ctx.fm.attention(q as Tensor, k as Tensor, v as Tensor, options as FastmaxOptions)
      : () =>
          ctx.fm.backward(q as Tensor, k as Tensor, v as Tensor, dOut as Tensor, options as FastmaxOptions);
  try {
    await call();
    report.fail(`resolved; expected a FastmaxError ${testCase.code}`);
  } catch (error) {
    const code = errorCode(error);
    if (code === undefined) {
      report.fail(`threw ${describeError(error)}; expected a FastmaxError ${testCase.code}`);
    } else if (code !== testCase.code) {
      report.fail(`FastmaxError ${code} (${describeError(error)}); expected ${testCase.code}`);
    } else {
      const argument = (error as { argument?: unknown }).argument;
      if (typeof argument !== 'string' || argument === '')
        report.fail('the FastmaxError does not name the argument at fault');
      else if (testCase.argument !== undefined && argument !== testCase.argument)
        report.fail(`${code} names ${argument}; expected ${testCase.argument}`);
      else report.note(`${code} naming ${argument}`);
    }
  }
  return report.done();
}

/**
 * With `checkFinite: false` the caller has opted out of the scan, so NaN/±Infinity may propagate
 * into the result; what is not allowed is to hang, to crash the process, or to fail with anything
 * but a FastmaxError. The call must settle within `settleTimeoutMs` either way.
 */
async function checkNonFinite(ctx: CheckContext, testCase: NonFiniteCase): Promise<CheckReport> {
  const report = new Report();
  const { spec, poison } = testCase;
  const inputs = caseInputs(spec);
  const tensors = { q: copy(inputs.q), k: copy(inputs.k), v: copy(inputs.v), dOut: copy(inputs.dOut) };
  tensors[poison.tensor].data[1] = poison.value;
  const call =
    testCase.call === 'attention'
      ? ctx.fm
          .attention(tensors.q, tensors.k, tensors.v, spec.options)
          .then(async (r) => [await toHost(r.output)])
      : ctx.fm
          .backward(tensors.q, tensors.k, tensors.v, tensors.dOut, spec.options)
          .then(async (r) => Promise.all([toHost(r.dq), toHost(r.dk), toHost(r.dv)]));
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), ctx.settings.settleTimeoutMs);
  });
  try {
    const outcome = await Promise.race([call, timeout]);
    if (outcome === 'timeout') {
      report.fail(`did not resolve or reject within ${ctx.settings.settleTimeoutMs} ms`);
    } else {
      const expectedShapes =
        testCase.call === 'attention'
          ? [outputShape(spec)]
          : [tensors.q.shape, tensors.k.shape, tensors.v.shape];
      outcome.forEach((tensor, i) => {
        report.shape(`result ${i}`, tensor.shape, expectedShapes[i]!);
      });
      const bad = outcome.reduce(
        (n, tensor) => n + tensor.data.filter((value) => !Number.isFinite(value)).length,
        0,
      );
      report.note(`resolved; ${bad} non-finite values in the result`);
    }
  } catch (error) {
    const code = errorCode(error);
    if (code === undefined) report.fail(`rejected with ${describeError(error)}, which is not a FastmaxError`);
    else report.note(`rejected with FastmaxError ${code}`);
  } finally {
    clearTimeout(timer);
  }
  return report.done();
}

/** Random small specs within what the backend declares (so nothing here is ever skipped). */
export function specArbitrary(capabilities: BackendCapabilities): fc.Arbitrary<AttentionSpec> {
  const maxDim = Math.max(1, Math.min(6, capabilities.maxHeadDim));
  const orders = capabilities.orders.length > 0 ? capabilities.orders : ORDERS;
  return fc
    .record({
      order: fc.constantFrom(...orders),
      normalization: fc.constantFrom(...capabilities.normalizations),
      causal: capabilities.causal ? fc.boolean() : fc.constant(false),
      padded: capabilities.keyPadding ? fc.boolean() : fc.constant(false),
      group: capabilities.groupedQuery ? fc.integer({ min: 1, max: 3 }) : fc.constant(1),
      kvHeads: fc.integer({ min: 1, max: 2 }),
      batch: fc.integer({ min: 1, max: 2 }),
      queryLength: fc.integer({ min: 1, max: 9 }),
      keyLength: capabilities.crossAttention ? fc.integer({ min: 1, max: 9 }) : fc.constant(0),
      headDim: fc.integer({ min: 1, max: maxDim }),
      valueDim: fc.integer({ min: 1, max: maxDim }),
      path: fc.constantFrom(...capabilities.paths),
      chunkSize: fc.option(fc.integer({ min: 1, max: 4 }), { nil: undefined }),
      variant: fc.boolean(),
      keyLengths: fc.array(fc.integer({ min: 0, max: 9 }), { minLength: 2, maxLength: 2 }),
      seed: fc.integer({ min: 0, max: 2 ** 30 }),
    })
    .map((r) => {
      const keyLength = r.keyLength === 0 ? r.queryLength : r.keyLength;
      return buildSpec({
        order: r.order,
        normalization: r.normalization,
        causal: r.causal,
        padded: r.padded,
        batch: r.batch,
        heads: [r.kvHeads * r.group, r.kvHeads],
        queryLength: r.queryLength,
        keyLength,
        headDim: r.headDim,
        valueDim: r.valueDim,
        path: r.path,
        ...(r.chunkSize === undefined ? {} : { chunkSize: r.chunkSize }),
        variant: r.variant,
        keyLengths: r.keyLengths.slice(0, r.batch).map((length) => Math.min(length, keyLength)),
        seed: r.seed,
      });
    });
}

async function checkProperty(ctx: CheckContext, testCase: PropertyCase): Promise<CheckReport> {
  const report = new Report();
  const capabilities = ctx.fm.backend.capabilities;
  let runs = 0;
  try {
    await fc.assert(
      fc.asyncProperty(specArbitrary(capabilities), async (spec) => {
        runs++;
        const forward = await checkForward(ctx, spec);
        if (!forward.ok) throw new Error(`${describeSpec(spec)}: ${forward.failures.join('; ')}`);
        if (capabilities.backward) {
          const backward = await checkBackward(ctx, spec);
          if (!backward.ok)
            throw new Error(`${describeSpec(spec)} backward: ${backward.failures.join('; ')}`);
        }
      }),
      { seed: testCase.seed, numRuns: testCase.runs, endOnFailure: true, includeErrorInReport: true },
    );
    report.note(`${runs} random cases (seed ${testCase.seed})`);
  } catch (error) {
    report.fail(describeError(error));
  }
  return report.done();
}

async function checkContract(ctx: CheckContext, testCase: ContractCase): Promise<CheckReport> {
  const report = new Report();
  const backend = ctx.fm.backend;
  if (testCase.check === 'device-output') {
    const spec = buildSpec({
      order: 2,
      normalization: 'max-norm',
      queryLength: 5,
      headDim: 4,
      valueDim: 3,
      seed: 3500,
    });
    const inputs = caseInputs(spec);
    const host = await ctx.fm.attention(inputs.q, inputs.k, inputs.v, spec.options);
    const device = await ctx.fm.attention(inputs.q, inputs.k, inputs.v, {
      ...spec.options,
      output: 'device',
    });
    if (!isDeviceTensor(device.output)) {
      report.fail("output: 'device' returned a host tensor although capabilities.deviceTensors is true");
    } else {
      if (device.output.backend !== backend.name) {
        report.fail(`device tensor names backend '${device.output.backend}', expected '${backend.name}'`);
      }
      const read = await device.output.read();
      report.compare(
        'device output read back vs host output',
        read.data,
        (await toHost(host.output)).data,
        ctx.settings.tolerance,
      );
      device.output.dispose();
    }
    return report.done();
  }
  const caps = backend.capabilities;
  if (typeof backend.name !== 'string' || backend.name === '') report.fail('name must be a non-empty string');
  if (backend.specVersion !== 1) report.fail(`specVersion is ${String(backend.specVersion)}, expected 1`);
  const availability = await backend.isAvailable();
  if (!availability.available) report.fail(`isAvailable() says unavailable: ${availability.reason}`);
  const subset = (label: string, values: readonly unknown[], allowed: readonly unknown[]) => {
    if (!Array.isArray(values) || values.length === 0)
      report.fail(`capabilities.${label} must be a non-empty array`);
    else
      for (const value of values)
        if (!allowed.includes(value)) report.fail(`capabilities.${label} holds unknown ${String(value)}`);
  };
  subset('orders', caps.orders, ORDERS);
  subset('normalizations', caps.normalizations, ['max-norm', 'prefix-max-norm', 'l2', 'scale']);
  subset('paths', caps.paths, ['factorized', 'direct']);
  subset('dtypes', caps.dtypes, ['float32', 'float16']);
  if (!caps.dtypes.includes('float32')) report.fail("capabilities.dtypes must include 'float32'");
  if (!Number.isInteger(caps.maxHeadDim) || caps.maxHeadDim < 1)
    report.fail('capabilities.maxHeadDim must be an integer >= 1');
  for (const flag of [
    'causal',
    'keyPadding',
    'groupedQuery',
    'crossAttention',
    'backward',
    'state',
    'deviceTensors',
  ] as const) {
    if (typeof caps[flag] !== 'boolean') report.fail(`capabilities.${flag} must be a boolean`);
  }
  for (const flag of [
    'checksFiniteInputs',
    'checksFiniteBackwardInputs',
    'writesIntoOut',
    'writesGradientsIntoOut',
  ] as const) {
    if (caps[flag] !== undefined && typeof caps[flag] !== 'boolean')
      report.fail(`capabilities.${flag} must be a boolean when present`);
  }
  if (caps.state && typeof backend.createState !== 'function')
    report.fail('capabilities.state is true but createState is missing');
  const declared = Object.entries(caps)
    .map(([key, value]) => `${key}=${Array.isArray(value) ? value.join('|') : String(value)}`)
    .join(' ');
  report.note(declared);
  return report.done();
}

/** Runs one case against a Fastmax instance and reports what it found; a throw is a failure too. */
export async function checkCase(ctx: CheckContext, original: ConformanceCase): Promise<CheckReport> {
  const testCase = adaptToCapabilities(original, ctx.fm.backend.capabilities);
  try {
    switch (testCase.kind) {
      case 'contract':
        return await checkContract(ctx, testCase);
      case 'forward':
        return testCase.intoOut === true
          ? await checkForwardIntoOut(ctx, testCase.spec)
          : await checkForward(ctx, testCase.spec);
      case 'backward':
        return await checkBackward(ctx, testCase.spec, testCase.intoOut === true);
      case 'gradient-fd':
        return await checkGradientFiniteDifference(ctx, testCase.spec);
      case 'padding-invariance':
        return await checkPaddingInvariance(ctx, testCase.spec);
      case 'causal-prefix':
        return await checkCausalPrefix(ctx, testCase);
      case 'key-permutation':
        return await checkKeyPermutation(ctx, testCase.spec);
      case 'degenerate':
        return await checkDegenerate(ctx, testCase);
      case 'state':
        return await checkState(ctx, testCase);
      case 'invalid-input':
        return await checkInvalidInput(ctx, testCase);
      case 'non-finite':
        return await checkNonFinite(ctx, testCase);
      case 'property':
        return await checkProperty(ctx, testCase);
    }
  } catch (error) {
    return { ok: false, failures: [`threw ${describeError(error)}`], notes: [] };
  }
}
