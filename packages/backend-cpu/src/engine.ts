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
 * Normalization (centering, norms, maxima, σ) is done here in float64 from the float32 inputs,
 * following core's `prepareScores` formula by formula (tested against it), and the kernels get
 * z = σ·x for queries and y for keys, so that σ^l falls out of the degree-l monomials of z.
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
}

/** One piece of work: a (batch, head) pair and the value columns [c0, c1) it produces. */
export interface WorkUnit {
  readonly head: number;
  readonly c0: number;
  readonly c1: number;
}

/** Largest query chunk the scratch is laid out for; longer schedule chunks are cut into these. */
const MAX_CHUNK = 512;
/** Keys added to the state per moments call, and keys per direct block. */
const KEY_CHUNK = 256;
/** Feature rows per block: the slice of φ built at a time, sized so S's slice and φ stay in L2. */
const FEATURE_BLOCK = 128;

const roundUp = (value: number, multiple: number): number => Math.ceil(value / multiple) * multiple;

interface Layout {
  readonly features: number;
  readonly headDim: number;
  readonly columns: number;
  readonly chunk: number;
  readonly order: number;
  readonly heads: number;
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
  readonly end: number;
}

export interface HeadState {
  /** Keys [0, keys) are in S. */
  keys: number;
  /** Running maxima of centered norms (prefix-max-norm): all queries so far, all keys so far. */
  queryMax: number;
  keyMax: number;
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
  readonly c0: number;
  readonly c1: number;
}

export class Engine {
  private readonly exports: KernelExports;
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
  prepare(setup: KernelSetup, columns: number, chunk: number, heads = 1): void {
    const layout: Layout = {
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
      this.layout.heads === layout.heads;
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
    const uq = take(FEATURE_BLOCK * C * 4);
    const uk = take(FEATURE_BLOCK * keyLd * 4);
    const o = take(C * W * 4);
    const den = take(C * 4);
    const w = take(C * KEY_CHUNK * 4);
    const stateBytes = roundUp((2 * F * W + 2 * F) * 4, 64);
    const states = take(stateBytes * layout.heads);
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
      end,
    };
  }

  /** Empties the moment state of head slot `slot`. */
  clearState(slot: number): void {
    const b = this.buffers!;
    const start = (b.states + slot * b.stateBytes) >> 2;
    this.f32.fill(0, start, start + (b.stateBytes >> 2));
  }

  /** Runs one work unit of a forward call; returns its degenerate rows (counted by the c0 = 0 unit). */
  runUnit(job: AttentionJob, unit: WorkUnit): number {
    const { heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = job;
    const b = Math.floor(unit.head / H);
    const kvHead = b * Hkv + Math.floor((unit.head % H) / (H / Hkv));
    this.prepare(job.setup, unit.c1 - unit.c0, job.chunkSize);
    this.clearState(0);
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
      c0: unit.c0,
      c1: unit.c1,
    };
    const state: HeadState = { keys: 0, queryMax: 0, keyMax: 0 };
    const scales = this.queryScales(job, view);
    return this.runHead(
      view,
      job.schedules[b]!,
      job.path,
      job.normalization,
      job.temperature,
      scales,
      state,
      0,
      0,
    );
  }

  /**
   * Decoding: appends the step's rows of one head to the state in slot `slot` (prefix-max-norm or
   * scale only, causal, no padding). `schedule` is core's chunk schedule for this step.
   */
  runStep(
    view: HeadView,
    schedule: Int32Array,
    normalization: NormalizationSpec,
    temperature: number,
    state: HeadState,
    slot: number,
  ): number {
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
    );
  }

  /**
   * Per-head divisors that need the whole head first: max-norm's largest query and key norms.
   * Returns null when the normalization needs none.
   */
  private queryScales(
    job: AttentionJob,
    view: HeadView,
  ): { queryDivisor: number; keyDivisor: number } | null {
    if (job.normalization.kind !== 'max-norm') return null;
    const D = view.headDim;
    let queryMax = 0;
    for (let i = 0; i < view.rows; i++)
      queryMax = Math.max(queryMax, centeredNorm(view.q, view.qBase + i * D, D));
    let keyMax = 0;
    for (let j = 0; j < view.valid; j++)
      keyMax = Math.max(keyMax, centeredNorm(view.k, view.kBase + j * D, D));
    return { queryDivisor: queryMax > 0 ? queryMax : 1, keyDivisor: keyMax > 0 ? keyMax : 1 };
  }

  private runHead(
    view: HeadView,
    schedule: Int32Array,
    path: 'factorized' | 'direct',
    normalization: NormalizationSpec,
    temperature: number,
    scales: { queryDivisor: number; keyDivisor: number } | null,
    state: HeadState,
    slot: number,
    /** Keys the state must hold when the head is done (decoding: all of them so far). */
    finalKeys: number,
  ): number {
    const layout = this.layout!;
    const b = this.buffers!;
    const ex = this.exports;
    const setup = this.setup!;
    const D = view.headDim;
    const W = layout.columns;
    const C = layout.chunk;
    const F = layout.features;
    const stateBase = b.states + slot * b.stateBytes;
    const sPtr = stateBase;
    const compPtr = sPtr + F * W * 4;
    const zPtr = compPtr + F * W * 4;
    const zCompPtr = zPtr + F * 4;
    const sPanel = F * 32;
    const keyLd = Math.max(KEY_CHUNK, C);
    const vPanel = keyLd * 32;
    const kind = normalization.kind;
    const centered = kind !== 'scale';
    const T = temperature;
    const scale = normalization.kind === 'scale' ? normalization.scale : 1;
    const limitOf = (i: number): number =>
      view.causal ? Math.max(0, Math.min(view.valid, i + view.causalShift + 1)) : view.valid;
    const qRow = new Float64Array(D);
    let degenerate = 0;
    // prefix-max-norm's σ_i uses the largest key norm among the keys row i sees: keys are scanned
    // once, in order, as the limit grows (it never shrinks from one row to the next). Keys before
    // keyOffset (earlier decoding steps) are already in state.keyMax.
    let keysScanned = view.keyOffset;

    // Writes keys [start, end) (global indices) as y (transposed, D × keyLd) and their value
    // columns [c0, c1) as 8-column panels.
    // The last key range written to yT / vPanels: a causal chunk's diagonal keys are the next
    // chunk's state update, so they are loaded once.
    let loadedStart = -1;
    let loadedEnd = -1;
    const loadKeys = (start: number, end: number): void => {
      if (start === loadedStart && end === loadedEnd) return;
      loadedStart = start;
      loadedEnd = end;
      this.refreshViews();
      const f32 = this.f32;
      const yBase = b.yT >> 2;
      const vBase = b.vPanels >> 2;
      const panelFloats = vPanel >> 2;
      const keys = view.k;
      const values = view.v;
      const count = end - start;
      for (let t = 0; t < count; t++) {
        const kb = view.kBase + (start + t - view.keyOffset) * D;
        let mean = 0;
        if (centered) {
          for (let d = 0; d < D; d++) mean += keys[kb + d]!;
          mean /= D;
        }
        let divisor = 1;
        if (kind === 'max-norm') divisor = scales!.keyDivisor;
        else if (kind === 'l2') {
          const norm = centeredNorm(keys, kb, D);
          divisor = norm > 0 ? norm : 1;
        }
        const inverse = 1 / divisor;
        let target = yBase + t;
        for (let d = 0; d < D; d++) {
          f32[target] = (keys[kb + d]! - mean) * inverse;
          target += keyLd;
        }
        const vb = view.vBase + (start + t - view.keyOffset) * view.valueDim;
        for (let c = 0; c < W; c += 8) {
          const row = vBase + (c >> 3) * panelFloats + t * 8;
          for (let lane = 0; lane < 8; lane++) {
            const col = view.c0 + c + lane;
            f32[row + lane] = col < view.c1 ? values[vb + col]! : 0;
          }
        }
      }
      // The scores kernel reads whole 8-key tiles: keep the tail of the last tile finite. (Skipped
      // when there is no tail: 64 empty fills per causal chunk are measurable at p = 1.)
      if (count % 8 !== 0)
        for (let d = 0; d < D; d++)
          f32.fill(0, yBase + d * keyLd + count, yBase + d * keyLd + roundUp(count, 8));
    };

    // Adds keys [state.keys, end) to the moment state.
    const advance = (end: number): void => {
      while (state.keys < end) {
        const start = state.keys;
        const stop = Math.min(end, start + KEY_CHUNK);
        const count = stop - start;
        loadKeys(start, stop);
        for (let f0 = 0; f0 < F; f0 += FEATURE_BLOCK) {
          const nf = Math.min(FEATURE_BLOCK, F - f0);
          ex.features(b.yT, keyLd, Math.ceil(count / 4), b.table, f0, f0 + nf, b.uk, keyLd);
          ex.moments(
            b.uk,
            keyLd,
            nf,
            b.vPanels,
            vPanel,
            count,
            W,
            sPtr + f0 * 32,
            compPtr + f0 * 32,
            sPanel,
            b.weights + f0 * 4,
            zPtr + f0 * 4,
            zCompPtr + f0 * 4,
          );
        }
        state.keys = stop;
      }
    };

    // prefix-max-norm: the largest centered key norm among keys [0, limit).
    const keyMaxUpTo = (limit: number): number => {
      for (; keysScanned < limit; keysScanned++) {
        const local = keysScanned - view.keyOffset;
        state.keyMax = Math.max(state.keyMax, centeredNorm(view.k, view.kBase + local * D, D));
      }
      return state.keyMax;
    };

    for (let c = 0; c < schedule.length; c += 4) {
      const chunkStart = schedule[c]!;
      const chunkEnd = schedule[c + 1]!;
      const stateKeyEnd = path === 'direct' ? 0 : Math.min(schedule[c + 2]!, view.valid);
      for (let i0 = chunkStart; i0 < chunkEnd; i0 += C) {
        const nq = Math.min(C, chunkEnd - i0);
        const nq4 = Math.ceil(nq / 4);
        this.refreshViews();
        const f32 = this.f32;
        const xBase = b.xT >> 2;
        // Queries: z_i = σ_i · x_i, transposed to D × C.
        for (let r = 0; r < nq; r++) {
          const i = i0 + r;
          const norm = centeredRow(view.q, view.qBase + i * D, D, centered, qRow);
          let factor: number;
          switch (kind) {
            case 'max-norm':
              factor = 1 / (scales!.queryDivisor * T);
              break;
            case 'l2':
              factor = 1 / ((norm > 0 ? norm : 1) * T);
              break;
            case 'prefix-max-norm': {
              if (norm > state.queryMax) state.queryMax = norm;
              const keyMax = keyMaxUpTo(limitOf(i));
              factor = 1 / ((state.queryMax > 0 ? state.queryMax : 1) * (keyMax > 0 ? keyMax : 1) * T);
              break;
            }
            default:
              factor = scale / T;
          }
          scatterColumn(f32, xBase + r, C, qRow, D, factor);
        }
        if (nq % 4 !== 0)
          for (let d = 0; d < D; d++) f32.fill(0, xBase + d * C + nq, xBase + d * C + nq4 * 4);
        f32.fill(0, b.o >> 2, (b.o >> 2) + C * W);
        f32.fill(0, b.den >> 2, (b.den >> 2) + C);

        if (path === 'factorized') {
          advance(stateKeyEnd);
          if (state.keys > 0) {
            for (let f0 = 0; f0 < F; f0 += FEATURE_BLOCK) {
              const nf = Math.min(FEATURE_BLOCK, F - f0);
              ex.features(b.xT, C, nq4, b.table, f0, f0 + nf, b.uq, C);
              ex.readout(b.uq, C, nf, sPtr + f0 * 32, sPanel, zPtr + f0 * 4, nq4, W, b.o, W, b.den);
            }
          }
        }
        // Keys past the state, pair by pair, in blocks of KEY_CHUNK keys.
        const directEnd = limitOf(i0 + nq - 1);
        for (let k0 = stateKeyEnd; k0 < directEnd; k0 += KEY_CHUNK) {
          const nk = Math.min(KEY_CHUNK, directEnd - k0);
          loadKeys(k0, k0 + nk);
          this.refreshViews();
          const i32b = this.i32;
          for (let r = 0; r < nq; r++) {
            i32b[(b.limits >> 2) + r] = Math.max(0, Math.min(nk, limitOf(i0 + r) - k0));
          }
          ex.scores(b.xT, C, nq4, b.yT, keyLd, Math.ceil(nk / 8), D, b.w, KEY_CHUNK);
          ex.polynomial(b.w, KEY_CHUNK, nq, Math.ceil(nk / 8), b.limits, b.coefficients, setup.order);
          ex.weighted(b.w, KEY_CHUNK, nq4, nk, b.vPanels, vPanel, W, b.o, W, b.den);
        }

        this.refreshViews();
        degenerate += normalizeRows(
          this.f32,
          b.o >> 2,
          b.den >> 2,
          W,
          nq,
          view.out,
          view.oBase + i0 * view.valueDim,
          view.valueDim,
          view.c0,
          view.c1,
        );
      }
    }
    if (path === 'factorized') advance(finalKeys);
    return view.c0 === 0 ? degenerate : 0;
  }
}

/** out = the row minus its mean (when centered), in float64; returns its norm. */
function centeredRow(
  data: Float32Array,
  base: number,
  dim: number,
  centered: boolean,
  out: Float64Array,
): number {
  let mean = 0;
  if (centered) {
    for (let d = 0; d < dim; d++) mean += data[base + d]!;
    mean /= dim;
  }
  let sum = 0;
  for (let d = 0; d < dim; d++) {
    const c = data[base + d]! - mean;
    out[d] = c;
    sum += c * c;
  }
  return Math.sqrt(sum);
}

/** target[start + d·stride] = row[d]·factor: one column of a feature-major (transposed) block. */
function scatterColumn(
  target: Float32Array,
  start: number,
  stride: number,
  row: Float64Array,
  dim: number,
  factor: number,
): void {
  let at = start;
  for (let d = 0; d < dim; d++) {
    target[at] = row[d]! * factor;
    at += stride;
  }
}

/**
 * out row = numerator / denominator for columns [c0, c1) of rows [0, rows) of the chunk, zeros for
 * a row whose denominator is <= 0 (or NaN); returns how many rows were degenerate.
 */
function normalizeRows(
  source: Float32Array,
  numerators: number,
  denominators: number,
  width: number,
  rows: number,
  out: Float32Array,
  outBase: number,
  valueDim: number,
  c0: number,
  c1: number,
): number {
  let degenerate = 0;
  for (let r = 0; r < rows; r++) {
    const den = source[denominators + r]!;
    const target = outBase + r * valueDim;
    if (!(den > 0)) {
      degenerate++;
      out.fill(0, target + c0, target + c1);
      continue;
    }
    const inverse = 1 / den;
    const row = numerators + r * width - c0;
    for (let col = c0; col < c1; col++) out[target + col] = source[row + col]! * inverse;
  }
  return degenerate;
}

function centeredNorm(data: Float32Array, base: number, dim: number): number {
  let mean = 0;
  for (let d = 0; d < dim; d++) mean += data[base + d]!;
  mean /= dim;
  let sum = 0;
  for (let d = 0; d < dim; d++) {
    const c = data[base + d]! - mean;
    sum += c * c;
  }
  return Math.sqrt(sum);
}
