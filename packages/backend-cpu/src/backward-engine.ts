/**
 * The backward pass of one (batch, query head), factorized like the forward so memory stays linear
 * in N. With z_i = σ_i x_i (prepared queries), y_j (prepared keys), w_ij = f(z_i·y_j) on visible
 * pairs, den_i = Σ_j w_ij, o_i the output and dO_i its gradient, let
 *
 *     g_i = [α_i dO_i | -α_i β_i],  α_i = 1/den_i (0 for a degenerate row),  β_i = dO_i·o_i,
 *     G_ij = g_i·[v_j | 1]   (= ∂L/∂w_ij).
 *
 * Then dz_i = Σ_j f'(s_ij) G_ij y_j, dy_j = Σ_i f'(s_ij) G_ij z_i and dv_j = Σ_i w_ij α_i dO_i.
 * Keys reached through the state factorize: with S_f = a_l w_m Σ_j φ_f(y_j) [v_j | 1] (the forward
 * state with its denominator column), dz_i = ∇_z Σ_f φ_f(z_i) (S_f·g_i), and with the reverse
 * moments R_f = a_l w_m Σ_i φ_f(z_i) g_i over the queries that see key j through the state,
 * dv_j = Σ_f φ_f(y_j) R_f[:Dv] and dy_j = ∇_y Σ_f φ_f(y_j) (R_f·[v_j | 1]). Pairs in the direct
 * blocks are evaluated pair by pair. Pass 1 walks core's schedule forward (recomputing o and den,
 * then dz), pass 2 walks it backward (R, then dv and dy of the keys each chunk completes).
 */

import type { KernelSetup } from './engine.js';
import type { BackwardKernelExports } from './kernel-types.js';

const MAX_CHUNK = 512;
const KEY_CHUNK = 256;
const FEATURE_BLOCK = 128;

const roundUp = (value: number, multiple: number): number => Math.ceil(value / multiple) * multiple;

export interface BackwardHead {
  /** z = σx rows of this query head, N×D, from `xBase`. */
  readonly z: Float32Array;
  readonly zBase: number;
  /** Prepared keys y of its kv head, M×D. */
  readonly y: Float32Array;
  readonly yBase: number;
  readonly v: Float32Array;
  readonly vBase: number;
  readonly dOut: Float32Array;
  readonly dOutBase: number;
  /** Written: dz, N×D. */
  readonly dz: Float64Array;
  readonly dzBase: number;
  /** Accumulated (kv heads are shared by query heads): dy M×D and dv M×Dv. */
  readonly dy: Float64Array;
  readonly dyBase: number;
  readonly dv: Float64Array;
  readonly dvBase: number;
  readonly rows: number;
  readonly valid: number;
  readonly causal: boolean;
  readonly causalShift: number;
  readonly headDim: number;
  /** Columns of v, dOut and dv rows (their row stride). */
  readonly valueDim: number;
  /**
   * The value columns [c0, c1) this run owns (the engine must be prepared for c1 - c0 columns).
   * Everything that sums over value columns (den excepted) is linear in g, so a run over a column
   * range writes its share of dz and dy with β_i restricted to its columns; the shares summed over
   * the ranges are the full dz and dy. Each run computes den itself (the ones column), and writes
   * only its columns of dv.
   */
  readonly c0: number;
  readonly c1: number;
  readonly path: 'factorized' | 'direct';
  readonly schedule: Int32Array;
}

interface Buffers {
  readonly [name: string]: number;
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
    const key = `${F}/${D}/${C}/${Wp}`;
    if (key !== this.key) {
      this.key = key;
      let offset = roundUp(this.ex.heapBase(), 64);
      const sizes: Record<string, number> = {
        table: F * 2,
        weights: F,
        coefficients: 8,
        derivative: 8,
        limits: C,
        xT: D * C,
        xPanels: Dp * C,
        gT: Wp * C,
        gPanels: Wp * C,
        yT: D * keyLd,
        yPanels: Dp * keyLd,
        vT: Wp * keyLd,
        vPanels: Wp * keyLd,
        uq: FEATURE_BLOCK * C,
        uk: FEATURE_BLOCK * keyLd,
        h: FEATURE_BLOCK * keyLd,
        oq: C * Wp,
        den: keyLd,
        dxT: D * C,
        dxRows: C * Dp,
        dyT: D * keyLd,
        dyRows: keyLd * Dp,
        dvRows: keyLd * Wp,
        sc: C * KEY_CHUNK,
        wf: C * KEY_CHUNK,
        wd: C * KEY_CHUNK,
        gg: C * KEY_CHUNK,
        trans: keyLd * C,
        s: F * Wp,
        sComp: F * Wp,
        r: F * Wp,
        rComp: F * Wp,
        z: F,
        zComp: F,
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

  run(head: BackwardHead): void {
    const ex = this.ex;
    const b = this.buffers;
    const setup = this.setup!;
    const C = b.C!;
    const Wp = b.Wp!;
    const Dp = b.Dp!;
    const keyLd = b.keyLd!;
    const F = setup.paddedFeatures;
    const D = head.headDim;
    // Local columns (the ones column sits right after them) and the row stride of v, dOut, dv.
    const Dv = head.c1 - head.c0;
    const stride = head.valueDim;
    const vBase = head.vBase + head.c0;
    const dOutBase = head.dOutBase + head.c0;
    const dvBase = head.dvBase + head.c0;
    const order = setup.order;
    const sPanel = F * 32;
    const limitOf = (i: number): number =>
      head.causal ? Math.max(0, Math.min(head.valid, i + head.causalShift + 1)) : head.valid;
    const factorized = head.path === 'factorized';
    const G = new Float32Array(head.rows * Wp);

    const zero = (name: string, floats: number): void => {
      this.views();
      this.f32.fill(0, b[name]! >> 2, (b[name]! >> 2) + floats);
    };
    zero('s', F * Wp);
    zero('sComp', F * Wp);
    zero('r', F * Wp);
    zero('rComp', F * Wp);

    const loadQueries = (i0: number, nq: number, withG: boolean): void => {
      this.views();
      const f = this.f32;
      const xT = b.xT! >> 2;
      const xP = b.xPanels! >> 2;
      for (let r = 0; r < nq; r++) {
        const src = head.zBase + (i0 + r) * D;
        for (let d = 0; d < D; d++) {
          const value = head.z[src + d]!;
          f[xT + d * C + r] = value;
          f[xP + (d >> 3) * C * 8 + r * 8 + (d & 7)] = value;
        }
        for (let d = D; d < Dp; d++) f[xP + (d >> 3) * C * 8 + r * 8 + (d & 7)] = 0;
        if (withG) {
          for (let c = 0; c < Wp; c++) {
            const value = G[(i0 + r) * Wp + c]!;
            f[(b.gT! >> 2) + c * C + r] = value;
            f[(b.gPanels! >> 2) + (c >> 3) * C * 8 + r * 8 + (c & 7)] = value;
          }
        }
      }
      for (let d = 0; d < D; d++) f.fill(0, xT + d * C + nq, xT + d * C + roundUp(nq, 8));
      if (withG)
        for (let c = 0; c < Wp; c++)
          f.fill(0, (b.gT! >> 2) + c * C + nq, (b.gT! >> 2) + c * C + roundUp(nq, 8));
    };

    const loadKeys = (k0: number, nk: number): void => {
      this.views();
      const f = this.f32;
      const yT = b.yT! >> 2;
      const yP = b.yPanels! >> 2;
      const vT = b.vT! >> 2;
      const vP = b.vPanels! >> 2;
      for (let t = 0; t < nk; t++) {
        const ys = head.yBase + (k0 + t) * D;
        for (let d = 0; d < Dp; d++) {
          const value = d < D ? head.y[ys + d]! : 0;
          if (d < D) f[yT + d * keyLd + t] = value;
          f[yP + (d >> 3) * keyLd * 8 + t * 8 + (d & 7)] = value;
        }
        const vs = vBase + (k0 + t) * stride;
        for (let c = 0; c < Wp; c++) {
          const value = c < Dv ? head.v[vs + c]! : c === Dv ? 1 : 0;
          f[vT + c * keyLd + t] = value;
          f[vP + (c >> 3) * keyLd * 8 + t * 8 + (c & 7)] = value;
        }
      }
      const end = roundUp(nk, 8);
      for (let d = 0; d < D; d++) f.fill(0, yT + d * keyLd + nk, yT + d * keyLd + end);
      for (let c = 0; c < Wp; c++) f.fill(0, vT + c * keyLd + nk, vT + c * keyLd + end);
    };

    let stateKeys = 0;
    const advance = (end: number): void => {
      while (stateKeys < end) {
        const nk = Math.min(KEY_CHUNK, end - stateKeys);
        loadKeys(stateKeys, nk);
        for (let f0 = 0; f0 < F; f0 += FEATURE_BLOCK) {
          const nf = Math.min(FEATURE_BLOCK, F - f0);
          ex.features(b.yT!, keyLd, Math.ceil(nk / 4), b.table!, f0, f0 + nf, b.uk!, keyLd);
          ex.moments(
            b.uk!,
            keyLd,
            nf,
            b.vPanels!,
            keyLd * 32,
            nk,
            Wp,
            b.s! + f0 * 32,
            b.sComp! + f0 * 32,
            sPanel,
            b.weights! + f0 * 4,
            b.z! + f0 * 4,
            b.zComp! + f0 * 4,
          );
        }
        stateKeys += nk;
      }
    };

    const setLimits = (i0: number, nq: number, k0: number, nk: number): void => {
      this.views();
      for (let r = 0; r < nq; r++)
        this.i32[(b.limits! >> 2) + r] = Math.max(0, Math.min(nk, limitOf(i0 + r) - k0));
    };

    const copy = (from: string, to: string, floats: number): void => {
      this.views();
      this.f32.copyWithin(b[to]! >> 2, b[from]! >> 2, (b[from]! >> 2) + floats);
    };

    // Pass 1: outputs, g, and dz.
    for (let c = 0; c < head.schedule.length; c += 4) {
      const chunkStart = head.schedule[c]!;
      const chunkEnd = head.schedule[c + 1]!;
      const stateKeyEnd = factorized ? Math.min(head.schedule[c + 2]!, head.valid) : 0;
      for (let i0 = chunkStart; i0 < chunkEnd; i0 += C) {
        const nq = Math.min(C, chunkEnd - i0);
        const nq4 = Math.ceil(nq / 4);
        const nq8 = Math.ceil(nq / 8);
        loadQueries(i0, nq, false);
        zero('oq', C * Wp);
        if (factorized) advance(stateKeyEnd);
        if (stateKeys > 0) {
          for (let f0 = 0; f0 < F; f0 += FEATURE_BLOCK) {
            const nf = Math.min(FEATURE_BLOCK, F - f0);
            ex.features(b.xT!, C, nq4, b.table!, f0, f0 + nf, b.uq!, C);
            ex.readout(b.uq!, C, nf, b.s! + f0 * 32, sPanel, b.z! + f0 * 4, nq4, Wp, b.oq!, Wp, b.den!);
          }
        }
        const directEnd = limitOf(i0 + nq - 1);
        for (let k0 = stateKeyEnd; k0 < directEnd; k0 += KEY_CHUNK) {
          const nk = Math.min(KEY_CHUNK, directEnd - k0);
          loadKeys(k0, nk);
          setLimits(i0, nq, k0, nk);
          ex.scores(b.xT!, C, nq4, b.yT!, keyLd, Math.ceil(nk / 8), D, b.wf!, KEY_CHUNK);
          ex.polynomial(b.wf!, KEY_CHUNK, nq, Math.ceil(nk / 8), b.limits!, b.coefficients!, order);
          ex.weighted(b.wf!, KEY_CHUNK, nq4, nk, b.vPanels!, keyLd * 32, Wp, b.oq!, Wp, b.den!);
        }
        // g_i from the recomputed output.
        this.views();
        const f = this.f32;
        const oq = b.oq! >> 2;
        for (let r = 0; r < nq; r++) {
          const den = f[oq + r * Wp + Dv]!;
          const target = (i0 + r) * Wp;
          if (!(den > 0)) continue;
          const alpha = 1 / den;
          const dOut = dOutBase + (i0 + r) * stride;
          let beta = 0;
          for (let col = 0; col < Dv; col++) beta += head.dOut[dOut + col]! * f[oq + r * Wp + col]! * alpha;
          for (let col = 0; col < Dv; col++) G[target + col] = alpha * head.dOut[dOut + col]!;
          G[target + Dv] = -alpha * beta;
        }
        loadQueries(i0, nq, true);
        zero('dxT', D * C);
        zero('dxRows', C * Dp);
        if (stateKeys > 0) {
          for (let f0 = 0; f0 < F; f0 += FEATURE_BLOCK) {
            const nf = Math.min(FEATURE_BLOCK, F - f0);
            ex.project(b.s! + f0 * 32, sPanel, nf, Wp, b.gT!, C, nq8, b.h!, C);
            ex.featureGradient(b.h!, C, b.table!, f0, f0 + nf, b.xT!, C, nq4, b.dxT!);
          }
        }
        for (let k0 = stateKeyEnd; k0 < directEnd; k0 += KEY_CHUNK) {
          const nk = Math.min(KEY_CHUNK, directEnd - k0);
          const nk4 = Math.ceil(nk / 4);
          const nk8 = Math.ceil(nk / 8);
          loadKeys(k0, nk);
          setLimits(i0, nq, k0, nk);
          ex.scores(b.xT!, C, nq4, b.yT!, keyLd, nk8, D, b.sc!, KEY_CHUNK);
          copy('sc', 'wf', C * KEY_CHUNK);
          copy('sc', 'wd', C * KEY_CHUNK);
          ex.polynomial(b.wf!, KEY_CHUNK, nq, nk8, b.limits!, b.coefficients!, order);
          ex.polynomial(b.wd!, KEY_CHUNK, nq, nk8, b.limits!, b.derivative!, order - 1);
          ex.scores(b.gT!, C, nq4, b.vT!, keyLd, nk8, Wp, b.gg!, KEY_CHUNK);
          ex.hadamard(b.wd!, b.gg!, (C * KEY_CHUNK) / 4);
          ex.weighted(b.wd!, KEY_CHUNK, nq4, nk, b.yPanels!, keyLd * 32, Dp, b.dxRows!, Dp, b.den!);
          ex.transpose(b.wd!, KEY_CHUNK, nq, nk, b.trans!, C);
          zero('dyRows', keyLd * Dp);
          ex.weighted(b.trans!, C, nk4, nq, b.xPanels!, C * 32, Dp, b.dyRows!, Dp, b.den!);
          ex.transpose(b.wf!, KEY_CHUNK, nq, nk, b.trans!, C);
          zero('dvRows', keyLd * Wp);
          ex.weighted(b.trans!, C, nk4, nq, b.gPanels!, C * 32, Wp, b.dvRows!, Wp, b.den!);
          this.addKeyRows(head, k0, nk, b.dyRows!, Dp, b.dvRows!, Wp, dvBase, Dv);
        }
        this.views();
        const g = this.f32;
        for (let r = 0; r < nq; r++) {
          const target = head.dzBase + (i0 + r) * D;
          for (let d = 0; d < D; d++) {
            head.dz[target + d] = g[(b.dxT! >> 2) + d * C + r]! + g[(b.dxRows! >> 2) + r * Dp + d]!;
          }
        }
      }
    }

    if (!factorized) return;
    // Pass 2: reverse moments over queries; each chunk completes the keys that enter the state
    // just before it.
    const chunks = head.schedule.length / 4;
    for (let c = chunks - 1; c >= 0; c--) {
      const stateEnd = Math.min(head.schedule[4 * c + 2]!, head.valid);
      if (stateEnd === 0) break;
      const previousEnd = c > 0 ? Math.min(head.schedule[4 * (c - 1) + 2]!, head.valid) : 0;
      const chunkStart = head.schedule[4 * c]!;
      const chunkEnd = head.schedule[4 * c + 1]!;
      for (let i0 = chunkStart; i0 < chunkEnd; i0 += C) {
        const nq = Math.min(C, chunkEnd - i0);
        loadQueries(i0, nq, true);
        for (let f0 = 0; f0 < F; f0 += FEATURE_BLOCK) {
          const nf = Math.min(FEATURE_BLOCK, F - f0);
          ex.features(b.xT!, C, Math.ceil(nq / 4), b.table!, f0, f0 + nf, b.uq!, C);
          ex.moments(
            b.uq!,
            C,
            nf,
            b.gPanels!,
            C * 32,
            nq,
            Wp,
            b.r! + f0 * 32,
            b.rComp! + f0 * 32,
            sPanel,
            b.weights! + f0 * 4,
            b.z! + f0 * 4,
            b.zComp! + f0 * 4,
          );
        }
      }
      for (let k0 = previousEnd; k0 < stateEnd; k0 += KEY_CHUNK) {
        const nk = Math.min(KEY_CHUNK, stateEnd - k0);
        const nk4 = Math.ceil(nk / 4);
        loadKeys(k0, nk);
        zero('dvRows', keyLd * Wp);
        zero('dyT', D * keyLd);
        for (let f0 = 0; f0 < F; f0 += FEATURE_BLOCK) {
          const nf = Math.min(FEATURE_BLOCK, F - f0);
          ex.features(b.yT!, keyLd, nk4, b.table!, f0, f0 + nf, b.uk!, keyLd);
          ex.readout(b.uk!, keyLd, nf, b.r! + f0 * 32, sPanel, b.z! + f0 * 4, nk4, Wp, b.dvRows!, Wp, b.den!);
          ex.project(b.r! + f0 * 32, sPanel, nf, Wp, b.vT!, keyLd, Math.ceil(nk / 8), b.h!, keyLd);
          ex.featureGradient(b.h!, keyLd, b.table!, f0, f0 + nf, b.yT!, keyLd, nk4, b.dyT!);
        }
        this.views();
        const f = this.f32;
        for (let t = 0; t < nk; t++) {
          const dy = head.dyBase + (k0 + t) * D;
          for (let d = 0; d < D; d++) head.dy[dy + d]! += f[(b.dyT! >> 2) + d * keyLd + t]!;
          const dv = dvBase + (k0 + t) * stride;
          for (let col = 0; col < Dv; col++) head.dv[dv + col]! += f[(b.dvRows! >> 2) + t * Wp + col]!;
        }
      }
    }
  }

  private addKeyRows(
    head: BackwardHead,
    k0: number,
    nk: number,
    dyRows: number,
    Dp: number,
    dvRows: number,
    Wp: number,
    dvBase: number,
    Dv: number,
  ): void {
    this.views();
    const f = this.f32;
    const D = head.headDim;
    for (let t = 0; t < nk; t++) {
      const dy = head.dyBase + (k0 + t) * D;
      for (let d = 0; d < D; d++) head.dy[dy + d]! += f[(dyRows >> 2) + t * Dp + d]!;
      const dv = dvBase + (k0 + t) * head.valueDim;
      for (let col = 0; col < Dv; col++) head.dv[dv + col]! += f[(dvRows >> 2) + t * Wp + col]!;
    }
  }
}
