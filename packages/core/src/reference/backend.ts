/**
 * The reference backend: Fastmax's factorized attention written to be read. Start here if you are
 * writing a backend. Everything is float64, one (batch, query head) at a time, with no tricks; a fast
 * backend does the same arithmetic with tiles, threads and matrix products.
 *
 * The recipe (docs/math.md has the derivations):
 *
 * 1. `prepareScores` turns every normalization into s_ij = σ_i (x_i · y_j).
 * 2. The kernel f(s) = Σ a_l s^l factorizes: f(σ x·y) = ⟨φQ(x, σ), φK(y)⟩ (features.ts).
 * 3. The output row is o_i = Σ_j f(s_ij) [v_j | 1], numerator | denominator. Keys reach a row in one of
 *    two ways, decided by the schedule (chunked.ts): through the moment state S = Σ_j φK(y_j) ⊗ [v_j | 1]
 *    (read as φQ(x_i, σ_i)ᵀ S), or directly, pair by pair. Non-causal factorized: every key goes
 *    through S. Causal factorized: keys before the query chunk go through S, the chunk's own diagonal
 *    block is direct. Direct path: every key is direct.
 * 4. A row whose denominator is <= 0 is degenerate: zero output, zero gradient, counted.
 *
 * The backward pass reuses the same schedule: one pass in chunk order for the query gradients (and
 * for the direct blocks), one pass in reverse chunk order for the key gradients of the state, with
 * moments over queries instead of keys. Memory stays linear in N.
 */
import { kernelDerivative, kernelValue } from '../algebra.js';
import { type QueryChunk, querySchedule } from '../chunked.js';
import {
  type BackendState,
  type BackwardRequest,
  type BackwardResult,
  type FastmaxBackend,
  type ForwardRequest,
  type ForwardResult,
  type ResolvedStateOptions,
  SPEC_VERSION,
  type StepResult,
} from '../contract.js';
import { FastmaxError } from '../errors.js';
import {
  type FeatureLayout,
  featureCoefficients,
  featureLayout,
  keyFeatures,
  keyFeaturesBackward,
  queryFeatures,
} from '../features.js';
import { NORMALIZATION_KINDS, type ResolvedOptions, SUPPORTED_ORDERS } from '../options.js';
import { type AttentionPlan, MAX_MOMENT_VALUES } from '../planner.js';
import {
  nonZeroDivisor,
  type PreparedScores,
  prepareScores,
  prepareScoresBackward,
  prepareToken,
} from '../prepare.js';
import { type HostTensor, hostTensor, type Tensor, toHost } from '../tensor.js';
import { type AttentionShape, keyLimit, kvHeadOf } from '../validate.js';

/**
 * Σ_t φ(t) ⊗ r_t over the tokens added so far: an F × width matrix. Over keys, with r_j = [v_j | 1],
 * it is the forward state (numerator | denominator). Over queries, with r_i = γ_i (see `rowGradient`),
 * it carries the key gradients of the backward pass.
 */
class FeatureMoments {
  readonly sums: Float64Array;

  constructor(
    readonly featureCount: number,
    readonly width: number,
  ) {
    assertMomentsFit(featureCount * width, 'options.path');
    this.sums = new Float64Array(featureCount * width);
  }

  /** sums += φ ⊗ r. */
  add(features: Float64Array, row: Float64Array): void {
    const { sums, width } = this;
    for (let f = 0; f < this.featureCount; f++) {
      const feature = features[f]!;
      if (feature === 0) continue;
      for (let c = 0; c < width; c++) sums[f * width + c]! += feature * row[c]!;
    }
  }

  /** into += φᵀ · sums: the width-long row the features select. */
  readInto(features: Float64Array, into: Float64Array): void {
    const { sums, width } = this;
    for (let f = 0; f < this.featureCount; f++) {
      const feature = features[f]!;
      if (feature === 0) continue;
      for (let c = 0; c < width; c++) into[c]! += feature * sums[f * width + c]!;
    }
  }

  /** out_f = sums[f] · vector: how the read-out of each feature moves with that feature. */
  project(vector: Float64Array, out: Float64Array): void {
    const { sums, width } = this;
    for (let f = 0; f < this.featureCount; f++) {
      let dot = 0;
      for (let c = 0; c < width; c++) dot += sums[f * width + c]! * vector[c]!;
      out[f] = dot;
    }
  }

  clear(): void {
    this.sums.fill(0);
  }
}

function assertMomentsFit(values: number, argument: string): void {
  if (values > MAX_MOMENT_VALUES) {
    throw new FastmaxError('RESOURCE_EXHAUSTED', 'the factorized moment state is too large', {
      argument,
      expected: `at most ${MAX_MOMENT_VALUES} moment values (use the direct path for this head dim and order)`,
      actual: `${values} values`,
    });
  }
}

/** What every head of one call shares. */
interface Call {
  readonly shape: AttentionShape;
  readonly options: ResolvedOptions;
  readonly plan: AttentionPlan;
  readonly prepared: PreparedScores;
  readonly values: Float32Array;
  /** The feature map; null on the direct path, which never needs one. */
  readonly features: { readonly layout: FeatureLayout; readonly coefficients: Float64Array } | null;
}

/** One (batch, query head): where its rows live in the flat arrays, and its chunk schedule. */
interface Head {
  readonly batch: number;
  /** Row of query 0 in the B×H×N arrays (x, σ, output). */
  readonly firstQuery: number;
  /** Row of key 0 of its kv head in the B×Hkv×M arrays (y, v). */
  readonly firstKey: number;
  readonly schedule: readonly QueryChunk[];
}

function openCall(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  shape: AttentionShape,
  options: ResolvedOptions,
  plan: AttentionPlan,
): Call {
  let features: Call['features'] = null;
  if (plan.path === 'factorized') {
    const layout = featureLayout(shape.headDim, options.order);
    assertMomentsFit(layout.featureCount * (shape.valueDim + 1), 'options.path');
    features = { layout, coefficients: featureCoefficients(layout, options.coefficients) };
  }
  return { shape, options, plan, prepared: prepareScores(q, k, shape, options), values: v.data, features };
}

/**
 * Every (batch, query head) of the call. Query heads of a GQA group read the same kv head; to keep
 * each head self-contained this backend rebuilds that kv head's key moments for every query head of
 * the group. A fast backend builds them once per kv head and serves the whole group from them.
 */
function* headsOf(call: Call): Generator<Head> {
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M } = call.shape;
  for (let b = 0; b < B; b++) {
    const schedule = querySchedule(b, call.shape, call.options, call.plan.path, call.plan.chunkSize);
    for (let h = 0; h < H; h++) {
      yield {
        batch: b,
        firstQuery: (b * H + h) * N,
        firstKey: (b * Hkv + kvHeadOf(h, call.shape)) * M,
        schedule,
      };
    }
  }
}

/** s_ij = σ_i (x_i · y_j), rows given as flat row indices. */
function score(call: Call, queryRow: number, keyRow: number): number {
  const { x, y, sigma } = call.prepared;
  const D = call.shape.headDim;
  let dot = 0;
  for (let d = 0; d < D; d++) dot += x[queryRow * D + d]! * y[keyRow * D + d]!;
  return sigma[queryRow]! * dot;
}

/** [v_j | 1]: the row a key contributes, weighted by f(s_ij), to numerator | denominator. */
function valueRow(call: Call, keyRow: number, out: Float64Array): Float64Array {
  const Dv = call.shape.valueDim;
  for (let d = 0; d < Dv; d++) out[d] = call.values[keyRow * Dv + d]!;
  out[Dv] = 1;
  return out;
}

/** Adds keys [from, to) of the head to the key moments S = Σ_j φK(y_j) ⊗ [v_j | 1]. */
function addKeysToState(call: Call, head: Head, state: FeatureMoments, from: number, to: number): void {
  const { layout } = call.features!;
  const phi = new Float64Array(layout.featureCount);
  const row = new Float64Array(call.shape.valueDim + 1);
  for (let j = from; j < to; j++) {
    const keyRow = head.firstKey + j;
    keyFeatures(layout, call.prepared.y, phi, keyRow * call.shape.headDim);
    state.add(phi, valueRow(call, keyRow, row));
  }
}

/** sums += φQ(x_i, σ_i)ᵀ S: every key in the state at once. */
function readState(
  call: Call,
  queryRow: number,
  state: FeatureMoments,
  phi: Float64Array,
  sums: Float64Array,
): void {
  const { layout } = call.features!;
  const { x, sigma } = call.prepared;
  queryFeatures(layout, x, sigma[queryRow]!, call.options.coefficients, phi, queryRow * call.shape.headDim);
  state.readInto(phi, sums);
}

/** sums += Σ_{j in [from, to)} f(s_ij) [v_j | 1], pair by pair. */
function addDirectKeys(
  call: Call,
  head: Head,
  queryRow: number,
  from: number,
  to: number,
  sums: Float64Array,
): void {
  const Dv = call.shape.valueDim;
  for (let j = from; j < to; j++) {
    const keyRow = head.firstKey + j;
    const weight = kernelValue(call.options.coefficients, score(call, queryRow, keyRow));
    for (let d = 0; d < Dv; d++) sums[d]! += weight * call.values[keyRow * Dv + d]!;
    sums[Dv]! += weight;
  }
}

/** Keys of the schedule's chunk `index` that enter the state just before it. */
function keysEnteringState(schedule: readonly QueryChunk[], index: number): { from: number; to: number } {
  return { from: index === 0 ? 0 : schedule[index - 1]!.stateKeyEnd, to: schedule[index]!.stateKeyEnd };
}

/**
 * Numerator | denominator of one row, from the state and its direct keys. This is the whole forward
 * kernel; the backward pass calls it again rather than storing anything of size N × M.
 */
function rowSums(
  call: Call,
  head: Head,
  chunk: QueryChunk,
  i: number,
  state: FeatureMoments | null,
  phi: Float64Array,
  sums: Float64Array,
): void {
  const queryRow = head.firstQuery + i;
  sums.fill(0);
  if (state !== null) readState(call, queryRow, state, phi, sums);
  addDirectKeys(
    call,
    head,
    queryRow,
    chunk.stateKeyEnd,
    keyLimit(head.batch, i, call.shape, call.options),
    sums,
  );
}

function newKeyState(call: Call): FeatureMoments | null {
  return call.features === null
    ? null
    : new FeatureMoments(call.features.layout.featureCount, call.shape.valueDim + 1);
}

/** o_i = numerator / denominator, or a zero row when the denominator is <= 0. Returns false then. */
function writeOutputRow(sums: Float64Array, output: Float64Array, offset: number, Dv: number): boolean {
  const denominator = sums[Dv]!;
  if (!(denominator > 0)) {
    output.fill(0, offset, offset + Dv);
    return false;
  }
  for (let d = 0; d < Dv; d++) output[offset + d] = sums[d]! / denominator;
  return true;
}

function forwardHead(call: Call, head: Head, output: Float64Array, denominators: Float64Array): number {
  const Dv = call.shape.valueDim;
  const state = newKeyState(call);
  const phi = new Float64Array(call.features?.layout.featureCount ?? 0);
  const sums = new Float64Array(Dv + 1);
  let degenerateRows = 0;
  head.schedule.forEach((chunk, index) => {
    const entering = keysEnteringState(head.schedule, index);
    if (state !== null) addKeysToState(call, head, state, entering.from, entering.to);
    for (let i = chunk.queryStart; i < chunk.queryEnd; i++) {
      rowSums(call, head, chunk, i, state, phi, sums);
      const queryRow = head.firstQuery + i;
      denominators[queryRow] = sums[Dv]!;
      if (!writeOutputRow(sums, output, queryRow * Dv, Dv)) degenerateRows++;
    }
  });
  return degenerateRows;
}

export interface ReferenceForward {
  /** B×H×N×Dv, float64. */
  readonly output: Float64Array;
  /** Σ_j f(s_ij) per row, B×H×N. */
  readonly denominators: Float64Array;
  readonly degenerateRows: number;
}

/**
 * The forward pass in float64, following `plan.path` and `plan.chunkSize`. The backend rounds its
 * output to float32; tests compare this one with the oracle at float64 precision.
 */
export function referenceForward(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  shape: AttentionShape,
  options: ResolvedOptions,
  plan: AttentionPlan,
): ReferenceForward {
  const call = openCall(q, k, v, shape, options, plan);
  const { batch: B, heads: H, queryLength: N, valueDim: Dv } = shape;
  const output = new Float64Array(B * H * N * Dv);
  const denominators = new Float64Array(B * H * N);
  let degenerateRows = 0;
  for (const head of headsOf(call)) degenerateRows += forwardHead(call, head, output, denominators);
  return { output, denominators, degenerateRows };
}

/** Float64 gradients of x, y, σ and v, before `prepareScoresBackward` maps x, y, σ back to q, k. */
interface ScoreGradients {
  readonly dx: Float64Array;
  readonly dy: Float64Array;
  readonly dsigma: Float64Array;
  readonly dv: Float64Array;
}

/**
 * γ_i = [dO_i / den_i | -(dO_i · o_i) / den_i], so that the loss gradient of weight w_ij is
 * g_ij = γ_i · [v_j | 1] = dO_i · (v_j - o_i) / den_i. Returns false (γ = 0) for a degenerate row:
 * its output is a constant 0, so nothing flows back through it.
 */
function rowGradient(
  sums: Float64Array,
  dOut: Float32Array,
  queryRow: number,
  Dv: number,
  gamma: Float64Array,
): boolean {
  const denominator = sums[Dv]!;
  gamma.fill(0);
  if (!(denominator > 0)) return false;
  let outputProjection = 0;
  for (let d = 0; d < Dv; d++) {
    const upstream = dOut[queryRow * Dv + d]!;
    gamma[d] = upstream / denominator;
    outputProjection += upstream * (sums[d]! / denominator);
  }
  gamma[Dv] = -outputProjection / denominator;
  return true;
}

/**
 * dz_i += Σ_{j in state} ds_ij y_j, with z_i = σ_i x_i. Through the moments:
 * Σ_j f(z·y_j) g_ij = Σ_f c_f z^m (S[f] · γ_i), whose gradient in z is `keyFeaturesBackward` of
 * the plain monomials of z with adjoint c_f (S[f] · γ_i).
 */
function addStateQueryGradient(
  call: Call,
  state: FeatureMoments,
  z: Float64Array,
  gamma: Float64Array,
  dz: Float64Array,
): void {
  const { layout, coefficients } = call.features!;
  const monomials = keyFeatures(layout, z, new Float64Array(layout.featureCount));
  const adjoint = new Float64Array(layout.featureCount);
  state.project(gamma, adjoint);
  for (let f = 0; f < adjoint.length; f++) adjoint[f] = adjoint[f]! * coefficients[f]!;
  keyFeaturesBackward(layout, z, monomials, adjoint, dz);
}

/**
 * The direct pairs of row i, both sides at once: ds_ij = g_ij f'(s_ij); dz_i += ds_ij y_j;
 * dy_j += ds_ij z_i; dv_j += w_ij dO_i / den_i.
 */
function addDirectGradients(
  call: Call,
  head: Head,
  queryRow: number,
  from: number,
  to: number,
  z: Float64Array,
  gamma: Float64Array,
  dz: Float64Array,
  gradients: ScoreGradients,
): void {
  const { headDim: D, valueDim: Dv } = call.shape;
  const { y } = call.prepared;
  const coefficients = call.options.coefficients;
  for (let j = from; j < to; j++) {
    const keyRow = head.firstKey + j;
    const s = score(call, queryRow, keyRow);
    const weight = kernelValue(coefficients, s);
    let weightGradient = gamma[Dv]!;
    for (let d = 0; d < Dv; d++) weightGradient += gamma[d]! * call.values[keyRow * Dv + d]!;
    const scoreGradient = weightGradient * kernelDerivative(coefficients, s);
    for (let d = 0; d < D; d++) {
      dz[d]! += scoreGradient * y[keyRow * D + d]!;
      gradients.dy[keyRow * D + d]! += scoreGradient * z[d]!;
    }
    for (let d = 0; d < Dv; d++) gradients.dv[keyRow * Dv + d]! += weight * gamma[d]!;
  }
}

/**
 * Pass 1, chunks in order: rebuild each row's sums exactly as the forward pass does, turn them into
 * γ_i, then the query-side gradients dx_i = σ_i dz_i and dσ_i = x_i · dz_i (from the state and the
 * direct keys), and the key-side gradients of the direct pairs. Returns γ for every row (N × (Dv+1)).
 */
function backwardQueriesInOrder(
  call: Call,
  head: Head,
  dOut: Float32Array,
  gradients: ScoreGradients,
): Float64Array {
  const { headDim: D, valueDim: Dv, queryLength: N } = call.shape;
  const { x, sigma } = call.prepared;
  const state = newKeyState(call);
  const phi = new Float64Array(call.features?.layout.featureCount ?? 0);
  const sums = new Float64Array(Dv + 1);
  const gammas = new Float64Array(N * (Dv + 1));
  const z = new Float64Array(D);
  const dz = new Float64Array(D);
  head.schedule.forEach((chunk, index) => {
    const entering = keysEnteringState(head.schedule, index);
    if (state !== null) addKeysToState(call, head, state, entering.from, entering.to);
    for (let i = chunk.queryStart; i < chunk.queryEnd; i++) {
      const queryRow = head.firstQuery + i;
      rowSums(call, head, chunk, i, state, phi, sums);
      const gamma = gammas.subarray(i * (Dv + 1), (i + 1) * (Dv + 1));
      if (!rowGradient(sums, dOut, queryRow, Dv, gamma)) continue;
      const rowSigma = sigma[queryRow]!;
      for (let d = 0; d < D; d++) z[d] = rowSigma * x[queryRow * D + d]!;
      dz.fill(0);
      if (state !== null) addStateQueryGradient(call, state, z, gamma, dz);
      const limit = keyLimit(head.batch, i, call.shape, call.options);
      addDirectGradients(call, head, queryRow, chunk.stateKeyEnd, limit, z, gamma, dz, gradients);
      let dsigma = 0;
      for (let d = 0; d < D; d++) {
        gradients.dx[queryRow * D + d] = rowSigma * dz[d]!;
        dsigma += x[queryRow * D + d]! * dz[d]!;
      }
      gradients.dsigma[queryRow] = dsigma;
    }
  });
  return gammas;
}

/**
 * Pass 2, chunks in reverse: the mirror image of the forward state. The query moments
 * Q = Σ_i φQ(x_i, σ_i) ⊗ γ_i hold the chunks from the current one to the last; the keys that entered
 * the state just before the current chunk are read by exactly those queries, so for each such key:
 * dv_j += (φK(y_j)ᵀ Q)[:Dv] and dy_j += ∇_y Σ_f φK_f(y) (Q[f] · [v_j | 1]).
 */
function backwardStateKeysInReverse(
  call: Call,
  head: Head,
  gammas: Float64Array,
  gradients: ScoreGradients,
): void {
  const { layout } = call.features!;
  const { headDim: D, valueDim: Dv } = call.shape;
  const { x, y, sigma } = call.prepared;
  const queryMoments = new FeatureMoments(layout.featureCount, Dv + 1);
  const phi = new Float64Array(layout.featureCount);
  const adjoint = new Float64Array(layout.featureCount);
  const read = new Float64Array(Dv + 1);
  const row = new Float64Array(Dv + 1);
  for (let index = head.schedule.length - 1; index >= 0; index--) {
    const chunk = head.schedule[index]!;
    for (let i = chunk.queryStart; i < chunk.queryEnd; i++) {
      const queryRow = head.firstQuery + i;
      queryFeatures(layout, x, sigma[queryRow]!, call.options.coefficients, phi, queryRow * D);
      queryMoments.add(phi, gammas.subarray(i * (Dv + 1), (i + 1) * (Dv + 1)));
    }
    const entering = keysEnteringState(head.schedule, index);
    for (let j = entering.from; j < entering.to; j++) {
      const keyRow = head.firstKey + j;
      keyFeatures(layout, y, phi, keyRow * D);
      read.fill(0);
      queryMoments.readInto(phi, read);
      for (let d = 0; d < Dv; d++) gradients.dv[keyRow * Dv + d]! += read[d]!;
      queryMoments.project(valueRow(call, keyRow, row), adjoint);
      keyFeaturesBackward(layout, y, phi, adjoint, gradients.dy, keyRow * D, keyRow * D);
    }
  }
}

export interface ReferenceGradients {
  readonly dq: Float64Array;
  readonly dk: Float64Array;
  readonly dv: Float64Array;
}

/** The backward pass in float64, following `plan.path` and `plan.chunkSize`. */
export function referenceBackwardPass(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  dOut: HostTensor,
  shape: AttentionShape,
  options: ResolvedOptions,
  plan: AttentionPlan,
): ReferenceGradients {
  const call = openCall(q, k, v, shape, options, plan);
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
  const gradients: ScoreGradients = {
    dx: new Float64Array(B * H * N * D),
    dy: new Float64Array(B * Hkv * M * D),
    dsigma: new Float64Array(B * H * N),
    dv: new Float64Array(B * Hkv * M * Dv),
  };
  for (const head of headsOf(call)) {
    const gammas = backwardQueriesInOrder(call, head, dOut.data, gradients);
    if (call.features !== null) backwardStateKeysInReverse(call, head, gammas, gradients);
  }
  const { dq, dk } = prepareScoresBackward(
    call.prepared,
    shape,
    options,
    gradients.dx,
    gradients.dy,
    gradients.dsigma,
  );
  return { dq, dk, dv: gradients.dv };
}

/**
 * Recurrent decoding. Per (batch, kv head): the unscaled key moments S = Σ_j φK(y_j) ⊗ [v_j | 1] and
 * the running largest centered key norm; per (batch, query head): the running largest centered query
 * norm. Each token is prepared exactly as `prepareScores` prepares row i of a causal call over all
 * tokens so far (the same operations in the same order), its key is added, then its query reads S.
 * Memory is O(F·(Dv+1)) per kv head whatever the number of tokens.
 */
class ReferenceState implements BackendState {
  readonly #config: ResolvedStateOptions;
  /** The sizes of one token, so that `kvHeadOf` maps query heads to kv heads as in a full call. */
  readonly #tokenShape: AttentionShape;
  readonly #layout: FeatureLayout;
  readonly #keyMoments: FeatureMoments[];
  readonly #keyMaxNorms: Float64Array;
  readonly #queryMaxNorms: Float64Array;
  #tokens = 0;
  #disposed = false;

  constructor(config: ResolvedStateOptions) {
    this.#config = config;
    const { batch, heads, kvHeads, headDim, valueDim } = config;
    this.#tokenShape = { batch, heads, kvHeads, queryLength: 1, keyLength: 1, headDim, valueDim };
    this.#layout = featureLayout(config.headDim, config.options.order);
    const width = config.valueDim + 1;
    const streams = config.batch * config.kvHeads;
    assertMomentsFit(streams * this.#layout.featureCount * width, 'options.headDim');
    this.#keyMoments = Array.from(
      { length: streams },
      () => new FeatureMoments(this.#layout.featureCount, width),
    );
    this.#keyMaxNorms = new Float64Array(streams);
    this.#queryMaxNorms = new Float64Array(config.batch * config.heads);
  }

  get tokens(): number {
    return this.#tokens;
  }

  async step(qTensor: Tensor, kTensor: Tensor, vTensor: Tensor): Promise<StepResult> {
    this.#assertLive();
    const [q, k, v] = await Promise.all([toHost(qTensor), toHost(kTensor), toHost(vTensor)]);
    const { batch: B, heads: H, kvHeads: Hkv, valueDim: Dv } = this.#config;
    const T = q.shape[2];
    const output = new Float32Array(B * H * T * Dv);
    let degenerateRows = 0;
    for (let t = 0; t < T; t++) {
      for (let b = 0; b < B; b++) {
        // Key first: token t sees itself, as in causal attention with N = M.
        for (let g = 0; g < Hkv; g++) this.#addKey(b, g, k, v, t, T);
        for (let h = 0; h < H; h++) {
          if (!this.#readQuery(b, h, q, t, T, output)) degenerateRows++;
        }
      }
      this.#tokens++;
    }
    return { output: hostTensor([B, H, T, Dv], output), degenerateRows };
  }

  reset(): void {
    this.#assertLive();
    for (const moments of this.#keyMoments) moments.clear();
    this.#keyMaxNorms.fill(0);
    this.#queryMaxNorms.fill(0);
    this.#tokens = 0;
  }

  dispose(): void {
    this.#disposed = true;
    this.#keyMoments.length = 0;
  }

  #assertLive(): void {
    if (this.#disposed) {
      throw new FastmaxError('DISPOSED', 'this decoding state was disposed', { argument: 'state' });
    }
  }

  #addKey(b: number, g: number, k: HostTensor, v: HostTensor, t: number, T: number): void {
    const { kvHeads: Hkv, headDim: D, valueDim: Dv, options } = this.#config;
    const stream = b * Hkv + g;
    const source = (stream * T + t) * D;
    const { vector: y, norm } = prepareToken(k.data, source, D, options.normalization.kind !== 'scale');
    // prefix-max-norm leaves keys unscaled; their running maximum only enters σ.
    if (norm > this.#keyMaxNorms[stream]!) this.#keyMaxNorms[stream] = norm;
    const row = new Float64Array(Dv + 1);
    for (let d = 0; d < Dv; d++) row[d] = v.data[(stream * T + t) * Dv + d]!;
    row[Dv] = 1;
    this.#keyMoments[stream]!.add(
      keyFeatures(this.#layout, y, new Float64Array(this.#layout.featureCount)),
      row,
    );
  }

  #readQuery(b: number, h: number, q: HostTensor, t: number, T: number, output: Float32Array): boolean {
    const { heads: H, kvHeads: Hkv, headDim: D, valueDim: Dv, options } = this.#config;
    const head = b * H + h;
    const stream = b * Hkv + kvHeadOf(h, this.#tokenShape);
    const normalization = options.normalization;
    const { vector: x, norm } = prepareToken(q.data, (head * T + t) * D, D, normalization.kind !== 'scale');
    let sigma: number;
    if (normalization.kind === 'scale') {
      sigma = normalization.scale / options.temperature;
    } else {
      if (norm > this.#queryMaxNorms[head]!) this.#queryMaxNorms[head] = norm;
      const divisor = nonZeroDivisor(this.#queryMaxNorms[head]!);
      for (let d = 0; d < D; d++) x[d] = x[d]! / divisor;
      sigma = 1 / (nonZeroDivisor(this.#keyMaxNorms[stream]!) * options.temperature);
    }
    const phi = queryFeatures(
      this.#layout,
      x,
      sigma,
      options.coefficients,
      new Float64Array(this.#layout.featureCount),
    );
    const sums = new Float64Array(Dv + 1);
    this.#keyMoments[stream]!.readInto(phi, sums);
    const row = new Float64Array(Dv);
    const regular = writeOutputRow(sums, row, 0, Dv);
    output.set(row, (head * T + t) * Dv);
    return regular;
  }
}

function toFloat32(shape: readonly [number, number, number, number], values: Float64Array): HostTensor {
  return hostTensor(shape, Float32Array.from(values));
}

/**
 * The reference backend. Every capability, host float32 tensors in and out, float64 inside.
 * maxHeadDim is 256: the factorized path needs F = Σ_l C(D+l-1, l) ~ D^p/p! features, so large D
 * with a high order is refused there (RESOURCE_EXHAUSTED) and planned onto the direct path, which
 * costs O(N·M·(D+Dv)) and handles any D; beyond 256 neither path is reasonable in plain TypeScript.
 */
export function referenceBackend(): FastmaxBackend {
  return {
    name: 'reference',
    specVersion: SPEC_VERSION,
    capabilities: {
      orders: SUPPORTED_ORDERS,
      normalizations: NORMALIZATION_KINDS,
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
    },
    async isAvailable() {
      return { available: true };
    },
    async forward(request: ForwardRequest): Promise<ForwardResult> {
      const [q, k, v] = await Promise.all([toHost(request.q), toHost(request.k), toHost(request.v)]);
      const { shape } = request;
      const result = referenceForward(q, k, v, shape, request.options, request.plan);
      return {
        output: toFloat32([shape.batch, shape.heads, shape.queryLength, shape.valueDim], result.output),
        degenerateRows: result.degenerateRows,
      };
    },
    async backward(request: BackwardRequest): Promise<BackwardResult> {
      const [q, k, v, dOut] = await Promise.all([
        toHost(request.q),
        toHost(request.k),
        toHost(request.v),
        toHost(request.dOut),
      ]);
      const { shape } = request;
      const { dq, dk, dv } = referenceBackwardPass(q, k, v, dOut, shape, request.options, request.plan);
      return {
        dq: toFloat32([shape.batch, shape.heads, shape.queryLength, shape.headDim], dq),
        dk: toFloat32([shape.batch, shape.kvHeads, shape.keyLength, shape.headDim], dk),
        dv: toFloat32([shape.batch, shape.kvHeads, shape.keyLength, shape.valueDim], dv),
      };
    },
    createState(options: ResolvedStateOptions): BackendState {
      return new ReferenceState(options);
    },
    dispose() {},
  };
}
