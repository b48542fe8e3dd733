// Fastmax CPU kernels (AssemblyScript, compiled to WebAssembly with 128-bit SIMD).
//
// Every pointer is a byte offset into this module's memory and every matrix is float32, row-major
// with an explicit leading dimension `ld*` counted in floats. The host (src/engine.ts) lays the
// buffers out, pads them (rows of queries to a multiple of 4, value columns to a multiple of 8) and
// drives the chunk loop; these functions are the hot loops only.
//
// All matrix products share one register-blocked micro-kernel: a 4×8 tile of the result kept in 8
// f32x4 accumulators while the shared dimension K streams through. Each step loads two vectors of
// the B operand and broadcasts four scalars of the A operand: 16 multiply-adds for 6 loads, and 11
// live vector registers, which leaves room in the 15 that V8 allocates on x64 (no spills).



@inline
function madd(a: v128, b: v128, c: v128): v128 {
  if (ASC_FEATURE_RELAXED_SIMD) return f32x4.relaxed_madd(a, b, c);
  return f32x4.add(f32x4.mul(a, b), c);
}

// Accumulators of the current tile, spilled once per tile (not per step) for the write-back.
let t0: v128 = f32x4.splat(0);
let t1: v128 = f32x4.splat(0);
let t2: v128 = f32x4.splat(0);
let t3: v128 = f32x4.splat(0);
let t4: v128 = f32x4.splat(0);
let t5: v128 = f32x4.splat(0);
let t6: v128 = f32x4.splat(0);
let t7: v128 = f32x4.splat(0);

/**
 * tile[r][0..8) = Σ_k A(k, r) · B(k, 0..8) with A(k, r) at a_r + k·aStep and B(k, ·) at b + k·bStep.
 * Rows r = 0..3 are the tile's rows (t{2r}, t{2r+1} hold its 8 columns).
 */
@inline
function tile4x8(a0: usize, a1: usize, a2: usize, a3: usize, aStep: usize, b: usize, bStep: usize, k: i32): void {
  let c00 = f32x4.splat(0);
  let c01 = f32x4.splat(0);
  let c10 = f32x4.splat(0);
  let c11 = f32x4.splat(0);
  let c20 = f32x4.splat(0);
  let c21 = f32x4.splat(0);
  let c30 = f32x4.splat(0);
  let c31 = f32x4.splat(0);
  for (let i = 0; i < k; i++) {
    const b0 = v128.load(b);
    const b1 = v128.load(b, 16);
    let a = v128.load32_splat(a0);
    c00 = madd(a, b0, c00);
    c01 = madd(a, b1, c01);
    a = v128.load32_splat(a1);
    c10 = madd(a, b0, c10);
    c11 = madd(a, b1, c11);
    a = v128.load32_splat(a2);
    c20 = madd(a, b0, c20);
    c21 = madd(a, b1, c21);
    a = v128.load32_splat(a3);
    c30 = madd(a, b0, c30);
    c31 = madd(a, b1, c31);
    a0 += aStep;
    a1 += aStep;
    a2 += aStep;
    a3 += aStep;
    b += bStep;
  }
  t0 = c00;
  t1 = c01;
  t2 = c10;
  t3 = c11;
  t4 = c20;
  t5 = c21;
  t6 = c30;
  t7 = c31;
}

@inline
function tileRow0(r: i32): v128 {
  return r == 0 ? t0 : r == 1 ? t2 : r == 2 ? t4 : t6;
}

@inline
function tileRow1(r: i32): v128 {
  return r == 0 ? t1 : r == 1 ? t3 : r == 2 ? t5 : t7;
}

/** Adds the tile into out (4 rows of 8 floats, row stride ldOut floats). */
@inline
function addTile(out: usize, ldOut: i32): void {
  const step = <usize>ldOut << 2;
  for (let r = 0; r < 4; r++) {
    const p = out + <usize>r * step;
    v128.store(p, f32x4.add(v128.load(p), tileRow0(r)));
    v128.store(p, f32x4.add(v128.load(p, 16), tileRow1(r)), 16);
  }
}

/** Kahan-compensated s += w·tile, so the running sum's rounding error does not grow with the count. */
@inline
function kahanAdd(s: usize, comp: usize, value: v128): void {
  const y = f32x4.sub(value, v128.load(comp));
  const old = v128.load(s);
  const t = f32x4.add(old, y);
  v128.store(comp, f32x4.sub(f32x4.sub(t, old), y));
  v128.store(s, t);
}

export function heapBase(): usize {
  return __heap_base;
}

/**
 * The end of the run of degree-2 features x_a·x_b that starts at f (first factor a), before f1:
 * core's layout lists them with b ≥ a in order, so that the kernels below keep x_a (or its
 * gradient row) in registers over the run.
 */
@inline
function quadraticRunEnd(table: usize, f: i32, f1: i32, a: u32): i32 {
  let end = f + 1;
  while (
    end < f1 &&
    load<i32>(table + (<usize>end << 3)) == 2 &&
    (load<u32>(table + (<usize>end << 3), 4) & 255) == a
  )
    end++;
  return end;
}

/** The second factor's coordinate of feature g (its packed indices, one per byte). */
@inline
function secondFactor(table: usize, g: i32): usize {
  return <usize>((load<u32>(table + (<usize>g << 3), 4) >> 8) & 255);
}

/**
 * Monomial features, feature-major: out[f - f0][j] = Π_t src[idx_t(f)][j] for j < 4·n4, where the
 * table holds (degree, packed indices) per feature, one index per byte, degree 0 giving 1.
 */
export function features(
  src: usize,
  ldSrc: i32,
  n4: i32,
  table: usize,
  f0: i32,
  f1: i32,
  out: usize,
  ldOut: i32,
): void {
  const rowBytes = <usize>ldSrc << 2;
  const one = f32x4.splat(1);
  for (let f = f0; f < f1; f++) {
    const degree = load<i32>(table + (<usize>f << 3));
    const packed = load<u32>(table + (<usize>f << 3), 4);
    const dst = out + ((<usize>(f - f0) * <usize>ldOut) << 2);
    const r0 = src + <usize>(packed & 255) * rowBytes;
    const r1 = src + <usize>((packed >> 8) & 255) * rowBytes;
    const r2 = src + <usize>((packed >> 16) & 255) * rowBytes;
    const r3 = src + <usize>(packed >> 24) * rowBytes;
    if (degree == 0) {
      for (let j = 0; j < n4; j++) v128.store(dst + (<usize>j << 4), one);
    } else if (degree == 1) {
      for (let j = 0; j < n4; j++) {
        const o = <usize>j << 4;
        v128.store(dst + o, v128.load(r0 + o));
      }
    } else if (degree == 2) {
      // A run of x_a·x_b sharing a (core's layout lists b ≥ a in order): x_a loaded once per run.
      const a = packed & 255;
      const end = quadraticRunEnd(table, f, f1, a);
      const outRow = <usize>ldOut << 2;
      let j = 0;
      for (; j + 4 <= n4; j += 4) {
        const o = <usize>j << 4;
        const xa0 = v128.load(r0 + o);
        const xa1 = v128.load(r0 + o, 16);
        const xa2 = v128.load(r0 + o, 32);
        const xa3 = v128.load(r0 + o, 48);
        let to = dst + o;
        for (let g = f; g < end; g++) {
          const rb = src + secondFactor(table, g) * rowBytes + o;
          v128.store(to, f32x4.mul(xa0, v128.load(rb)));
          v128.store(to, f32x4.mul(xa1, v128.load(rb, 16)), 16);
          v128.store(to, f32x4.mul(xa2, v128.load(rb, 32)), 32);
          v128.store(to, f32x4.mul(xa3, v128.load(rb, 48)), 48);
          to += outRow;
        }
      }
      for (; j < n4; j++) {
        const o = <usize>j << 4;
        const xa = v128.load(r0 + o);
        let to = dst + o;
        for (let g = f; g < end; g++) {
          const rb = src + secondFactor(table, g) * rowBytes + o;
          v128.store(to, f32x4.mul(xa, v128.load(rb)));
          to += outRow;
        }
      }
      f = end - 1;
    } else if (degree == 3) {
      for (let j = 0; j < n4; j++) {
        const o = <usize>j << 4;
        v128.store(dst + o, f32x4.mul(f32x4.mul(v128.load(r0 + o), v128.load(r1 + o)), v128.load(r2 + o)));
      }
    } else {
      for (let j = 0; j < n4; j++) {
        const o = <usize>j << 4;
        const ab = f32x4.mul(v128.load(r0 + o), v128.load(r1 + o));
        const cd = f32x4.mul(v128.load(r2 + o), v128.load(r3 + o));
        v128.store(dst + o, f32x4.mul(ab, cd));
      }
    }
  }
}

/**
 * Moment update for one block of nf (multiple of 4) features and nTok tokens:
 *   S[f][c] += w_f · Σ_j U[f][j] · V[j][c]   (c < nc, a multiple of 8)
 *   z[f]    += w_f · Σ_j U[f][j] · t_j       (t_j = 1 when tokenWeights is 0, else tokenWeights[j])
 * with Kahan compensation (comp, zComp) on both running sums. w holds one weight per feature; t
 * gives one more column of V as a vector, for a column that would otherwise add a panel of 8.
 * V and S are stored in panels of 8 columns (panel p holds columns 8p..8p+7 of every row, rows
 * 32 bytes apart, panels vPanel / sPanel bytes apart) so that every tile streams contiguous memory.
 */
export function moments(
  u: usize,
  ldU: i32,
  nf: i32,
  v: usize,
  vPanel: i32,
  nTok: i32,
  nc: i32,
  s: usize,
  comp: usize,
  sPanel: i32,
  w: usize,
  z: usize,
  zComp: usize,
  tokenWeights: usize,
): void {
  const uRow = <usize>ldU << 2;
  for (let f = 0; f < nf; f += 4) {
    const a0 = u + <usize>f * uRow;
    const w0 = f32x4.splat(load<f32>(w + (<usize>f << 2)));
    const w1 = f32x4.splat(load<f32>(w + (<usize>f << 2), 4));
    const w2 = f32x4.splat(load<f32>(w + (<usize>f << 2), 8));
    const w3 = f32x4.splat(load<f32>(w + (<usize>f << 2), 12));
    for (let c = 0; c < nc >> 3; c++) {
      tile4x8(a0, a0 + uRow, a0 + 2 * uRow, a0 + 3 * uRow, 4, v + <usize>c * <usize>vPanel, 32, nTok);
      const sp = s + <usize>c * <usize>sPanel + (<usize>f << 5);
      const cp = comp + <usize>c * <usize>sPanel + (<usize>f << 5);
      kahanAdd(sp, cp, f32x4.mul(t0, w0));
      kahanAdd(sp + 16, cp + 16, f32x4.mul(t1, w0));
      kahanAdd(sp + 32, cp + 32, f32x4.mul(t2, w1));
      kahanAdd(sp + 48, cp + 48, f32x4.mul(t3, w1));
      kahanAdd(sp + 64, cp + 64, f32x4.mul(t4, w2));
      kahanAdd(sp + 80, cp + 80, f32x4.mul(t5, w2));
      kahanAdd(sp + 96, cp + 96, f32x4.mul(t6, w3));
      kahanAdd(sp + 112, cp + 112, f32x4.mul(t7, w3));
    }
  }
  const n4 = nTok >> 2;
  for (let f = 0; f < nf; f++) {
    const row = u + <usize>f * uRow;
    let acc = f32x4.splat(0);
    if (tokenWeights == 0) {
      for (let j = 0; j < n4; j++) acc = f32x4.add(acc, v128.load(row + (<usize>j << 4)));
    } else {
      for (let j = 0; j < n4; j++) acc = madd(v128.load(row + (<usize>j << 4)), v128.load(tokenWeights + (<usize>j << 4)), acc);
    }
    let total: f32 =
      f32x4.extract_lane(acc, 0) + f32x4.extract_lane(acc, 1) + f32x4.extract_lane(acc, 2) + f32x4.extract_lane(acc, 3);
    for (let j = n4 << 2; j < nTok; j++) {
      const weight: f32 = tokenWeights == 0 ? 1 : load<f32>(tokenWeights + (<usize>j << 2));
      total += load<f32>(row + (<usize>j << 2)) * weight;
    }
    const value: f32 = total * load<f32>(w + (<usize>f << 2));
    const zp = z + (<usize>f << 2);
    const cp = zComp + (<usize>f << 2);
    const y = value - load<f32>(cp);
    const old = load<f32>(zp);
    const t = old + y;
    store<f32>(cp, t - old - y);
    store<f32>(zp, t);
  }
}

/**
 * Query side for one block of nf features and 4·nq4 queries:
 *   O[i][c] += Σ_f U[f][i] · S[f][c]   (c < nc, a multiple of 8; S in panels as in `moments`)
 *   den[i]  += Σ_f U[f][i] · z[f]
 */
export function readout(
  u: usize,
  ldU: i32,
  nf: i32,
  s: usize,
  sPanel: i32,
  z: usize,
  nq4: i32,
  nc: i32,
  o: usize,
  ldO: i32,
  den: usize,
): void {
  const uRow = <usize>ldU << 2;
  for (let i = 0; i < nq4 << 2; i += 4) {
    const a0 = u + (<usize>i << 2);
    for (let c = 0; c < nc; c += 8) {
      tile4x8(a0, a0 + 4, a0 + 8, a0 + 12, uRow, s + <usize>(c >> 3) * <usize>sPanel, 32, nf);
      addTile(o + ((<usize>i * <usize>ldO + <usize>c) << 2), ldO);
    }
    let acc = f32x4.splat(0);
    let row = a0;
    for (let f = 0; f < nf; f++) {
      acc = madd(v128.load(row), v128.load32_splat(z + (<usize>f << 2)), acc);
      row += uRow;
    }
    const dp = den + (<usize>i << 2);
    v128.store(dp, f32x4.add(v128.load(dp), acc));
  }
}

/**
 * Keys a tile of 4 rows (rows i..i+3) reads in a causal block: the largest of their limits, at
 * most nk. Rows of the tile past the block's last query must have limit 0.
 */
@inline
function tileKeyEnd(limits: usize, i: i32, nk: i32): i32 {
  const p = limits + (<usize>i << 2);
  const a = max(load<i32>(p), load<i32>(p, 4));
  const b = max(load<i32>(p, 8), load<i32>(p, 12));
  return min(nk, max(a, b));
}

/**
 * W[i][j] = Σ_d X[d][i] · Y[d][j] for i < 4·nq4, j < 8·nk8 (X, Y feature-major, D rows).
 * bounded != 0: a tile of 4 rows stops at its `tileKeyEnd` (rounded up to 8 keys), which skips the
 * masked upper triangle of a causal diagonal block; the rest of W is left as it was (bounded = 1)
 * or set to 0 (bounded = 2, for callers that read all of W).
 */
export function scores(
  x: usize,
  ldX: i32,
  nq4: i32,
  y: usize,
  ldY: i32,
  nk8: i32,
  d: i32,
  w: usize,
  ldW: i32,
  limits: usize,
  bounded: i32,
): void {
  const xRow = <usize>ldX << 2;
  const yRow = <usize>ldY << 2;
  const wRow = <usize>ldW << 2;
  for (let i = 0; i < nq4 << 2; i += 4) {
    const a0 = x + (<usize>i << 2);
    const end = bounded ? (tileKeyEnd(limits, i, nk8 << 3) + 7) & ~7 : nk8 << 3;
    for (let j = 0; j < end; j += 8) {
      tile4x8(a0, a0 + 4, a0 + 8, a0 + 12, xRow, y + (<usize>j << 2), yRow, d);
      const p = w + <usize>i * wRow + (<usize>j << 2);
      v128.store(p, t0);
      v128.store(p, t1, 16);
      v128.store(p + wRow, t2);
      v128.store(p + wRow, t3, 16);
      v128.store(p + 2 * wRow, t4);
      v128.store(p + 2 * wRow, t5, 16);
      v128.store(p + 3 * wRow, t6);
      v128.store(p + 3 * wRow, t7, 16);
    }
    if (bounded == 2) {
      const zero = f32x4.splat(0);
      for (let r = 0; r < 4; r++) {
        const row = w + <usize>(i + r) * wRow;
        for (let j = end; j < nk8 << 3; j += 4) v128.store(row + (<usize>j << 2), zero);
      }
    }
  }
}

/**
 * W[i][j] = f(W[i][j]) = Σ_l a_l W^l for j < limit_i, else 0, for j < 8·nk8 and every row i < nq.
 * coefficients: order + 1 floats a_0..a_p; limits: one i32 per row. bounded = 1: only the keys of
 * the row's tile (`tileKeyEnd`, as `scores` and `weighted` read them) are written; bounded = 2: the
 * others are set to 0 without evaluating f.
 */
export function polynomial(
  w: usize,
  ldW: i32,
  nq: i32,
  nk8: i32,
  limits: usize,
  coefficients: usize,
  order: i32,
  bounded: i32,
): void {
  const wRow = <usize>ldW << 2;
  const top = f32x4.splat(load<f32>(coefficients + (<usize>order << 2)));
  const lane = i32x4(0, 1, 2, 3);
  for (let i = 0; i < nq; i++) {
    const row = w + <usize>i * wRow;
    const limit = i32x4.splat(load<i32>(limits + (<usize>i << 2)));
    const end4 = bounded ? (tileKeyEnd(limits, i & ~3, nk8 << 3) + 3) >> 2 : nk8 << 1;
    for (let j = 0; j < end4; j++) {
      const p = row + (<usize>j << 4);
      const s = v128.load(p);
      let acc = top;
      for (let l = order - 1; l >= 0; l--) {
        acc = madd(acc, s, f32x4.splat(load<f32>(coefficients + (<usize>l << 2))));
      }
      const visible = i32x4.lt_s(i32x4.add(lane, i32x4.splat(j << 2)), limit);
      v128.store(p, v128.and(acc, visible));
    }
    if (bounded == 2) {
      const zero = f32x4.splat(0);
      for (let j = end4; j < nk8 << 1; j++) v128.store(row + (<usize>j << 4), zero);
    }
  }
}

/**
 * O[i][c] += Σ_j W[i][j] · V[j][c] for j < nk (c < nc, a multiple of 8; V in panels as in
 * `moments`), den[i] += Σ_j W[i][j] (skipped when den is 0),
 * for i < 4·nq4. Columns of W at or past nk are ignored; bounded != 0: so are those at or past the
 * tile's `tileKeyEnd`.
 */
export function weighted(
  w: usize,
  ldW: i32,
  nq4: i32,
  nk: i32,
  v: usize,
  vPanel: i32,
  nc: i32,
  o: usize,
  ldO: i32,
  den: usize,
  limits: usize,
  bounded: i32,
): void {
  const wRow = <usize>ldW << 2;
  for (let i = 0; i < nq4 << 2; i += 4) {
    const a0 = w + <usize>i * wRow;
    const end = bounded ? tileKeyEnd(limits, i, nk) : nk;
    for (let c = 0; c < nc; c += 8) {
      tile4x8(a0, a0 + wRow, a0 + 2 * wRow, a0 + 3 * wRow, 4, v + <usize>(c >> 3) * <usize>vPanel, 32, end);
      addTile(o + ((<usize>i * <usize>ldO + <usize>c) << 2), ldO);
    }
    if (den == 0) continue;
    for (let r = 0; r < 4; r++) {
      const row = a0 + <usize>r * wRow;
      let total: f32 = 0;
      for (let j = 0; j < end; j++) total += load<f32>(row + (<usize>j << 2));
      const dp = den + (<usize>(i + r) << 2);
      store<f32>(dp, load<f32>(dp) + total);
    }
  }
}

/**
 * The transposed product: O[j][c] += Σ_{i < nq} W[i][j] · X[i][c] for j < 4·nk4 (c < nc, a multiple
 * of 8; X in panels as in `moments`, one row per i). bounded != 0 (causal blocks, where `limits`
 * never decreases with i): a tile of keys j..j+3 starts at the first row whose limit passes j, the
 * rows before it seeing none of them; the entries it still reads past a row's limit must be 0.
 */
export function weightedTransposed(
  w: usize,
  ldW: i32,
  nq: i32,
  nk4: i32,
  x: usize,
  xPanel: i32,
  nc: i32,
  o: usize,
  ldO: i32,
  limits: usize,
  bounded: i32,
): void {
  const wRow = <usize>ldW << 2;
  let start = 0;
  for (let j = 0; j < nk4 << 2; j += 4) {
    if (bounded) while (start < nq && load<i32>(limits + (<usize>start << 2)) <= j) start++;
    const a0 = w + <usize>start * wRow + (<usize>j << 2);
    for (let c = 0; c < nc; c += 8) {
      const b = x + <usize>(c >> 3) * <usize>xPanel + (<usize>start << 5);
      tile4x8(a0, a0 + 4, a0 + 8, a0 + 12, wRow, b, 32, nq - start);
      addTile(o + ((<usize>j * <usize>ldO + <usize>c) << 2), ldO);
    }
  }
}

// ---- Backward pass -------------------------------------------------------------------------

/**
 * H[f][i] = Σ_{c < nc} S[f][c] · G[c][i] + bias[f] for f < nf (a multiple of 4), i < 8·n8 (no bias
 * when `bias` is 0): every feature's moment row contracted with one vector per token (S in panels
 * as in `moments`; the bias stands for a constant column of G, as `moments`' token weights for a
 * column of V). G comes in token
 * blocks: block b (tokens 8b..8b+7) holds row c of G at g + b·blockBytes + 32c, so the tile streams
 * G contiguously, and the accumulators run over every panel of S without restarting per panel
 * (about 1.4x the speed of a per-panel tile over a row-major G).
 */
export function projectBlocks(
  s: usize,
  sPanel: i32,
  nf: i32,
  nc: i32,
  g: usize,
  blockBytes: i32,
  n8: i32,
  h: usize,
  ldH: i32,
  bias: usize,
): void {
  const hRow = <usize>ldH << 2;
  const panels = nc >> 3;
  for (let f = 0; f < nf; f += 4) {
    // Added after the sum over panels: in the order a ones column after the last panel would be.
    const b0 = bias == 0 ? f32x4.splat(0) : f32x4.splat(load<f32>(bias + (<usize>f << 2)));
    const b1 = bias == 0 ? f32x4.splat(0) : f32x4.splat(load<f32>(bias + (<usize>f << 2), 4));
    const b2 = bias == 0 ? f32x4.splat(0) : f32x4.splat(load<f32>(bias + (<usize>f << 2), 8));
    const b3 = bias == 0 ? f32x4.splat(0) : f32x4.splat(load<f32>(bias + (<usize>f << 2), 12));
    for (let j = 0; j < n8; j++) {
      let c00 = f32x4.splat(0);
      let c01 = f32x4.splat(0);
      let c10 = f32x4.splat(0);
      let c11 = f32x4.splat(0);
      let c20 = f32x4.splat(0);
      let c21 = f32x4.splat(0);
      let c30 = f32x4.splat(0);
      let c31 = f32x4.splat(0);
      let bp = g + <usize>j * <usize>blockBytes;
      for (let p = 0; p < panels; p++) {
        let a = s + <usize>p * <usize>sPanel + (<usize>f << 5);
        for (let k = 0; k < 8; k++) {
          const b0 = v128.load(bp);
          const b1 = v128.load(bp, 16);
          let x = v128.load32_splat(a);
          c00 = madd(x, b0, c00);
          c01 = madd(x, b1, c01);
          x = v128.load32_splat(a, 32);
          c10 = madd(x, b0, c10);
          c11 = madd(x, b1, c11);
          x = v128.load32_splat(a, 64);
          c20 = madd(x, b0, c20);
          c21 = madd(x, b1, c21);
          x = v128.load32_splat(a, 96);
          c30 = madd(x, b0, c30);
          c31 = madd(x, b1, c31);
          a += 4;
          bp += 32;
        }
      }
      const o = h + <usize>f * hRow + (<usize>j << 5);
      v128.store(o, f32x4.add(c00, b0));
      v128.store(o, f32x4.add(c01, b0), 16);
      v128.store(o + hRow, f32x4.add(c10, b1));
      v128.store(o + hRow, f32x4.add(c11, b1), 16);
      v128.store(o + 2 * hRow, f32x4.add(c20, b2));
      v128.store(o + 2 * hRow, f32x4.add(c21, b2), 16);
      v128.store(o + 3 * hRow, f32x4.add(c30, b3));
      v128.store(o + 3 * hRow, f32x4.add(c31, b3), 16);
    }
  }
}

/**
 * out[a] += hv · ∂φ/∂x_a for the monomial φ = x_o0·x_o1·… of one feature, over four tokens at byte
 * offset c (o0..o3: byte offsets of the factors' rows, shared by src and out).
 */
@inline
function addMonomialGradient(degree: i32, o0: usize, o1: usize, o2: usize, o3: usize, src: usize, out: usize, c: usize, hv: v128): void {
  if (degree == 1) {
    v128.store(out + o0 + c, f32x4.add(v128.load(out + o0 + c), hv));
  } else if (degree == 2) {
    const x0 = v128.load(src + o0 + c);
    const x1 = v128.load(src + o1 + c);
    v128.store(out + o0 + c, madd(hv, x1, v128.load(out + o0 + c)));
    v128.store(out + o1 + c, madd(hv, x0, v128.load(out + o1 + c)));
  } else if (degree == 3) {
    const x0 = v128.load(src + o0 + c);
    const x1 = v128.load(src + o1 + c);
    const x2 = v128.load(src + o2 + c);
    v128.store(out + o0 + c, madd(hv, f32x4.mul(x1, x2), v128.load(out + o0 + c)));
    v128.store(out + o1 + c, madd(hv, f32x4.mul(x0, x2), v128.load(out + o1 + c)));
    v128.store(out + o2 + c, madd(hv, f32x4.mul(x0, x1), v128.load(out + o2 + c)));
  } else {
    const x0 = v128.load(src + o0 + c);
    const x1 = v128.load(src + o1 + c);
    const x2 = v128.load(src + o2 + c);
    const x3 = v128.load(src + o3 + c);
    const x01 = f32x4.mul(x0, x1);
    const x23 = f32x4.mul(x2, x3);
    v128.store(out + o0 + c, madd(hv, f32x4.mul(x1, x23), v128.load(out + o0 + c)));
    v128.store(out + o1 + c, madd(hv, f32x4.mul(x0, x23), v128.load(out + o1 + c)));
    v128.store(out + o2 + c, madd(hv, f32x4.mul(x01, x3), v128.load(out + o2 + c)));
    v128.store(out + o3 + c, madd(hv, f32x4.mul(x01, x2), v128.load(out + o3 + c)));
  }
}

/**
 * Gradient of Σ_f H[f][j] · φ_f(x_j) with respect to x_j, added to out (both feature-major, D rows):
 * for a monomial x_a·x_b·…, ∂/∂x_a is the product of the other factors.
 */
export function featureGradient(
  h: usize,
  ldH: i32,
  table: usize,
  f0: i32,
  f1: i32,
  src: usize,
  ldSrc: i32,
  n4: i32,
  out: usize,
): void {
  gradientOfFeatures(h, <usize>ldH << 2, 0, table, f0, f1, src, <usize>ldSrc << 2, n4, out);
}

/**
 * `featureGradient` with the same H[f] for every token, H[f] = weights[f] (f absolute): the
 * gradient of Σ_f weights[f] · φ_f(x_j), e.g. of a denominator through the state's ones column.
 */
export function featureGradientConstant(
  weights: usize,
  table: usize,
  f0: i32,
  f1: i32,
  src: usize,
  ldSrc: i32,
  n4: i32,
  out: usize,
): void {
  gradientOfFeatures(0, 0, weights, table, f0, f1, src, <usize>ldSrc << 2, n4, out);
}

/**
 * Both gradients: H[f] from row f - f0 of h (hRow bytes apart) or, when `constant` is not 0, the
 * value constant[f] for every token. A run of degree-2 features sharing their first factor a (core's
 * layout lists x_a·x_b for b ≥ a in order) keeps out[a] in registers over the run, four token
 * groups at a time: per feature and token group, three loads and a store (two and a store for a
 * constant H) instead of five loads and two stores. Each out row gets the same additions in the
 * same order as one feature at a time, so the results are the same.
 */
@inline
function gradientOfFeatures(
  h: usize,
  hRow: usize,
  constant: usize,
  table: usize,
  f0: i32,
  f1: i32,
  src: usize,
  rowBytes: usize,
  n4: i32,
  out: usize,
): void {
  let f = f0;
  while (f < f1) {
    const degree = load<i32>(table + (<usize>f << 3));
    const packed = load<u32>(table + (<usize>f << 3), 4);
    if (degree == 2) {
      const a = packed & 255;
      const end = quadraticRunEnd(table, f, f1, a);
      quadraticRun(h + <usize>(f - f0) * hRow, hRow, constant, table, f, end, src, rowBytes, n4, out, <usize>a * rowBytes);
      f = end;
      continue;
    }
    if (degree != 0) {
      const hp = h + <usize>(f - f0) * hRow;
      const o0 = <usize>(packed & 255) * rowBytes;
      const o1 = <usize>((packed >> 8) & 255) * rowBytes;
      const o2 = <usize>((packed >> 16) & 255) * rowBytes;
      const o3 = <usize>(packed >> 24) * rowBytes;
      const fixed = constant != 0 ? f32x4.splat(load<f32>(constant + (<usize>f << 2))) : f32x4.splat(0);
      for (let j = 0; j < n4; j++) {
        const c = <usize>j << 4;
        addMonomialGradient(degree, o0, o1, o2, o3, src, out, c, constant != 0 ? fixed : v128.load(hp + c));
      }
    }
    f++;
  }
}

/**
 * The features [f, end), all x_a·x_b with the same a (row offset oa) and b ≥ a, of
 * `gradientOfFeatures`; H rows from hp, hRow bytes apart, or constant[g]. out[a] accumulates in
 * registers; x_a·x_a adds h·x_a to it twice, as ∂/∂x_a of its two factors.
 */
@inline
function quadraticRun(
  hp: usize,
  hRow: usize,
  constant: usize,
  table: usize,
  f: i32,
  end: i32,
  src: usize,
  rowBytes: usize,
  n4: i32,
  out: usize,
  oa: usize,
): void {
  let j = 0;
  for (; j + 4 <= n4; j += 4) {
    const c = <usize>j << 4;
    const xa0 = v128.load(src + oa + c);
    const xa1 = v128.load(src + oa + c, 16);
    const xa2 = v128.load(src + oa + c, 32);
    const xa3 = v128.load(src + oa + c, 48);
    let acc0 = v128.load(out + oa + c);
    let acc1 = v128.load(out + oa + c, 16);
    let acc2 = v128.load(out + oa + c, 32);
    let acc3 = v128.load(out + oa + c, 48);
    let row = hp + c;
    for (let g = f; g < end; g++) {
      const ob = secondFactor(table, g) * rowBytes;
      let h0: v128;
      let h1: v128;
      let h2: v128;
      let h3: v128;
      if (constant != 0) {
        h0 = f32x4.splat(load<f32>(constant + (<usize>g << 2)));
        h1 = h0;
        h2 = h0;
        h3 = h0;
      } else {
        h0 = v128.load(row);
        h1 = v128.load(row, 16);
        h2 = v128.load(row, 32);
        h3 = v128.load(row, 48);
      }
      if (ob == oa) {
        acc0 = madd(h0, xa0, madd(h0, xa0, acc0));
        acc1 = madd(h1, xa1, madd(h1, xa1, acc1));
        acc2 = madd(h2, xa2, madd(h2, xa2, acc2));
        acc3 = madd(h3, xa3, madd(h3, xa3, acc3));
      } else {
        const xb = src + ob + c;
        const yb = out + ob + c;
        acc0 = madd(h0, v128.load(xb), acc0);
        acc1 = madd(h1, v128.load(xb, 16), acc1);
        acc2 = madd(h2, v128.load(xb, 32), acc2);
        acc3 = madd(h3, v128.load(xb, 48), acc3);
        v128.store(yb, madd(h0, xa0, v128.load(yb)));
        v128.store(yb, madd(h1, xa1, v128.load(yb, 16)), 16);
        v128.store(yb, madd(h2, xa2, v128.load(yb, 32)), 32);
        v128.store(yb, madd(h3, xa3, v128.load(yb, 48)), 48);
      }
      row += hRow;
    }
    v128.store(out + oa + c, acc0);
    v128.store(out + oa + c, acc1, 16);
    v128.store(out + oa + c, acc2, 32);
    v128.store(out + oa + c, acc3, 48);
  }
  for (; j < n4; j++) {
    const c = <usize>j << 4;
    const xa = v128.load(src + oa + c);
    let acc = v128.load(out + oa + c);
    let row = hp + c;
    for (let g = f; g < end; g++) {
      const ob = secondFactor(table, g) * rowBytes;
      const hv = constant != 0 ? f32x4.splat(load<f32>(constant + (<usize>g << 2))) : v128.load(row);
      if (ob == oa) {
        acc = madd(hv, xa, madd(hv, xa, acc));
      } else {
        acc = madd(hv, v128.load(src + ob + c), acc);
        v128.store(out + ob + c, madd(hv, xa, v128.load(out + ob + c)));
      }
      row += hRow;
    }
    v128.store(out + oa + c, acc);
  }
}

/** out[j] += Σ_{f < nf} U[f][j] · H[f][j] for j < 4·n4 (both feature-major). */
export function dotFeatures(u: usize, ldU: i32, h: usize, ldH: i32, nf: i32, n4: i32, out: usize): void {
  const uRow = <usize>ldU << 2;
  const hRow = <usize>ldH << 2;
  // Feature rows outer: both operands stream contiguously, out (one row) stays in L1.
  for (let f = 0; f < nf; f++) {
    const up = u + <usize>f * uRow;
    const hp = h + <usize>f * hRow;
    for (let j = 0; j < n4; j++) {
      const c = <usize>j << 4;
      v128.store(out + c, madd(v128.load(up + c), v128.load(hp + c), v128.load(out + c)));
    }
  }
}

/** a[i] *= b[i] for i < 4·n4. */
export function hadamard(a: usize, b: usize, n4: i32): void {
  for (let i = 0; i < n4; i++) {
    const o = <usize>i << 4;
    v128.store(a + o, f32x4.mul(v128.load(a + o), v128.load(b + o)));
  }
}

/** a[i] += b[i] for i < 4·n4. */
export function addVectors(a: usize, b: usize, n4: i32): void {
  for (let i = 0; i < n4; i++) {
    const o = <usize>i << 4;
    v128.store(a + o, f32x4.add(v128.load(a + o), v128.load(b + o)));
  }
}

/** dst[c][r] = src[r][c] for r < rows, c < cols. */
export function transpose(src: usize, ldSrc: i32, rows: i32, cols: i32, dst: usize, ldDst: i32): void {
  for (let r = 0; r < rows; r++) {
    const row = src + ((<usize>r * <usize>ldSrc) << 2);
    for (let c = 0; c < cols; c++) {
      store<f32>(dst + ((<usize>c * <usize>ldDst + <usize>r) << 2), load<f32>(row + (<usize>c << 2)));
    }
  }
}

// Preparation and write-back: the per-element work around the products, so that the host only
// copies raw rows in (one memcpy per chunk) and finished rows out.

/**
 * Rows [0, n) of a row-major n × d block (rows d floats apart): subtracts each row's mean in place
 * when `centered`, and writes the row's (centered) Euclidean norm to norms[t]. Returns the number
 * of rows whose norm is not finite: every row holding a NaN or an infinity (the input check the
 * engine does for free), and finite rows whose squared norm overflows.
 */
export function centerRows(src: usize, n: i32, d: i32, centered: i32, norms: usize): i32 {
  const d4 = d & ~3;
  const rowBytes = <usize>d << 2;
  let nonFinite = 0;
  for (let t = 0; t < n; t++) {
    const row = src + <usize>t * rowBytes;
    if (centered) {
      let acc = f32x4.splat(0);
      for (let k = 0; k < d4; k += 4) acc = f32x4.add(acc, v128.load(row + (<usize>k << 2)));
      let sum =
        f32x4.extract_lane(acc, 0) + f32x4.extract_lane(acc, 1) + f32x4.extract_lane(acc, 2) + f32x4.extract_lane(acc, 3);
      for (let k = d4; k < d; k++) sum += load<f32>(row + (<usize>k << 2));
      const mean: f32 = sum / <f32>d;
      const m = f32x4.splat(mean);
      for (let k = 0; k < d4; k += 4) {
        const p = row + (<usize>k << 2);
        v128.store(p, f32x4.sub(v128.load(p), m));
      }
      for (let k = d4; k < d; k++) {
        const p = row + (<usize>k << 2);
        store<f32>(p, load<f32>(p) - mean);
      }
    }
    let sq = f32x4.splat(0);
    for (let k = 0; k < d4; k += 4) {
      const x = v128.load(row + (<usize>k << 2));
      sq = madd(x, x, sq);
    }
    let total =
      f32x4.extract_lane(sq, 0) + f32x4.extract_lane(sq, 1) + f32x4.extract_lane(sq, 2) + f32x4.extract_lane(sq, 3);
    for (let k = d4; k < d; k++) {
      const x = load<f32>(row + (<usize>k << 2));
      total += x * x;
    }
    const norm = Mathf.sqrt(total);
    if (!(norm < Infinity)) nonFinite++;
    store<f32>(norms + (<usize>t << 2), norm);
  }
  return nonFinite;
}

/**
 * dst[k][t] = src[t][k] · factors[t] for t < n, k < d (src rows d floats apart, dst rows ldDst floats
 * apart), then zeros in columns [n, nPad) so that whole tiles stay finite.
 */
export function transposeScaled(src: usize, n: i32, d: i32, factors: usize, dst: usize, ldDst: i32, nPad: i32): void {
  const rowBytes = <usize>d << 2;
  const dstRow = <usize>ldDst << 2;
  const n4 = n & ~3;
  const d4 = d & ~3;
  // 4 × 4 blocks: four scaled rows in, four transposed columns out, by shuffles.
  for (let t = 0; t < n4; t += 4) {
    const row = src + <usize>t * rowBytes;
    const f0 = f32x4.splat(load<f32>(factors + (<usize>t << 2)));
    const f1 = f32x4.splat(load<f32>(factors + (<usize>t << 2), 4));
    const f2 = f32x4.splat(load<f32>(factors + (<usize>t << 2), 8));
    const f3 = f32x4.splat(load<f32>(factors + (<usize>t << 2), 12));
    for (let k = 0; k < d4; k += 4) {
      const at = row + (<usize>k << 2);
      const r0 = f32x4.mul(v128.load(at), f0);
      const r1 = f32x4.mul(v128.load(at + rowBytes), f1);
      const r2 = f32x4.mul(v128.load(at + 2 * rowBytes), f2);
      const r3 = f32x4.mul(v128.load(at + 3 * rowBytes), f3);
      const a = v128.shuffle<f32>(r0, r1, 0, 4, 1, 5);
      const b = v128.shuffle<f32>(r0, r1, 2, 6, 3, 7);
      const c = v128.shuffle<f32>(r2, r3, 0, 4, 1, 5);
      const e = v128.shuffle<f32>(r2, r3, 2, 6, 3, 7);
      const out = dst + <usize>k * dstRow + (<usize>t << 2);
      v128.store(out, v128.shuffle<f32>(a, c, 0, 1, 4, 5));
      v128.store(out + dstRow, v128.shuffle<f32>(a, c, 2, 3, 6, 7));
      v128.store(out + 2 * dstRow, v128.shuffle<f32>(b, e, 0, 1, 4, 5));
      v128.store(out + 3 * dstRow, v128.shuffle<f32>(b, e, 2, 3, 6, 7));
    }
    for (let k = d4; k < d; k++)
      for (let i = 0; i < 4; i++) {
        const f = load<f32>(factors + (<usize>(t + i) << 2));
        store<f32>(dst + <usize>k * dstRow + (<usize>(t + i) << 2), load<f32>(row + <usize>i * rowBytes + (<usize>k << 2)) * f);
      }
  }
  for (let t = n4; t < n; t++) {
    const row = src + <usize>t * rowBytes;
    const f = load<f32>(factors + (<usize>t << 2));
    let at = dst + (<usize>t << 2);
    for (let k = 0; k < d; k++) {
      store<f32>(at, load<f32>(row + (<usize>k << 2)) * f);
      at += dstRow;
    }
  }
  if (nPad > n)
    for (let k = 0; k < d; k++) memory.fill(dst + <usize>k * dstRow + (<usize>n << 2), 0, <usize>(nPad - n) << 2);
}

/**
 * Value rows into 8-column panels: panel p row t = src[t][c0 + 8p .. c0 + 8p + 8), zero past c1.
 * src rows are dv floats apart; panels are panelFloats floats apart; nc (a multiple of 8) columns.
 * Returns 1 when a packed value is NaN or infinite (x − x is 0 for every finite x), else 0.
 */
export function packPanels(src: usize, n: i32, dv: i32, c0: i32, c1: i32, nc: i32, dst: usize, panelFloats: i32): i32 {
  const rowBytes = <usize>dv << 2;
  const panelBytes = <usize>panelFloats << 2;
  let check = f32x4.splat(0);
  let checkTail: f32 = 0;
  for (let c = 0; c < nc; c += 8) {
    const panel = dst + <usize>(c >> 3) * panelBytes;
    const first = c0 + c;
    if (first + 8 <= c1) {
      for (let t = 0; t < n; t++) {
        const from = src + <usize>t * rowBytes + (<usize>first << 2);
        const to = panel + (<usize>t << 5);
        const a = v128.load(from);
        const b = v128.load(from, 16);
        check = f32x4.add(check, f32x4.add(f32x4.sub(a, a), f32x4.sub(b, b)));
        v128.store(to, a);
        v128.store(to, b, 16);
      }
    } else {
      for (let t = 0; t < n; t++) {
        const from = src + <usize>t * rowBytes;
        const to = panel + (<usize>t << 5);
        for (let lane = 0; lane < 8; lane++) {
          const col = first + lane;
          const x: f32 = col < c1 ? load<f32>(from + (<usize>col << 2)) : 0;
          checkTail += x - x;
          store<f32>(to + (<usize>lane << 2), x);
        }
      }
    }
  }
  return v128.any_true(f32x4.ne(check, f32x4.splat(0))) || checkTail != 0 ? 1 : 0;
}

/**
 * dst row r (width floats, rows width apart) = o row r [0, width) / den[r], or zeros when den[r] is
 * not > 0 (degenerate, NaN included); returns the number of degenerate rows.
 */
export function normalizeRows(o: usize, ldO: i32, den: usize, rows: i32, width: i32, dst: usize): i32 {
  let degenerate = 0;
  const w4 = width & ~3;
  for (let r = 0; r < rows; r++) {
    const d = load<f32>(den + (<usize>r << 2));
    const from = o + ((<usize>r * <usize>ldO) << 2);
    const to = dst + ((<usize>r * <usize>width) << 2);
    if (!(d > 0)) {
      degenerate++;
      memory.fill(to, 0, <usize>width << 2);
      continue;
    }
    const inverse: f32 = <f32>1 / d;
    const s = f32x4.splat(inverse);
    for (let c = 0; c < w4; c += 4) v128.store(to + (<usize>c << 2), f32x4.mul(v128.load(from + (<usize>c << 2)), s));
    for (let c = w4; c < width; c++) store<f32>(to + (<usize>c << 2), load<f32>(from + (<usize>c << 2)) * inverse);
  }
  return degenerate;
}
