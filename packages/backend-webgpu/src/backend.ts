import {
  type AttentionShape,
  type Availability,
  type BackendCapabilities,
  type BackendState,
  type BackwardRequest,
  type BackwardResult,
  chunkRanges,
  type FastmaxBackend,
  FastmaxError,
  type ForwardRequest,
  type ForwardResult,
  featureCount,
  type HostTensor,
  isDeviceTensor,
  type Order,
  type ResolvedOptions,
  type ResolvedStateOptions,
  type Shape4,
  SPEC_VERSION,
  type StepResult,
  type Tensor,
} from '@fastmax/core';
import { featureTable } from './features.js';
import { acquireDevice } from './gpu.js';
import {
  addProgram,
  applyProgram,
  argmaxScanProgram,
  argmaxScatterProgram,
  backwardKeyProgram,
  backwardQueryProgram,
  backwardUpstreamProgram,
  blockKeyProgram,
  blockQueryProgram,
  chainRowsProgram,
  convertProgram,
  dimBucket,
  directKeyTile,
  directProgram,
  divideRowsProgram,
  divisorGradientProgram,
  featureGradientProgram,
  keyDivisorsProgram,
  momentsProgram,
  NormalizationCode,
  normalizeProgram,
  PRODUCT_TILE,
  prefixMaxProgram,
  queryScalesProgram,
  rowNormsProgram,
  scaleRowsProgram,
  sigmaGradientProgram,
  traceArgmaxProgram,
  valueRowsProgram,
} from './kernels.js';
import { Runtime, type WorkLimits } from './runtime.js';
import { BACKEND_NAME, WebGpuTensor } from './tensor.js';

export interface WebGpuBackendOptions {
  /** Use this device (it is not destroyed by `dispose()`). Default: request an adapter and a device. */
  readonly device?: GPUDevice;
  readonly powerPreference?: GPUPowerPreference;
  /**
   * Whether a software adapter (lavapipe, SwiftShader: `adapter.info.isFallbackAdapter`) counts as
   * available. Default `'allow'`; a list of backends in order of preference passes `'reject'` so a
   * CPU backend wins over WebGPU emulated on the CPU.
   */
  readonly fallbackAdapter?: 'allow' | 'reject';
  /** Lower the limits the backend splits its work by (tests use this to force splitting). */
  readonly limits?: Partial<WorkLimits>;
  /** Wrap submissions in validation / out-of-memory error scopes (slower; errors become BACKEND_ERROR). */
  readonly debug?: boolean;
}

export interface WebGpuBackend extends FastmaxBackend {
  /** The device in use, once available (for chaining with the user's own WebGPU work). */
  device(): Promise<GPUDevice>;
  /** The adapter in words (vendor, architecture, device), or 'user device'. */
  adapterDescription(): Promise<string>;
  /**
   * Uploads a host tensor into a device tensor of this backend; `'float16'` stores it in half
   * precision (needs the adapter's shader-f16; kernels still compute in float32).
   */
  toDevice(tensor: HostTensor, dtype?: 'float32' | 'float16'): Promise<WebGpuTensor>;
}

/**
 * Causal chunks hold at least N / MAX_CAUSAL_STEPS query rows when the caller leaves the chunk to the
 * planner. On the GPU every chunk is a moments dispatch and an apply dispatch that wait for the one
 * before, and the planner's chunk (CPU-sized: at most 256, 32 at p = 1 and D = 64) makes those
 * steps too small to fill a GPU: on an H200 (B·H = 16, N = 65536) p = 1 causal took 350 ms against
 * 80 ms non-causal, and p = 2 causal 288 ms against 133. Larger chunks add diagonal-block pairs
 * (N·C/2 per head), all of them in the one direct dispatch.
 */
const MAX_CAUSAL_STEPS = 64;
const MAX_CAUSAL_CHUNK = 4096;

export function causalChunk(plannerChunk: number, options: ResolvedOptions, queryLength: number): number {
  if (!options.causal || options.chunkSize !== undefined) return plannerChunk;
  let chunk = plannerChunk;
  while (chunk * MAX_CAUSAL_STEPS < queryLength && chunk * 2 <= MAX_CAUSAL_CHUNK) chunk *= 2;
  return chunk;
}

export const WEBGPU_CAPABILITIES: BackendCapabilities = {
  orders: [1, 2, 3, 4],
  normalizations: ['max-norm', 'prefix-max-norm', 'l2', 'scale'],
  maxHeadDim: 256,
  causal: true,
  keyPadding: true,
  groupedQuery: true,
  crossAttention: true,
  backward: true,
  state: true,
  // float16 is storage only (device tensors from toDevice), on adapters with shader-f16.
  dtypes: ['float32', 'float16'],
  paths: ['factorized', 'direct'],
  deviceTensors: true,
  // Host outputs are read back pass by pass into the caller's options.out when given.
  writesIntoOut: true,
};

interface Slice {
  readonly buffer: GPUBuffer;
  readonly size: number;
}

/** What one kernel sequence needs to know about its sizes. */
export interface Geometry {
  readonly units: number;
  readonly G: number;
  readonly N: number;
  readonly M: number;
  readonly D: number;
  readonly Dv: number;
}

function polynomialValues(options: ResolvedOptions): Record<string, number> {
  const values: Record<string, number> = {};
  for (let l = 0; l <= 4; l++) values[`a${l}`] = options.coefficients[l] ?? 0;
  return values;
}

function baseSigma(options: ResolvedOptions): number {
  const scale = options.normalization.kind === 'scale' ? options.normalization.scale : 1;
  return scale / options.temperature;
}

/** Per-unit valid key counts (a unit is one (batch, kv head)). */
function validKeyCounts(
  shape: AttentionShape,
  options: ResolvedOptions,
  u0: number,
  u1: number,
): Uint32Array {
  const counts = new Uint32Array(u1 - u0);
  for (let unit = u0; unit < u1; unit++) {
    const batch = Math.floor(unit / shape.kvHeads);
    counts[unit - u0] = options.keyLengths === null ? shape.keyLength : options.keyLengths[batch]!;
  }
  return counts;
}

/**
 * One pass of work: units [u0, u1) with their query heads [g0, g1) each. Query-like tensors of a
 * pass are the contiguous query heads [h0, h1); key-like ones the units [u0, u1).
 */
interface Pass {
  readonly u0: number;
  readonly u1: number;
  readonly g0: number;
  readonly g1: number;
  readonly h0: number;
  readonly h1: number;
}

/**
 * Passes that keep every binding within maxStorageBufferBindingSize: as many whole units as fit,
 * or, when one unit's query heads do not fit together (grouped-query attention at large N), one
 * unit at a time in groups of its query heads (its keys are then read once per group). Only a
 * single query head or a single kv head too large for a binding is refused.
 */
function planPasses(
  runtime: Runtime,
  units: number,
  G: number,
  perQueryHead: readonly number[],
  perUnit: readonly number[],
): Pass[] {
  const limit = runtime.limits.maxStorageBufferBindingSize;
  const headBytes = Math.max(...perQueryHead);
  const unitBytes = Math.max(...perUnit);
  if (headBytes > limit || unitBytes > limit) {
    throw new FastmaxError('RESOURCE_EXHAUSTED', 'one attention head does not fit in a storage binding', {
      argument: 'q, k, v',
      expected: `<= ${limit} bytes per head (maxStorageBufferBindingSize)`,
      actual: `${Math.max(headBytes, unitBytes)} bytes`,
    });
  }
  const passes: Pass[] = [];
  const wholeUnits = Math.min(Math.floor(limit / (headBytes * G)), Math.floor(limit / unitBytes));
  if (wholeUnits >= 1) {
    for (let u0 = 0; u0 < units; u0 += wholeUnits) {
      const u1 = Math.min(units, u0 + wholeUnits);
      passes.push({ u0, u1, g0: 0, g1: G, h0: u0 * G, h1: u1 * G });
    }
    return passes;
  }
  const headsPerPass = Math.floor(limit / headBytes);
  for (let u = 0; u < units; u++) {
    for (let g0 = 0; g0 < G; g0 += headsPerPass) {
      const g1 = Math.min(G, g0 + headsPerPass);
      passes.push({ u0: u, u1: u + 1, g0, g1, h0: u * G + g0, h1: u * G + g1 });
    }
  }
  return passes;
}

/**
 * Records normalization (core's prepareScores, in f32): x, y and σ from q and k. `runningQ` (per
 * query head) and `runningK` (per unit) hold the prefix maxima the scans start from and end with.
 */
export function recordPrepare(
  runtime: Runtime,
  encoder: GPUCommandEncoder,
  temporaries: GPUBuffer[],
  geometry: Geometry,
  options: ResolvedOptions,
  q: Slice,
  k: Slice,
  validKeys: GPUBuffer,
  runningQ: GPUBuffer,
  runningK: GPUBuffer,
  borrowed: GPUBuffer[],
): PreparedSlices {
  const { units, G, N, M, D } = geometry;
  const queryRows = units * G * N;
  const keyRows = units * M;
  const take = (bytes: number): Slice => {
    const buffer = runtime.acquire(bytes);
    borrowed.push(buffer);
    return { buffer, size: bytes };
  };
  const x = take(queryRows * D * 4);
  const y = take(keyRows * D * 4);
  const sigma = take(queryRows * 4);
  const queryNorms = take(queryRows * 4);
  const keyNorms = take(keyRows * 4);
  const queryDivisor = take(queryRows * 4);
  const keyDivisor = take(keyRows * 4);
  const mode = NormalizationCode[options.normalization.kind];
  const centered = mode === NormalizationCode.scale ? 0 : 1;
  runtime.dispatch(
    encoder,
    rowNormsProgram(),
    { source: q, centeredRows: x, norms: queryNorms },
    { rows: queryRows, dim: D, centered },
    runtime.linearGrid(queryRows, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    rowNormsProgram(),
    { source: k, centeredRows: y, norms: keyNorms },
    { rows: keyRows, dim: D, centered },
    runtime.linearGrid(keyRows, 64),
    temporaries,
  );
  const queryPrefix = take(queryRows * 4);
  const keyPrefix = take(keyRows * 4);
  const keyRunningBefore = take(units * 4);
  // σ of rows that see no key yet uses the key maximum from before this call (decoding).
  encoder.copyBufferToBuffer(runningK, 0, keyRunningBefore.buffer, 0, units * 4);
  runtime.dispatch(
    encoder,
    prefixMaxProgram(),
    { values: queryNorms, prefix: queryPrefix, running: runningQ },
    { length: N },
    [1, 1, units * G],
    temporaries,
  );
  runtime.dispatch(
    encoder,
    prefixMaxProgram(),
    { values: keyNorms, prefix: keyPrefix, running: runningK },
    { length: M },
    [1, 1, units],
    temporaries,
  );
  runtime.dispatch(
    encoder,
    queryScalesProgram(),
    { queryNorms, queryPrefix, keyPrefix, keyRunning: keyRunningBefore, validKeys, queryDivisor, sigma },
    { N, M, causal: options.causal ? 1 : 0, rows: queryRows, G, mode, baseSigma: baseSigma(options) },
    runtime.linearGrid(queryRows, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    keyDivisorsProgram(),
    { keyNorms, keyPrefix, validKeys, keyDivisor },
    { rows: keyRows, M, mode },
    runtime.linearGrid(keyRows, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    divideRowsProgram(),
    { values: x, divisor: queryDivisor },
    { rows: queryRows, dim: D },
    runtime.linearGrid(queryRows, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    divideRowsProgram(),
    { values: y, divisor: keyDivisor },
    { rows: keyRows, dim: D },
    runtime.linearGrid(keyRows, 64),
    temporaries,
  );
  return { x, y, sigma, queryNorms, keyNorms, queryDivisor, keyDivisor };
}

/** What `recordPrepare` leaves on the device: the prepared x, y, σ and what divided them. */
export interface PreparedSlices {
  readonly x: Slice;
  readonly y: Slice;
  readonly sigma: Slice;
  /** |c(q_i)| per query row and |c(k_j)| per key row. */
  readonly queryNorms: Slice;
  readonly keyNorms: Slice;
  /** What x_i and y_j were divided by (1 where nothing, or a zero norm, divides). */
  readonly queryDivisor: Slice;
  readonly keyDivisor: Slice;
}

/** Gradients of the prepared quantities: dx per query row, dσ per query row, dy per key row. */
export interface PreparedGradients {
  readonly dx: Slice;
  readonly dsigma: Slice;
  readonly dy: Slice;
}

/**
 * Records core's prepareScoresBackward (in f32) for inputs prepared by `recordPrepare` in the same
 * pass (its prefix maxima started from 0): dq, dk from dx, dy, dσ. The argmax of every maximum is
 * recomputed by core's own scan (lowest index on ties, none while all norms are 0), each row's
 * gradient of the divisor is scattered onto its argmax row per sequence in a fixed order, and the
 * rows are un-centered. dk covers the pass's query heads only (a unit split into head groups adds
 * its passes' dk).
 */
export function recordPrepareBackward(
  runtime: Runtime,
  encoder: GPUCommandEncoder,
  temporaries: GPUBuffer[],
  geometry: Geometry,
  options: ResolvedOptions,
  prepared: PreparedSlices,
  validKeys: GPUBuffer,
  gradients: PreparedGradients,
  borrowed: GPUBuffer[],
): { dq: Slice; dk: Slice } {
  const { units, G, N, M, D } = geometry;
  const heads = units * G;
  const queryRows = heads * N;
  const keyRows = units * M;
  const take = (bytes: number): Slice => {
    const buffer = runtime.acquire(bytes);
    borrowed.push(buffer);
    return { buffer, size: bytes };
  };
  const kind = options.normalization.kind;
  const mode = NormalizationCode[kind];
  const dq = take(queryRows * D * 4);
  const dk = take(keyRows * D * 4);
  const queryScan = take(queryRows * 4);
  const keyScan = take(keyRows * 4);
  const queryArgmax = take(queryRows * 4);
  const keyArgmax = take(queryRows * 4);
  const queryScatter = take(queryRows * 4);
  // prefix-max-norm routes per query head (summed over the unit's heads in chainRows).
  const keyScatter = take((kind === 'prefix-max-norm' ? heads * M : keyRows) * 4);
  const queryContribution = take(queryRows * 4);
  const keyContribution = take(Math.max(queryRows, keyRows) * 4);
  encoder.clearBuffer(queryScatter.buffer, 0, Math.ceil(queryScatter.size / 4) * 4);
  encoder.clearBuffer(keyScatter.buffer, 0, Math.ceil(keyScatter.size / 4) * 4);
  runtime.dispatch(
    encoder,
    argmaxScanProgram(),
    { values: prepared.queryNorms, argmax: queryScan },
    { sequences: heads, length: N },
    runtime.linearGrid(heads, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    argmaxScanProgram(),
    { values: prepared.keyNorms, argmax: keyScan },
    { sequences: units, length: M },
    runtime.linearGrid(units, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    traceArgmaxProgram(),
    { queryNorms: prepared.queryNorms, queryScan, keyScan, validKeys, queryArgmax, keyArgmax },
    { N, M, causal: options.causal ? 1 : 0, rows: queryRows, G, mode },
    runtime.linearGrid(queryRows, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    divisorGradientProgram(),
    {
      grad: gradients.dx,
      values: prepared.x,
      divisor: prepared.queryDivisor,
      contribution: queryContribution,
    },
    { rows: queryRows, dim: D },
    runtime.linearGrid(queryRows, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    argmaxScatterProgram(),
    { contribution: queryContribution, argmax: queryArgmax, sums: queryScatter },
    { sequences: heads, length: N, targets: N, argStride: N, argStep: 1 },
    runtime.linearGrid(heads, 64),
    temporaries,
  );
  let keyRoutes = 0;
  if (kind === 'max-norm' && N > 0) {
    // One divisor per unit (its argmax is stored on every query row): every key row's dy feeds it.
    runtime.dispatch(
      encoder,
      divisorGradientProgram(),
      { grad: gradients.dy, values: prepared.y, divisor: prepared.keyDivisor, contribution: keyContribution },
      { rows: keyRows, dim: D },
      runtime.linearGrid(keyRows, 64),
      temporaries,
    );
    runtime.dispatch(
      encoder,
      argmaxScatterProgram(),
      { contribution: keyContribution, argmax: keyArgmax, sums: keyScatter },
      { sequences: units, length: M, targets: M, argStride: G * N, argStep: 0 },
      runtime.linearGrid(units, 64),
      temporaries,
    );
    keyRoutes = 1;
  } else if (kind === 'prefix-max-norm') {
    runtime.dispatch(
      encoder,
      sigmaGradientProgram(),
      { dsigma: gradients.dsigma, sigma: prepared.sigma, contribution: keyContribution },
      { rows: queryRows, temperature: options.temperature },
      runtime.linearGrid(queryRows, 64),
      temporaries,
    );
    runtime.dispatch(
      encoder,
      argmaxScatterProgram(),
      { contribution: keyContribution, argmax: keyArgmax, sums: keyScatter },
      { sequences: heads, length: N, targets: M, argStride: N, argStep: 1 },
      runtime.linearGrid(heads, 64),
      temporaries,
    );
    keyRoutes = G;
  }
  const centered = kind === 'scale' ? 0 : 1;
  runtime.dispatch(
    encoder,
    chainRowsProgram(),
    {
      grad: gradients.dx,
      z: prepared.x,
      divisor: prepared.queryDivisor,
      norms: prepared.queryNorms,
      scatter: queryScatter,
      result: dq,
    },
    { rows: queryRows, dim: D, R: N, count: 1, project: 0, centered },
    runtime.linearGrid(queryRows, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    chainRowsProgram(),
    {
      grad: gradients.dy,
      z: prepared.y,
      divisor: prepared.keyDivisor,
      norms: prepared.keyNorms,
      scatter: keyScatter,
      result: dk,
    },
    { rows: keyRows, dim: D, R: M, count: keyRoutes, project: kind === 'l2' ? 1 : 0, centered },
    runtime.linearGrid(keyRows, 64),
    temporaries,
  );
  return { dq, dk };
}

interface KernelInputs {
  readonly x: Slice;
  readonly y: Slice;
  readonly sigma: Slice;
  readonly v: Slice;
  readonly validKeys: GPUBuffer;
}

function recordMoments(
  runtime: Runtime,
  encoder: GPUCommandEncoder,
  temporaries: GPUBuffer[],
  geometry: Geometry,
  F: number,
  features: GPUBuffer,
  inputs: KernelInputs,
  S: Slice,
  j0: number,
  j1: number,
): void {
  const { units, M, D, Dv } = geometry;
  runtime.dispatch(
    encoder,
    momentsProgram(),
    { features, y: inputs.y, v: inputs.v, validKeys: inputs.validKeys, S },
    { F, M, D, Dv, j0, j1 },
    [Math.ceil(F / PRODUCT_TILE), Math.ceil(Dv / PRODUCT_TILE), units],
    temporaries,
  );
}

function recordApply(
  runtime: Runtime,
  encoder: GPUCommandEncoder,
  temporaries: GPUBuffer[],
  geometry: Geometry,
  options: ResolvedOptions,
  F: number,
  features: GPUBuffer,
  inputs: KernelInputs,
  S: Slice,
  acc: Slice,
  i0: number,
  i1: number,
): void {
  const { units, G, N, D, Dv } = geometry;
  runtime.dispatch(
    encoder,
    applyProgram(),
    { features, x: inputs.x, sigma: inputs.sigma, S, acc },
    { N, F, D, Dv, G, i0, i1, ...polynomialValues(options) },
    [Math.ceil((i1 - i0) / PRODUCT_TILE), Math.ceil(Dv / PRODUCT_TILE), units * G],
    temporaries,
  );
}

function recordDirect(
  runtime: Runtime,
  encoder: GPUCommandEncoder,
  temporaries: GPUBuffer[],
  geometry: Geometry,
  options: ResolvedOptions,
  inputs: KernelInputs,
  acc: Slice,
  chunk: number,
  accumulate: boolean,
): void {
  const { units, G, N, M, D, Dv } = geometry;
  const [bucketD, bucketDv] = [dimBucket(D), dimBucket(Dv)];
  const tile = directKeyTile(bucketD, bucketDv, runtime.limits.maxComputeWorkgroupStorageSize);
  runtime.dispatch(
    encoder,
    directProgram(bucketD, bucketDv, tile),
    { x: inputs.x, sigma: inputs.sigma, y: inputs.y, v: inputs.v, validKeys: inputs.validKeys, acc },
    {
      N,
      M,
      causal: options.causal ? 1 : 0,
      D,
      DV: Dv,
      G,
      chunk,
      accumulate: accumulate ? 1 : 0,
      ...polynomialValues(options),
    },
    [Math.ceil(N / 64), 1, units * G],
    temporaries,
  );
}

/**
 * The whole kernel for prepared inputs: acc[row] = [Σ_j w_ij v_j | Σ_j w_ij] by the planned path.
 * Causal factorized: for each query chunk, add the keys that became visible to the moment state,
 * apply the state to the chunk's queries, then one direct pass adds every chunk's own block.
 */
function recordKernel(
  runtime: Runtime,
  encoder: GPUCommandEncoder,
  temporaries: GPUBuffer[],
  geometry: Geometry,
  options: ResolvedOptions,
  path: 'factorized' | 'direct',
  chunkSize: number,
  inputs: KernelInputs,
  acc: Slice,
  borrowed: GPUBuffer[],
  tables: FeatureTables,
): void {
  const { units, N, M, D, Dv } = geometry;
  if (path === 'direct') {
    recordDirect(runtime, encoder, temporaries, geometry, options, inputs, acc, 0, false);
    return;
  }
  const F = featureCount(D, options.order);
  const features = tables.get(D, options.order);
  const sBytes = units * F * (Dv + 1) * 4;
  const S = { buffer: runtime.acquire(sBytes), size: sBytes };
  borrowed.push(S.buffer);
  encoder.clearBuffer(S.buffer, 0, Math.ceil(sBytes / 4) * 4);
  if (!options.causal) {
    recordMoments(runtime, encoder, temporaries, geometry, F, features, inputs, S, 0, M);
    recordApply(runtime, encoder, temporaries, geometry, options, F, features, inputs, S, acc, 0, N);
    return;
  }
  // Core's schedule; padding is masked in the kernels (validKeys), so every unit shares it.
  let seen = 0;
  for (const chunk of chunkRanges(N, M, chunkSize)) {
    if (chunk.stateKeyEnd > seen) {
      recordMoments(runtime, encoder, temporaries, geometry, F, features, inputs, S, seen, chunk.stateKeyEnd);
      seen = chunk.stateKeyEnd;
    }
    recordApply(
      runtime,
      encoder,
      temporaries,
      geometry,
      options,
      F,
      features,
      inputs,
      S,
      acc,
      chunk.queryStart,
      chunk.queryEnd,
    );
  }
  recordDirect(runtime, encoder, temporaries, geometry, options, inputs, acc, chunkSize, true);
}

function recordNormalize(
  runtime: Runtime,
  encoder: GPUCommandEncoder,
  temporaries: GPUBuffer[],
  rows: number,
  Dv: number,
  acc: Slice,
  output: Slice,
  denominators: Slice,
  degenerate: GPUBuffer,
): void {
  runtime.dispatch(
    encoder,
    normalizeProgram(),
    { acc, output, denominators, degenerate },
    { rows, Dv },
    runtime.linearGrid(rows, 64),
    temporaries,
  );
}

/** The gradients of the kernel for prepared inputs, accumulated into zeroed buffers. */
interface KernelGradients {
  readonly dx: Slice;
  readonly dsigma: Slice;
  readonly dy: Slice;
  readonly dv: Slice;
}

/**
 * Factorized backward (the reference backend's algorithm, in f32): the forward accumulator gives
 * upstream_i = [dO_i | −δ_i/den_i]/den_i, so g_ij = upstream_i·[v_j | 1]. Query side: moments S over
 * keys, read through the query features' derivatives (dx, dσ). Key side: moments T over queries of
 * σ_i x_i against upstream_i, read through the key features (dy, and dv from the features
 * themselves). Causal: S grows over the chunks in order, T over the chunks in reverse (each key
 * reads the queries of every chunk whose state contains it); the diagonal blocks go direct.
 * Memory: O(units·G·F·(Dv+2)) for the moments, linear in N and M.
 */
function recordFactorizedBackward(
  runtime: Runtime,
  encoder: GPUCommandEncoder,
  temporaries: GPUBuffer[],
  geometry: Geometry,
  options: ResolvedOptions,
  chunkSize: number,
  inputs: KernelInputs,
  dOut: Slice,
  keyRows: Slice,
  gradients: KernelGradients,
  borrowed: GPUBuffer[],
  tables: FeatureTables,
): void {
  const { units, G, N, M, D, Dv } = geometry;
  const heads = units * G;
  const rows = heads * N;
  const keys = units * M;
  const take = (bytes: number): Slice => {
    const buffer = runtime.acquire(bytes);
    borrowed.push(buffer);
    return { buffer, size: bytes };
  };
  const acc = take(rows * (Dv + 1) * 4);
  recordKernel(
    runtime,
    encoder,
    temporaries,
    geometry,
    options,
    'factorized',
    chunkSize,
    inputs,
    acc,
    borrowed,
    tables,
  );
  const upstream = take(rows * (Dv + 1) * 4);
  runtime.dispatch(
    encoder,
    backwardUpstreamProgram(),
    { acc, dOut, upstream },
    { rows, Dv },
    runtime.linearGrid(rows, 64),
    temporaries,
  );
  const F = featureCount(D, options.order);
  const features = tables.get(D, options.order);
  const S = take(units * F * (Dv + 1) * 4);
  const T = take(heads * F * (Dv + 2) * 4);
  encoder.clearBuffer(S.buffer, 0, S.size);
  encoder.clearBuffer(T.buffer, 0, T.size);
  const scaledX = take(rows * D * 4);
  runtime.dispatch(
    encoder,
    scaleRowsProgram(),
    { values: inputs.x, scale: inputs.sigma, scaled: scaledX },
    { rows, dim: D },
    runtime.linearGrid(rows, 64),
    temporaries,
  );
  const everyQuery = runtime.upload(new Uint32Array(heads).fill(N));
  borrowed.push(everyQuery);
  // Query rows as the "keys" of moments T: per query head, values upstream (Dv+1 columns).
  const queryGeometry: Geometry = { units: heads, G: 1, N, M: N, D, Dv: Dv + 1 };
  const queryInputs: KernelInputs = {
    x: scaledX,
    y: scaledX,
    sigma: inputs.sigma,
    v: upstream,
    validKeys: everyQuery,
  };
  const unused = take(4);
  const keyUnused = take(keys * 4);
  const [bucketD, bucketDv] = [dimBucket(D), dimBucket(Dv)];
  const polynomial = polynomialValues(options);
  const throughFeatures = (side: 'query' | 'key', r0: number, r1: number): void => {
    if (r1 <= r0) return;
    const query = side === 'query';
    const owners = query ? heads : units;
    runtime.dispatch(
      encoder,
      featureGradientProgram(bucketD, bucketDv),
      {
        features,
        z: query ? inputs.x : inputs.y,
        sigma: inputs.sigma,
        upstream: query ? upstream : keyRows,
        validKeys: inputs.validKeys,
        moments: query ? S : T,
        gradZ: query ? gradients.dx : gradients.dy,
        gradSigma: query ? gradients.dsigma : keyUnused,
        values: query ? unused : gradients.dv,
      },
      {
        owners,
        R: query ? N : M,
        r0,
        r1,
        limitRows: query ? 0 : 1,
        unitSigma: query ? 0 : 1,
        D,
        Dv,
        F,
        stride: query ? Dv + 1 : Dv + 2,
        divisor: query ? G : 1,
        count: query ? 1 : G,
        withValues: query ? 0 : 1,
        ...polynomial,
      },
      runtime.linearGrid(owners * (r1 - r0), 64),
      temporaries,
    );
  };
  if (!options.causal) {
    recordMoments(runtime, encoder, temporaries, geometry, F, features, inputs, S, 0, M);
    throughFeatures('query', 0, N);
    recordMoments(runtime, encoder, temporaries, queryGeometry, F, features, queryInputs, T, 0, N);
    throughFeatures('key', 0, M);
    return;
  }
  const chunks = chunkRanges(N, M, chunkSize);
  let seen = 0;
  for (const chunk of chunks) {
    if (chunk.stateKeyEnd > seen) {
      recordMoments(runtime, encoder, temporaries, geometry, F, features, inputs, S, seen, chunk.stateKeyEnd);
      seen = chunk.stateKeyEnd;
    }
    if (seen > 0) throughFeatures('query', chunk.queryStart, chunk.queryEnd);
  }
  // Keys in [stateKeyEnd of chunk c-1, stateKeyEnd of chunk c) are in the states of chunks c.. only.
  let added = N;
  for (let c = chunks.length - 1; c >= 0; c--) {
    const chunk = chunks[c]!;
    const keyStart = c > 0 ? chunks[c - 1]!.stateKeyEnd : 0;
    if (chunk.stateKeyEnd <= keyStart) continue;
    recordMoments(
      runtime,
      encoder,
      temporaries,
      queryGeometry,
      F,
      features,
      queryInputs,
      T,
      chunk.queryStart,
      added,
    );
    added = chunk.queryStart;
    throughFeatures('key', keyStart, chunk.stateKeyEnd);
  }
  const block = {
    N,
    M,
    causal: 1,
    D,
    DV: Dv,
    G,
    chunk: chunkSize,
    ...polynomial,
  };
  runtime.dispatch(
    encoder,
    blockQueryProgram(bucketD, bucketDv),
    { ...inputs, upstream, dx: gradients.dx, dsigma: gradients.dsigma },
    { ...block, rows },
    runtime.linearGrid(rows, 64),
    temporaries,
  );
  runtime.dispatch(
    encoder,
    blockKeyProgram(bucketD, bucketDv),
    { ...inputs, upstream, dy: gradients.dy, dv: gradients.dv },
    { ...block, rows: keys },
    runtime.linearGrid(keys, 64),
    temporaries,
  );
}

/** Feature tables per (D, p), uploaded once per device. */
class FeatureTables {
  private readonly tables = new Map<string, GPUBuffer>();
  constructor(private readonly runtime: Runtime) {}
  get(headDim: number, order: Order): GPUBuffer {
    const key = `${headDim}:${order}`;
    let buffer = this.tables.get(key);
    if (buffer === undefined) {
      buffer = this.runtime.upload(featureTable(headDim, order), false);
      this.tables.set(key, buffer);
    }
    return buffer;
  }
}

interface Session {
  readonly runtime: Runtime;
  readonly tables: FeatureTables;
}

/**
 * The WebGPU backend. Without `options.device` it requests an adapter on first use (navigator.gpu in
 * browsers, the optional `webgpu` package in Node); `isAvailable()` says why when there is none.
 */
export function webgpuBackend(options: WebGpuBackendOptions = {}): WebGpuBackend {
  let session: Promise<Session | string> | undefined;
  let disposed = false;
  const ownsDevice = options.device === undefined;

  const open = (): Promise<Session | string> => {
    session ??= (async () => {
      const acquired =
        options.device === undefined
          ? await acquireDevice(options.powerPreference, options.fallbackAdapter ?? 'allow')
          : { device: options.device, adapterDescription: 'user device' };
      if (typeof acquired === 'string') return acquired;
      const runtime = new Runtime(
        acquired.device,
        acquired.adapterDescription,
        options.limits ?? {},
        options.debug ?? false,
      );
      return { runtime, tables: new FeatureTables(runtime) };
    })();
    return session;
  };

  const live = async (): Promise<Session> => {
    if (disposed)
      throw new FastmaxError('DISPOSED', 'this WebGPU backend was disposed', { argument: 'backend' });
    const opened = await open();
    if (typeof opened === 'string') {
      throw new FastmaxError('BACKEND_UNAVAILABLE', `WebGPU is not available: ${opened}`, {
        argument: 'backend',
      });
    }
    opened.runtime.assertAlive();
    return opened;
  };

  /** Blocks [first, end) of a tensor (a block: one unit's or one query head's rows), as a bindable buffer. */
  const sliceOf = async (
    runtime: Runtime,
    encoder: GPUCommandEncoder,
    tensor: Tensor,
    perBlock: number,
    first: number,
    end: number,
    borrowed: GPUBuffer[],
    temporaries: GPUBuffer[],
  ): Promise<Slice> => {
    const bytes = (end - first) * perBlock * 4;
    if (tensor instanceof WebGpuTensor && tensor.runtime === runtime && tensor.dtype === 'float16') {
      const buffer = runtime.acquire(bytes);
      borrowed.push(buffer);
      runtime.dispatch(
        encoder,
        convertProgram('f32'),
        { source: { buffer: tensor.buffer, size: tensor.buffer.size }, destination: { buffer, size: bytes } },
        { count: (end - first) * perBlock, sourceOffset: first * perBlock, targetOffset: 0 },
        runtime.linearGrid((end - first) * perBlock, 64),
        temporaries,
      );
      return { buffer, size: bytes };
    }
    if (tensor instanceof WebGpuTensor && tensor.runtime === runtime) {
      if (first === 0 && bytes === tensor.byteLength) return { buffer: tensor.buffer, size: bytes };
      const buffer = runtime.acquire(bytes);
      borrowed.push(buffer);
      encoder.copyBufferToBuffer(tensor.buffer, first * perBlock * 4, buffer, 0, Math.ceil(bytes / 4) * 4);
      return { buffer, size: bytes };
    }
    const host = isDeviceTensor(tensor) ? await tensor.read() : tensor;
    const buffer = runtime.upload(host.data.subarray(first * perBlock, end * perBlock));
    borrowed.push(buffer);
    return { buffer, size: bytes };
  };

  /** Output assembly: a device tensor filled pass by pass, or a host array (the caller's `out`). */
  const makeSink = (
    runtime: Runtime,
    shape: Shape4,
    perBlock: number,
    keepOnDevice: boolean,
    dtype: 'float32' | 'float16',
    out?: Float32Array,
  ) => {
    const total = shape[0] * shape[1] * shape[2] * shape[3];
    const bytesPer = dtype === 'float16' ? 2 : 4;
    if (keepOnDevice && total * bytesPer > runtime.limits.maxBufferSize) {
      throw new FastmaxError('RESOURCE_EXHAUSTED', 'the output does not fit in one GPU buffer', {
        argument: 'options.output',
        expected: `'host', or an output of at most ${runtime.limits.maxBufferSize} bytes (maxBufferSize)`,
        actual: `${total * bytesPer} bytes`,
      });
    }
    const device = keepOnDevice
      ? new WebGpuTensor(
          runtime,
          runtime.device.createBuffer({
            size: Math.max(4, Math.ceil((total * bytesPer) / 4) * 4),
            usage: 0x80 | 0x4 | 0x8,
          }),
          shape,
          dtype,
        )
      : undefined;
    const host = keepOnDevice ? undefined : (out ?? new Float32Array(total));
    return {
      record(encoder: GPUCommandEncoder, source: Slice, first: number, temporaries: GPUBuffer[]): void {
        if (device !== undefined && dtype === 'float16') {
          const count = source.size / 4;
          runtime.dispatch(
            encoder,
            convertProgram('f16'),
            { source, destination: { buffer: device.buffer, size: device.buffer.size } },
            { count, sourceOffset: 0, targetOffset: first * perBlock },
            runtime.linearGrid(count, 64),
            temporaries,
          );
        } else if (device !== undefined) {
          encoder.copyBufferToBuffer(
            source.buffer,
            0,
            device.buffer,
            first * perBlock * 4,
            Math.ceil(source.size / 4) * 4,
          );
        }
      },
      async collect(source: Slice, first: number): Promise<void> {
        if (host !== undefined) host.set(await runtime.read(source.buffer, source.size), first * perBlock);
      },
      tensor(): Tensor {
        return device ?? { shape, data: host! };
      },
      /** Releases the device output when the call fails half way. */
      abandon(): void {
        device?.dispose();
      },
    };
  };

  const forward = async (request: ForwardRequest): Promise<ForwardResult> => {
    const { runtime, tables } = await live();
    const { shape, options: resolved, plan } = request;
    const { batch, heads, kvHeads, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
    const U = batch * kvHeads;
    const G = heads / kvHeads;
    const F = featureCount(D, resolved.order);
    const perUnit = [M * D * 4, M * Dv * 4];
    if (plan.path === 'factorized') perUnit.push(F * (Dv + 1) * 4);
    const passes = planPasses(runtime, U, G, [N * D * 4, N * (Dv + 1) * 4], perUnit);
    const dtype = request.q instanceof WebGpuTensor ? request.q.dtype : 'float32';
    const sink = makeSink(runtime, [batch, heads, N, Dv], N * Dv, request.keepOnDevice, dtype, request.out);
    let degenerateRows = 0;
    let complete = false;
    try {
      for (const { u0, u1, g0, g1, h0, h1 } of passes) {
        const units = u1 - u0;
        const geometry: Geometry = { units, G: g1 - g0, N, M, D, Dv };
        const borrowed: GPUBuffer[] = [];
        const temporaries: GPUBuffer[] = [];
        try {
          const encoder = runtime.device.createCommandEncoder();
          const q = await sliceOf(runtime, encoder, request.q, N * D, h0, h1, borrowed, temporaries);
          const k = await sliceOf(runtime, encoder, request.k, M * D, u0, u1, borrowed, temporaries);
          const v = await sliceOf(runtime, encoder, request.v, M * Dv, u0, u1, borrowed, temporaries);
          const validKeys = runtime.upload(validKeyCounts(shape, resolved, u0, u1));
          borrowed.push(validKeys);
          const runningQ = runtime.acquire((h1 - h0) * 4);
          const runningK = runtime.acquire(units * 4);
          borrowed.push(runningQ, runningK);
          encoder.clearBuffer(runningQ);
          encoder.clearBuffer(runningK);
          const prepared = recordPrepare(
            runtime,
            encoder,
            temporaries,
            geometry,
            resolved,
            q,
            k,
            validKeys,
            runningQ,
            runningK,
            borrowed,
          );
          const rows = (h1 - h0) * N;
          const acc = { buffer: runtime.acquire(rows * (Dv + 1) * 4), size: rows * (Dv + 1) * 4 };
          const output = { buffer: runtime.acquire(rows * Dv * 4), size: rows * Dv * 4 };
          const denominators = { buffer: runtime.acquire(rows * 4), size: rows * 4 };
          const degenerate = runtime.acquire(4);
          borrowed.push(acc.buffer, output.buffer, denominators.buffer, degenerate);
          encoder.clearBuffer(degenerate);
          const inputs: KernelInputs = { ...prepared, v, validKeys };
          recordKernel(
            runtime,
            encoder,
            temporaries,
            geometry,
            resolved,
            plan.path,
            causalChunk(plan.chunkSize, resolved, N),
            inputs,
            acc,
            borrowed,
            tables,
          );
          recordNormalize(runtime, encoder, temporaries, rows, Dv, acc, output, denominators, degenerate);
          sink.record(encoder, output, h0, temporaries);
          await runtime.submit(encoder, temporaries);
          await sink.collect(output, h0);
          degenerateRows += new Uint32Array((await runtime.read(degenerate, 4)).buffer)[0]!;
        } finally {
          for (const buffer of temporaries) buffer.destroy();
          for (const buffer of borrowed) runtime.release(buffer);
        }
      }
      complete = true;
    } finally {
      if (!complete) sink.abandon();
    }
    return { output: sink.tensor(), degenerateRows };
  };

  /**
   * Backward, all on the device: the forward's prepare kernels give x, y, σ (and the norms and
   * divisors); the kernel's gradients run by the planned path, factorized (linear memory,
   * recordFactorizedBackward) or direct; recordPrepareBackward chains dx, dy, dσ back to dq, dk as
   * core's prepareScoresBackward does. Device inputs are never read back; host outputs are read
   * pass by pass.
   */
  const backward = async (request: BackwardRequest): Promise<BackwardResult> => {
    const { runtime, tables } = await live();
    const { shape, options: resolved, plan } = request;
    const { batch, heads, kvHeads, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
    const U = batch * kvHeads;
    const G = heads / kvHeads;
    const factorized = plan.path === 'factorized';
    const F = featureCount(D, resolved.order);
    const perQueryHead = [N * D * 4, N * Dv * 4];
    const perUnit = [M * D * 4, M * Dv * 4];
    if (factorized) {
      perQueryHead.push(N * (Dv + 1) * 4, F * (Dv + 2) * 4);
      perUnit.push(M * (Dv + 1) * 4, F * (Dv + 1) * 4);
    }
    const passes = planPasses(runtime, U, G, perQueryHead, perUnit);
    const keep = request.keepOnDevice;
    const dqSink = makeSink(runtime, [batch, heads, N, D], N * D, keep, 'float32');
    const dkSink = makeSink(runtime, [batch, kvHeads, M, D], M * D, keep, 'float32');
    const dvSink = makeSink(runtime, [batch, kvHeads, M, Dv], M * Dv, keep, 'float32');
    // A unit whose query heads run in several passes sums its key-side gradients here.
    const split = passes.some((pass) => pass.g1 - pass.g0 < G);
    const dkTotal = split ? { buffer: runtime.acquire(M * D * 4), size: M * D * 4 } : undefined;
    const dvTotal = split ? { buffer: runtime.acquire(M * Dv * 4), size: M * Dv * 4 } : undefined;
    let complete = false;
    try {
      for (const { u0, u1, g0, g1, h0, h1 } of passes) {
        const units = u1 - u0;
        const rows = (h1 - h0) * N;
        const keys = units * M;
        const geometry: Geometry = { units, G: g1 - g0, N, M, D, Dv };
        const borrowed: GPUBuffer[] = [];
        const temporaries: GPUBuffer[] = [];
        const take = (bytes: number): Slice => {
          const buffer = runtime.acquire(bytes);
          borrowed.push(buffer);
          return { buffer, size: bytes };
        };
        try {
          const encoder = runtime.device.createCommandEncoder();
          const q = await sliceOf(runtime, encoder, request.q, N * D, h0, h1, borrowed, temporaries);
          const k = await sliceOf(runtime, encoder, request.k, M * D, u0, u1, borrowed, temporaries);
          const values = await sliceOf(runtime, encoder, request.v, M * Dv, u0, u1, borrowed, temporaries);
          const gradOut = await sliceOf(
            runtime,
            encoder,
            request.dOut,
            N * Dv,
            h0,
            h1,
            borrowed,
            temporaries,
          );
          const validKeys = runtime.upload(validKeyCounts(shape, resolved, u0, u1));
          borrowed.push(validKeys);
          const runningQ = take((h1 - h0) * 4);
          const runningK = take(units * 4);
          encoder.clearBuffer(runningQ.buffer);
          encoder.clearBuffer(runningK.buffer);
          const prepared = recordPrepare(
            runtime,
            encoder,
            temporaries,
            geometry,
            resolved,
            q,
            k,
            validKeys,
            runningQ.buffer,
            runningK.buffer,
            borrowed,
          );
          const { x, y, sigma } = prepared;
          const gradX = take(rows * D * 4);
          const gradSigma = take(rows * 4);
          const gradY = take(keys * D * 4);
          const gradV = take(keys * Dv * 4);
          for (const slice of [gradX, gradSigma, gradY, gradV])
            encoder.clearBuffer(slice.buffer, 0, Math.ceil(slice.size / 4) * 4);
          if (factorized) {
            // [v_j | 1]: the key rows the query side's upstream is dotted with.
            const keyRows = take(keys * (Dv + 1) * 4);
            runtime.dispatch(
              encoder,
              valueRowsProgram(),
              { values, extended: keyRows },
              { rows: keys, Dv },
              runtime.linearGrid(keys, 64),
              temporaries,
            );
            recordFactorizedBackward(
              runtime,
              encoder,
              temporaries,
              geometry,
              resolved,
              causalChunk(plan.chunkSize, resolved, N),
              { x, y, sigma, v: values, validKeys },
              gradOut,
              keyRows,
              { dx: gradX, dsigma: gradSigma, dy: gradY, dv: gradV },
              borrowed,
              tables,
            );
          } else {
            const common = {
              N,
              M,
              causal: resolved.causal ? 1 : 0,
              D,
              DV: Dv,
              G: g1 - g0,
              ...polynomialValues(resolved),
            };
            const [bucketD, bucketDv] = [dimBucket(D), dimBucket(Dv)];
            const denominators = take(rows * 4);
            const delta = take(rows * 4);
            runtime.dispatch(
              encoder,
              backwardQueryProgram(bucketD, bucketDv),
              {
                x,
                sigma,
                y,
                v: values,
                validKeys,
                dOut: gradOut,
                dx: gradX,
                dsigma: gradSigma,
                delta,
                denominators,
              },
              { ...common, rows },
              runtime.linearGrid(rows, 64),
              temporaries,
            );
            runtime.dispatch(
              encoder,
              backwardKeyProgram(bucketD, bucketDv),
              { x, sigma, y, v: values, validKeys, denominators, dOut: gradOut, delta, dy: gradY, dv: gradV },
              { ...common, rows: keys },
              runtime.linearGrid(keys, 64),
              temporaries,
            );
          }
          const { dq, dk } = recordPrepareBackward(
            runtime,
            encoder,
            temporaries,
            geometry,
            resolved,
            prepared,
            validKeys,
            { dx: gradX, dsigma: gradSigma, dy: gradY },
            borrowed,
          );
          dqSink.record(encoder, dq, h0, temporaries);
          let keySide: { dk: Slice; dv: Slice } | undefined = { dk, dv: gradV };
          if (dkTotal !== undefined && dvTotal !== undefined) {
            if (g0 === 0) {
              encoder.clearBuffer(dkTotal.buffer, 0, Math.ceil(dkTotal.size / 4) * 4);
              encoder.clearBuffer(dvTotal.buffer, 0, Math.ceil(dvTotal.size / 4) * 4);
            }
            for (const [source, target] of [
              [dk, dkTotal],
              [gradV, dvTotal],
            ] as const) {
              runtime.dispatch(
                encoder,
                addProgram(),
                { source, total: target },
                { count: target.size / 4 },
                runtime.linearGrid(target.size / 4, 64),
                temporaries,
              );
            }
            keySide = g1 === G ? { dk: dkTotal, dv: dvTotal } : undefined;
          }
          if (keySide !== undefined) {
            dkSink.record(encoder, keySide.dk, u0, temporaries);
            dvSink.record(encoder, keySide.dv, u0, temporaries);
          }
          await runtime.submit(encoder, temporaries);
          await dqSink.collect(dq, h0);
          if (keySide !== undefined) {
            await dkSink.collect(keySide.dk, u0);
            await dvSink.collect(keySide.dv, u0);
          }
        } finally {
          for (const buffer of temporaries) buffer.destroy();
          for (const buffer of borrowed) runtime.release(buffer);
        }
      }
      complete = true;
    } finally {
      if (dkTotal !== undefined) runtime.release(dkTotal.buffer);
      if (dvTotal !== undefined) runtime.release(dvTotal.buffer);
      if (!complete) for (const sink of [dqSink, dkSink, dvSink]) sink.abandon();
    }
    return { dq: dqSink.tensor(), dk: dkSink.tensor(), dv: dvSink.tensor() };
  };

  const toDevice = async (
    tensor: HostTensor,
    dtype: 'float32' | 'float16' = 'float32',
  ): Promise<WebGpuTensor> => {
    const { runtime } = await live();
    if (dtype === 'float32')
      return new WebGpuTensor(runtime, runtime.upload(tensor.data, false), tensor.shape);
    if (!runtime.device.features.has('shader-f16')) {
      throw new FastmaxError('UNSUPPORTED_CAPABILITY', 'float16 storage needs the shader-f16 feature', {
        argument: 'dtype',
        expected: "'float32' on this adapter (it lacks shader-f16)",
        actual: "'float16'",
      });
    }
    const count = tensor.data.length;
    const half = runtime.device.createBuffer({
      size: Math.max(4, Math.ceil((count * 2) / 4) * 4),
      usage: 0x80 | 0x4 | 0x8,
    });
    const single = runtime.upload(tensor.data);
    const temporaries: GPUBuffer[] = [];
    try {
      const encoder = runtime.device.createCommandEncoder();
      runtime.dispatch(
        encoder,
        convertProgram('f16'),
        { source: { buffer: single, size: count * 4 }, destination: { buffer: half, size: half.size } },
        { count, sourceOffset: 0, targetOffset: 0 },
        runtime.linearGrid(count, 64),
        temporaries,
      );
      await runtime.submit(encoder, temporaries);
    } finally {
      runtime.release(single);
    }
    return new WebGpuTensor(runtime, half, tensor.shape, 'float16');
  };

  const createState = async (state: ResolvedStateOptions): Promise<BackendState> => {
    const { runtime, tables } = await live();
    const { batch, heads, kvHeads, headDim: D, valueDim: Dv, options: resolved } = state;
    const U = batch * kvHeads;
    const G = heads / kvHeads;
    const F = featureCount(D, resolved.order);
    const sBytes = U * F * (Dv + 1) * 4;
    if (sBytes > runtime.limits.maxStorageBufferBindingSize) {
      throw new FastmaxError('RESOURCE_EXHAUSTED', 'the decoding state does not fit in one storage binding', {
        argument: 'options',
        expected: `<= ${runtime.limits.maxStorageBufferBindingSize} bytes (maxStorageBufferBindingSize)`,
        actual: `${sBytes} bytes (B·Hkv·F·(Dv+1)·4)`,
      });
    }
    const S: Slice = {
      buffer: runtime.device.createBuffer({ size: Math.max(4, sBytes), usage: 0x80 | 0x4 | 0x8 }),
      size: sBytes,
    };
    const runningQ = runtime.device.createBuffer({ size: Math.max(4, U * G * 4), usage: 0x80 | 0x4 | 0x8 });
    const runningK = runtime.device.createBuffer({ size: Math.max(4, U * G * 4), usage: 0x80 | 0x4 | 0x8 });
    let tokens = 0;
    let closed = false;
    const clear = (): void => {
      const encoder = runtime.device.createCommandEncoder();
      encoder.clearBuffer(S.buffer);
      encoder.clearBuffer(runningQ);
      encoder.clearBuffer(runningK);
      runtime.device.queue.submit([encoder.finish()]);
      tokens = 0;
    };
    clear();
    return {
      get tokens() {
        return tokens;
      },
      async step(qIn: Tensor, kIn: Tensor, vIn: Tensor): Promise<StepResult> {
        if (closed)
          throw new FastmaxError('DISPOSED', 'this decoding state was disposed', { argument: 'state' });
        runtime.assertAlive();
        const T = qIn.shape[2];
        const geometry: Geometry = { units: U, G, N: T, M: T, D, Dv };
        const rows = U * G * T;
        const borrowed: GPUBuffer[] = [];
        const temporaries: GPUBuffer[] = [];
        try {
          const encoder = runtime.device.createCommandEncoder();
          const q = await sliceOf(runtime, encoder, qIn, G * T * D, 0, U, borrowed, temporaries);
          const k = await sliceOf(runtime, encoder, kIn, T * D, 0, U, borrowed, temporaries);
          const v = await sliceOf(runtime, encoder, vIn, T * Dv, 0, U, borrowed, temporaries);
          const validKeys = runtime.upload(new Uint32Array(U).fill(T));
          borrowed.push(validKeys);
          const prepared = recordPrepare(
            runtime,
            encoder,
            temporaries,
            geometry,
            resolved,
            q,
            k,
            validKeys,
            runningQ,
            runningK,
            borrowed,
          );
          const inputs: KernelInputs = { ...prepared, v, validKeys };
          const acc = { buffer: runtime.acquire(rows * (Dv + 1) * 4), size: rows * (Dv + 1) * 4 };
          const output = { buffer: runtime.acquire(rows * Dv * 4), size: rows * Dv * 4 };
          const denominators = { buffer: runtime.acquire(rows * 4), size: rows * 4 };
          const degenerate = runtime.acquire(4);
          borrowed.push(acc.buffer, output.buffer, denominators.buffer, degenerate);
          encoder.clearBuffer(degenerate);
          const features = tables.get(D, resolved.order);
          // Earlier tokens through the state, this step's own tokens directly, then fold them in.
          recordApply(runtime, encoder, temporaries, geometry, resolved, F, features, inputs, S, acc, 0, T);
          recordDirect(runtime, encoder, temporaries, geometry, resolved, inputs, acc, 0, true);
          recordMoments(runtime, encoder, temporaries, geometry, F, features, inputs, S, 0, T);
          recordNormalize(runtime, encoder, temporaries, rows, Dv, acc, output, denominators, degenerate);
          await runtime.submit(encoder, temporaries);
          const data = await runtime.read(output.buffer, output.size);
          const degenerateRows = new Uint32Array((await runtime.read(degenerate, 4)).buffer)[0]!;
          tokens += T;
          return { output: { shape: [batch, heads, T, Dv], data }, degenerateRows };
        } finally {
          for (const buffer of temporaries) buffer.destroy();
          for (const buffer of borrowed) runtime.release(buffer);
        }
      },
      reset(): void {
        if (!closed && !runtime.lost) clear();
      },
      dispose(): void {
        if (closed) return;
        closed = true;
        S.buffer.destroy();
        runningQ.destroy();
        runningK.destroy();
      },
    };
  };

  return {
    name: BACKEND_NAME,
    specVersion: SPEC_VERSION,
    capabilities: WEBGPU_CAPABILITIES,
    async isAvailable(): Promise<Availability> {
      if (disposed) return { available: false, reason: 'this WebGPU backend was disposed' };
      const opened = await open();
      if (typeof opened === 'string') return { available: false, reason: opened };
      if (opened.runtime.lost)
        return { available: false, reason: 'the WebGPU device was lost; create the backend again' };
      return { available: true };
    },
    forward,
    backward,
    createState,
    async device() {
      return (await live()).runtime.device;
    },
    async adapterDescription() {
      return (await live()).runtime.adapterDescription;
    },
    toDevice,
    async dispose() {
      if (disposed) return;
      disposed = true;
      const opened = session === undefined ? undefined : await session;
      if (opened !== undefined && typeof opened !== 'string') opened.runtime.destroy(ownsDevice);
    },
  };
}
