/**
 * The per-head driver of the WebAssembly kernels. It runs in the main thread (one thread, or no
 * SharedArrayBuffer) and, transpiled into src/generated/worker-source.ts by the build, inside every
 * worker. So this module imports nothing at run time (types only), and everything it needs arrives
 * as plain, structured-cloneable data: tensors, sizes, the kernel setup and the chunk schedule.
 *
 * Layout of the work for one head (see docs/benchmarks.md, "Method"):
 * - queries go chunk by chunk; per chunk the keys [0, stateKeyEnd) are read through the moment state
 *   S (F × Dv, plus the denominator moments z), the keys [stateKeyEnd, keyLimit(i)) directly;
 * - keys enter S (Kahan-compensated, in chunks of at most `keyChunk`) just before the first query
 *   chunk that needs them, so memory is O(F·Dv) for the state plus per-chunk scratch: the N×F
 *   feature matrices are never formed, only `featureBlock`-row slices of one chunk.
 * Normalization follows core's `prepareScores` formula by formula (tested against it), in float32:
 * per chunk the raw rows are copied into WebAssembly memory (one copy per tensor), the kernels center
 * them and compute their norms, this driver turns the norms into one factor per row (maxima, σ: a
 * few scalar operations per row), and the kernels scale and transpose the rows into the feature-major
 * layout: z = σ·x for queries and y for keys, so that σ^l falls out of the degree-l monomials of z.
 * Finished output rows are divided by their denominators in the kernels and copied out at once.
 */

import type { KernelExports } from './kernel-types.js';

export type NormalizationSpec =
  | { readonly kind: 'max-norm' | 'prefix-max-norm' | 'l2' }
  | { readonly kind: 'scale'; readonly scale: number };

/** What depends on (D, p, coefficients) only; built once per call on the main thread. */
export interface KernelSetup {
  readonly headDim: number;
  readonly order: number;
  /** Features F, padded to a multiple of 4 with zero-weight constants. */
  readonly paddedFeatures: number;
  /** Per feature: degree, then its coordinates packed one per byte (first factor lowest). */
  readonly table: Int32Array;
  /** a_l · multinomial weight of each feature (0 for the padding). */
  readonly weights: Float32Array;
  /** a_0..a_p. */
  readonly coefficients: Float32Array;
}

export interface AttentionJob {
  readonly q: Float32Array;
  readonly k: Float32Array;
  readonly v: Float32Array;
  readonly out: Float32Array;
  readonly batch: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly queryLength: number;
  readonly keyLength: number;
  readonly headDim: number;
  readonly valueDim: number;
  readonly normalization: NormalizationSpec;
  readonly temperature: number;
  readonly causal: boolean;
  /** Valid keys per batch. */
  readonly validKeys: Int32Array;
  readonly path: 'factorized' | 'direct';
  /** Per batch: the chunk schedule from core's `querySchedule`, 4 numbers per chunk. */
  readonly schedules: readonly Int32Array[];
  readonly chunkSize: number;
  readonly setup: KernelSetup;
  /**
   * Units each head is split into by features (1: whole heads). With more than one, share 0 writes
   * its unnormalized numerators to `out` and every other share s to `partialOut` slice
   * (head·(shares − 1) + s − 1), each share its denominators to `partialDen` slice
   * (head·shares + s); a second pass sums them and divides (`combineShares`).
   */
  readonly shares: number;
  /**
   * Padded-feature boundaries of the feature shares (shares + 1 of them, multiples of 4) when they
   * are sized to the workers' measured speeds (balance.ts); null: equal counts (featureShare).
   */
  readonly featureBounds: Int32Array | null;
  readonly partialOut: Float32Array | null;
  readonly partialDen: Float32Array | null;
  /**
   * Causal calls with few features split each head by queries instead (`shares` units): share s
   * answers the schedule's chunks starting in [queryBounds[s], queryBounds[s + 1]) with every
   * feature, after building the state of the keys before them itself (the prefix a sequential run
   * would have built), and writes finished rows. Null: the feature split.
   */
  readonly queryBounds: Int32Array | null;
  /**
   * The split by queries as a prefix scan (null: each query share folds the keys before it itself).
   * Share s first builds the moments of its own keys only, [E_s, E_(s+1)) with E_s the keys its
   * first query chunk reads through the state (E_0 = 0), keeping a copy of that partial state at
   * every query chunk; it then takes the prefix (the moments of keys [0, E_s) and the running
   * maxima before its first query) from share s − 1, hands prefix + its own moments on to share
   * s + 1, and reads its queries out against prefix + copy. Nothing is computed twice; share s
   * waits (Atomics.wait) only between the two phases, and share 0 never waits.
   */
  readonly scan: QueryScan | null;
  /**
   * Non-causal heads with few features split by keys, then by queries (`shares` units a head, two
   * runs): in phase 'moments' unit s adds keys [valid·s/shares, valid·(s + 1)/shares) to a partial
   * state and finds the largest norms of those keys and of its queries; in phase 'readout' it sums
   * the head's partial states and reads out queries [N·s/shares, N·(s + 1)/shares). Null: no such
   * split.
   */
  readonly keySplit: KeySplit | null;
  /**
   * Staging that goes on while the workers run (one head): [QUERY_ROWS] query rows and [KEY_ROWS]
   * key and value rows copied so far, raised by the calling thread with Atomics.notify; a worker
   * waits (Atomics.wait) before it reads past them. Null: everything was staged before the run.
   */
  readonly stagedRows: Int32Array | null;
}

/** Shared memory of AttentionJob.scan, one slot per (head, share s ≥ 1): slot head·(shares − 1) + s − 1. */
export interface QueryScan {
  /**
   * The prefix of each slot's share (scanPrefixFloats floats a slot): the moment state S of the keys
   * before it in the state's 8-column panels, its denominator moments z, then prefix-max-norm's
   * largest centered query norm and key norm before it.
   */
  readonly prefixes: Float32Array;
  /** Per slot: 0 until its prefix is written, then 1; SCAN_ABORTED when the call failed. */
  readonly ready: Int32Array;
  /**
   * Whether each share keeps its queries, keys and a state copy per chunk between the phases
   * (scanStoreBytes of WebAssembly memory; nothing computed twice), or keeps nothing and adds its
   * own keys' moments twice (runRecomputingScanShare), for shares whose kept data would not fit.
   */
  readonly keep: boolean;
}

/** Shared memory of AttentionJob.keySplit, one slot per (head, share): slot head·shares + share. */
export interface KeySplit {
  readonly phase: 'moments' | 'readout';
  /** Each slot's partial moment state: S (F × W, in the state's 8-column panels), then z. */
  readonly states: Float32Array;
  /** Each slot's largest centered key norm and query norm (max-norm's divisors come from these). */
  readonly maxima: Float32Array;
}

/** AttentionJob.scan's ready cell of a call that failed: waiting shares stop with an error. */
export const SCAN_ABORTED = -1;

/** Floats of a moment state as the splits hand it on: S (F × W, W = Dv rounded up to 8), then z. */
export function momentStateFloats(paddedFeatures: number, valueDim: number): number {
  return paddedFeatures * roundUp(Math.max(valueDim, 1), 8) + paddedFeatures;
}

/** Floats of one prefix slot (QueryScan.prefixes): a moment state, then two maxima. */
export function scanPrefixFloats(paddedFeatures: number, valueDim: number): number {
  return momentStateFloats(paddedFeatures, valueDim) + 2;
}

/** Byte offsets of what a scan share keeps between its two phases (see scanLayout). */
interface ScanLayout {
  /** Its queries, centered, and their norms. */
  readonly queries: number;
  readonly queryNorms: number;
  /** Its kept keys transposed (D rows `ldKeys` floats apart), their values in panels, their norms. */
  readonly keys: number;
  readonly values: number;
  readonly keyNorms: number;
  readonly ldKeys: number;
  /** A copy of the moment state (S, then z) per query chunk, then the prefix from the share before. */
  readonly snapshots: number;
  readonly prefix: number;
  readonly end: number;
}

/**
 * Where a scan share of `rows` queries, `keptKeys` kept keys and `chunks` query chunks keeps its
 * data, from byte offset `base` (the engine's scratch ends there).
 */
function scanLayout(
  paddedFeatures: number,
  headDim: number,
  columns: number,
  rows: number,
  keptKeys: number,
  chunks: number,
  base: number,
): ScanLayout {
  const stateFloats = momentStateFloats(paddedFeatures, columns);
  // The scores kernel reads whole 8-key tiles: a tile of zeros past the last kept key.
  const ldKeys = roundUp(keptKeys, 8) + 8;
  let offset = roundUp(base, 64);
  const take = (floats: number): number => {
    const start = offset;
    offset = roundUp(offset + floats * 4, 64);
    return start;
  };
  return {
    queries: take(rows * headDim),
    queryNorms: take(rows),
    keys: take(headDim * ldKeys),
    values: take(columns * ldKeys),
    keyNorms: take(ldKeys),
    ldKeys,
    snapshots: take(chunks * stateFloats),
    prefix: take(stateFloats),
    end: offset,
  };
}

/**
 * Bytes of WebAssembly memory a scan share of `rows` queries keeps between its two phases (on top of
 * the engine's scratch; a share keeps at most as many keys as it has queries, and a state copy per
 * query chunk of `chunk` rows). The backend folds instead above a limit.
 */
export function scanStoreBytes(
  paddedFeatures: number,
  headDim: number,
  valueDim: number,
  rows: number,
  chunk: number,
): number {
  const columns = roundUp(Math.max(valueDim, 1), 8);
  const chunks = Math.ceil(rows / Math.max(1, chunk));
  // From an offset just past a 64-byte boundary: the most the alignment can add.
  return scanLayout(paddedFeatures, headDim, columns, rows, rows, chunks, 1).end;
}

/**
 * Scan share `share`'s queries [rowStart, rowEnd) and own keys [keyStart, keyEnd): the keys past
 * the previous share's and up to the last its queries see, share 0's from key 0 (with more keys
 * than queries, those every query sees).
 */
function scanShareRows(
  view: HeadView,
  bounds: Int32Array,
  share: number,
): { rowStart: number; rowEnd: number; keyStart: number; keyEnd: number } {
  const clampKeys = (end: number): number => Math.max(0, Math.min(view.valid, end));
  const rowStart = bounds[share]!;
  const rowEnd = bounds[share + 1]!;
  return {
    rowStart,
    rowEnd,
    keyStart: share === 0 ? 0 : clampKeys(rowStart + view.causalShift),
    keyEnd: clampKeys(rowEnd + view.causalShift),
  };
}

/**
 * The chunks [first, end) of a packed schedule (four numbers a chunk, packedSchedule) whose first
 * query lies in [from, to): a share's chunks when a head is split by queries.
 */
export function chunksStartingIn(
  schedule: Int32Array,
  from: number,
  to: number,
): { first: number; end: number } {
  const chunks = schedule.length / 4;
  let first = 0;
  while (first < chunks && schedule[4 * first]! < from) first++;
  let end = first;
  while (end < chunks && schedule[4 * end]! < to) end++;
  return { first, end };
}

/**
 * max-norm's whole-head divisors of the query and key rows (queryScales); null for the other
 * normalizations, which need none.
 */
export interface HeadScales {
  readonly queryDivisor: number;
  readonly keyDivisor: number;
}

/** Cells of AttentionJob.stagedRows. */
export const QUERY_ROWS = 0;
export const KEY_ROWS = 1;

/**
 * One piece of work: a (batch, head) pair, and which of the head's shares it is when a head is
 * split over threads (AttentionJob.shares and queryBounds; BackwardJob.shares).
 */
export interface WorkUnit {
  readonly head: number;
  readonly share?: number;
  /**
   * The whole head, in a job that splits heads by queries (AttentionJob.queryBounds): the heads
   * that fill whole rounds of the threads run unsplit, only the rest in shares.
   */
  readonly whole?: boolean;
  /**
   * Query heads [head, head + heads) run together: they read the same key head (grouped-query
   * attention), whose keys then enter the moment state once for all of them. Whole heads, or the
   * same feature share of each (AttentionJob.shares).
   */
  readonly heads?: number;
}

/**
 * The units in batches for the pool, which hands the next batch to whichever worker is free.
 * Several units a batch only when there are many (fewer messages), and rounded down, so that the
 * last round stays even: 10 whole heads on 2 workers in batches of 3 took 6 heads' time on one of
 * them, one a batch 5; and a head's shares are not batched back together (3 heads in 2 shares).
 */
export function batchUnits<Unit>(units: readonly Unit[], threads: number): Unit[][] {
  const size = Math.max(1, Math.floor(units.length / (threads * 4)));
  const batches: Unit[][] = [];
  for (let i = 0; i < units.length; i += size) batches.push(units.slice(i, i + size));
  return batches;
}

/**
 * Padded features [start, end) of share `share` of `shares`: from `bounds` when the shares were
 * sized to the workers' speeds (AttentionJob.featureBounds), else equal counts; in groups of 4
 * because the moment and readout kernels take features 4 at a time.
 */
export function featureShare(
  paddedFeatures: number,
  share: number,
  shares: number,
  bounds: Int32Array | null = null,
): { start: number; end: number } {
  if (bounds !== null && shares > 1) return { start: bounds[share]!, end: bounds[share + 1]! };
  const groups = paddedFeatures / 4;
  return {
    start: Math.floor((groups * share) / shares) * 4,
    end: Math.floor((groups * (share + 1)) / shares) * 4,
  };
}

/** Largest query chunk the scratch is laid out for; longer schedule chunks are cut into these. */
export const MAX_CHUNK = 512;
/** Keys added to the state per moments call, and keys per direct block. */
export const KEY_CHUNK = 256;
/** Feature rows per block: the slice of φ built at a time, sized so S's slice and φ stay in L2. */
export const FEATURE_BLOCK = 128;
/**
 * Floats added to each row of a feature block (φ of queries or keys, and the backward's
 * projections h): rows of 128 or 256 floats are a power-of-two number of bytes apart, so the
 * readout, which reads one feature after another down a column, met them in a few L1 sets only.
 */
export const FEATURE_ROW_PAD = 4;

export const roundUp = (value: number, multiple: number): number => Math.ceil(value / multiple) * multiple;

interface Layout {
  readonly features: number;
  readonly headDim: number;
  readonly columns: number;
  readonly chunk: number;
  readonly order: number;
  readonly heads: number;
  /** Floats per raw value row (the host's Dv, whatever columns this engine produces). */
  readonly valueDim: number;
}

/** Byte offsets of every buffer, for one layout. */
interface Buffers {
  readonly table: number;
  readonly weights: number;
  readonly coefficients: number;
  readonly limits: number;
  readonly xT: number;
  readonly yT: number;
  readonly vPanels: number;
  readonly uq: number;
  readonly uk: number;
  readonly o: number;
  readonly den: number;
  readonly w: number;
  /** Per head: S, its compensation, z, its compensation. */
  readonly states: number;
  readonly stateBytes: number;
  /** Raw rows copied in from the host (queries, keys, values), before preparation. */
  readonly qRaw: number;
  readonly kRaw: number;
  readonly vRaw: number;
  /** Per-row norms and scale factors of the rows being prepared. */
  readonly qNorms: number;
  readonly qFactors: number;
  readonly kNorms: number;
  readonly kFactors: number;
  /** prefix-max-norm: centered norms of the keys scanned ahead of the running key maximum. */
  readonly scanNorms: number;
  /** prefix-max-norm's scan window: centered keys whose norms are in scanNorms. */
  readonly scanRaw: number;
  /** Finished output rows of one chunk, before the copy out. */
  readonly stage: number;
  readonly end: number;
}

/**
 * Where prepared keys live in WebAssembly memory (byte offsets): y transposed, D rows `ldY` floats
 * apart, and the values in 8-column panels `vPanel` bytes apart.
 */
interface PreparedKeys {
  readonly y: number;
  readonly ldY: number;
  readonly v: number;
  readonly vPanel: number;
}

export interface HeadState {
  /** Keys [0, keys) are in S. */
  keys: number;
  /** Running maxima of centered norms (prefix-max-norm): all queries so far, all keys so far. */
  queryMax: number;
  keyMax: number;
}

/** A query head of a group that reads one key head's state (Engine.runHead's `group`). */
export interface GroupMember {
  readonly view: HeadView;
  /** max-norm's divisors (queryScales); the key divisor is the same for every head of a group. */
  readonly scales: HeadScales | null;
  /** prefix-max-norm's running maximum of this head's query norms. */
  readonly running: { queryMax: number };
}

/**
 * The flat (batch, kv head) index that flat query head b·H + h reads: core's `kvHeadOf`, restated
 * because this module (bundled into the workers) imports nothing at run time.
 */
export function kvHeadSlot(head: number, heads: number, kvHeads: number): number {
  const batch = Math.floor(head / heads);
  return batch * kvHeads + Math.floor((head % heads) / (heads / kvHeads));
}

/** Rows [start, end) of the B·H·N output rows, for the pass that combines feature shares. */
export interface RowRange {
  readonly start: number;
  readonly end: number;
}

/** Range `index` of `parts` near-equal contiguous ranges of [0, total). */
export function evenRange(total: number, index: number, parts: number): RowRange {
  return { start: Math.floor((total * index) / parts), end: Math.floor((total * (index + 1)) / parts) };
}

/**
 * Finishes rows [start, end) of a feature-split forward (AttentionJob.shares) in place: share 0's
 * numerators in `out` plus the other shares', over the summed denominators, or zeros (counted) where
 * that sum is not > 0. Returns the degenerate rows.
 */
export function combineShares(job: AttentionJob, rows: RowRange): number {
  const { shares, queryLength: N, valueDim: Dv, out } = job;
  const partialOut = job.partialOut!;
  const partialDen = job.partialDen!;
  let degenerate = 0;
  for (let row = rows.start; row < rows.end; row++) {
    const head = Math.floor(row / N);
    const i = row - head * N;
    let den = 0;
    for (let s = 0; s < shares; s++) den += partialDen[(head * shares + s) * N + i]!;
    const start = row * Dv;
    if (!(den > 0)) {
      degenerate++;
      out.fill(0, start, start + Dv);
      continue;
    }
    const inverse = 1 / den;
    if (shares === 2) {
      // The common case (two threads): partialOut is laid out exactly like out.
      for (let c = start; c < start + Dv; c++) out[c] = (out[c]! + partialOut[c]!) * inverse;
      continue;
    }
    for (let c = 0; c < Dv; c++) {
      let sum = out[start + c]!;
      for (let s = 1; s < shares; s++) sum += partialOut[((head * (shares - 1) + s - 1) * N + i) * Dv + c]!;
      out[start + c] = sum * inverse;
    }
  }
  return degenerate;
}

/** Rows of one head in flat B×H×N×D storage. */
export interface HeadView {
  readonly q: Float32Array;
  readonly qBase: number;
  readonly k: Float32Array;
  readonly kBase: number;
  readonly v: Float32Array;
  readonly vBase: number;
  readonly out: Float32Array;
  readonly oBase: number;
  readonly rows: number;
  /**
   * Global index of local key 0 (decoding: the keys before it live only in the state). Key limits,
   * `valid` and the schedule count keys globally.
   */
  readonly keyOffset: number;
  readonly valid: number;
  readonly causal: boolean;
  /** Query row i sees keys j < i + causalShift + 1 when causal (global key indices). */
  readonly causalShift: number;
  readonly headDim: number;
  readonly valueDim: number;
  /**
   * Feature split (see AttentionJob.shares): this run owns features [featureStart, featureEnd) and
   * the diagonal blocks of the query blocks whose index ≡ share (mod shares), and writes
   * unnormalized numerators and denominators to `partial` instead of finished rows.
   */
  readonly featureStart: number;
  readonly featureEnd: number;
  readonly share: number;
  readonly shares: number;
  readonly partial: PartialTarget | null;
}

/** Where a feature share writes its unnormalized rows: numerators (Dv per row) and denominators. */
export interface PartialTarget {
  readonly out: Float32Array;
  readonly outBase: number;
  readonly den: Float32Array;
  readonly denBase: number;
}

/**
 * The factor that turns query row i's centered (or raw, under `scale`) row into z_i = σ_i·x_i, as
 * in core's prepareScores: `norm` is the row's own norm, `queryMax` and `keyMax` prefix-max-norm's
 * running maxima for this row, `scales` max-norm's whole-head divisors.
 */
function queryFactor(
  kind: NormalizationSpec['kind'],
  norm: number,
  queryMax: number,
  keyMax: number,
  scales: HeadScales | null,
  temperature: number,
  scale: number,
): number {
  switch (kind) {
    case 'max-norm':
      return 1 / (scales!.queryDivisor * temperature);
    case 'l2':
      return 1 / ((norm > 0 ? norm : 1) * temperature);
    case 'prefix-max-norm':
      return 1 / ((queryMax > 0 ? queryMax : 1) * (keyMax > 0 ? keyMax : 1) * temperature);
    default:
      return scale / temperature;
  }
}

export class Engine {
  /**
   * Input rows loaded since this was last set to 0 whose values include a NaN or an infinity (query
   * and key rows whose norm is not finite, value blocks the packing found one in): the non-finite
   * check costs the kernels next to nothing; the caller names the bad value (core's checkFinite).
   */
  nonFiniteInputs = 0;
  /** Milliseconds spent waiting for another share's moments (AttentionJob.scan) since last set to 0. */
  waitedMillis = 0;
  private readonly exports: KernelExports;
  /** The running call's AttentionJob.stagedRows. */
  private stagedRows: Int32Array | null = null;
  private layout: Layout | null = null;
  private buffers: Buffers | null = null;
  private setup: KernelSetup | null = null;
  private f32: Float32Array;
  private i32: Int32Array;

  constructor(module: WebAssembly.Module) {
    this.exports = new WebAssembly.Instance(module, {}).exports as unknown as KernelExports;
    this.f32 = new Float32Array(this.exports.memory.buffer);
    this.i32 = new Int32Array(this.exports.memory.buffer);
  }

  /** Bytes of WebAssembly memory this engine holds. */
  get memoryBytes(): number {
    return this.exports.memory.buffer.byteLength;
  }

  private refreshViews(): void {
    if (this.f32.buffer !== this.exports.memory.buffer) {
      this.f32 = new Float32Array(this.exports.memory.buffer);
      this.i32 = new Int32Array(this.exports.memory.buffer);
    }
  }

  /** Lays the buffers out for this layout, growing memory when needed; keeps the state if unchanged. */
  prepare(setup: KernelSetup, columns: number, chunk: number, heads = 1, valueDim = columns): void {
    const layout: Layout = {
      valueDim,
      features: setup.paddedFeatures,
      headDim: setup.headDim,
      columns: roundUp(Math.max(columns, 1), 8),
      chunk: Math.min(MAX_CHUNK, roundUp(Math.max(chunk, 1), 8)),
      order: setup.order,
      heads,
    };
    const same =
      this.layout !== null &&
      this.layout.features === layout.features &&
      this.layout.headDim === layout.headDim &&
      this.layout.columns === layout.columns &&
      this.layout.chunk === layout.chunk &&
      this.layout.order === layout.order &&
      this.layout.heads === layout.heads &&
      this.layout.valueDim === layout.valueDim;
    if (!same) {
      this.layout = layout;
      this.buffers = this.allocate(layout);
    }
    if (!same || this.setup !== setup) {
      this.setup = setup;
      const b = this.buffers!;
      this.i32.set(setup.table, b.table >> 2);
      this.f32.set(setup.weights, b.weights >> 2);
      this.f32.set(setup.coefficients, b.coefficients >> 2);
    }
  }

  private allocate(layout: Layout): Buffers {
    const { features: F, headDim: D, columns: W, chunk: C } = layout;
    const keyLd = Math.max(KEY_CHUNK, C);
    let offset = roundUp(this.exports.heapBase(), 64);
    const take = (bytes: number): number => {
      const start = offset;
      offset = roundUp(offset + bytes, 64);
      return start;
    };
    const table = take(F * 8);
    const weights = take(F * 4);
    const coefficients = take(8 * 4);
    const limits = take(C * 4);
    const xT = take(D * C * 4);
    const yT = take(D * keyLd * 4);
    const vPanels = take(W * keyLd * 4);
    const uq = take(FEATURE_BLOCK * (C + FEATURE_ROW_PAD) * 4);
    const uk = take(FEATURE_BLOCK * (keyLd + FEATURE_ROW_PAD) * 4);
    const o = take(C * W * 4);
    const den = take(C * 4);
    const w = take(C * KEY_CHUNK * 4);
    const stateBytes = roundUp((2 * F * W + 2 * F) * 4, 64);
    const states = take(stateBytes * layout.heads);
    const qRaw = take(C * D * 4);
    const kRaw = take(keyLd * D * 4);
    const vRaw = take(keyLd * layout.valueDim * 4);
    const qNorms = take(C * 4);
    const qFactors = take(C * 4);
    const kNorms = take(keyLd * 4);
    const kFactors = take(keyLd * 4);
    const scanNorms = take(keyLd * 4);
    const scanRaw = take(keyLd * D * 4);
    const stage = take(C * W * 4);
    const end = offset;
    const memory = this.exports.memory;
    const needed = Math.ceil(end / 65536) - memory.buffer.byteLength / 65536;
    if (needed > 0) memory.grow(needed);
    this.refreshViews();
    return {
      table,
      weights,
      coefficients,
      limits,
      xT,
      yT,
      vPanels,
      uq,
      uk,
      o,
      den,
      w,
      states,
      stateBytes,
      qRaw,
      kRaw,
      vRaw,
      qNorms,
      qFactors,
      kNorms,
      kFactors,
      scanNorms,
      scanRaw,
      stage,
      end,
    };
  }

  /** Empties the moment state of head slot `slot`. */
  clearState(slot: number): void {
    const b = this.buffers!;
    const start = (b.states + slot * b.stateBytes) >> 2;
    this.f32.fill(0, start, start + (b.stateBytes >> 2));
  }

  /** Runs one work unit of a forward call; returns its degenerate rows (0 for a feature share). */
  runUnit(job: AttentionJob, unit: WorkUnit): number {
    const { heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = job;
    const b = Math.floor(unit.head / H);
    const kvHead = kvHeadSlot(unit.head, H, Hkv);
    this.prepare(job.setup, Dv, job.chunkSize, 1, Dv);
    this.clearState(0);
    this.stagedRows = job.stagedRows;
    const share = unit.share ?? 0;
    // A job split by sequence has no feature shares, whether or not this unit is a whole head.
    const bySequence = job.queryBounds !== null || job.keySplit !== null;
    // Feature shares of this unit: all of them when the head is split by queries.
    const shares = bySequence ? 1 : job.shares;
    const featureIndex = bySequence ? 0 : share;
    const { start: featureStart, end: featureEnd } = featureShare(
      job.setup.paddedFeatures,
      featureIndex,
      shares,
      job.featureBounds,
    );
    // Where feature share `share` of query head `head` leaves its unnormalized rows.
    const partialOf = (head: number): PartialTarget | null =>
      shares > 1
        ? {
            out: share === 0 ? job.out : job.partialOut!,
            outBase: share === 0 ? head * N * Dv : (head * (shares - 1) + share - 1) * N * Dv,
            den: job.partialDen!,
            denBase: (head * shares + share) * N,
          }
        : null;
    const partial = partialOf(unit.head);
    const view: HeadView = {
      q: job.q,
      qBase: unit.head * N * D,
      k: job.k,
      kBase: kvHead * M * D,
      v: job.v,
      vBase: kvHead * M * Dv,
      out: job.out,
      oBase: unit.head * N * Dv,
      rows: N,
      keyOffset: 0,
      valid: job.validKeys[b]!,
      causal: job.causal,
      causalShift: M - N,
      headDim: D,
      valueDim: Dv,
      featureStart,
      featureEnd,
      share: featureIndex,
      shares,
      partial,
    };
    const state: HeadState = { keys: 0, queryMax: 0, keyMax: 0 };
    if (job.keySplit !== null) return this.runKeySplitShare(job, unit.head, share, view, state);
    const scales = this.queryScales(job, view);
    // The other query heads of a group read their own queries; the key divisor is the group's.
    const group =
      (unit.heads ?? 1) > 1
        ? Array.from({ length: unit.heads! }, (_, h): GroupMember => {
            if (h === 0) return { view, scales, running: state };
            const head = {
              ...view,
              qBase: (unit.head + h) * N * D,
              oBase: (unit.head + h) * N * Dv,
              partial: partialOf(unit.head + h),
            };
            return { view: head, scales: this.queryScales(job, head, scales), running: { queryMax: 0 } };
          })
        : null;
    let schedule = job.schedules[b]!;
    if (bySequence && unit.whole !== true) {
      const { first, end } = chunksStartingIn(
        schedule,
        job.queryBounds![share]!,
        job.queryBounds![share + 1]!,
      );
      schedule = schedule.subarray(4 * first, 4 * end);
      if (job.scan !== null)
        return job.scan.keep
          ? this.runScanShare(job, unit.head, share, view, schedule, scales)
          : this.runRecomputingScanShare(job, unit.head, share, view, schedule, scales);
      // prefix-max-norm's running query maximum over the rows before this share's first chunk;
      // the key maximum and the state catch up by themselves (keyMaxUpTo and advance start at 0).
      if (job.normalization.kind === 'prefix-max-norm' && schedule.length > 0)
        state.queryMax = this.maxCenteredNorm(view.q, view.qBase, 0, schedule[0]!, D, QUERY_ROWS);
    }
    return this.runHead(
      view,
      schedule,
      job.path,
      job.normalization,
      job.temperature,
      scales,
      state,
      0,
      0,
      group,
    );
  }

  /**
   * Share `share` of a non-causal head split by keys, then by queries (AttentionJob.keySplit).
   * max-norm's keys are all divided by the head's largest key norm, which no share knows in phase
   * 'moments': the keys go in undivided and every query is divided by it as well, which for
   * features homogeneous in the key gives the same sums (φ_f(q)·φ_f(k/m) = φ_f(q/m)·φ_f(k)).
   */
  private runKeySplitShare(
    job: AttentionJob,
    head: number,
    share: number,
    view: HeadView,
    state: HeadState,
  ): number {
    const split = job.keySplit!;
    const shares = job.shares;
    const { features: F } = this.layout!;
    const D = view.headDim;
    const kind = job.normalization.kind;
    const stateFloats = momentStateFloats(F, view.valueDim);
    const slot = head * shares + share;
    const part = (total: number, s: number): number => Math.floor((total * s) / shares);
    if (split.phase === 'moments') {
      const keyMax = this.addKeyRange(view, part(view.valid, share), part(view.valid, share + 1), kind, {
        queryDivisor: 1,
        keyDivisor: 1,
      });
      const queryMax =
        kind === 'max-norm'
          ? this.maxCenteredNorm(
              view.q,
              view.qBase,
              part(view.rows, share),
              part(view.rows, share + 1),
              D,
              QUERY_ROWS,
            )
          : 0;
      this.copyStateTo(split.states.subarray(slot * stateFloats, (slot + 1) * stateFloats));
      split.maxima[2 * slot] = keyMax;
      split.maxima[2 * slot + 1] = queryMax;
      return 0;
    }
    // Phase 'readout': the head's moments, summed in share order (every share alike).
    let keyMax = 0;
    let queryMax = 0;
    for (let s = 0; s < shares; s++) {
      const from = (head * shares + s) * stateFloats;
      this.addToState(split.states.subarray(from, from + stateFloats));
      keyMax = Math.max(keyMax, split.maxima[2 * (head * shares + s)]!);
      queryMax = Math.max(queryMax, split.maxima[2 * (head * shares + s) + 1]!);
    }
    const scales =
      kind === 'max-norm'
        ? { queryDivisor: (queryMax > 0 ? queryMax : 1) * (keyMax > 0 ? keyMax : 1), keyDivisor: 1 }
        : null;
    state.keys = view.valid;
    const rows = Int32Array.of(part(view.rows, share), part(view.rows, share + 1), view.valid, view.valid);
    if (rows[0] === rows[1]) return 0;
    return this.runHead(view, rows, 'factorized', job.normalization, job.temperature, scales, state, 0, 0);
  }

  /**
   * Share `share` of head `head` split by queries as a prefix scan (AttentionJob.scan): queries
   * [bounds[share], bounds[share + 1]), whose chunks are `schedule`. Phase 1 needs nothing from the
   * other shares: it loads and centers the share's queries (kept with their norms), loads its keys
   * once (kept transposed, with their values in panels, for the diagonal blocks) and adds them to
   * the moment state, copying the state at each chunk. Phase 2 reads each chunk out against the
   * prefix plus that copy and evaluates its diagonal block: the same sums as runHead's, in the same
   * order within the share.
   */
  private runScanShare(
    job: AttentionJob,
    head: number,
    share: number,
    view: HeadView,
    schedule: Int32Array,
    scales: HeadScales | null,
  ): number {
    const scan = job.scan!;
    const bounds = job.queryBounds!;
    const shares = bounds.length - 1;
    const layout = this.layout!;
    const ex = this.exports;
    const D = view.headDim;
    const W = layout.columns;
    const C = layout.chunk;
    const F = layout.features;
    const kind = job.normalization.kind;
    const centered = kind !== 'scale';
    const T = job.temperature;
    const scale = job.normalization.kind === 'scale' ? job.normalization.scale : 1;
    const clampKeys = (end: number): number => Math.max(0, Math.min(view.valid, end));
    const limitOf = (i: number): number => clampKeys(i + view.causalShift + 1);
    const { rowStart, rowEnd, keyStart, keyEnd } = scanShareRows(view, bounds, share);
    const rows = rowEnd - rowStart;
    // Own keys from storeStart on are kept for the diagonal blocks (before it only share 0 has any:
    // keys that every query sees when there are more keys than queries).
    const storeStart =
      rows > 0 ? clampKeys(rowStart + view.causalShift) : clampKeys(rowEnd + view.causalShift);
    const storedKeys = keyEnd - storeStart;
    const stateFloats = momentStateFloats(F, view.valueDim);
    const {
      queries: qStore,
      queryNorms: qNormStore,
      keys: yStore,
      values: vStore,
      keyNorms: kNormStore,
      ldKeys: ldStore,
      snapshots,
      prefix,
      end,
    } = scanLayout(F, D, W, rows, storedKeys, schedule.length / 4, this.buffers!.end);
    const needed = Math.ceil(end / 65536) - ex.memory.buffer.byteLength / 65536;
    if (needed > 0) ex.memory.grow(needed);
    this.refreshViews();
    const b = this.buffers!;
    // The share's own moments, in state slot 0.
    const sPtr = b.states;
    const zPtr = sPtr + 2 * F * W * 4;
    const scratchKeys = this.scratchKeys();
    // Kept keys from key `first` on.
    const kept = (first: number): PreparedKeys => ({
      y: yStore + (first - storeStart) * 4,
      ldY: ldStore,
      v: vStore + (first - storeStart) * 32,
      vPanel: ldStore * 32,
    });

    // Phase 1.
    let ownQueryMax = 0;
    let ownKeyMax = 0;
    // Largest key norm before storeStart (share 0's keys that every query sees).
    let unstoredKeyMax = 0;
    let stateKeys = keyStart;
    const addKeys = (end: number): void => {
      while (stateKeys < end) {
        const start = stateKeys;
        const count = Math.min(KEY_CHUNK, end - start);
        const stored = start >= storeStart;
        const local = start - view.keyOffset;
        const f32 = this.loadRows(view.k, view.kBase, local, count, D, b.kRaw, centered, b.kNorms, KEY_ROWS);
        const norms = b.kNorms >> 2;
        for (let t = 0; t < count; t++) {
          const norm = f32[norms + t]!;
          if (norm > ownKeyMax) ownKeyMax = norm;
          if (stored) f32[(kNormStore >> 2) + start - storeStart + t] = norm;
          else if (norm > unstoredKeyMax) unstoredKeyMax = norm;
        }
        const keys = stored ? kept(start) : scratchKeys;
        this.packKeys(view, local, count, b.kRaw, kind, scales, keys);
        this.addMoments(keys, count, 0, F, sPtr);
        stateKeys += count;
      }
    };
    addKeys(storeStart);
    for (let c = 0; c < schedule.length; c += 4) {
      addKeys(Math.min(schedule[c + 2]!, view.valid));
      const snapshot = (snapshots >> 2) + (c / 4) * stateFloats;
      this.f32.copyWithin(snapshot, sPtr >> 2, (sPtr >> 2) + F * W);
      this.f32.copyWithin(snapshot + F * W, zPtr >> 2, (zPtr >> 2) + F);
      for (let i0 = schedule[c]!; i0 < schedule[c + 1]!; i0 += C) {
        const nq = Math.min(C, schedule[c + 1]! - i0);
        const f32 = this.loadRows(view.q, view.qBase, i0, nq, D, b.qRaw, centered, b.qNorms, QUERY_ROWS);
        const at = i0 - rowStart;
        f32.copyWithin((qStore >> 2) + at * D, b.qRaw >> 2, (b.qRaw >> 2) + nq * D);
        f32.copyWithin((qNormStore >> 2) + at, b.qNorms >> 2, (b.qNorms >> 2) + nq);
        for (let r = 0; r < nq; r++)
          if (f32[(b.qNorms >> 2) + r]! > ownQueryMax) ownQueryMax = f32[(b.qNorms >> 2) + r]!;
      }
    }
    addKeys(keyEnd);
    // The tile of zeros past the last kept key (scanLayout).
    this.refreshViews();
    for (let d = 0; d < D; d++) {
      const row = (yStore >> 2) + d * ldStore;
      this.f32.fill(0, row + storedKeys, row + ldStore);
    }

    const {
      prefix: from,
      queryMax: prefixQueryMax,
      keyMax: prefixKeyMax,
    } = this.exchangePrefix(scan, head, share, shares, view.valueDim, ownQueryMax, ownKeyMax);
    this.refreshViews();
    if (from !== null) this.f32.set(from.subarray(0, stateFloats), prefix >> 2);

    // Phase 2.
    let queryMax = prefixQueryMax;
    let keyMax = Math.max(prefixKeyMax, unstoredKeyMax);
    let keysScanned = storeStart;
    let degenerate = 0;
    for (let c = 0; c < schedule.length; c += 4) {
      const stateKeyEnd = Math.min(schedule[c + 2]!, view.valid);
      const snapshot = snapshots + (c / 4) * stateFloats * 4;
      if (share > 0) ex.addVectors(snapshot, prefix, stateFloats / 4);
      for (let i0 = schedule[c]!; i0 < schedule[c + 1]!; i0 += C) {
        const nq = Math.min(C, schedule[c + 1]! - i0);
        const nq4 = Math.ceil(nq / 4);
        this.refreshViews();
        const f32 = this.f32;
        const at = i0 - rowStart;
        for (let r = 0; r < nq; r++) {
          const norm = f32[(qNormStore >> 2) + at + r]!;
          if (kind === 'prefix-max-norm') {
            if (norm > queryMax) queryMax = norm;
            for (const limit = limitOf(i0 + r); keysScanned < limit; keysScanned++) {
              const keyNorm = f32[(kNormStore >> 2) + keysScanned - storeStart]!;
              if (keyNorm > keyMax) keyMax = keyNorm;
            }
          }
          f32[(b.qFactors >> 2) + r] = queryFactor(kind, norm, queryMax, keyMax, scales, T, scale);
        }
        ex.transposeScaled(qStore + at * D * 4, nq, D, b.qFactors, b.xT, C, nq4 * 4);
        f32.fill(0, b.o >> 2, (b.o >> 2) + C * W);
        f32.fill(0, b.den >> 2, (b.den >> 2) + C);
        if (stateKeyEnd > 0) this.readOut(nq4, 0, F, snapshot, snapshot + F * W * 4);
        const directEnd = limitOf(i0 + nq - 1);
        for (let k0 = stateKeyEnd; k0 < directEnd; k0 += KEY_CHUNK) {
          const nk = Math.min(KEY_CHUNK, directEnd - k0);
          this.directBlock(view, limitOf, i0, nq, k0, nk, kept(k0));
        }
        const width = view.valueDim;
        degenerate += ex.normalizeRows(b.o, W, b.den, nq, width, b.stage);
        this.refreshViews();
        const stage = b.stage >> 2;
        view.out.set(this.f32.subarray(stage, stage + nq * width), view.oBase + i0 * width);
      }
    }
    return degenerate;
  }

  /**
   * Share `share` of head `head` split by queries as a prefix scan that keeps nothing between its
   * phases (QueryScan.keep false), for shares whose kept data would not fit: phase 1 adds the
   * share's own keys to an empty state and finds its largest query norm, without keeping either;
   * phase 2 starts a sequential run over the share's chunks from the prefix's state, which adds the
   * same keys again on its way. Its own keys' moments are the price (about a third of a p = 1
   * share's work), against the keys before it that a fold adds.
   */
  private runRecomputingScanShare(
    job: AttentionJob,
    head: number,
    share: number,
    view: HeadView,
    schedule: Int32Array,
    scales: HeadScales | null,
  ): number {
    const bounds = job.queryBounds!;
    const shares = bounds.length - 1;
    const D = view.headDim;
    const kind = job.normalization.kind;
    const { rowStart, rowEnd, keyStart, keyEnd } = scanShareRows(view, bounds, share);

    // Phase 1.
    const ownKeyMax = this.addKeyRange(view, keyStart, keyEnd, kind, scales);
    const ownQueryMax =
      kind === 'prefix-max-norm'
        ? this.maxCenteredNorm(view.q, view.qBase, rowStart, rowEnd, D, QUERY_ROWS)
        : 0;
    const { prefix, queryMax, keyMax } = this.exchangePrefix(
      job.scan!,
      head,
      share,
      shares,
      view.valueDim,
      ownQueryMax,
      ownKeyMax,
    );

    // Phase 2.
    this.clearState(0);
    if (prefix !== null) this.addToState(prefix);
    const state: HeadState = { keys: keyStart, queryMax, keyMax };
    return this.runHead(view, schedule, job.path, job.normalization, job.temperature, scales, state, 0, 0);
  }

  /** Slot 0's moment state into `to`, as the splits hand it on (S, then z: momentStateFloats). */
  private copyStateTo(to: Float32Array): void {
    const { features: F, columns: W } = this.layout!;
    this.refreshViews();
    const s = this.buffers!.states >> 2;
    to.set(this.f32.subarray(s, s + F * W));
    to.set(this.f32.subarray(s + 2 * F * W, s + 2 * F * W + F), F * W);
  }

  /** Adds a moment state handed on by the splits (S, then z; anything past them is left) to slot 0's. */
  private addToState(from: Float32Array): void {
    const { features: F, columns: W } = this.layout!;
    this.refreshViews();
    const f32 = this.f32;
    const s = this.buffers!.states >> 2;
    const z = s + 2 * F * W;
    for (let i = 0; i < F * W; i++) f32[s + i]! += from[i]!;
    for (let i = 0; i < F; i++) f32[z + i]! += from[F * W + i]!;
  }

  /** The scratch where keys are packed for one block (runHead's, a scan share's unkept keys). */
  private scratchKeys(): PreparedKeys {
    const b = this.buffers!;
    const keyLd = Math.max(KEY_CHUNK, this.layout!.chunk);
    return { y: b.yT, ldY: keyLd, v: b.vPanels, vPanel: keyLd * 32 };
  }

  /**
   * Adds keys [start, end) of `view` to the moment state in slot 0 (every feature), packed with
   * `scales`; returns their largest centered norm.
   */
  private addKeyRange(
    view: HeadView,
    start: number,
    end: number,
    kind: NormalizationSpec['kind'],
    scales: HeadScales | null,
  ): number {
    const b = this.buffers!;
    const { features: F } = this.layout!;
    const keys = this.scratchKeys();
    let keyMax = 0;
    for (let first = start; first < end; first += KEY_CHUNK) {
      const count = Math.min(KEY_CHUNK, end - first);
      const f32 = this.loadRows(
        view.k,
        view.kBase,
        first,
        count,
        view.headDim,
        b.kRaw,
        kind !== 'scale',
        b.kNorms,
        KEY_ROWS,
      );
      for (let t = 0; t < count; t++) keyMax = Math.max(keyMax, f32[(b.kNorms >> 2) + t]!);
      this.packKeys(view, first, count, b.kRaw, kind, scales, keys);
      this.addMoments(keys, count, 0, F, b.states);
    }
    return keyMax;
  }

  /**
   * A scan share's hand-on, its own moments in state slot 0: waits for the prefix from share − 1
   * (the moments of the keys before the share, then the running maxima before it), and hands
   * prefix + own moments on to share + 1. Returns the prefix (null for share 0: empty) and its
   * maxima.
   */
  private exchangePrefix(
    scan: QueryScan,
    head: number,
    share: number,
    shares: number,
    valueDim: number,
    ownQueryMax: number,
    ownKeyMax: number,
  ): { prefix: Float32Array | null; queryMax: number; keyMax: number } {
    const { features: F, columns: W } = this.layout!;
    const stateFloats = momentStateFloats(F, valueDim);
    const slot = head * (shares - 1) + share - 1;
    const prefixFloats = scanPrefixFloats(F, valueDim);
    let prefix: Float32Array | null = null;
    let queryMax = 0;
    let keyMax = 0;
    if (share > 0) {
      this.awaitPrefix(scan.ready, slot);
      prefix = scan.prefixes.subarray(slot * prefixFloats, slot * prefixFloats + stateFloats + 2);
      queryMax = prefix[stateFloats]!;
      keyMax = prefix[stateFloats + 1]!;
    }
    if (share < shares - 1) {
      const to = scan.prefixes.subarray((slot + 1) * prefixFloats, (slot + 2) * prefixFloats);
      this.refreshViews();
      const f32 = this.f32;
      const own = this.buffers!.states >> 2;
      const ownZ = own + 2 * F * W;
      for (let i = 0; i < F * W; i++) to[i] = (prefix?.[i] ?? 0) + f32[own + i]!;
      for (let i = 0; i < F; i++) to[F * W + i] = (prefix?.[F * W + i] ?? 0) + f32[ownZ + i]!;
      to[stateFloats] = Math.max(queryMax, ownQueryMax);
      to[stateFloats + 1] = Math.max(keyMax, ownKeyMax);
      Atomics.store(scan.ready, slot + 1, 1);
      Atomics.notify(scan.ready, slot + 1);
    }
    return { prefix, queryMax, keyMax };
  }

  /** Waits until slot `slot` of a scan's prefixes is written; throws when the call failed meanwhile. */
  private awaitPrefix(ready: Int32Array, slot: number): void {
    const start = performance.now();
    for (let state = Atomics.load(ready, slot); state === 0; state = Atomics.load(ready, slot))
      Atomics.wait(ready, slot, 0);
    this.waitedMillis += performance.now() - start;
    if (Atomics.load(ready, slot) === SCAN_ABORTED)
      throw new Error('another share of this call failed before handing on its moments');
  }

  /**
   * Decoding: appends the step's rows of one head, or of the query heads of one key head (`group`,
   * as runHead's), to the state in slot `slot` (prefix-max-norm or scale only, causal, no
   * padding). `schedule` is core's chunk schedule for this step.
   */
  runStep(
    view: HeadView,
    schedule: Int32Array,
    normalization: NormalizationSpec,
    temperature: number,
    state: HeadState,
    slot: number,
    group: readonly GroupMember[] | null = null,
  ): number {
    this.stagedRows = null;
    return this.runHead(
      view,
      schedule,
      'factorized',
      normalization,
      temperature,
      null,
      state,
      slot,
      view.valid,
      group,
    );
  }

  /**
   * Per-head divisors that need the whole head first: max-norm's largest query and key norms
   * (the key one taken from `sameKeys` when another head of its group found it already).
   * Returns null when the normalization needs none.
   */
  private queryScales(
    job: AttentionJob,
    view: HeadView,
    sameKeys: HeadScales | null = null,
  ): HeadScales | null {
    if (job.normalization.kind !== 'max-norm') return null;
    const queryMax = this.maxCenteredNorm(view.q, view.qBase, 0, view.rows, view.headDim, QUERY_ROWS);
    const keyMax =
      sameKeys?.keyDivisor ?? this.maxCenteredNorm(view.k, view.kBase, 0, view.valid, view.headDim, KEY_ROWS);
    return { queryDivisor: queryMax > 0 ? queryMax : 1, keyDivisor: keyMax > 0 ? keyMax : 1 };
  }

  /**
   * Centered norms of rows [first, end) of `data` (from `base`), computed by the kernels in blocks through
   * the raw key buffer, written to the buffer at byte offset `norms` (the last block's) and reduced to
   * their maximum.
   */
  private maxCenteredNorm(
    data: Float32Array,
    base: number,
    first: number,
    end: number,
    dim: number,
    cell: typeof QUERY_ROWS | typeof KEY_ROWS,
  ): number {
    const b = this.buffers!;
    const block = Math.max(KEY_CHUNK, this.layout!.chunk);
    let max = 0;
    for (let r0 = first; r0 < end; r0 += block) {
      const n = Math.min(block, end - r0);
      const f32 = this.loadRows(data, base, r0, n, dim, b.kRaw, true, b.scanNorms, cell);
      const at = b.scanNorms >> 2;
      for (let t = 0; t < n; t++) if (f32[at + t]! > max) max = f32[at + t]!;
    }
    return max;
  }

  /**
   * Copies rows [first, first + n) of `data` (rows `dim` floats apart from `base`) into WebAssembly
   * memory at byte offset `raw`, centers them there unless `centered` is false, and writes their
   * norms at byte offset `norms`. Returns the float view of the memory. `cell`: which count of
   * AttentionJob.stagedRows the rows are staged under.
   */
  private loadRows(
    data: Float32Array,
    base: number,
    first: number,
    n: number,
    dim: number,
    raw: number,
    centered: boolean,
    norms: number,
    cell: typeof QUERY_ROWS | typeof KEY_ROWS,
  ): Float32Array {
    this.awaitStaged(cell, first + n);
    this.refreshViews();
    this.f32.set(data.subarray(base + first * dim, base + (first + n) * dim), raw >> 2);
    this.nonFiniteInputs += this.exports.centerRows(raw, n, dim, centered ? 1 : 0, norms);
    return this.f32;
  }

  /** Waits until the calling thread has staged `rows` rows under `cell` (AttentionJob.stagedRows). */
  private awaitStaged(cell: typeof QUERY_ROWS | typeof KEY_ROWS, rows: number): void {
    const staged = this.stagedRows;
    if (staged === null) return;
    for (let done = Atomics.load(staged, cell); done < rows; done = Atomics.load(staged, cell))
      Atomics.wait(staged, cell, done);
  }

  /**
   * Adds `count` prepared keys to the moment state at byte offset `stateBase` (S, its compensation,
   * z and its compensation, laid out as in Buffers.states), features [fStart, fEnd).
   */
  private addMoments(
    keys: PreparedKeys,
    count: number,
    fStart: number,
    fEnd: number,
    stateBase: number,
  ): void {
    const b = this.buffers!;
    const ex = this.exports;
    const { features: F, columns: W, chunk: C } = this.layout!;
    const keyLd = Math.max(KEY_CHUNK, C);
    const comp = stateBase + F * W * 4;
    const z = comp + F * W * 4;
    const zComp = z + F * 4;
    for (let f0 = fStart; f0 < fEnd; f0 += FEATURE_BLOCK) {
      const nf = Math.min(FEATURE_BLOCK, fEnd - f0);
      ex.features(
        keys.y,
        keys.ldY,
        Math.ceil(count / 4),
        b.table,
        f0,
        f0 + nf,
        b.uk,
        keyLd + FEATURE_ROW_PAD,
      );
      ex.moments(
        b.uk,
        keyLd + FEATURE_ROW_PAD,
        nf,
        keys.v,
        keys.vPanel,
        count,
        W,
        stateBase + f0 * 32,
        comp + f0 * 32,
        F * 32,
        b.weights + f0 * 4,
        z + f0 * 4,
        zComp + f0 * 4,
        0,
      );
    }
  }

  /**
   * Adds the prepared queries' (xT, 4·nq4 of them) features [fStart, fEnd) read out against the
   * state S at byte offset `s` (panels as in the state) and z at `z` to the chunk's o and den.
   */
  private readOut(nq4: number, fStart: number, fEnd: number, s: number, z: number): void {
    const b = this.buffers!;
    const ex = this.exports;
    const { features: F, columns: W, chunk: C } = this.layout!;
    for (let f0 = fStart; f0 < fEnd; f0 += FEATURE_BLOCK) {
      const nf = Math.min(FEATURE_BLOCK, fEnd - f0);
      ex.features(b.xT, C, nq4, b.table, f0, f0 + nf, b.uq, C + FEATURE_ROW_PAD);
      ex.readout(b.uq, C + FEATURE_ROW_PAD, nf, s + f0 * 32, F * 32, z + f0 * 4, nq4, W, b.o, W, b.den);
    }
  }

  /**
   * Adds the prepared keys [k0, k0 + nk) to the chunk's o and den pair by pair for its queries
   * [i0, i0 + nq) (prepared in xT), each up to its own key limit.
   */
  private directBlock(
    view: HeadView,
    limitOf: (row: number) => number,
    i0: number,
    nq: number,
    k0: number,
    nk: number,
    keys: PreparedKeys,
  ): void {
    const b = this.buffers!;
    const ex = this.exports;
    const { columns: W, chunk: C } = this.layout!;
    const nq4 = Math.ceil(nq / 4);
    this.refreshViews();
    const i32 = this.i32;
    for (let r = 0; r < nq; r++) i32[(b.limits >> 2) + r] = Math.max(0, Math.min(nk, limitOf(i0 + r) - k0));
    // Causal blocks skip, per tile of 4 rows, the keys none of its rows sees (the masked upper
    // triangle of a diagonal block): the rows past the last query see none.
    const bounded = view.causal ? 1 : 0;
    for (let r = nq; r < nq4 * 4; r++) i32[(b.limits >> 2) + r] = 0;
    const nk8 = Math.ceil(nk / 8);
    ex.scores(b.xT, C, nq4, keys.y, keys.ldY, nk8, view.headDim, b.w, KEY_CHUNK, b.limits, bounded);
    ex.polynomial(b.w, KEY_CHUNK, nq, nk8, b.limits, b.coefficients, this.setup!.order, bounded);
    ex.weighted(b.w, KEY_CHUNK, nq4, nk, keys.v, keys.vPanel, W, b.o, W, b.den, b.limits, bounded);
  }

  /**
   * Keys [local, local + count) of `view`, already loaded and centered at byte offset `raw` (their
   * norms in kNorms), prepared into `keys`: scaled as y and transposed, and their values packed
   * into panels. The scores kernel reads whole 8-key tiles, so the tail of the last tile is zeroed.
   */
  private packKeys(
    view: HeadView,
    local: number,
    count: number,
    raw: number,
    kind: NormalizationSpec['kind'],
    scales: HeadScales | null,
    keys: PreparedKeys,
  ): void {
    const b = this.buffers!;
    const ex = this.exports;
    const f32 = this.f32;
    const norms = b.kNorms >> 2;
    const factors = b.kFactors >> 2;
    const constant = kind === 'max-norm' ? 1 / scales!.keyDivisor : 1;
    for (let t = 0; t < count; t++) {
      if (kind === 'l2') {
        const norm = f32[norms + t]!;
        f32[factors + t] = 1 / (norm > 0 ? norm : 1);
      } else f32[factors + t] = constant;
    }
    ex.transposeScaled(raw, count, view.headDim, b.kFactors, keys.y, keys.ldY, roundUp(count, 8));
    const Dv = view.valueDim;
    f32.set(view.v.subarray(view.vBase + local * Dv, view.vBase + (local + count) * Dv), b.vRaw >> 2);
    this.nonFiniteInputs += ex.packPanels(
      b.vRaw,
      count,
      Dv,
      0,
      Dv,
      this.layout!.columns,
      keys.v,
      keys.vPanel >> 2,
    );
  }

  private runHead(
    view: HeadView,
    schedule: Int32Array,
    path: 'factorized' | 'direct',
    normalization: NormalizationSpec,
    temperature: number,
    scales: HeadScales | null,
    state: HeadState,
    slot: number,
    /** Keys the state must hold when the head is done (decoding: all of them so far). */
    finalKeys: number,
    /**
     * The query heads that read these keys and values, when more than `view`'s (grouped-query
     * attention, WorkUnit.heads): each chunk's keys enter the state once and every head reads them
     * out. Null: `view`'s head alone, its running query maximum in `state`.
     */
    group: readonly GroupMember[] | null = null,
  ): number {
    const members: readonly GroupMember[] = group ?? [{ view, scales, running: state }];
    const layout = this.layout!;
    const b = this.buffers!;
    const ex = this.exports;
    const D = view.headDim;
    const W = layout.columns;
    const C = layout.chunk;
    const F = layout.features;
    const stateBase = b.states + slot * b.stateBytes;
    const sPtr = stateBase;
    const zPtr = sPtr + 2 * F * W * 4;
    const keyLd = Math.max(KEY_CHUNK, C);
    const scratchKeys = this.scratchKeys();
    const kind = normalization.kind;
    const centered = kind !== 'scale';
    const T = temperature;
    const scale = normalization.kind === 'scale' ? normalization.scale : 1;
    const fStart = view.featureStart;
    const fEnd = view.featureEnd;
    // Index of the current query block: with a feature split, only the share it maps to evaluates
    // the block's keys past the state (each block's pairs are counted once over the shares).
    let block = -1;
    const limitOf = (i: number): number =>
      view.causal ? Math.max(0, Math.min(view.valid, i + view.causalShift + 1)) : view.valid;
    let degenerate = 0;
    // prefix-max-norm's σ_i uses the largest key norm among the keys row i sees: keys are scanned
    // once, in order, as the limit grows (it never shrinks from one row to the next). Keys before
    // keyOffset (earlier decoding steps) or in the state it starts from (a recomputing scan share's
    // prefix) are already in state.keyMax.
    let keysScanned = Math.max(view.keyOffset, state.keys);

    // Writes keys [start, end) (global indices) as y (transposed, D × keyLd) and their values as
    // 8-column panels.
    // The last key range written to yT / vPanels: a causal chunk's diagonal keys are the next
    // chunk's state update, so they are loaded once.
    let loadedStart = -1;
    let loadedEnd = -1;
    // prefix-max-norm scans key norms a block ahead of the queries: keys [scanStart, scanEnd) are
    // centered in scanRaw, their norms in scanNorms.
    let scanStart = 0;
    let scanEnd = 0;
    const loadKeys = (start: number, end: number): void => {
      if (start === loadedStart && end === loadedEnd) return;
      loadedStart = start;
      loadedEnd = end;
      const count = end - start;
      const local = start - view.keyOffset;
      // prefix-max-norm has usually centered these keys already, in its scan window.
      const scanned = kind === 'prefix-max-norm' && start >= scanStart && end <= scanEnd;
      const raw = scanned ? b.scanRaw + (start - scanStart) * D * 4 : b.kRaw;
      if (scanned) this.refreshViews();
      else this.loadRows(view.k, view.kBase, local, count, D, b.kRaw, centered, b.kNorms, KEY_ROWS);
      this.packKeys(view, local, count, raw, kind, scales, scratchKeys);
    };

    // Adds keys [state.keys, end) to the moment state.
    const advance = (end: number): void => {
      while (state.keys < end) {
        const start = state.keys;
        const stop = Math.min(end, start + KEY_CHUNK);
        const count = stop - start;
        loadKeys(start, stop);
        this.addMoments(scratchKeys, count, fStart, fEnd, stateBase);
        state.keys = stop;
      }
    };

    // prefix-max-norm: the largest centered key norm among keys [0, limit).
    const keyMaxUpTo = (limit: number): number => {
      for (; keysScanned < limit; keysScanned++) {
        if (keysScanned >= scanEnd) {
          const n = Math.min(keyLd, view.valid - keysScanned);
          this.loadRows(
            view.k,
            view.kBase,
            keysScanned - view.keyOffset,
            n,
            D,
            b.scanRaw,
            true,
            b.scanNorms,
            KEY_ROWS,
          );
          scanStart = keysScanned;
          scanEnd = keysScanned + n;
        }
        const norm = this.f32[(b.scanNorms >> 2) + keysScanned - scanStart]!;
        if (norm > state.keyMax) state.keyMax = norm;
      }
      return state.keyMax;
    };

    const rowKeyMax = new Float64Array(C);
    // Answers queries [i0, i0 + nq) of one query head: the state's keys [0, stateKeyEnd) (added
    // here by the group's first head), then the keys past them pair by pair, in blocks of KEY_CHUNK
    // (loaded once for the group: loadKeys keeps the last range). Returns its degenerate rows.
    const answerBlock = (member: GroupMember, i0: number, nq: number, stateKeyEnd: number): number => {
      const { view: head, scales: headScales, running } = member;
      const nq4 = Math.ceil(nq / 4);
      // Queries: z_i = σ_i · x_i, transposed to D × C.
      const f32 = this.loadRows(head.q, head.qBase, i0, nq, D, b.qRaw, centered, b.qNorms, QUERY_ROWS);
      const norms = b.qNorms >> 2;
      const factors = b.qFactors >> 2;
      for (let r = 0; r < nq; r++) {
        const norm = f32[norms + r]!;
        if (kind === 'prefix-max-norm' && norm > running.queryMax) running.queryMax = norm;
        f32[factors + r] = queryFactor(kind, norm, running.queryMax, rowKeyMax[r]!, headScales, T, scale);
      }
      ex.transposeScaled(b.qRaw, nq, D, b.qFactors, b.xT, C, nq4 * 4);
      f32.fill(0, b.o >> 2, (b.o >> 2) + C * W);
      f32.fill(0, b.den >> 2, (b.den >> 2) + C);

      if (path === 'factorized') {
        advance(stateKeyEnd);
        if (state.keys > 0) this.readOut(nq4, fStart, fEnd, sPtr, zPtr);
      }
      const directEnd = block % view.shares === view.share ? limitOf(i0 + nq - 1) : stateKeyEnd;
      for (let k0 = stateKeyEnd; k0 < directEnd; k0 += KEY_CHUNK) {
        const nk = Math.min(KEY_CHUNK, directEnd - k0);
        loadKeys(k0, k0 + nk);
        this.directBlock(head, limitOf, i0, nq, k0, nk, scratchKeys);
      }

      const width = head.valueDim;
      const partial = head.partial;
      if (partial !== null) {
        this.refreshViews();
        const o = b.o >> 2;
        const outStart = partial.outBase + i0 * width;
        if (W === width) partial.out.set(this.f32.subarray(o, o + nq * width), outStart);
        else
          for (let r = 0; r < nq; r++)
            partial.out.set(this.f32.subarray(o + r * W, o + r * W + width), outStart + r * width);
        partial.den.set(this.f32.subarray(b.den >> 2, (b.den >> 2) + nq), partial.denBase + i0);
        return 0;
      }
      const degenerateRows = ex.normalizeRows(b.o, W, b.den, nq, width, b.stage);
      this.refreshViews();
      const stage = b.stage >> 2;
      head.out.set(this.f32.subarray(stage, stage + nq * width), head.oBase + i0 * width);
      return degenerateRows;
    };

    for (let c = 0; c < schedule.length; c += 4) {
      const chunkStart = schedule[c]!;
      const chunkEnd = schedule[c + 1]!;
      const stateKeyEnd = path === 'direct' ? 0 : Math.min(schedule[c + 2]!, view.valid);
      for (let i0 = chunkStart; i0 < chunkEnd; i0 += C) {
        const nq = Math.min(C, chunkEnd - i0);
        block++;
        // prefix-max-norm: the largest key norm each row sees, the same for every head of a group
        // (the scan behind keyMaxUpTo only moves forward).
        if (kind === 'prefix-max-norm')
          for (let r = 0; r < nq; r++) rowKeyMax[r] = keyMaxUpTo(limitOf(i0 + r));
        for (const member of members) degenerate += answerBlock(member, i0, nq, stateKeyEnd);
      }
    }
    if (path === 'factorized') advance(finalKeys);
    return degenerate;
  }
}
