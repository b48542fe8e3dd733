import {
  type AttentionShape,
  type Availability,
  type BackendCapabilities,
  type BackendState,
  type BackwardRequest,
  type BackwardResult,
  checkFinite,
  chooseChunkSize,
  chunkRanges,
  type FastmaxBackend,
  FastmaxError,
  type ForwardRequest,
  type ForwardResult,
  type HostTensor,
  isDeviceTensor,
  keyLimit,
  NORMALIZATION_KINDS,
  querySchedule,
  type ResolvedOptions,
  type ResolvedStateOptions,
  SPEC_VERSION,
  type StepResult,
  SUPPORTED_ORDERS,
  type Tensor,
  validKeyCount,
} from '@fastmax/core';
import { cpuBackward } from './backward.js';
import { BackwardEngine } from './backward-engine.js';
import {
  balancedFeatureBounds,
  featureShareWork,
  PREPARATION_COST,
  sequenceBounds,
  sharesPerHead,
  unevenSpeeds,
  updatedSpeeds,
} from './balance.js';
import {
  type AttentionJob,
  batchUnits,
  Engine,
  evenRange,
  type GroupMember,
  type HeadState,
  type HeadView,
  MAX_CHUNK,
  momentStateFloats,
  type NormalizationSpec,
  type QueryScan,
  type RowRange,
  SCAN_ABORTED,
  scanPrefixFloats,
  scanStoreBytes,
  type WorkUnit,
} from './engine.js';
import { KERNELS_RELAXED_SIMD, KERNELS_SIMD } from './generated/kernels.js';
import { type BatchTiming, WorkerPool, workerFactory } from './pool.js';
import { directSchedule, kernelSetup, packedSchedule } from './setup.js';
import {
  FLOATS_PER_PAGE,
  firstTouchMs,
  ProgressiveStaging,
  SharedStaging,
  touchedFloat32,
  touchPages,
} from './staging.js';

/** The CPU backend: a `FastmaxBackend` that can also say how many threads it computes with. */
export interface CpuBackend extends FastmaxBackend {
  /** Threads large calls use: the pool's workers, or 1 without a pool (one thread, no SharedArrayBuffer). */
  threadCount(): Promise<number>;
  /**
   * Which build of the WebAssembly kernels this backend compiled: 'relaxed-simd' (fused multiply-add)
   * where `relaxedSimd` is not false and the engine validates that build, else 'simd'.
   */
  kernelVariant(): Promise<'simd' | 'relaxed-simd'>;
}

export interface CpuBackendOptions {
  /**
   * Threads to compute with, the calling one included in the count: 1 runs everything in the
   * calling thread; more starts a pool of workers (Node `worker_threads`, or Web Workers where
   * `SharedArrayBuffer` is available). Default: the available cores.
   */
  readonly threads?: number;
  /**
   * Calls estimated below this many multiply-adds run in the calling thread even with a pool,
   * because handing work to workers costs more than it saves. Default 2^22 (a few milliseconds).
   */
  readonly parallelThreshold?: number;
  /** Use relaxed-SIMD fused multiply-add where the engine supports it. Default true. */
  readonly relaxedSimd?: boolean;
  /**
   * Let the calling thread compute a share of a call it would otherwise only wait for (one head
   * split by queries: causal, p = 1): faster, since that share needs no staged copy of its inputs
   * and no copy of its output rows, but the calling thread is busy for part of the call. Pass
   * false on a browser's main thread to keep it free for rendering. Default true.
   */
  readonly shareCallingThread?: boolean;
  /**
   * Size the shares of a head split over threads (by features in the forward and the backward, or
   * by queries with the calling thread's share) by each thread's speed, measured on the calls
   * before (see src/balance.ts),
   * instead of equal or modelled shares: for hybrid CPUs with fast and slow cores, and virtual
   * machines whose cores slow down unevenly. Speeds within 8% of each other keep the usual shares.
   * Since the split then follows timings, repeated calls can differ by float32 rounding (as results
   * with different thread counts do); pass false for bit-identical repeated calls. Default true.
   */
  readonly balanceShares?: boolean;
  /**
   * How a head split by queries (causal, few features: p = 1) gets the moments of the keys before
   * each share. true: a prefix scan, where each share builds the moments of its own keys only and
   * takes the rest from the share before it. To compute nothing twice, a scan share keeps its
   * queries, keys and a copy of its state per query chunk between its two phases (about 1.3 KB
   * per query row at D = Dv = 64, p = 1); a share that would keep more than `scanKeepBytes` keeps
   * nothing and adds its own keys' moments twice instead (about a third more work). false: each
   * share folds every key before its first query into its own state, work that grows with the
   * share's position (the last of P shares folds (P − 1)/P of the keys). Default: the scan from 3
   * shares on (threads ≥ 3), folding with 2, where both measured alike (docs/benchmarks.md). The
   * two group float32 sums differently, so their results differ by rounding.
   */
  readonly queryScan?: boolean;
  /**
   * The most WebAssembly memory, in bytes, one share of a prefix scan (`queryScan`) may keep
   * between its phases. Its thread holds on to that memory after the call (WebAssembly memory does
   * not shrink), so this bounds what long sequences leave behind per thread. Default 64 MiB; 0
   * keeps nothing.
   */
  readonly scanKeepBytes?: number;
  /**
   * Shared memory, in bytes, the backend keeps between calls for good: the staged inputs, outputs
   * and scratch the workers read and write (fresh memory costs a page fault per 4 KiB on first
   * touch: about 12 µs a page on the VM of docs/benchmarks.md, over 1 s for the 430 MiB a backward
   * at N = 65536, D = 64 stages). Above it, staging stays while calls keep coming and is let go
   * once none has come for `stagingIdleMillis`. Default 256 MiB.
   */
  readonly stagingKeepBytes?: number;
  /**
   * How long staging above `stagingKeepBytes` outlives the last call, in milliseconds (a pending
   * release does not keep a Node process alive). 0 lets it go right after each call. Default 1000.
   */
  readonly stagingIdleMillis?: number;
}

/** The splits whose shares balance.ts sizes (see the testing hooks of cpuBackend). */
type SplitKind = 'features' | 'queries' | 'backward';

/** Largest moment state (S, its compensation and z) one thread may hold, in bytes. */
const MAX_STATE_BYTES = 2 ** 31;

const CAPABILITIES: BackendCapabilities = {
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
  // Flagged by the kernels as they load rows; core's scan names the value (see forward).
  checksFiniteInputs: true,
  // The backward's too: its first step flags them (backward.ts).
  checksFiniteBackwardInputs: true,
  writesIntoOut: true,
  writesGradientsIntoOut: true,
};

function decodeBase64(text: string): Uint8Array<ArrayBuffer> {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function defaultThreads(): number {
  const nav = (globalThis as { navigator?: { hardwareConcurrency?: number } }).navigator;
  if (typeof nav?.hardwareConcurrency === 'number' && nav.hardwareConcurrency > 0)
    return nav.hardwareConcurrency;
  return 1;
}

async function availableCores(): Promise<number> {
  if (typeof process === 'object' && typeof process.versions?.node === 'string') {
    const os = await import('node:os');
    return typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  }
  return defaultThreads();
}

function host(tensor: Tensor, name: string): HostTensor {
  if (isDeviceTensor(tensor)) {
    throw new FastmaxError('UNSUPPORTED_CAPABILITY', 'the CPU backend takes host tensors', {
      argument: name,
      expected: '{ shape, data: Float32Array }',
      actual: `a device tensor of ${tensor.backend}`,
    });
  }
  return tensor;
}

function normalizationSpec(options: ForwardRequest['options']): NormalizationSpec {
  const n = options.normalization;
  return n.kind === 'scale' ? { kind: 'scale', scale: n.scale } : { kind: n.kind };
}

/** Bytes of moment state per thread for F features and `columns` value columns. */
function stateBytes(paddedFeatures: number, columns: number): number {
  const W = Math.ceil(columns / 8) * 8;
  return (2 * paddedFeatures * W + 2 * paddedFeatures) * 4;
}

function refuseLargeState(bytes: number, what: string): void {
  if (bytes > MAX_STATE_BYTES) {
    throw new FastmaxError(
      'RESOURCE_EXHAUSTED',
      `the factorized moment state is too large for WebAssembly memory`,
      {
        argument: 'options.path',
        expected: `a state of at most ${MAX_STATE_BYTES} bytes per thread, or path: 'direct'`,
        actual: `${bytes} bytes (${what})`,
      },
    );
  }
}

/** Default of CpuBackendOptions.stagingKeepBytes. */
const KEEP_STAGING_BYTES = 256 * 2 ** 20;

/** Default of CpuBackendOptions.stagingIdleMillis. */
const STAGING_IDLE_MILLIS = 1000;

/**
 * Outputs above this size are written to fresh shared memory and handed to the caller as they are:
 * staged, they would be let go after the call anyway, and the copy out would double their memory.
 */
const LARGEST_STAGED_OUTPUT_BYTES = 64 * 2 ** 20;

/**
 * Splits the (batch, head) pairs into work units, grouped in batches (batchUnits). When the heads
 * do not divide evenly over the threads, each head is split into `shares` units (see
 * AttentionJob.shares), in order of share within each head (a scan's share waits for the one
 * before it, which therefore starts first), except the first `wholeHeads`, which go first as whole
 * heads (WorkUnit.whole). `skipShare`: that share of head 0 is left out (the calling thread runs it).
 * `groupSize` > 1: the query heads of one key head make one unit (WorkUnit.heads), or one a feature
 * share.
 */
function planUnits(
  heads: number,
  threads: number,
  shares: number,
  {
    skipShare = -1,
    wholeHeads = 0,
    groupSize = 1,
  }: { skipShare?: number; wholeHeads?: number; groupSize?: number } = {},
): WorkUnit[][] {
  const units: WorkUnit[] = [];
  if (groupSize > 1) {
    for (let head = 0; head < heads; head += groupSize)
      for (let share = 0; share < shares; share++) units.push({ head, heads: groupSize, share });
    return batchUnits(units, threads);
  }
  for (let head = 0; head < heads; head++) {
    if (head < wholeHeads) {
      units.push({ head, whole: true });
      continue;
    }
    for (let share = 0; share < shares; share++) {
      if (!(head === 0 && share === skipShare)) units.push({ head, share });
    }
  }
  return batchUnits(units, threads);
}

/**
 * A feature share repeats the preparation of every query and key of its head (centering, norms,
 * transposes: memory-bound work comparable to the moments themselves when F is small). Below this
 * many features, a causal forward splits a head by queries instead (a query share repeats only the
 * keys before its first query, folded into its state), a non-causal forward by keys, then queries
 * (AttentionJob.keySplit), and a factorized backward by queries when causal, else not at all.
 * Measured, the non-causal forward at N = 16384 on two threads against one split by features:
 * F = 68 (p = 1, D = 64) 0.75×, 153 0.83×, 129 1.02×, 257 1.16×, 325 1.07×, 561 1.36×, 2145 1.7
 * to 1.9×.
 */
const MIN_FEATURES_FOR_FEATURE_SPLIT = 256;

/**
 * Cost of one float of the calling thread's own work in a split by queries, in the same units:
 * staging an input row for the workers, or copying an output row they wrote into the caller's
 * array, runs at about 0.45 ns a float on the machine that measured PREPARATION_COST, where a
 * multiply-add of the p = 1 forward costs about 0.04 ns.
 */
const CALLER_FLOAT_COST = 10;

/**
 * A worker's share runs this much slower than the same work in the calling thread while both run:
 * the worker reads shared copies that the other core has just written, the calling thread its own
 * arrays (measured on the p = 1 causal forward at N = 16384: 0.85 to 0.94 against 0.76 µs a query
 * row; a worker alone is as fast as the calling thread alone).
 */
const STAGED_SLOWDOWN = 1.12;

/** Rows of q, k and v staged at a time while the workers run (about 0.2 ms of copying at D = 64). */
const STAGE_BLOCK_ROWS = 1024;

/** One unit of the cost model above in nanoseconds, on the machine that measured it. */
const COST_UNIT_NS = 0.042;

/**
 * Pages of a new output timed on first touch (firstTouchMs), and the time per page above which
 * some are fresh from the system and the calling thread touches them all up front.
 */
const PROBED_PAGES = 32;
const FRESH_PAGE_MS = 0.002;

/**
 * Query rows per chunk of a direct-path head split over threads (directSchedule): the direct path's
 * query block, so that the shares compute the blocks one thread would (at N = 2048, p = 2, two
 * threads: 11.0 ms causal against 11.9 with 128-row chunks, 17.1 ms on one thread).
 */
const DIRECT_SPLIT_ROWS = 256;

/**
 * Query boundaries (multiples of `chunk`) of a direct-path head split into `shares` of equal work:
 * row i costs the keys it sees (all of them, or its causal prefix), plus what loading it costs.
 */
function directBounds(
  shape: AttentionShape,
  options: ResolvedOptions,
  shares: number,
  chunk: number,
): Int32Array {
  const N = shape.queryLength;
  const rowCost = (i: number): number =>
    PREPARATION_COST + (options.causal ? keyLimit(0, i, shape, options) : shape.keyLength);
  const chunks = Math.ceil(N / chunk);
  const cumulative = new Float64Array(chunks + 1);
  for (let c = 0; c < chunks; c++) {
    let cost = 0;
    for (let i = c * chunk; i < Math.min(N, (c + 1) * chunk); i++) cost += rowCost(i);
    cumulative[c + 1] = cumulative[c]! + cost;
  }
  const bounds = new Int32Array(shares + 1);
  let c = 0;
  for (let s = 1; s < shares; s++) {
    const target = (cumulative[chunks]! * s) / shares;
    while (c < chunks && cumulative[c + 1]! <= target) c++;
    // The chunk boundary nearer the target.
    const at = c < chunks && target - cumulative[c]! > cumulative[c + 1]! - target ? c + 1 : c;
    bounds[s] = Math.max(bounds[s - 1]!, Math.min(N, at * chunk));
  }
  bounds[shares] = N;
  return bounds;
}

/** Default of CpuBackendOptions.scanKeepBytes. */
const SCAN_KEEP_BYTES = 64 * 2 ** 20;

/** A numeric option that must be a non-negative number when given (`fallback` when not). */
function nonNegativeOption(value: number | undefined, argument: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || Number.isNaN(value) || value < 0) {
    throw new FastmaxError('INVALID_OPTION', `${argument} must be a non-negative number`, {
      argument,
      expected: 'a number >= 0',
      actual: String(value),
    });
  }
  return value;
}

/** `rows` output rows in `parts` contiguous ranges of nearly equal size. */
function rowRanges(rows: number, parts: number): RowRange[] {
  const ranges: RowRange[] = [];
  for (let p = 0; p < parts; p++) {
    const range = evenRange(rows, p, parts);
    if (range.end > range.start) ranges.push(range);
  }
  return ranges;
}

/**
 * The CPU backend: WebAssembly SIMD kernels (compiled from asm/kernels.ts and embedded), driven
 * per head by src/engine.ts, in the calling thread or on a pool of worker threads.
 */
export function cpuBackend(options: CpuBackendOptions = {}): CpuBackend {
  const requested = options.threads;
  if (requested !== undefined && (!Number.isInteger(requested) || requested < 1)) {
    throw new FastmaxError('INVALID_OPTION', 'threads must be a positive integer', {
      argument: 'threads',
      expected: 'an integer >= 1',
      actual: String(requested),
    });
  }
  const parallelThreshold = nonNegativeOption(options.parallelThreshold, 'parallelThreshold', 2 ** 22);
  const scanKeepBytes = nonNegativeOption(options.scanKeepBytes, 'scanKeepBytes', SCAN_KEEP_BYTES);
  let modulePromise: Promise<WebAssembly.Module> | null = null;
  let variant: 'simd' | 'relaxed-simd' = 'simd';
  let localEngine: Engine | null = null;
  let backwardEngine: BackwardEngine | null = null;
  let poolPromise: Promise<WorkerPool | null> | null = null;
  const staging = new SharedStaging(
    nonNegativeOption(options.stagingKeepBytes, 'stagingKeepBytes', KEEP_STAGING_BYTES),
    nonNegativeOption(options.stagingIdleMillis, 'stagingIdleMillis', STAGING_IDLE_MILLIS),
  );
  let disposed = false;
  // Relative speeds of the pool's workers (balance.ts), from the last feature-split forwards.
  let workerSpeeds: Float64Array | null = null;
  // The same for the shares of a split by queries (the calling thread's among them when it takes
  // one), relative to the cost model of sequenceBounds.
  let queryShareSpeeds: Float64Array | null = null;
  // The same for a backward's feature shares (per worker): its passes weigh the kernels otherwise.
  let backwardSpeeds: Float64Array | null = null;
  // Whether those were learned on shares that scan (true) or fold (false): the calling thread takes
  // the first share in a scan and the last in a fold, so speeds do not carry over from one to the
  // other. null: set by a test, for either.
  let queryShareSpeedsScan: boolean | null = null;

  const compiled = (): Promise<WebAssembly.Module> => {
    modulePromise ??= (async () => {
      const relaxed = decodeBase64(KERNELS_RELAXED_SIMD);
      const useRelaxed = options.relaxedSimd !== false && WebAssembly.validate(relaxed);
      variant = useRelaxed ? 'relaxed-simd' : 'simd';
      return WebAssembly.compile(useRelaxed ? relaxed : decodeBase64(KERNELS_SIMD));
    })();
    return modulePromise;
  };

  const engine = async (): Promise<Engine> => {
    localEngine ??= new Engine(await compiled());
    return localEngine;
  };

  const threads = async (): Promise<number> => requested ?? (await availableCores());

  const pool = async (): Promise<WorkerPool | null> => {
    poolPromise ??= (async () => {
      const count = await threads();
      if (count <= 1) return null;
      const factory = await workerFactory();
      if (factory === null) return null;
      return new WorkerPool(count, await compiled(), factory);
    })();
    return poolPromise;
  };

  const live = (): void => {
    if (disposed) throw new FastmaxError('DISPOSED', 'the CPU backend was disposed', { argument: 'backend' });
  };

  // Tests replace the first-touch probe to take both sides of the decision it feeds.
  let probeFirstTouch = (array: Float32Array): number => firstTouchMs(array, PROBED_PAGES);

  const backend: CpuBackend & {
    readonly poolForTesting: () => Promise<WorkerPool | null>;
    readonly setFirstTouchProbeForTesting: (probe: (array: Float32Array) => number) => void;
    /**
     * The relative speeds balance.ts keeps for the forward's feature shares (per worker), its query
     * shares (per share) and the backward's feature shares (per worker); null before a balanced
     * call of that kind.
     */
    readonly speedsForTesting: (split: SplitKind) => Float64Array | null;
    readonly setSpeedsForTesting: (split: SplitKind, speeds: Float64Array | null) => void;
  } = {
    name: 'cpu',
    specVersion: SPEC_VERSION,
    capabilities: CAPABILITIES,

    async isAvailable(): Promise<Availability> {
      if (typeof WebAssembly !== 'object')
        return { available: false, reason: 'WebAssembly is not available' };
      if (!WebAssembly.validate(decodeBase64(KERNELS_SIMD))) {
        return { available: false, reason: 'this engine does not support WebAssembly SIMD (128-bit)' };
      }
      return { available: true };
    },

    async forward(request: ForwardRequest): Promise<ForwardResult> {
      live();
      const { shape, options: resolved, plan } = request;
      const q = host(request.q, 'q');
      const k = host(request.k, 'k');
      const v = host(request.v, 'v');
      const { batch: B, heads: H, queryLength: N, valueDim: Dv } = shape;
      const factorized = plan.path === 'factorized';
      const setup = kernelSetup(shape.headDim, resolved.order, resolved.coefficients, factorized);
      const chunkSize = factorized && resolved.causal ? plan.chunkSize : 256;
      const validKeys = new Int32Array(B);
      const schedules: Int32Array[] = [];
      for (let b = 0; b < B; b++) {
        validKeys[b] = validKeyCount(b, shape, resolved);
        schedules.push(packedSchedule(querySchedule(b, shape, resolved, plan.path, plan.chunkSize)));
      }
      const heads = B * H;
      const work = (factorized ? plan.cost.factorized : plan.cost.direct) * heads;
      if (factorized)
        refuseLargeState(stateBytes(setup.paddedFeatures, Dv), `F = ${plan.featureCount}, Dv = ${Dv}`);
      const workers = heads > 0 && N > 0 && work >= parallelThreshold ? await pool() : null;
      const threadCount = workers?.size ?? 1;
      const D = shape.headDim;
      // Work a feature share has whatever its features, in features' worth: it prepares every
      // query and key, and takes every shares-th diagonal block.
      const fixedFeaturesFor = (shares: number): number =>
        (PREPARATION_COST * (N * D + shape.keyLength * (D + Dv)) +
          (resolved.causal ? (N * chunkSize * (D + Dv)) / (2 * shares) : 0)) /
        ((N + shape.keyLength) * (Dv + 1));
      // A non-causal one splits its keys' moments, then its queries (AttentionJob.keySplit), which
      // repeats nothing but a sum of the partial states (prefix-max-norm is causal by nature).
      const byKeys =
        !resolved.causal &&
        plan.featureCount < MIN_FEATURES_FOR_FEATURE_SPLIT &&
        resolved.normalization.kind !== 'prefix-max-norm';
      // A causal head with few features splits by queries, whose shares repeat next to nothing.
      const byQueries = resolved.causal && plan.featureCount < MIN_FEATURES_FOR_FEATURE_SPLIT;
      // At most one feature share per 4 features (the kernels' granularity).
      const F = setup.paddedFeatures;
      // The direct path splits a head by queries too, in chunks of DIRECT_SPLIT_ROWS: it keeps no
      // state, so a share repeats nothing.
      const directChunks = factorized ? 0 : Math.floor(N / DIRECT_SPLIT_ROWS);
      // A share's cost per key: what folding a key into its state, or adding a key twice, costs.
      const keyCost = plan.featureCount * (Dv + 1) + PREPARATION_COST * (D + Dv);
      // Grouped-query attention: the query heads that read one key head run as one unit
      // (WorkUnit.heads), which adds each key to the state once for all of them, when that beats
      // spreading the heads over the threads (modelled evenly spread, which favours spreading).
      const groupSize = H / shape.kvHeads;
      const groups = B * shape.kvHeads;
      const readCost =
        plan.featureCount * (Dv + 1) +
        (resolved.causal ? (chunkSize * (D + Dv)) / 2 : 0) +
        PREPARATION_COST * (D + Dv);
      const headCost = N * readCost + shape.keyLength * keyCost;
      const groupCost = groupSize * N * readCost + shape.keyLength * keyCost;
      // With many features, fewer groups than threads split by features too: every feature share
      // of a group still adds each key once for all its heads.
      const groupShares =
        factorized && groupSize > 1 && plan.featureCount >= MIN_FEATURES_FOR_FEATURE_SPLIT && workers !== null
          ? sharesPerHead(groups, threadCount, F / 4, (s) => fixedFeaturesFor(s) / F)
          : 1;
      // One unit's part of its group's work: its features', plus what every feature share repeats.
      const unitOfGroup = groupShares > 1 ? 1 / groupShares + fixedFeaturesFor(groupShares) / F : 1;
      const grouped =
        factorized &&
        groupSize > 1 &&
        Math.ceil((groups * groupShares) / threadCount) * groupCost * unitOfGroup <
          0.97 * (heads / threadCount) * headCost;
      const shares =
        workers === null
          ? 1
          : grouped
            ? groupShares
            : !factorized
              ? sharesPerHead(heads, threadCount, directChunks, () => 0)
              : byQueries
                ? // Only the heads past whole rounds of the threads: a later query share folds the
                  // keys before its first query again, so splitting every head adds work (3 heads on
                  // 2 threads in 2 shares each took 1.21× whole heads' time at p = 1, N = 16384).
                  sharesPerHead(heads % threadCount, threadCount, F / 4, () => 0)
                : plan.featureCount >= MIN_FEATURES_FOR_FEATURE_SPLIT
                  ? sharesPerHead(heads, threadCount, F / 4, (s) => fixedFeaturesFor(s) / F)
                  : byKeys
                    ? sharesPerHead(heads, threadCount, Math.max(1, Math.floor(N / 64)), () => 0)
                    : 1;
      const bySequence = shares > 1 && (byQueries || !factorized);
      // Heads that run whole in a split by queries (WorkUnit.whole).
      const wholeHeads = bySequence && factorized ? heads - (heads % threadCount) : 0;
      if (bySequence && !factorized)
        for (let b = 0; b < B; b++) schedules[b] = directSchedule(b, shape, resolved, DIRECT_SPLIT_ROWS);
      // With one head split by queries, the calling thread answers one share itself, from the
      // caller's arrays into the caller's output, so that share's rows are not staged for the
      // workers: the first one when the shares scan (it waits for no other), else the last one
      // (it needs the fewest rows staged). Its other duties count against it (callerExtra).
      const callerShare = bySequence && factorized && heads === 1 && options.shareCallingThread !== false;
      const outLength = B * H * N * Dv;
      const stagedOutput = outLength * 4 <= LARGEST_STAGED_OUTPUT_BYTES;
      // The caller's output, allocated first when the calling thread takes a share: whether its
      // pages are fresh from the system (a page fault each on first touch, 11 µs on the VMs we
      // measure: 13 ms for 4 MiB, as much as the rest of a p = 1 call) decides how much of the
      // work that thread can take, so a few pages are timed and all of them priced alike.
      const callerOutput =
        callerShare && stagedOutput ? (request.out ?? allocate(() => new Float32Array(outLength))) : null;
      const probeMs = callerOutput === null ? 0 : probeFirstTouch(callerOutput);
      const outputPages = Math.ceil(outLength / FLOATS_PER_PAGE);
      // Its duties: staging the workers' rows (after the first block) and copying their output
      // rows out, about (shares − 1)/shares of each, and the output's first touch.
      const callerExtra = callerShare
        ? (CALLER_FLOAT_COST * N * (2 * D + 2 * Dv) * (shares - 1)) / shares +
          (outputPages * probeMs * 1e6) / COST_UNIT_NS
        : 0;
      const queryCost =
        2 * plan.featureCount * (Dv + 1) + (chunkSize * (D + Dv)) / 2 + PREPARATION_COST * (2 * D + Dv);
      // The speed of each query share relative to the model when one head's shares are balanced
      // (balance.ts).
      const balancedQueries = bySequence && factorized && heads === 1 && options.balanceShares !== false;
      const learnedSpeeds = (scan: boolean) =>
        queryShareSpeedsScan === null || queryShareSpeedsScan === scan ? queryShareSpeeds : null;
      const splitByQueries = (scan: boolean, keep = true) => {
        // Building the state of the keys before a share costs it per key only when it folds them;
        // a scan share that keeps nothing adds its own keys twice.
        const prefixCost = scan ? 0 : keyCost;
        const rowCost = queryCost + (scan && !keep ? keyCost : 0);
        const callerIndex = callerShare ? (scan ? 0 : shares - 1) : -1;
        // The model's time factor of each share: a worker's staged reads are slower.
        const factors = Array.from({ length: shares }, (_, s) =>
          callerShare && s !== callerIndex ? STAGED_SLOWDOWN : 1,
        );
        const extras = Array.from({ length: shares }, (_, s) => (s === callerIndex ? callerExtra : 0));
        const speeds = balancedQueries ? unevenSpeeds(learnedSpeeds(scan), shares) : null;
        const bounds = sequenceBounds(
          N,
          shares,
          chunkSize,
          rowCost,
          prefixCost,
          extras,
          factors.map((factor, s) => factor / (speeds?.[s] ?? 1)),
        );
        return { scan, keep, prefixCost, rowCost, callerIndex, factors, bounds };
      };
      let querySplit = !bySequence
        ? null
        : factorized
          ? splitByQueries(options.queryScan ?? shares >= 3)
          : {
              scan: false,
              keep: true,
              prefixCost: 0,
              rowCost: 0,
              callerIndex: -1,
              factors: new Array<number>(shares).fill(1),
              bounds: directBounds(shape, resolved, shares, DIRECT_SPLIT_ROWS),
            };
      if (querySplit?.scan) {
        let largest = 0;
        for (let s = 0; s < shares; s++)
          largest = Math.max(largest, querySplit.bounds[s + 1]! - querySplit.bounds[s]!);
        if (scanStoreBytes(setup.paddedFeatures, D, Dv, largest, chunkSize) > scanKeepBytes)
          querySplit = splitByQueries(true, false);
      }
      const queryBounds = querySplit?.bounds ?? null;
      // After a balanced split by queries: how fast each share ran against the model. The workers'
      // shares ran as batches in share order (the calling thread's left out), the calling thread's
      // took `callerMillis`.
      const learnQueryShareSpeeds = (timings: readonly BatchTiming[], callerMillis?: number): void => {
        const { scan, prefixCost, rowCost, callerIndex, factors, bounds } = querySplit!;
        const workerShares = Array.from({ length: shares }, (_, s) => s).filter((s) => s !== callerIndex);
        const millis: number[] = [];
        for (const { batch, millis: taken } of timings) millis[workerShares[batch]!] = taken;
        if (callerMillis !== undefined) millis[callerIndex] = callerMillis;
        const modelled = factors.map(
          (factor, s) => factor * (prefixCost * bounds[s]! + rowCost * (bounds[s + 1]! - bounds[s]!)),
        );
        queryShareSpeeds = updatedSpeeds(learnedSpeeds(scan), modelled, millis);
        queryShareSpeedsScan = scan;
      };
      // Feature shares leave partial sums to be combined; query shares write finished rows.
      const keySplit = factorized && shares > 1 && byKeys;
      const combined = shares > 1 && queryBounds === null && !keySplit;
      // One head in as many feature shares as workers: share s runs on worker s (WorkerPool.run),
      // sized to that worker's measured speed, its fixed work counted (fixedFeaturesFor).
      const balanced = combined && heads === 1 && shares === threadCount && options.balanceShares !== false;
      const fixedFeatures = fixedFeaturesFor(shares);
      const featureBounds = balanced
        ? balancedFeatureBounds(setup.paddedFeatures, unevenSpeeds(workerSpeeds, shares), fixedFeatures)
        : null;
      const common = {
        batch: B,
        heads: H,
        kvHeads: shape.kvHeads,
        queryLength: N,
        keyLength: shape.keyLength,
        headDim: shape.headDim,
        valueDim: Dv,
        normalization: normalizationSpec(resolved),
        temperature: resolved.temperature,
        causal: resolved.causal,
        validKeys,
        path: plan.path,
        schedules,
        chunkSize,
        setup,
      };
      // The kernels flag the rows they load that hold a NaN or an infinity (Engine.nonFiniteInputs):
      // a call fails after its run when they flagged one, or when a key row no query reads (past
      // a batch's valid length) holds one; core's checkFinite then names the first bad value.
      const failOnNonFinite = (flaggedRows: number): void => {
        if (!resolved.checkFinite) return;
        if (flaggedRows === 0 && !unreadKeysNonFinite(k.data, v.data, shape, validKeys)) return;
        checkFinite(q, 'q');
        checkFinite(k, 'k');
        checkFinite(v, 'v');
      };
      // A single unit runs in the calling thread, without copies to shared memory.
      if (workers === null || heads * shares === 1) {
        const job: AttentionJob = {
          ...common,
          ...allocate(() => ({
            q: q.data,
            k: k.data,
            v: v.data,
            out: request.out ?? new Float32Array(outLength),
          })),
          shares: 1,
          featureBounds: null,
          partialOut: null,
          partialDen: null,
          queryBounds: null,
          scan: null,
          keySplit: null,
          stagedRows: null,
        };
        const local = await engine();
        let degenerateRows = 0;
        local.nonFiniteInputs = 0;
        try {
          const step = grouped ? groupSize : 1;
          for (let head = 0; head < heads; head += step)
            degenerateRows += local.runUnit(job, step > 1 ? { head, heads: step } : { head });
        } catch (error) {
          throw wrapEngineError(error);
        }
        failOnNonFinite(local.nonFiniteInputs);
        return { output: { shape: [B, H, N, Dv], data: job.out }, degenerateRows };
      }
      return staging.exclusive(async () => {
        // Everything the workers touch lives in the reused staging; the caller's output is a plain
        // array filled by one copy at the end. Fresh shared memory would save that copy but costs
        // its page faults on every call, where freed plain arrays are recycled.
        // Rows the workers answer when the calling thread takes the last share (the queries before
        // it), and the rows they read: those queries, and the keys they see plus a scan window
        // (prefix-max-norm reads key norms a block ahead); max-norm's whole-head maxima read all.
        // Those are staged block by block while the workers start (AttentionJob.stagedRows).
        const scan = querySplit?.scan === true;
        // Rows the workers answer when the calling thread takes a share (the queries after the first
        // share when the shares scan, before the last one when they fold), and the rows they read:
        // those queries, and the keys they see (a scan share only its own; a folding one every key
        // before it, plus prefix-max-norm's scan window, which reads key norms a block ahead);
        // max-norm's whole-head maxima read all. Those are staged block by block while the workers
        // start (AttentionJob.stagedRows).
        const M = shape.keyLength;
        const workerQueries = !callerShare
          ? { start: 0, end: N }
          : scan
            ? { start: queryBounds![1]!, end: N }
            : { start: 0, end: queryBounds![shares - 1]! };
        const readsAll =
          (workerQueries.start === 0 && workerQueries.end === N) ||
          resolved.normalization.kind === 'max-norm';
        const stagedQueries = readsAll ? { start: 0, end: N } : workerQueries;
        const stagedKeys = readsAll
          ? { start: 0, end: M }
          : scan
            ? { start: Math.min(M, Math.max(0, workerQueries.start + M - N)), end: M }
            : { start: 0, end: Math.min(M, workerQueries.end + Math.max(0, M - N) + MAX_CHUNK) };
        const progressive = callerShare
          ? allocate(
              () => new ProgressiveStaging(staging, q.data, k.data, v.data, D, Dv, stagedQueries, stagedKeys),
            )
          : null;
        const scanSlots = heads * (shares - 1);
        const queryScan: QueryScan | null = scan
          ? allocate(() => ({
              prefixes: staging.take('scanPrefixes', scanSlots * scanPrefixFloats(setup.paddedFeatures, Dv)),
              ready: staging.takeCounters('scanReady', scanSlots),
              keep: querySplit!.keep,
            }))
          : null;
        queryScan?.ready.fill(0);
        // A failed call wakes the scan shares waiting for a share that will not hand on its moments.
        const abortScan = (): void => {
          if (queryScan === null) return;
          for (let slot = 0; slot < scanSlots; slot++) {
            Atomics.store(queryScan.ready, slot, SCAN_ABORTED);
            Atomics.notify(queryScan.ready, slot);
          }
        };
        const job: AttentionJob = {
          ...common,
          ...allocate(() => ({
            q: progressive?.q ?? staging.input('q', q.data),
            k: progressive?.k ?? staging.input('k', k.data),
            v: progressive?.v ?? staging.input('v', v.data),
            out: stagedOutput
              ? staging.take('out', outLength)
              : new Float32Array(new SharedArrayBuffer(outLength * 4)),
            partialOut: combined ? staging.take('partialOut', outLength * (shares - 1)) : null,
            partialDen: combined ? staging.take('partialDen', heads * shares * N) : null,
          })),
          shares,
          featureBounds,
          queryBounds,
          scan: queryScan,
          keySplit: keySplit
            ? allocate(() => ({
                phase: 'moments' as const,
                states: staging.take('keySplitStates', heads * shares * momentStateFloats(F, Dv)),
                maxima: staging.take('keySplitMaxima', heads * shares * 2),
              }))
            : null,
          stagedRows: progressive?.rows ?? null,
        };
        const runWorkers = (units: WorkUnit[][], alongside: () => void) =>
          workers.run(job, units, alongside).catch((error: unknown) => {
            abortScan();
            throw error;
          });
        // The first block goes before the workers start, so that they do not wait at once.
        progressive?.stage(0, STAGE_BLOCK_ROWS);
        if (callerShare) {
          // The calling thread stages the rest of the workers' rows, touches the output's pages
          // where they are fresh, and computes its share into the caller's array while the workers
          // compute the others (with fresh pages that share may be empty); their rows are copied in
          // after. A scan's workers wait for what the calling thread's share hands on, so there
          // that share goes first, and runs even without rows.
          const local = await engine();
          const output = callerOutput ?? job.out;
          const callerIndex = querySplit!.callerIndex;
          const callerRows = queryBounds![callerIndex + 1]! - queryBounds![callerIndex]!;
          let callerDegenerate = 0;
          // Zero (unusable, balance.ts) when the calling thread answers no rows.
          let callerMillis = 0;
          local.nonFiniteInputs = 0;
          const runCallerShare = (): void => {
            if (callerRows === 0 && !scan) return;
            const callerJob: AttentionJob = {
              ...job,
              q: q.data,
              k: k.data,
              v: v.data,
              out: output,
              stagedRows: null,
            };
            const start = performance.now();
            try {
              callerDegenerate = local.runUnit(callerJob, { head: 0, share: callerIndex });
            } catch (error) {
              abortScan();
              throw wrapEngineError(error);
            }
            if (callerRows > 0) callerMillis = performance.now() - start;
          };
          const workerUnits = planUnits(heads, threadCount, shares, { skipShare: callerIndex });
          const totals = await runWorkers(workerUnits, () => {
            progressive!.finish(STAGE_BLOCK_ROWS);
            if (scan) runCallerShare();
            // Only the workers' rows: the calling thread's are written (and touched) by its share.
            if (callerOutput !== null && probeMs > FRESH_PAGE_MS)
              touchPages(callerOutput.subarray(workerQueries.start * Dv, workerQueries.end * Dv));
            if (!scan) runCallerShare();
          });
          failOnNonFinite(local.nonFiniteInputs + totals.nonFiniteInputs);
          if (balancedQueries) learnQueryShareSpeeds(totals.timings, callerMillis);
          if (output !== job.out)
            output.set(
              job.out.subarray(workerQueries.start * Dv, workerQueries.end * Dv),
              workerQueries.start * Dv,
            );
          return {
            output: { shape: [B, H, N, Dv], data: output },
            degenerateRows: callerDegenerate + totals.degenerate,
          };
        }
        // While the workers compute, the calling thread allocates the caller's output array and
        // touches every page of it (unless the caller gave one).
        const prepared: { output: Float32Array | null } = { output: request.out ?? null };
        let totals = await runWorkers(
          planUnits(heads, threadCount, shares, { wholeHeads, groupSize: grouped ? groupSize : 1 }),
          () => {
            if (!stagedOutput || prepared.output !== null) return;
            prepared.output = allocate(() => touchedFloat32(outLength));
          },
        );
        if (job.keySplit !== null) {
          // The moments are in: each share now reads its queries out against their sum.
          const moments = totals;
          const readout = { ...job, keySplit: { ...job.keySplit, phase: 'readout' as const } };
          totals = await workers.run(readout, planUnits(heads, threadCount, shares));
          totals = { ...totals, nonFiniteInputs: totals.nonFiniteInputs + moments.nonFiniteInputs };
        }
        failOnNonFinite(totals.nonFiniteInputs);
        if (balancedQueries) learnQueryShareSpeeds(totals.timings);
        if (balanced) {
          const { work, millis } = featureShareWork(
            [totals.timings],
            setup.paddedFeatures,
            shares,
            featureBounds,
            fixedFeatures,
          );
          workerSpeeds = updatedSpeeds(workerSpeeds, work, millis);
        }
        let degenerateRows = totals.degenerate;
        if (combined)
          degenerateRows += (await workers.combine(job, rowRanges(heads * N, threadCount))).degenerate;
        const output = prepared.output;
        if (output === null) return { output: { shape: [B, H, N, Dv], data: job.out }, degenerateRows };
        output.set(job.out);
        return { output: { shape: [B, H, N, Dv], data: output }, degenerateRows };
      });
    },

    async backward(request: BackwardRequest): Promise<BackwardResult> {
      live();
      if (request.plan.path === 'factorized') {
        const F = Math.ceil(request.plan.featureCount / 4) * 4;
        refuseLargeState(
          4 * stateBytes(F, request.shape.valueDim + 1),
          `F = ${request.plan.featureCount} (backward)`,
        );
      }
      backwardEngine ??= new BackwardEngine(await compiled());
      const { plan, shape } = request;
      const heads = shape.batch * shape.heads;
      const work = (plan.path === 'factorized' ? plan.cost.factorized : plan.cost.direct) * heads;
      // A head split into shares (features and query blocks) repeats only the per-token loading and
      // feature rows: worth it with many features, and on the direct path (its blocks are split).
      const splitHeads = plan.path === 'direct' || plan.featureCount >= MIN_FEATURES_FOR_FEATURE_SPLIT;
      // One head that is not split runs on a worker too: the calling thread allocates and touches
      // the result arrays meanwhile (fresh pages: about 37 ms for the three of N = 16384, D = 64
      // on the VM of docs/benchmarks.md), and the finishing pass spreads over every worker.
      const workers = work >= parallelThreshold ? await pool() : null;
      const engine = backwardEngine;
      try {
        return await staging.exclusive(() =>
          cpuBackward(
            request,
            host(request.q, 'q'),
            host(request.k, 'k'),
            host(request.v, 'v'),
            host(request.dOut, 'dOut'),
            engine,
            workers,
            splitHeads,
            staging,
            options.balanceShares === false
              ? null
              : {
                  speeds: backwardSpeeds,
                  learn: (work, millis) => {
                    backwardSpeeds = updatedSpeeds(backwardSpeeds, work, millis);
                  },
                },
          ),
        );
      } catch (error) {
        throw wrapEngineError(error);
      }
    },

    async createState(stateOptions: ResolvedStateOptions): Promise<BackendState> {
      live();
      return new CpuState(stateOptions, new Engine(await compiled()));
    },

    async dispose(): Promise<void> {
      disposed = true;
      const current = poolPromise;
      poolPromise = null;
      localEngine = null;
      backwardEngine = null;
      staging.release();
      (await current)?.dispose();
    },

    async threadCount(): Promise<number> {
      return (await pool())?.size ?? 1;
    },

    async kernelVariant(): Promise<'simd' | 'relaxed-simd'> {
      await compiled();
      return variant;
    },

    poolForTesting: () => pool(),
    setFirstTouchProbeForTesting: (probe) => {
      probeFirstTouch = probe;
    },
    speedsForTesting: (split) =>
      ({ features: workerSpeeds, queries: queryShareSpeeds, backward: backwardSpeeds })[split]?.slice() ??
      null,
    setSpeedsForTesting: (split, speeds) => {
      if (split === 'features') workerSpeeds = speeds;
      else if (split === 'backward') backwardSpeeds = speeds;
      else {
        queryShareSpeeds = speeds;
        queryShareSpeedsScan = null;
      }
    },
  };
  return backend;
}

/** Runs an allocation of host memory; a refusal becomes RESOURCE_EXHAUSTED instead of a RangeError. */
function allocate<T>(make: () => T): T {
  try {
    return make();
  } catch (error) {
    if (!(error instanceof RangeError)) throw error;
    throw new FastmaxError(
      'RESOURCE_EXHAUSTED',
      'not enough memory for the output (or shared copies of the inputs)',
      {
        argument: 'q',
        expected: 'tensors that fit in memory',
        actual: error.message,
        cause: error,
      },
    );
  }
}

/**
 * Whether a key or value row that no query reads (rows past a batch's valid length, which the
 * kernels never load) holds a NaN or an infinity.
 */
function unreadKeysNonFinite(
  k: Float32Array,
  v: Float32Array,
  shape: AttentionShape,
  validKeys: Int32Array,
): boolean {
  const { keyLength: M, kvHeads, headDim: D, valueDim: Dv } = shape;
  for (let b = 0; b < shape.batch; b++) {
    if (validKeys[b]! >= M) continue;
    for (let h = 0; h < kvHeads; h++) {
      const head = b * kvHeads + h;
      for (const [data, width] of [
        [k, D],
        [v, Dv],
      ] as const) {
        for (let i = (head * M + validKeys[b]!) * width; i < (head + 1) * M * width; i++) {
          if (data[i]! - data[i]! !== 0) return true;
        }
      }
    }
  }
  return false;
}

function wrapEngineError(error: unknown): FastmaxError {
  if (error instanceof FastmaxError) return error;
  const text = error instanceof Error ? error.message : String(error);
  return new FastmaxError(
    error instanceof RangeError ? 'RESOURCE_EXHAUSTED' : 'BACKEND_ERROR',
    `the CPU kernels failed: ${text}`,
    { cause: error },
  );
}

/**
 * Recurrent decoding: one moment state per (batch, key head) in a WebAssembly instance of its own,
 * O(F·Dv) whatever the number of tokens; the query heads of a key head (grouped-query attention)
 * read it together (Engine.runHead's group), each with its own running query maximum. Each step
 * runs core's causal chunk schedule over the new tokens, starting from the state, then adds their
 * keys to it.
 */
class CpuState implements BackendState {
  private count = 0;
  /** Per (batch, key head): the keys in the state and their running maximum norm. */
  private readonly keyHeads: HeadState[] = [];
  /** Per (batch, query head): prefix-max-norm's running maximum of its query norms. */
  private readonly queryHeads: { queryMax: number }[] = [];
  private readonly setup;
  private closed = false;

  constructor(
    private readonly options: ResolvedStateOptions,
    private readonly engine: Engine,
  ) {
    const { headDim: D, valueDim: Dv, batch: B, kvHeads: Hkv } = options;
    const resolved = options.options;
    this.setup = kernelSetup(D, resolved.order, resolved.coefficients, true);
    refuseLargeState(stateBytes(this.setup.paddedFeatures, Dv) * B * Hkv, `${B * Hkv} decoding states`);
    this.engine.prepare(this.setup, Dv, chooseChunkSize(D, Dv, resolved.order, 256), B * Hkv);
    this.reset();
  }

  get tokens(): number {
    return this.count;
  }

  async step(qt: Tensor, kt: Tensor, vt: Tensor): Promise<StepResult> {
    if (this.closed)
      throw new FastmaxError('DISPOSED', 'this decoding state was disposed', { argument: 'state' });
    const q = host(qt, 'q');
    const k = host(kt, 'k');
    const v = host(vt, 'v');
    const { batch: B, heads: H, kvHeads: Hkv, headDim: D, valueDim: Dv } = this.options;
    const resolved = this.options.options;
    const T = q.shape[2];
    const n = this.count;
    const chunk = chooseChunkSize(D, Dv, resolved.order, Math.max(T, 1));
    const schedule = packedSchedule(chunkRanges(T, n + T, chunk, n + T));
    const out = new Float32Array(B * H * T * Dv);
    const normalization = normalizationSpec(resolved);
    let degenerateRows = 0;
    const groupSize = H / Hkv;
    try {
      for (let kvHead = 0; kvHead < B * Hkv; kvHead++) {
        const first = kvHead * groupSize;
        const headView = (head: number): HeadView => ({
          q: q.data,
          qBase: head * T * D,
          k: k.data,
          kBase: kvHead * T * D,
          v: v.data,
          vBase: kvHead * T * Dv,
          out,
          oBase: head * T * Dv,
          rows: T,
          keyOffset: n,
          valid: n + T,
          causal: true,
          causalShift: n,
          headDim: D,
          valueDim: Dv,
          featureStart: 0,
          featureEnd: this.setup.paddedFeatures,
          share: 0,
          shares: 1,
          partial: null,
        });
        const group = Array.from(
          { length: groupSize },
          (_, h): GroupMember => ({
            view: headView(first + h),
            scales: null,
            running: this.queryHeads[first + h]!,
          }),
        );
        degenerateRows += this.engine.runStep(
          group[0]!.view,
          schedule,
          normalization,
          resolved.temperature,
          this.keyHeads[kvHead]!,
          kvHead,
          group,
        );
      }
    } catch (error) {
      throw wrapEngineError(error);
    }
    this.count = n + T;
    return { output: { shape: [B, H, T, Dv], data: out }, degenerateRows };
  }

  reset(): void {
    const { batch: B, heads: H, kvHeads: Hkv } = this.options;
    this.keyHeads.length = 0;
    for (let slot = 0; slot < B * Hkv; slot++) {
      this.engine.clearState(slot);
      this.keyHeads.push({ keys: 0, queryMax: 0, keyMax: 0 });
    }
    this.queryHeads.length = 0;
    for (let head = 0; head < B * H; head++) this.queryHeads.push({ queryMax: 0 });
    this.count = 0;
  }

  dispose(): void {
    this.closed = true;
  }
}
