/**
 * The backward pass of one (batch, query head), factorized like the forward so memory stays linear
 * in N. With z_i = σ_i x_i (prepared queries), y_j (prepared keys), w_ij = f(z_i·y_j) on visible
 * pairs, den_i = Σ_j w_ij, o_i the output and dO_i its gradient, let
 *
 *     g_i = [α_i dO_i | -α_i β_i],  α_i = 1/den_i (0 for a degenerate row),  β_i = dO_i·o_i,
 *     G_ij = g_i·[v_j | 1]   (= ∂L/∂w_ij).
 *
 * Then dz_i = Σ_j f'(s_ij) G_ij y_j, dy_j = Σ_i f'(s_ij) G_ij z_i and dv_j = Σ_j w_ij α_i dO_i.
 * Keys reached through the state factorize: with S_f = a_l w_m Σ_j φ_f(y_j) [v_j | 1] (the forward
 * state; its last column is the denominator moment z_f) and P_fi = S_f[:Dv]·dO_i,
 *
 *     den_i = Σ_f φ_f(z_i) z_f,  β_i den_i = Σ_f φ_f(z_i) P_fi,
 *     dz_i = α_i (A_i - β_i B_i),  A_i = ∇_z Σ_f φ_f(z_i) P_fi,  B_i = ∇_z Σ_f φ_f(z_i) z_f
 *
 * (plus the direct blocks' terms). None of den, β den, A, B needs α or β, and each is a sum over
 * features: so `gradients` runs over one share of the features (and of the direct blocks), and
 * `keyGradients` adds the shares' den and β·den to form g as it loads each query block (pass 3,
 * worker.ts, adds the shares' A and B into dz afterwards). `keyGradients` needs g: with the reverse
 * moments R_f = a_l w_m Σ_i φ_f(z_i) g_i over the queries that see key j through the state,
 * dv_j = Σ_f φ_f(y_j) R_f[:Dv] and dy_j = ∇_y Σ_f φ_f(y_j) (R_f·[v_j | 1]), again a sum over the
 * features of the share; the direct blocks are evaluated pair by pair, each query block by one share.
 * Pass 1 walks core's schedule forward, pass 2 walks it backward (each chunk completes the keys
 * that enter the state just before it).
 */

import {
  FEATURE_BLOCK,
  FEATURE_ROW_PAD,
  KEY_CHUNK,
  type KernelSetup,
  MAX_CHUNK,
  type RowRange,
  roundUp,
} from './engine.js';
import type { BackwardKernelExports } from './kernel-types.js';

/**
 * Row stride of the direct blocks' score buffers: KEY_CHUNK keys plus FEATURE_ROW_PAD, off a power
 * of two for the same reason (`weightedTransposed` walks down their columns).
 */
const SCORE_LD = KEY_CHUNK + FEATURE_ROW_PAD;

export interface BackwardHead {
  /** z = σx rows of this query head, N×D, from `zBase`. */
  readonly z: Float32Array;
  readonly zBase: number;
  /** Prepared keys y of its kv head, M×D. */
  readonly y: Float32Array;
  readonly yBase: number;
  readonly v: Float32Array;
  readonly vBase: number;
  readonly dOut: Float32Array;
  readonly dOutBase: number;
  /**
   * Pass 1 writes this share's A and B (N×D each) and den and β·den (N each), from `rowBase`:
   * every row, so they need no clearing.
   */
  readonly gradA: Float32Array;
  readonly gradB: Float32Array;
  readonly gradBase: number;
  readonly den: Float64Array;
  readonly betaDen: Float64Array;
  readonly rowBase: number;
  /**
   * Pass 2 reads every share's den and β·den (from `firstRowBase`, N apart) to form
   * g = [α dO | -αβ] ...
   */
  readonly firstRowBase: number;
  /** ... writes the direct blocks' dz (0 where none) to the rows of the query blocks this share owns ... */
  readonly dz: Float64Array;
  readonly dzBase: number;
  /** ... and writes this share's dy (M×D) and dv (M×Dv), every key row. */
  readonly dy: Float64Array;
  readonly dyBase: number;
  readonly dv: Float64Array;
  readonly dvBase: number;
  readonly rows: number;
  /** M, the keys of the kv head (padded ones included), and the valid ones among them. */
  readonly keys: number;
  readonly valid: number;
  readonly causal: boolean;
  readonly causalShift: number;
  readonly headDim: number;
  readonly valueDim: number;
  /** The padded features [featureStart, featureEnd) this share owns (multiples of 4). */
  readonly featureStart: number;
  readonly featureEnd: number;
  /** Query block q (blocks of the engine's chunk, in schedule order) is owned by share q % shares. */
  readonly share: number;
  readonly shares: number;
  readonly path: 'factorized' | 'direct';
  readonly schedule: Int32Array;
  /**
   * The chunks of the schedule [firstChunk, endChunk) this unit answers (all of them unless the head
   * is split by queries, BackwardJob.queryBounds): pass 1 their query rows, pass 2 their dz and the
   * keys their diagonal blocks reach, [stateKeyEnd(firstChunk), stateKeyEnd(endChunk)) (from key 0
   * for the first chunk, to the last key for the last), folding the queries after them into R.
   */
  readonly firstChunk: number;
  readonly endChunk: number;
  /** A non-causal head split by sequence (BackwardJob.sequenceSplit); null: not split so. */
  readonly sequenceSplit: SequenceSplitShare | null;
}

/**
 * One share of a non-causal head with few features split by sequence: each pass runs in two phases.
 * In 'moments' the share adds its tokens (pass 1: its keys, pass 2: its queries, with their g) to a
 * partial state (S and z, or R and rz) and writes it to its slot of `states`; pass 2 also writes the
 * direct part of its queries' dz, 0 (a non-causal head has no direct blocks). In 'readout' it sums
 * the head's slots in share order (every share alike) and reads its rows out against the sum (pass 1:
 * its queries, pass 2: its keys, the last share also zeroing the padded keys' dy and dv). Nothing is
 * computed twice.
 */
export interface SequenceSplitShare {
  readonly phase: 'moments' | 'readout';
  /** Partial states, sequenceStateFloats(...) apart: this share's at `slot`, the head's from `firstSlot`. */
  readonly states: Float32Array;
  readonly slot: number;
  readonly firstSlot: number;
  readonly slots: number;
  /** This share's query rows and keys (of the valid ones). */
  readonly queries: RowRange;
  readonly keys: RowRange;
  /** Whether this share zeroes the padded keys [valid, keys) in pass 2. */
  readonly last: boolean;
}

/** Floats of a partial state of SequenceSplitShare: F × Wp (S or R), then F (z or rz). */
export function sequenceStateFloats(paddedFeatures: number, valueDim: number): number {
  return paddedFeatures * (roundUp(valueDim + 1, 8) + 1);
}

interface Buffers {
  readonly [name: string]: number;
}

/**
 * Pass 1's den or β·den of one query row summed over the shares (their slots `stride` apart, from
 * `first`), in share order: pass 2 (forming g) and pass 3 (forming dz) must get the same α and β.
 */
export function sumOverShares(values: Float64Array, first: number, shares: number, stride: number): number {
  let sum = 0;
  for (let s = 0; s < shares; s++) sum += values[first + s * stride]!;
  return sum;
}

export class BackwardEngine {
  private readonly ex: BackwardKernelExports;
  private f32: Float32Array;
  private i32: Int32Array;
  private key = '';
  private buffers: Buffers = {};
  private setup: KernelSetup | null = null;

  constructor(module: WebAssembly.Module) {
    this.ex = new WebAssembly.Instance(module, {}).exports as unknown as BackwardKernelExports;
    this.f32 = new Float32Array(this.ex.memory.buffer);
    this.i32 = new Int32Array(this.ex.memory.buffer);
  }

  private views(): void {
    if (this.f32.buffer !== this.ex.memory.buffer) {
      this.f32 = new Float32Array(this.ex.memory.buffer);
      this.i32 = new Int32Array(this.ex.memory.buffer);
    }
  }

  prepare(setup: KernelSetup, valueDim: number, chunk: number): void {
    const F = setup.paddedFeatures;
    const D = setup.headDim;
    const C = Math.min(MAX_CHUNK, roundUp(Math.max(chunk, 1), 8));
    const Wp = roundUp(valueDim + 1, 8);
    const Dp = roundUp(D, 8);
    const keyLd = Math.max(KEY_CHUNK, C);
    const key = `${F}/${D}/${C}/${valueDim}`;
    if (key !== this.key) {
      this.key = key;
      let offset = roundUp(this.ex.heapBase(), 64);
      const sizes: Record<string, number> = {
        table: F * 2,
        weights: F,
        coefficients: 8,
        derivative: 8,
        limits: C,
        ones: keyLd,
        rawQ: C * D,
        rawG: C * Wp,
        rawD: C * valueDim,
        rawY: keyLd * D,
        rawV: keyLd * valueDim,
        rowsA: C * D,
        rowsB: C * D,
        xT: D * C,
        xPanels: Dp * C,
        gT: Wp * C,
        gBlocks: Wp * C,
        gPanels: Wp * C,
        yT: D * keyLd,
        yPanels: Dp * keyLd,
        vT: Wp * keyLd,
        vBlocks: Wp * keyLd,
        vPanels: Wp * keyLd,
        uq: FEATURE_BLOCK * (C + FEATURE_ROW_PAD),
        uk: FEATURE_BLOCK * (keyLd + FEATURE_ROW_PAD),
        h: FEATURE_BLOCK * (keyLd + FEATURE_ROW_PAD),
        oq: C * Wp,
        den: keyLd,
        betaDen: C,
        dxT: D * C,
        bT: D * C,
        dxRows: C * Dp,
        dyT: D * keyLd,
        dyRows: keyLd * Dp,
        // dv rows of the key block, roundUp(Dv, 8) floats apart (contiguous when Dv is a multiple of 8).
        dvRows: keyLd * Wp,
        sc: C * SCORE_LD,
        wf: C * SCORE_LD,
        wd: C * SCORE_LD,
        gg: C * SCORE_LD,
        s: F * Wp,
        sComp: F * Wp,
        r: F * Wp,
        rComp: F * Wp,
        z: F,
        zComp: F,
        rz: F,
        rzComp: F,
      };
      const buffers: Record<string, number> = { C, Wp, Dp, keyLd };
      for (const [name, floats] of Object.entries(sizes)) {
        buffers[name] = offset;
        offset = roundUp(offset + floats * 4, 64);
      }
      const needed = Math.ceil(offset / 65536) - this.ex.memory.buffer.byteLength / 65536;
      if (needed > 0) this.ex.memory.grow(needed);
      this.views();
      this.buffers = buffers;
      this.setup = null;
      // Factors of 1 for transposeScaled: the backward's rows arrive prepared.
      this.f32.fill(1, buffers.ones! >> 2, (buffers.ones! >> 2) + keyLd);
    }
    if (this.setup !== setup) {
      this.setup = setup;
      const b = this.buffers;
      this.i32.set(setup.table, b.table! >> 2);
      this.f32.set(setup.weights, b.weights! >> 2);
      this.f32.set(setup.coefficients, b.coefficients! >> 2);
      // f'(s) = Σ_l l·a_l s^(l-1).
      const derivative = new Float32Array(8);
      for (let l = 1; l < setup.coefficients.length; l++) derivative[l - 1] = l * setup.coefficients[l]!;
      this.f32.set(derivative, b.derivative! >> 2);
    }
  }

  private zero(name: string, floats: number): void {
    this.views();
    const at = this.buffers[name]! >> 2;
    this.f32.fill(0, at, at + floats);
  }

  private limitOf(head: BackwardHead, i: number): number {
    return head.causal ? Math.max(0, Math.min(head.valid, i + head.causalShift + 1)) : head.valid;
  }

  /** Query rows [i0, i0 + nq) of z into xT (feature-major, zero-padded) and xPanels. */
  private loadQueries(head: BackwardHead, i0: number, nq: number): void {
    this.views();
    const b = this.buffers;
    const D = head.headDim;
    const src = head.zBase + i0 * D;
    this.f32.set(head.z.subarray(src, src + nq * D), b.rawQ! >> 2);
    this.ex.transposeScaled(b.rawQ!, nq, D, b.ones!, b.xT!, b.C!, roundUp(nq, 8));
    this.ex.packPanels(b.rawQ!, nq, D, 0, D, b.Dp!, b.xPanels!, b.C! * 8);
  }

  /**
   * g = [α dO | -αβ] of query rows [i0, i0 + nq) into gT (transposed, Wp rows) and gPanels, zero
   * past column Dv: α = 1/den and β from the sums of pass 1's shares (BackwardEngine's module
   * comment); a degenerate row (den not > 0) gets g = 0, so that it contributes nothing.
   */
  private loadGradients(head: BackwardHead, i0: number, nq: number): void {
    this.views();
    const f = this.f32;
    const b = this.buffers;
    const Wp = b.Wp!;
    const Dv = head.valueDim;
    const N = head.rows;
    const dOut = head.dOut;
    // Row-major and contiguous here (one pass of plain stores), then transposed and packed by the
    // kernels, as `loadQueries` does.
    const rows = b.rawG! >> 2;
    for (let r = 0; r < nq; r++) {
      const row = head.firstRowBase + i0 + r;
      const den = sumOverShares(head.den, row, head.shares, N);
      const betaDen = sumOverShares(head.betaDen, row, head.shares, N);
      const at = rows + r * Wp;
      if (!(den > 0)) {
        f.fill(0, at, at + Wp);
        continue;
      }
      const alpha = 1 / den;
      const src = head.dOutBase + (i0 + r) * Dv;
      for (let c = 0; c < Dv; c++) f[at + c] = alpha * dOut[src + c]!;
      f[at + Dv] = -alpha * (betaDen * alpha);
      f.fill(0, at + Dv + 1, at + Wp);
    }
    this.ex.transposeScaled(b.rawG!, nq, Wp, b.ones!, b.gT!, b.C!, roundUp(nq, 8));
    this.ex.packPanels(b.rawG!, nq, Wp, 0, Wp, Wp, b.gPanels!, b.C! * 8);
  }

  /**
   * The n rows of `width` floats at buffer `raw` into token blocks at buffer `target` (the layout of
   * `projectBlocks`: 8 tokens a block, Wp rows of 8 floats each), zeros past `width` and for the
   * padding tokens up to a multiple of 8. Each block is a transpose of its 8 rows.
   */
  private loadTokenBlocks(raw: string, n: number, width: number, target: string): void {
    this.views();
    const b = this.buffers;
    const Wp = b.Wp!;
    for (let t0 = 0; t0 < n; t0 += 8) {
      const block = b[target]! + t0 * Wp * 4;
      this.ex.transposeScaled(b[raw]! + t0 * width * 4, Math.min(8, n - t0), width, b.ones!, block, 8, 8);
      this.f32.fill(0, (block >> 2) + width * 8, (block >> 2) + Wp * 8);
    }
  }

  /** Keys [k0, k0 + nk) of y into yT and yPanels, and [v | 1] into vT and vPanels (zero-padded). */
  private loadKeys(head: BackwardHead, k0: number, nk: number): void {
    this.views();
    const f = this.f32;
    const ex = this.ex;
    const b = this.buffers;
    const keyLd = b.keyLd!;
    const Wp = b.Wp!;
    const D = head.headDim;
    const Dv = head.valueDim;
    const end = roundUp(nk, 8);
    const ys = head.yBase + k0 * D;
    f.set(head.y.subarray(ys, ys + nk * D), b.rawY! >> 2);
    ex.transposeScaled(b.rawY!, nk, D, b.ones!, b.yT!, keyLd, end);
    ex.packPanels(b.rawY!, nk, D, 0, D, b.Dp!, b.yPanels!, keyLd * 8);
    const vs = head.vBase + k0 * Dv;
    f.set(head.v.subarray(vs, vs + nk * Dv), b.rawV! >> 2);
    ex.transposeScaled(b.rawV!, nk, Dv, b.ones!, b.vT!, keyLd, end);
    ex.packPanels(b.rawV!, nk, Dv, 0, Dv, Wp, b.vPanels!, keyLd * 8);
    // The ones column at Dv, then zero columns up to Wp.
    const vT = b.vT! >> 2;
    f.fill(1, vT + Dv * keyLd, vT + Dv * keyLd + nk);
    f.fill(0, vT + Dv * keyLd + nk, vT + Dv * keyLd + end);
    for (let c = Dv + 1; c < Wp; c++) f.fill(0, vT + c * keyLd, vT + c * keyLd + end);
    const ones = (b.vPanels! >> 2) + (Dv >> 3) * keyLd * 8 + (Dv & 7);
    for (let t = 0; t < nk; t++) f[ones + t * 8] = 1;
  }

  private setLimits(head: BackwardHead, i0: number, nq: number, k0: number, nk: number): void {
    this.views();
    const limits = this.buffers.limits! >> 2;
    for (let r = 0; r < nq; r++)
      this.i32[limits + r] = Math.max(0, Math.min(nk, this.limitOf(head, i0 + r) - k0));
    // Rows past the block's last query, up to the 4-row tile, see no key (the bounded kernels
    // take a tile's largest limit).
    for (let r = nq; r < Math.ceil(nq / 4) * 4; r++) this.i32[limits + r] = 0;
  }

  /** Calls `block(i0, nq, stateKeyEnd, owned)` for every query block of the schedule, in order. */
  private forEachBlock(
    head: BackwardHead,
    block: (i0: number, nq: number, stateKeyEnd: number, owned: boolean) => void,
  ): void {
    const C = this.buffers.C!;
    let index = 0;
    for (let c = 4 * head.firstChunk; c < 4 * head.endChunk; c += 4) {
      const chunkEnd = head.schedule[c + 1]!;
      const stateKeyEnd = head.path === 'factorized' ? Math.min(head.schedule[c + 2]!, head.valid) : 0;
      for (let i0 = head.schedule[c]!; i0 < chunkEnd; i0 += C) {
        block(i0, Math.min(C, chunkEnd - i0), stateKeyEnd, index % head.shares === head.share);
        index++;
      }
    }
  }

  /**
   * Pass 1 over this share: den, β·den, A and B of every query row, from the state's features of
   * the share and the direct blocks of the query blocks the share owns (module comment).
   */
  gradients(head: BackwardHead): void {
    const ex = this.ex;
    const b = this.buffers;
    const setup = this.setup!;
    const C = b.C!;
    const Wp = b.Wp!;
    const keyLd = b.keyLd!;
    const uqLd = C + FEATURE_ROW_PAD;
    const F = setup.paddedFeatures;
    const D = head.headDim;
    const Dv = head.valueDim;
    const sPanel = F * 32;
    const fStart = head.featureStart;
    const fEnd = head.featureEnd;
    // Value columns rounded up to whole panels of 8.
    const valuePanels = roundUp(Dv, 8);
    this.zeroMoments('s', 'z');

    let stateKeys = 0;
    const advance = (end: number): void => {
      while (stateKeys < end) {
        const nk = Math.min(KEY_CHUNK, end - stateKeys);
        this.loadKeys(head, stateKeys, nk);
        // S's value columns only: its denominator column is z, which moments keeps anyway.
        this.addMoments(head, 'keys', nk, 's', 'z', 0);
        stateKeys += nk;
      }
    };

    const split = head.sequenceSplit;
    if (split?.phase === 'moments') {
      stateKeys = split.keys.start;
      advance(split.keys.end);
      this.handOn(split, 's', 'z');
      return;
    }
    if (split !== null) {
      this.gather(split, 's', 'z');
      stateKeys = head.valid;
    }

    this.forEachBlock(head, (i0, nq, stateKeyEnd, owned) => {
      const nq4 = Math.ceil(nq / 4);
      if (head.path === 'factorized') advance(stateKeyEnd);
      const fromState = stateKeys > 0 && fStart < fEnd;
      const directEnd = owned ? this.limitOf(head, i0 + nq - 1) : stateKeyEnd;
      if (!fromState && directEnd <= stateKeyEnd) {
        // No key reaches these rows in this share: its parts are 0 (the caller does not clear the
        // arrays, which are reused staging: every row is written here or below).
        const rows = head.gradBase + i0 * D;
        head.gradA.fill(0, rows, rows + nq * D);
        head.gradB.fill(0, rows, rows + nq * D);
        head.den.fill(0, head.rowBase + i0, head.rowBase + i0 + nq);
        head.betaDen.fill(0, head.rowBase + i0, head.rowBase + i0 + nq);
        return;
      }
      this.loadQueries(head, i0, nq);
      this.zero('den', C);
      this.zero('betaDen', C);
      this.zero('dxT', D * C);
      this.zero('bT', D * C);
      if (fromState) {
        // dO's columns only (gT rows past Dv are 0): S's denominator column drops out of P.
        this.views();
        const dOutRows = head.dOutBase + i0 * Dv;
        this.f32.set(head.dOut.subarray(dOutRows, dOutRows + nq * Dv), b.rawD! >> 2);
        this.loadTokenBlocks('rawD', nq, Dv, 'gBlocks');
        for (let f0 = fStart; f0 < fEnd; f0 += FEATURE_BLOCK) {
          const nf = Math.min(FEATURE_BLOCK, fEnd - f0);
          ex.features(b.xT!, C, nq4, b.table!, f0, f0 + nf, b.uq!, uqLd);
          ex.readout(b.uq!, uqLd, nf, b.s! + f0 * 32, sPanel, b.z! + f0 * 4, nq4, 0, b.oq!, Wp, b.den!);
          ex.projectBlocks(
            b.s! + f0 * 32,
            sPanel,
            nf,
            valuePanels,
            b.gBlocks!,
            Wp * 32,
            Math.ceil(nq / 8),
            b.h!,
            uqLd,
            0,
          );
          ex.dotFeatures(b.uq!, uqLd, b.h!, uqLd, nf, nq4, b.betaDen!);
          ex.featureGradient(b.h!, uqLd, b.table!, f0, f0 + nf, b.xT!, C, nq4, b.dxT!);
          ex.featureGradientConstant(b.z!, b.table!, f0, f0 + nf, b.xT!, C, nq4, b.bT!);
        }
      }
      this.zero('oq', C * Wp);
      for (let k0 = stateKeyEnd; k0 < directEnd; k0 += KEY_CHUNK) {
        const nk = Math.min(KEY_CHUNK, directEnd - k0);
        this.loadKeys(head, k0, nk);
        this.setLimits(head, i0, nq, k0, nk);
        const bounded = head.causal ? 1 : 0;
        const nk8 = Math.ceil(nk / 8);
        ex.scores(b.xT!, C, nq4, b.yT!, keyLd, nk8, D, b.wf!, SCORE_LD, b.limits!, bounded);
        ex.polynomial(b.wf!, SCORE_LD, nq, nk8, b.limits!, b.coefficients!, setup.order, bounded);
        // dO·o needs o's value columns only; den comes from `weighted` itself.
        ex.weighted(
          b.wf!,
          SCORE_LD,
          nq4,
          nk,
          b.vPanels!,
          keyLd * 32,
          valuePanels,
          b.oq!,
          Wp,
          b.den!,
          b.limits!,
          bounded,
        );
      }
      // The direct blocks' part of β·den is dO·(their unnormalized output), here in the oq rows.
      this.views();
      const f = this.f32;
      const oq = b.oq! >> 2;
      const stateBetaDen = b.betaDen! >> 2;
      const blockDen = b.den! >> 2;
      const dOutRows = head.dOut;
      // Without direct keys in this share the oq rows are zeros.
      const direct = directEnd > stateKeyEnd;
      for (let r = 0; r < nq; r++) {
        const row = i0 + r;
        const dOut = head.dOutBase + row * Dv;
        const o = oq + r * Wp;
        let betaDen = f[stateBetaDen + r]!;
        if (direct) for (let col = 0; col < Dv; col++) betaDen += dOutRows[dOut + col]! * f[o + col]!;
        head.den[head.rowBase + row] = f[blockDen + r]!;
        head.betaDen[head.rowBase + row] = betaDen;
      }
      // A and B to token rows, then one copy each.
      ex.transpose(b.dxT!, C, D, nq, b.rowsA!, D);
      ex.transpose(b.bT!, C, D, nq, b.rowsB!, D);
      this.views();
      const target = head.gradBase + i0 * D;
      head.gradA.set(this.f32.subarray(b.rowsA! >> 2, (b.rowsA! >> 2) + nq * D), target);
      head.gradB.set(this.f32.subarray(b.rowsB! >> 2, (b.rowsB! >> 2) + nq * D), target);
    });
  }

  /**
   * Pass 2 over this share: dy and dv from the reverse moments of the share's features, and the
   * direct blocks of the query blocks it owns (their dz too). Needs g from the sum of pass 1.
   */
  keyGradients(head: BackwardHead): void {
    if (head.sequenceSplit !== null) {
      this.splitKeyGradients(head, head.sequenceSplit);
      return;
    }
    const ex = this.ex;
    const b = this.buffers;
    const setup = this.setup!;
    const C = b.C!;
    const Dp = b.Dp!;
    const keyLd = b.keyLd!;
    const D = head.headDim;
    const Dv = head.valueDim;
    const fStart = head.featureStart;
    const fEnd = head.featureEnd;
    const order = setup.order;
    const valuePanels = roundUp(Dv, 8);

    // This unit's keys (BackwardHead.firstChunk): the state part writes dy and dv of those it
    // reads out, chunk c reading out [stateKeyEnd(c − 1), stateKeyEnd(c)) for c in [readFrom,
    // readTo); the rest (the last chunk's own keys, padded keys, all keys without a state part)
    // start at 0 here, since the direct blocks add to them.
    const chunks = head.schedule.length / 4;
    const stateEndOf = (c: number): number => Math.min(head.schedule[4 * c + 2]!, head.valid);
    const withState = head.path === 'factorized' && fStart < fEnd;
    const readFrom = head.firstChunk === 0 ? 0 : head.firstChunk + 1;
    const readTo = Math.min(chunks, head.endChunk + 1);
    const keyStart = head.firstChunk === 0 ? 0 : stateEndOf(head.firstChunk);
    const keyEnd = head.endChunk === chunks ? head.keys : stateEndOf(head.endChunk);
    const readOut = withState && readTo > readFrom ? Math.max(keyStart, stateEndOf(readTo - 1)) : keyStart;
    head.dy.fill(0, head.dyBase + readOut * D, head.dyBase + keyEnd * D);
    head.dv.fill(0, head.dvBase + readOut * Dv, head.dvBase + keyEnd * Dv);

    if (withState) {
      this.zeroMoments('r', 'rz');
      // Chunks from readTo on only add their queries to R (folded: the keys they read out are
      // another unit's).
      for (let c = chunks - 1; c >= readFrom; c--) {
        const stateEnd = stateEndOf(c);
        if (stateEnd === 0) break;
        const previousEnd = c > 0 ? stateEndOf(c - 1) : 0;
        const chunkEnd = head.schedule[4 * c + 1]!;
        for (let i0 = head.schedule[4 * c]!; i0 < chunkEnd; i0 += C) {
          const nq = Math.min(C, chunkEnd - i0);
          this.addQueriesToR(head, i0, nq);
        }
        for (let k0 = previousEnd; c < readTo && k0 < stateEnd; k0 += KEY_CHUNK) {
          const nk = Math.min(KEY_CHUNK, stateEnd - k0);
          this.readOutKeys(head, k0, nk);
        }
      }
    }

    this.forEachBlock(head, (i0, nq, stateKeyEnd, owned) => {
      if (!owned) return;
      const directEnd = this.limitOf(head, i0 + nq - 1);
      if (directEnd <= stateKeyEnd) {
        head.dz.fill(0, head.dzBase + i0 * D, head.dzBase + (i0 + nq) * D);
        return;
      }
      const nq4 = Math.ceil(nq / 4);
      this.loadQueries(head, i0, nq);
      this.loadGradients(head, i0, nq);
      this.zero('dxRows', C * Dp);
      for (let k0 = stateKeyEnd; k0 < directEnd; k0 += KEY_CHUNK) {
        const nk = Math.min(KEY_CHUNK, directEnd - k0);
        const nk4 = Math.ceil(nk / 4);
        const nk8 = Math.ceil(nk / 8);
        this.loadKeys(head, k0, nk);
        this.setLimits(head, i0, nq, k0, nk);
        // Causal blocks skip the masked triangle: the rows' products stop at each tile's last key,
        // the transposed ones start at each key tile's first row, and the skipped entries inside
        // the tiles they do read are written as zeros (bounded = 2).
        const bounded = head.causal ? 2 : 0;
        ex.scores(b.xT!, C, nq4, b.yT!, keyLd, nk8, D, b.sc!, SCORE_LD, b.limits!, bounded);
        this.copy('sc', 'wf', C * SCORE_LD);
        this.copy('sc', 'wd', C * SCORE_LD);
        ex.polynomial(b.wf!, SCORE_LD, nq, nk8, b.limits!, b.coefficients!, order, bounded);
        ex.polynomial(b.wd!, SCORE_LD, nq, nk8, b.limits!, b.derivative!, order - 1, bounded);
        // G = g·[v | 1]: Dv + 1 terms (the rows of gT and vT past them are zeros).
        ex.scores(b.gT!, C, nq4, b.vT!, keyLd, nk8, Dv + 1, b.gg!, SCORE_LD, b.limits!, bounded);
        ex.hadamard(b.wd!, b.gg!, (C * SCORE_LD) / 4);
        // The row sums `weighted` can add to den are not needed here (den: 0).
        ex.weighted(
          b.wd!,
          SCORE_LD,
          nq4,
          nk,
          b.yPanels!,
          keyLd * 32,
          Dp,
          b.dxRows!,
          Dp,
          0,
          b.limits!,
          bounded,
        );
        const fromFirstRow = head.causal ? 1 : 0;
        this.zero('dyRows', keyLd * Dp);
        ex.weightedTransposed(
          b.wd!,
          SCORE_LD,
          nq,
          nk4,
          b.xPanels!,
          C * 32,
          Dp,
          b.dyRows!,
          Dp,
          b.limits!,
          fromFirstRow,
        );
        this.zero('dvRows', keyLd * valuePanels);
        ex.weightedTransposed(
          b.wf!,
          SCORE_LD,
          nq,
          nk4,
          b.gPanels!,
          C * 32,
          valuePanels,
          b.dvRows!,
          valuePanels,
          b.limits!,
          fromFirstRow,
        );
        this.addKeyRows(head, k0, nk);
      }
      this.views();
      const f = this.f32;
      const dz = head.dz;
      const dxRows = b.dxRows! >> 2;
      // One conversion by `set` when the rows are contiguous (D a multiple of 8).
      if (Dp === D) {
        dz.set(f.subarray(dxRows, dxRows + nq * D), head.dzBase + i0 * D);
      } else {
        for (let r = 0; r < nq; r++) {
          const target = head.dzBase + (i0 + r) * D;
          const source = dxRows + r * Dp;
          for (let d = 0; d < D; d++) dz[target + d] = f[source + d]!;
        }
      }
    });
  }

  /** Pass 2 of a share of a head split by sequence (SequenceSplitShare). */
  private splitKeyGradients(head: BackwardHead, split: SequenceSplitShare): void {
    const C = this.buffers.C!;
    const D = head.headDim;
    const Dv = head.valueDim;
    if (split.phase === 'moments') {
      this.zeroMoments('r', 'rz');
      const { start, end } = split.queries;
      for (let i0 = start; i0 < end; i0 += C) this.addQueriesToR(head, i0, Math.min(C, end - i0));
      this.handOn(split, 'r', 'rz');
      head.dz.fill(0, head.dzBase + start * D, head.dzBase + end * D);
      return;
    }
    this.gather(split, 'r', 'rz');
    const { start, end } = split.keys;
    for (let k0 = start; k0 < end; k0 += KEY_CHUNK) this.readOutKeys(head, k0, Math.min(KEY_CHUNK, end - k0));
    if (split.last) {
      head.dy.fill(0, head.dyBase + head.valid * D, head.dyBase + head.keys * D);
      head.dv.fill(0, head.dvBase + head.valid * Dv, head.dvBase + head.keys * Dv);
    }
  }

  /** Zeroes a moment state (S and z, or R and rz) with its compensation terms. */
  private zeroMoments(matrix: 's' | 'r', vector: 'z' | 'rz'): void {
    const F = this.setup!.paddedFeatures;
    const Wp = this.buffers.Wp!;
    this.zero(matrix, F * Wp);
    this.zero(`${matrix}Comp`, F * Wp);
    this.zero(vector, F);
    this.zero(`${vector}Comp`, F);
  }

  /** Writes a partial moment state to the share's slot (SequenceSplitShare). */
  private handOn(split: SequenceSplitShare, matrix: 's' | 'r', vector: 'z' | 'rz'): void {
    const F = this.setup!.paddedFeatures;
    const matrixFloats = F * this.buffers.Wp!;
    const at = split.slot * (matrixFloats + F);
    this.views();
    const m = this.buffers[matrix]! >> 2;
    const v = this.buffers[vector]! >> 2;
    split.states.set(this.f32.subarray(m, m + matrixFloats), at);
    split.states.set(this.f32.subarray(v, v + F), at + matrixFloats);
  }

  /** The sum of the head's partial moment states, in share order, as this unit's state. */
  private gather(split: SequenceSplitShare, matrix: 's' | 'r', vector: 'z' | 'rz'): void {
    const F = this.setup!.paddedFeatures;
    const matrixFloats = F * this.buffers.Wp!;
    this.zeroMoments(matrix, vector);
    this.views();
    const f = this.f32;
    const states = split.states;
    const m = this.buffers[matrix]! >> 2;
    const v = this.buffers[vector]! >> 2;
    for (let slot = split.firstSlot; slot < split.firstSlot + split.slots; slot++) {
      const at = slot * (matrixFloats + F);
      for (let i = 0; i < matrixFloats; i++) f[m + i]! += states[at + i]!;
      for (let i = 0; i < F; i++) f[v + i]! += states[at + matrixFloats + i]!;
    }
  }

  /** Adds query rows [i0, i0 + nq) with their g to R and rz (pass 2; this unit's features). */
  private addQueriesToR(head: BackwardHead, i0: number, nq: number): void {
    this.loadQueries(head, i0, nq);
    this.loadGradients(head, i0, nq);
    // g's last column, -αβ, as `moments`' token weights: R's last column goes to rz, a vector,
    // rather than a ninth panel of eight (seven of them zeros) in both products with R.
    this.addMoments(head, 'queries', nq, 'r', 'rz', this.buffers.gT! + head.valueDim * this.buffers.C! * 4);
  }

  /**
   * Adds the `count` tokens last loaded (keys: yT with their v panels; queries: xT with their g
   * panels) to a moment state over this unit's features: `matrix` (S or R) and `vector` (z or rz),
   * the latter weighted by `tokenWeights` (0: ones).
   */
  private addMoments(
    head: BackwardHead,
    tokens: 'keys' | 'queries',
    count: number,
    matrix: 's' | 'r',
    vector: 'z' | 'rz',
    tokenWeights: number,
  ): void {
    const ex = this.ex;
    const b = this.buffers;
    const keys = tokens === 'keys';
    const ld = keys ? b.keyLd! : b.C!;
    const featureRows = keys ? b.uk! : b.uq!;
    const sPanel = this.setup!.paddedFeatures * 32;
    const valuePanels = roundUp(head.valueDim, 8);
    for (let f0 = head.featureStart; f0 < head.featureEnd; f0 += FEATURE_BLOCK) {
      const nf = Math.min(FEATURE_BLOCK, head.featureEnd - f0);
      ex.features(
        keys ? b.yT! : b.xT!,
        ld,
        Math.ceil(count / 4),
        b.table!,
        f0,
        f0 + nf,
        featureRows,
        ld + FEATURE_ROW_PAD,
      );
      ex.moments(
        featureRows,
        ld + FEATURE_ROW_PAD,
        nf,
        keys ? b.vPanels! : b.gPanels!,
        ld * 32,
        count,
        valuePanels,
        b[matrix]! + f0 * 32,
        b[`${matrix}Comp`]! + f0 * 32,
        sPanel,
        b.weights! + f0 * 4,
        b[vector]! + f0 * 4,
        b[`${vector}Comp`]! + f0 * 4,
        tokenWeights,
      );
    }
  }

  /** Writes dy and dv of keys [k0, k0 + nk) from R and rz (pass 2; their state part). */
  private readOutKeys(head: BackwardHead, k0: number, nk: number): void {
    const ex = this.ex;
    const b = this.buffers;
    const Wp = b.Wp!;
    const keyLd = b.keyLd!;
    const ukLd = keyLd + FEATURE_ROW_PAD;
    const sPanel = this.setup!.paddedFeatures * 32;
    const { featureStart: fStart, featureEnd: fEnd, headDim: D, valueDim: Dv } = head;
    const valuePanels = roundUp(Dv, 8);
    const nk4 = Math.ceil(nk / 4);
    this.loadKeys(head, k0, nk);
    // loadKeys left these keys' v rows in rawV.
    this.loadTokenBlocks('rawV', nk, Dv, 'vBlocks');
    this.zero('dvRows', keyLd * valuePanels);
    this.zero('dyT', D * keyLd);
    for (let f0 = fStart; f0 < fEnd; f0 += FEATURE_BLOCK) {
      const nf = Math.min(FEATURE_BLOCK, fEnd - f0);
      ex.features(b.yT!, keyLd, nk4, b.table!, f0, f0 + nf, b.uk!, ukLd);
      ex.readout(
        b.uk!,
        ukLd,
        nf,
        b.r! + f0 * 32,
        sPanel,
        b.z! + f0 * 4,
        nk4,
        valuePanels,
        b.dvRows!,
        valuePanels,
        b.den!,
      );
      // h = R·[v | 1]: the ones column is rz, added as the bias.
      ex.projectBlocks(
        b.r! + f0 * 32,
        sPanel,
        nf,
        valuePanels,
        b.vBlocks!,
        Wp * 32,
        Math.ceil(nk / 8),
        b.h!,
        ukLd,
        b.rz! + f0 * 4,
      );
      ex.featureGradient(b.h!, ukLd, b.table!, f0, f0 + nf, b.yT!, keyLd, nk4, b.dyT!);
    }
    // The state reaches each key once, before the direct blocks add theirs: its part is
    // written (converted to float64 by `set`), not added.
    ex.transpose(b.dyT!, keyLd, D, nk, b.rawY!, D);
    this.views();
    const f = this.f32;
    const dyRows = b.rawY! >> 2;
    head.dy.set(f.subarray(dyRows, dyRows + nk * D), head.dyBase + k0 * D);
    const dvRows = b.dvRows! >> 2;
    if (valuePanels === Dv) {
      head.dv.set(f.subarray(dvRows, dvRows + nk * Dv), head.dvBase + k0 * Dv);
    } else {
      for (let t = 0; t < nk; t++) {
        const row = dvRows + t * valuePanels;
        head.dv.set(f.subarray(row, row + Dv), head.dvBase + (k0 + t) * Dv);
      }
    }
  }

  private copy(from: string, to: string, floats: number): void {
    this.views();
    const b = this.buffers;
    this.f32.copyWithin(b[to]! >> 2, b[from]! >> 2, (b[from]! >> 2) + floats);
  }

  /** Adds the direct block's dyRows and dvRows of keys [k0, k0 + nk) to this share's dy and dv. */
  private addKeyRows(head: BackwardHead, k0: number, nk: number): void {
    this.views();
    const f = this.f32;
    const b = this.buffers;
    const D = head.headDim;
    const Dv = head.valueDim;
    // Locals, not property reads, in the loops: `buffers` is a dictionary-mode object.
    const dyRows = b.dyRows! >> 2;
    const dvRows = b.dvRows! >> 2;
    const Dp = b.Dp!;
    const dvLd = roundUp(Dv, 8);
    const dyShare = head.dy;
    const dvShare = head.dv;
    for (let t = 0; t < nk; t++) {
      const dy = head.dyBase + (k0 + t) * D;
      const dyFrom = dyRows + t * Dp;
      for (let d = 0; d < D; d++) dyShare[dy + d]! += f[dyFrom + d]!;
      const dv = head.dvBase + (k0 + t) * Dv;
      const dvFrom = dvRows + t * dvLd;
      for (let col = 0; col < Dv; col++) dvShare[dv + col]! += f[dvFrom + col]!;
    }
  }
}
