import {
  KEY_LIMIT_HELPER,
  KEY_LIMIT_UNIFORMS,
  linearIndex,
  monomial,
  POLYNOMIAL_UNIFORMS,
  type ProgramInfo,
  polynomialHelpers,
  type StorageBinding,
} from './wgsl.js';

/**
 * Every WGSL program of the backend. Layouts: a "unit" is one (batch, kv head) pair with its G =
 * H/Hkv query heads; q-like tensors are [units·G, N, ·], k-like ones [units, M, ·], so any range of
 * units is a contiguous slice (this is how work is split to fit maxStorageBufferBindingSize).
 */

const ROW_THREADS = 64;

const read = (name: string, element: StorageBinding['element'] = 'f32'): StorageBinding => ({
  name,
  access: 'read',
  element,
});
const write = (name: string, element: StorageBinding['element'] = 'f32'): StorageBinding => ({
  name,
  access: 'read_write',
  element,
});

/** Normalization modes as the kernels number them. */
export const NormalizationCode = { 'max-norm': 0, 'prefix-max-norm': 1, l2: 2, scale: 3 } as const;

/** Centers each row (unless `centered` is 0) and writes its Euclidean norm. */
export function rowNormsProgram(): ProgramInfo {
  return {
    key: 'rowNorms',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'dim', type: 'u32' },
      { name: 'centered', type: 'u32' },
    ],
    bindings: [read('source'), write('centeredRows'), write('norms')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let base = row * u.dim;
  var mean = 0.0;
  if (u.centered == 1u) {
    for (var d = 0u; d < u.dim; d++) { mean += source[base + d]; }
    mean /= f32(u.dim);
  }
  var squares = 0.0;
  for (var d = 0u; d < u.dim; d++) {
    let c = source[base + d] - mean;
    centeredRows[base + d] = c;
    squares += c * c;
  }
  norms[row] = sqrt(squares);`,
  };
}

const SCAN_THREADS = 256;

/**
 * prefix[seq, i] = max(running[seq], values[seq, 0..i]) for each of `sequences` rows of `length`
 * values, one workgroup per sequence: each invocation scans a contiguous segment, the segment maxima
 * are scanned in workgroup memory, then each segment is rescanned from its offset. `running` ends
 * holding the sequence's maximum, which is how decoding carries the prefix maxima across steps.
 */
export function prefixMaxProgram(): ProgramInfo {
  return {
    key: 'prefixMax',
    uniforms: [{ name: 'length', type: 'u32' }],
    bindings: [read('values'), write('prefix'), write('running')],
    workgroupSize: [SCAN_THREADS, 1, 1],
    declarations: `var<workgroup> segmentMax: array<f32, ${SCAN_THREADS}>;`,
    body: `
  let sequence = group.z;
  let base = sequence * u.length;
  let segment = (u.length + ${SCAN_THREADS - 1}u) / ${SCAN_THREADS}u;
  let first = min(lid.x * segment, u.length);
  let last = min(first + segment, u.length);
  var local = 0.0;
  for (var i = first; i < last; i++) { local = max(local, values[base + i]); }
  segmentMax[lid.x] = local;
  workgroupBarrier();
  for (var stride = 1u; stride < ${SCAN_THREADS}u; stride *= 2u) {
    var before = 0.0;
    if (lid.x >= stride) { before = segmentMax[lid.x - stride]; }
    workgroupBarrier();
    segmentMax[lid.x] = max(segmentMax[lid.x], before);
    workgroupBarrier();
  }
  let start = running[sequence];
  var carried = start;
  if (lid.x > 0u) { carried = max(start, segmentMax[lid.x - 1u]); }
  for (var i = first; i < last; i++) {
    carried = max(carried, values[base + i]);
    prefix[base + i] = carried;
  }
  workgroupBarrier();
  if (lid.x == 0u) { running[sequence] = max(start, segmentMax[${SCAN_THREADS - 1}u]); }`,
  };
}

const DIVISOR_HELPER = `
fn divisorOf(norm: f32) -> f32 { return select(1.0, norm, norm > 0.0); }
`;

/**
 * Per query row, the divisor of x_i and σ_i of core's prepareScores for every normalization, read
 * from the prefix maxima of the query norms (per query head) and of the key norms (per unit).
 * `keyRunning` is the key maximum before this call (decoding), used where no key is visible yet.
 */
export function queryScalesProgram(): ProgramInfo {
  return {
    key: 'queryScales',
    uniforms: [
      ...KEY_LIMIT_UNIFORMS,
      { name: 'rows', type: 'u32' },
      { name: 'G', type: 'u32' },
      { name: 'mode', type: 'u32' },
      { name: 'baseSigma', type: 'f32' },
    ],
    bindings: [
      read('queryNorms'),
      read('queryPrefix'),
      read('keyPrefix'),
      read('keyRunning'),
      read('validKeys', 'u32'),
      write('queryDivisor'),
      write('sigma'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: KEY_LIMIT_HELPER + DIVISOR_HELPER,
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let head = row / u.N;
  let i = row % u.N;
  let unit = head / u.G;
  var divisor = 1.0;
  var s = u.baseSigma;
  if (u.mode == 0u) {
    divisor = divisorOf(queryPrefix[head * u.N + u.N - 1u]);
  } else if (u.mode == 1u) {
    divisor = divisorOf(queryPrefix[row]);
    let limit = keyLimit(i, validKeys[unit]);
    var keyMax = keyRunning[unit];
    if (limit > 0u) { keyMax = keyPrefix[unit * u.M + limit - 1u]; }
    s = u.baseSigma / divisorOf(keyMax);
  } else if (u.mode == 2u) {
    divisor = divisorOf(queryNorms[row]);
  }
  queryDivisor[row] = divisor;
  sigma[row] = s;`,
  };
}

/** Per key row, the divisor of y: the head's largest valid key norm (max-norm), its own norm (l2), or 1. */
export function keyDivisorsProgram(): ProgramInfo {
  return {
    key: 'keyDivisors',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'M', type: 'u32' },
      { name: 'mode', type: 'u32' },
    ],
    bindings: [read('keyNorms'), read('keyPrefix'), read('validKeys', 'u32'), write('keyDivisor')],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: DIVISOR_HELPER,
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let unit = row / u.M;
  let valid = validKeys[unit];
  var divisor = 1.0;
  if (u.mode == 0u && valid > 0u) { divisor = divisorOf(keyPrefix[unit * u.M + valid - 1u]); }
  if (u.mode == 2u) { divisor = divisorOf(keyNorms[row]); }
  keyDivisor[row] = divisor;`,
  };
}

/** rows[r] /= divisor[r], in place. */
export function divideRowsProgram(): ProgramInfo {
  return {
    key: 'divideRows',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'dim', type: 'u32' },
    ],
    bindings: [write('values'), read('divisor')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let inverse = 1.0 / divisor[row];
  for (var d = 0u; d < u.dim; d++) { values[row * u.dim + d] = values[row * u.dim + d] * inverse; }`,
  };
}

/**
 * Feature table: per packed feature three u32s, the indices (four 8-bit fields), the degree and the
 * bits of its multinomial weight.
 */
const FEATURE_READ = `
    let packed = features[3u * f];
    let degree = features[3u * f + 1u];
    let weight = bitcast<f32>(features[3u * f + 2u]);`;

/**
 * Register tiling of the two matrix products (moments and query apply): a 16×16 workgroup computes
 * a 64×64 output tile, 4×4 per invocation, stepping through the reduction 16 at a time with both
 * factors staged in workgroup memory (8 KiB). The denominator column (the "1" of [v | 1]) is not a
 * 65th column padded to a second tile: every invocation also keeps its rows' sums and the column-0
 * tile's first lane writes them.
 */
const MICRO = 4;
const BLOCK = 16;
const OUTER = 16 * MICRO;

/**
 * Moments S[unit, f, c] += Σ_j w_f y_j^m [v_j | 1]_c over keys j in [j0, j1) below the unit's valid
 * count; the left factor (the features of 16 keys) is built in workgroup memory from y on the fly.
 * Grid: (ceil(F/64), ceil(Dv/64), units).
 */
export function momentsProgram(): ProgramInfo {
  return {
    key: 'moments',
    uniforms: [
      { name: 'F', type: 'u32' },
      { name: 'M', type: 'u32' },
      { name: 'D', type: 'u32' },
      { name: 'Dv', type: 'u32' },
      { name: 'j0', type: 'u32' },
      { name: 'j1', type: 'u32' },
    ],
    bindings: [read('features', 'u32'), read('y'), read('v'), read('validKeys', 'u32'), write('S')],
    workgroupSize: [16, 16, 1],
    declarations: `
var<workgroup> featureTile: array<f32, ${BLOCK * OUTER}>;
var<workgroup> valueTile: array<f32, ${BLOCK * OUTER}>;
var<workgroup> sharedValid: u32;
`,
    body: `
  let unit = group.z;
  let featureBase = group.x * ${OUTER}u;
  let columnBase = group.y * ${OUTER}u;
  let lane = lid.y * 16u + lid.x;
  if (lane == 0u) { sharedValid = validKeys[unit]; }
  let end = min(u.j1, workgroupUniformLoad(&sharedValid));
  var total: array<array<f32, ${MICRO}>, ${MICRO}>;
  var sums: array<f32, ${MICRO}>;
  for (var start = u.j0; start < end; start += ${BLOCK}u) {
    for (var e = lane; e < ${BLOCK * OUTER}u; e += 256u) {
      let t = e / ${OUTER}u;
      let j = start + t;
      let f = featureBase + e % ${OUTER}u;
      var phi = 0.0;
      if (j < end && f < u.F) {${FEATURE_READ}
        ${monomial('y', '(unit * u.M + j) * u.D', 'packed', 'degree', 'product')}
        phi = weight * product;
      }
      featureTile[e] = phi;
      let c = columnBase + e % ${OUTER}u;
      var value = 0.0;
      if (j < end && c < u.Dv) { value = v[(unit * u.M + j) * u.Dv + c]; }
      valueTile[e] = value;
    }
    workgroupBarrier();
    for (var t = 0u; t < ${BLOCK}u; t++) {
      var a: array<f32, ${MICRO}>;
      var b: array<f32, ${MICRO}>;
      for (var r = 0u; r < ${MICRO}u; r++) {
        a[r] = featureTile[t * ${OUTER}u + lid.y * ${MICRO}u + r];
        b[r] = valueTile[t * ${OUTER}u + lid.x * ${MICRO}u + r];
      }
      for (var r = 0u; r < ${MICRO}u; r++) {
        sums[r] += a[r];
        for (var c = 0u; c < ${MICRO}u; c++) { total[r][c] += a[r] * b[c]; }
      }
    }
    workgroupBarrier();
  }
  let columns = u.Dv + 1u;
  for (var r = 0u; r < ${MICRO}u; r++) {
    let f = featureBase + lid.y * ${MICRO}u + r;
    if (f >= u.F) { continue; }
    let rowAt = (unit * u.F + f) * columns;
    for (var c = 0u; c < ${MICRO}u; c++) {
      let column = columnBase + lid.x * ${MICRO}u + c;
      if (column < u.Dv) { S[rowAt + column] = S[rowAt + column] + total[r][c]; }
    }
    if (group.y == 0u && lid.x == 0u) { S[rowAt + u.Dv] = S[rowAt + u.Dv] + sums[r]; }
  }`,
  };
}

/**
 * Query side: acc[row, c] = Σ_f a_l σ_i^l x_i^m S[unit, f, c] for rows [i0, i1) of every query head
 * (overwrites acc), the query features built in workgroup memory. Grid: (ceil((i1-i0)/64),
 * ceil(Dv/64), query heads).
 */
export function applyProgram(): ProgramInfo {
  return {
    key: 'apply',
    uniforms: [
      { name: 'N', type: 'u32' },
      { name: 'F', type: 'u32' },
      { name: 'D', type: 'u32' },
      { name: 'Dv', type: 'u32' },
      { name: 'G', type: 'u32' },
      { name: 'i0', type: 'u32' },
      { name: 'i1', type: 'u32' },
      ...POLYNOMIAL_UNIFORMS,
    ],
    bindings: [read('features', 'u32'), read('x'), read('sigma'), read('S'), write('acc')],
    workgroupSize: [16, 16, 1],
    declarations: `
var<workgroup> featureTile: array<f32, ${BLOCK * OUTER}>;
var<workgroup> momentTile: array<f32, ${BLOCK * OUTER}>;
var<workgroup> sumTile: array<f32, ${BLOCK}>;
${polynomialHelpers(4)}`,
    body: `
  let head = group.z;
  let unit = head / u.G;
  let rowBase = u.i0 + group.x * ${OUTER}u;
  let columnBase = group.y * ${OUTER}u;
  let lane = lid.y * 16u + lid.x;
  let columns = u.Dv + 1u;
  var total: array<array<f32, ${MICRO}>, ${MICRO}>;
  var sums: array<f32, ${MICRO}>;
  for (var start = 0u; start < u.F; start += ${BLOCK}u) {
    for (var e = lane; e < ${BLOCK * OUTER}u; e += 256u) {
      let t = e / ${OUTER}u;
      let f = start + t;
      let row = rowBase + e % ${OUTER}u;
      var phi = 0.0;
      if (row < u.i1 && f < u.F) {${FEATURE_READ}
        ${monomial('x', '(head * u.N + row) * u.D', 'packed', 'degree', 'product')}
        phi = coefficient(degree) * pow(sigma[head * u.N + row], f32(degree)) * product;
        if (degree == 0u) { phi = coefficient(0u); }
      }
      featureTile[e] = phi;
      let c = columnBase + e % ${OUTER}u;
      var moment = 0.0;
      if (f < u.F && c < u.Dv) { moment = S[(unit * u.F + f) * columns + c]; }
      momentTile[e] = moment;
    }
    if (lane < ${BLOCK}u) {
      var sum = 0.0;
      if (start + lane < u.F) { sum = S[(unit * u.F + start + lane) * columns + u.Dv]; }
      sumTile[lane] = sum;
    }
    workgroupBarrier();
    for (var t = 0u; t < ${BLOCK}u; t++) {
      var a: array<f32, ${MICRO}>;
      var b: array<f32, ${MICRO}>;
      for (var r = 0u; r < ${MICRO}u; r++) {
        a[r] = featureTile[t * ${OUTER}u + lid.y * ${MICRO}u + r];
        b[r] = momentTile[t * ${OUTER}u + lid.x * ${MICRO}u + r];
      }
      let sum = sumTile[t];
      for (var r = 0u; r < ${MICRO}u; r++) {
        sums[r] += a[r] * sum;
        for (var c = 0u; c < ${MICRO}u; c++) { total[r][c] += a[r] * b[c]; }
      }
    }
    workgroupBarrier();
  }
  for (var r = 0u; r < ${MICRO}u; r++) {
    let row = rowBase + lid.y * ${MICRO}u + r;
    if (row >= u.i1) { continue; }
    let rowAt = (head * u.N + row) * columns;
    for (var c = 0u; c < ${MICRO}u; c++) {
      let column = columnBase + lid.x * ${MICRO}u + c;
      if (column < u.Dv) { acc[rowAt + column] = total[r][c]; }
    }
    if (group.y == 0u && lid.x == 0u) { acc[rowAt + u.Dv] = sums[r]; }
  }`,
  };
}

/** Output tile edge of the moments and apply kernels (grid sizes are counted in these). */
export const PRODUCT_TILE = OUTER;

/** Needs the `chunk` uniform besides KEY_LIMIT_UNIFORMS. */
const CHUNK_START_HELPER = `
fn chunkStart(i: u32) -> u32 {
  if (u.chunk == 0u) { return 0u; }
  // stateKeyEnd of core's chunkRanges: the keys before the chunk's diagonal block.
  let reach = i32((i / u.chunk) * u.chunk) + i32(u.M) - i32(u.N);
  return u32(clamp(reach, 0, i32(u.M)));
}
`;

/** Keys held in workgroup memory by the direct kernel, within maxComputeWorkgroupStorageSize. */
export function directKeyTile(headDim: number, valueDim: number, workgroupStorage: number): number {
  const perKey = (headDim + valueDim) * 4;
  let tile = 32;
  while (tile > 1 && tile * perKey + 64 > workgroupStorage) tile >>= 1;
  return tile;
}

/**
 * f(s) evaluated directly, one invocation per query row, keys streamed through workgroup memory:
 * acc[row] (+)= Σ_{j in [start_i, keyLimit_i)} f(σ_i x_i·y_j) [v_j | 1]. `chunk` = 0 means every key
 * from 0 (the direct path); otherwise start_i is the first key after the moment state of query i's
 * chunk (the intra-chunk block of the causal factorized algorithm).
 */
export function directProgram(headDim: number, valueDim: number, keyTile: number): ProgramInfo {
  return {
    key: `direct:D${headDim}:Dv${valueDim}:T${keyTile}`,
    uniforms: [
      ...KEY_LIMIT_UNIFORMS,
      { name: 'D', type: 'u32' },
      { name: 'DV', type: 'u32' },
      { name: 'G', type: 'u32' },
      { name: 'chunk', type: 'u32' },
      { name: 'accumulate', type: 'u32' },
      ...POLYNOMIAL_UNIFORMS,
    ],
    bindings: [read('x'), read('sigma'), read('y'), read('v'), read('validKeys', 'u32'), write('acc')],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: `
const KT = ${keyTile}u;
const BD = ${headDim}u;
const BDV = ${valueDim}u;
var<workgroup> keyTile: array<f32, ${keyTile * headDim}>;
var<workgroup> valueTile: array<f32, ${keyTile * valueDim}>;
var<workgroup> sharedValid: u32;
${KEY_LIMIT_HELPER}
${polynomialHelpers(4)}
${CHUNK_START_HELPER}`,
    body: `
  // Tiles are laid out with the bucket's stride and zero-padded past D and Dv, so the inner loops
  // run over compile-time bounds (BD, BDV) and unroll; the padding adds exact zeros.
  let D = u.D;
  let DV = u.DV;
  let head = group.z;
  let unit = head / u.G;
  let firstRow = group.x * ${ROW_THREADS}u;
  let lastRow = min(firstRow + ${ROW_THREADS}u, u.N) - 1u;
  let i = firstRow + lid.x;
  let rowActive = i < u.N;
  if (lid.x == 0u) { sharedValid = validKeys[unit]; }
  let valid = workgroupUniformLoad(&sharedValid);
  let low = chunkStart(firstRow);
  let high = keyLimit(lastRow, valid);
  var start = 0u;
  var limit = 0u;
  var s = 0.0;
  var xi: array<f32, BD>;
  if (rowActive) {
    start = chunkStart(i);
    limit = keyLimit(i, valid);
    s = sigma[head * u.N + i];
    for (var d = 0u; d < D; d++) { xi[d] = x[(head * u.N + i) * D + d]; }
  }
  var numerator: array<f32, BDV>;
  var denominator = 0.0;
  for (var tileStart = low; tileStart < high; tileStart += KT) {
    for (var e = lid.x; e < KT * BD; e += ${ROW_THREADS}u) {
      let j = tileStart + e / BD;
      let d = e % BD;
      var value = 0.0;
      if (j < high && d < D) { value = y[(unit * u.M + j) * D + d]; }
      keyTile[e] = value;
    }
    for (var e = lid.x; e < KT * BDV; e += ${ROW_THREADS}u) {
      let j = tileStart + e / BDV;
      let c = e % BDV;
      var value = 0.0;
      if (j < high && c < DV) { value = v[(unit * u.M + j) * DV + c]; }
      valueTile[e] = value;
    }
    workgroupBarrier();
    for (var t = 0u; t < KT; t++) {
      let j = tileStart + t;
      if (rowActive && j >= start && j < limit) {
        var dot = 0.0;
        for (var d = 0u; d < BD; d++) { dot += xi[d] * keyTile[t * BD + d]; }
        let w = poly(s * dot);
        denominator += w;
        for (var c = 0u; c < BDV; c++) { numerator[c] += w * valueTile[t * BDV + c]; }
      }
    }
    workgroupBarrier();
  }
  if (rowActive) {
    let base = (head * u.N + i) * (DV + 1u);
    if (u.accumulate == 1u) {
      for (var c = 0u; c < DV; c++) { acc[base + c] = acc[base + c] + numerator[c]; }
      acc[base + DV] = acc[base + DV] + denominator;
    } else {
      for (var c = 0u; c < DV; c++) { acc[base + c] = numerator[c]; }
      acc[base + DV] = denominator;
    }
  }`,
  };
}

/** o = numerator / denominator, or 0 (and counted) where the denominator is <= 0. */
export function normalizeProgram(): ProgramInfo {
  return {
    key: 'normalize',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'Dv', type: 'u32' },
    ],
    bindings: [read('acc'), write('output'), write('denominators'), write('degenerate', 'atomic<u32>')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let base = row * (u.Dv + 1u);
  let denominator = acc[base + u.Dv];
  denominators[row] = denominator;
  if (denominator > 0.0) {
    let inverse = 1.0 / denominator;
    for (var c = 0u; c < u.Dv; c++) { output[row * u.Dv + c] = acc[base + c] * inverse; }
  } else {
    for (var c = 0u; c < u.Dv; c++) { output[row * u.Dv + c] = 0.0; }
    atomicAdd(&degenerate[0], 1u);
  }`,
  };
}

const BACKWARD_UNIFORMS = [
  ...KEY_LIMIT_UNIFORMS,
  { name: 'D', type: 'u32' as const },
  { name: 'DV', type: 'u32' as const },
  { name: 'G', type: 'u32' as const },
  { name: 'rows', type: 'u32' as const },
  ...POLYNOMIAL_UNIFORMS,
];

/**
 * Backward, query side (direct form). A first pass over the row's keys recomputes den_i and
 * o_i = Σ_j (w_ij/den_i) v_j in this kernel, so that with one visible key o_i is v_j exactly and the
 * gradients cancel to exactly 0, as in float64. Then, with g_ij = (dO_i·v_j − δ_i)/den_i
 * (δ_i = dO_i·o_i) and ds_ij = g_ij f'(s_ij): dx_i = σ_i Σ_j ds_ij y_j and dσ_i = Σ_j ds_ij x_i·y_j.
 * den_i and δ_i are written for the key side. Degenerate rows (den <= 0) contribute nothing.
 */
export function backwardQueryProgram(headDim: number, valueDim: number): ProgramInfo {
  return {
    key: `backwardQuery:D${headDim}:Dv${valueDim}`,
    uniforms: BACKWARD_UNIFORMS,
    bindings: [
      read('x'),
      read('sigma'),
      read('y'),
      read('v'),
      read('validKeys', 'u32'),
      read('dOut'),
      write('dx'),
      write('dsigma'),
      write('delta'),
      write('denominators'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: `
${KEY_LIMIT_HELPER}
${polynomialHelpers(4)}`,
    body: `
  let D = u.D;
  let DV = u.DV;
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let head = row / u.N;
  let i = row % u.N;
  let unit = head / u.G;
  let s = sigma[row];
  let limit = keyLimit(i, validKeys[unit]);
  var den = 0.0;
  for (var j = 0u; j < limit; j++) {
    let key = unit * u.M + j;
    var dot = 0.0;
    for (var d = 0u; d < D; d++) { dot += x[row * D + d] * y[key * D + d]; }
    den += poly(s * dot);
  }
  var gradX: array<f32, ${headDim}>;
  var gradSigma = 0.0;
  var rowDelta = 0.0;
  if (den > 0.0) {
    var o: array<f32, ${valueDim}>;
    for (var j = 0u; j < limit; j++) {
      let key = unit * u.M + j;
      var dot = 0.0;
      for (var d = 0u; d < D; d++) { dot += x[row * D + d] * y[key * D + d]; }
      let p = poly(s * dot) / den;
      for (var c = 0u; c < DV; c++) { o[c] += p * v[key * DV + c]; }
    }
    for (var c = 0u; c < DV; c++) { rowDelta += dOut[row * DV + c] * o[c]; }
    for (var j = 0u; j < limit; j++) {
      let key = unit * u.M + j;
      var dot = 0.0;
      for (var d = 0u; d < D; d++) { dot += x[row * D + d] * y[key * D + d]; }
      var dov = 0.0;
      for (var c = 0u; c < DV; c++) { dov += dOut[row * DV + c] * v[key * DV + c]; }
      let ds = (dov - rowDelta) / den * polySlope(s * dot);
      gradSigma += ds * dot;
      for (var d = 0u; d < D; d++) { gradX[d] += ds * s * y[key * D + d]; }
    }
  }
  for (var d = 0u; d < D; d++) { dx[row * D + d] = gradX[d]; }
  dsigma[row] = gradSigma;
  delta[row] = rowDelta;
  denominators[row] = den;`,
  };
}

/**
 * Backward, key side (direct form): per key row j of a unit, over every query head of the unit and
 * every query row that sees j: dv_j = Σ (w_ij/den_i) dO_i and dy_j = Σ ds_ij σ_i x_i.
 */
export function backwardKeyProgram(headDim: number, valueDim: number): ProgramInfo {
  return {
    key: `backwardKey:D${headDim}:Dv${valueDim}`,
    uniforms: BACKWARD_UNIFORMS,
    bindings: [
      read('x'),
      read('sigma'),
      read('y'),
      read('v'),
      read('validKeys', 'u32'),
      read('denominators'),
      read('dOut'),
      read('delta'),
      write('dy'),
      write('dv'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: `
${KEY_LIMIT_HELPER}
${polynomialHelpers(4)}`,
    body: `
  let D = u.D;
  let DV = u.DV;
  let key = ${linearIndex(ROW_THREADS)};
  if (key >= u.rows) { return; }
  let unit = key / u.M;
  let j = key % u.M;
  let valid = validKeys[unit];
  var gradY: array<f32, ${headDim}>;
  var gradV: array<f32, ${valueDim}>;
  if (j < valid) {
    for (var r = 0u; r < u.G; r++) {
      let head = unit * u.G + r;
      for (var i = 0u; i < u.N; i++) {
        if (j >= keyLimit(i, valid)) { continue; }
        let row = head * u.N + i;
        let den = denominators[row];
        if (den <= 0.0) { continue; }
        let s = sigma[row];
        var dot = 0.0;
        for (var d = 0u; d < D; d++) { dot += x[row * D + d] * y[key * D + d]; }
        let p = poly(s * dot) / den;
        var dov = 0.0;
        for (var c = 0u; c < DV; c++) {
          dov += dOut[row * DV + c] * v[key * DV + c];
          gradV[c] += p * dOut[row * DV + c];
        }
        let ds = (dov - delta[row]) / den * polySlope(s * dot);
        for (var d = 0u; d < D; d++) { gradY[d] += ds * s * x[row * D + d]; }
      }
    }
  }
  for (var d = 0u; d < D; d++) { dy[key * D + d] = gradY[d]; }
  for (var c = 0u; c < DV; c++) { dv[key * DV + c] = gradV[c]; }`,
  };
}

/**
 * Factorized backward, per query row: upstream_i = [dO_i/den_i | −δ_i/den_i] (δ_i = dO_i·o_i) from
 * the forward's accumulator, so that g_ij = dL/dw_ij = upstream_i·[v_j | 1] is a dot product with a
 * key row's [v_j | 1]. Degenerate rows (den <= 0) get zeros and so contribute nothing.
 */
export function backwardUpstreamProgram(): ProgramInfo {
  return {
    key: 'backwardUpstream',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'Dv', type: 'u32' },
    ],
    bindings: [read('acc'), read('dOut'), write('upstream')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let base = row * (u.Dv + 1u);
  let den = acc[base + u.Dv];
  if (den > 0.0) {
    let inverse = 1.0 / den;
    var delta = 0.0;
    for (var c = 0u; c < u.Dv; c++) { delta += dOut[row * u.Dv + c] * acc[base + c]; }
    for (var c = 0u; c < u.Dv; c++) { upstream[base + c] = dOut[row * u.Dv + c] * inverse; }
    upstream[base + u.Dv] = -delta * inverse * inverse;
  } else {
    for (var c = 0u; c <= u.Dv; c++) { upstream[base + c] = 0.0; }
  }`,
  };
}

/** scaled[r] = values[r] · scale[r] (σ_i x_i: the query features of the key-side moments carry σ_i^l). */
export function scaleRowsProgram(): ProgramInfo {
  return {
    key: 'scaleRows',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'dim', type: 'u32' },
    ],
    bindings: [read('values'), read('scale'), write('scaled')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let factor = scale[row];
  for (var d = 0u; d < u.dim; d++) { scaled[row * u.dim + d] = values[row * u.dim + d] * factor; }`,
  };
}

/**
 * Factorized backward through one side's features. A row r (a query row with its σ_r, or a key row
 * with σ = 1) has features φ_f = a_l σ^l z_r^m; the other side is summarized by moments
 * Mom[block, f, c] (the multinomial weight inside), c over Dv+1 columns at `stride`. With
 * G_f = upstream_r · Mom[f] (dL/dφ_f): gradZ += Σ_f G_f ∂φ_f/∂z, gradSigma += Σ_f G_f ∂φ_f/∂σ and,
 * when `withValues` is 1, values += Σ_f φ_f Mom[f, 0..Dv). Queries read S over keys (upstream is
 * the query's, giving dx, dσ); keys read T over queries (upstream is [v_j | 1], giving dy, dv).
 * Rows [r0, r1) of each owner (R rows per owner); owner o reads blocks (o / divisor)·count + g for
 * g < count (a query head reads its unit's S; a unit sums its query heads' T). Accumulates.
 */
export function featureGradientProgram(headDim: number, valueDim: number): ProgramInfo {
  return {
    key: `featureGradient:D${headDim}:Dv${valueDim}`,
    uniforms: [
      { name: 'owners', type: 'u32' },
      { name: 'R', type: 'u32' },
      { name: 'r0', type: 'u32' },
      { name: 'r1', type: 'u32' },
      { name: 'limitRows', type: 'u32' },
      { name: 'unitSigma', type: 'u32' },
      { name: 'D', type: 'u32' },
      { name: 'Dv', type: 'u32' },
      { name: 'F', type: 'u32' },
      { name: 'stride', type: 'u32' },
      { name: 'divisor', type: 'u32' },
      { name: 'count', type: 'u32' },
      { name: 'withValues', type: 'u32' },
      ...POLYNOMIAL_UNIFORMS,
    ],
    bindings: [
      read('features', 'u32'),
      read('z'),
      read('sigma'),
      read('upstream'),
      read('validKeys', 'u32'),
      read('moments'),
      write('gradZ'),
      write('gradSigma'),
      write('values'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: `
${polynomialHelpers(4)}
fn featureIndex(packed: u32, t: u32) -> u32 { return (packed >> (8u * t)) & 0xffu; }`,
    body: `
  let D = u.D;
  let DV = u.Dv;
  let span = u.r1 - u.r0;
  let slot = ${linearIndex(ROW_THREADS)};
  if (span == 0u || slot >= u.owners * span) { return; }
  let owner = slot / span;
  let r = u.r0 + slot % span;
  if (u.limitRows == 1u && r >= validKeys[owner]) { return; }
  let row = owner * u.R + r;
  var s = 1.0;
  if (u.unitSigma == 0u) { s = sigma[row]; }
  var zi: array<f32, ${headDim}>;
  for (var d = 0u; d < D; d++) { zi[d] = z[row * D + d]; }
  var up: array<f32, ${valueDim}>;
  for (var c = 0u; c < DV; c++) { up[c] = upstream[row * (DV + 1u) + c]; }
  let upLast = upstream[row * (DV + 1u) + DV];
  var gradRow: array<f32, ${headDim}>;
  var valueSum: array<f32, ${valueDim}>;
  var gs = 0.0;
  for (var g = 0u; g < u.count; g++) {
    let momentBlock = (owner / u.divisor) * u.count + g;
    for (var f = 0u; f < u.F; f++) {
      let packed = features[3u * f];
      let degree = features[3u * f + 1u];
      let at = (momentBlock * u.F + f) * u.stride;
      var slope = upLast * moments[at + DV];
      for (var c = 0u; c < DV; c++) { slope += up[c] * moments[at + c]; }
      var below = 1.0;
      for (var t = 1u; t < degree; t++) { below *= s; }
      var power = 1.0;
      if (degree > 0u) { power = below * s; }
      let scaled = coefficient(degree) * power;
      var product = 1.0;
      for (var t = 0u; t < degree; t++) { product *= zi[featureIndex(packed, t)]; }
      if (u.withValues == 1u) {
        let phi = scaled * product;
        for (var c = 0u; c < DV; c++) { valueSum[c] += phi * moments[at + c]; }
      }
      if (degree > 0u) {
        gs += slope * coefficient(degree) * f32(degree) * below * product;
        for (var t = 0u; t < degree; t++) {
          var others = 1.0;
          for (var t2 = 0u; t2 < degree; t2++) {
            if (t2 != t) { others *= zi[featureIndex(packed, t2)]; }
          }
          let d = featureIndex(packed, t);
          gradRow[d] += slope * scaled * others;
        }
      }
    }
  }
  for (var d = 0u; d < D; d++) { gradZ[row * D + d] = gradZ[row * D + d] + gradRow[d]; }
  gradSigma[row] = gradSigma[row] + gs;
  if (u.withValues == 1u) {
    for (var c = 0u; c < DV; c++) { values[row * DV + c] = values[row * DV + c] + valueSum[c]; }
  }`,
  };
}

const BLOCK_UNIFORMS = [...BACKWARD_UNIFORMS, { name: 'chunk', type: 'u32' as const }];

/**
 * Causal factorized backward, query side of the diagonal blocks: for keys j in
 * [chunkStart(i), keyLimit_i), ds_ij = (upstream_i·[v_j | 1]) f'(s_ij); dx_i += σ_i Σ ds_ij y_j and
 * dσ_i += Σ ds_ij x_i·y_j (the keys before chunkStart came through the moments).
 */
export function blockQueryProgram(headDim: number, valueDim: number): ProgramInfo {
  return {
    key: `blockQuery:D${headDim}:Dv${valueDim}`,
    uniforms: BLOCK_UNIFORMS,
    bindings: [
      read('x'),
      read('sigma'),
      read('y'),
      read('v'),
      read('validKeys', 'u32'),
      read('upstream'),
      write('dx'),
      write('dsigma'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: `
${KEY_LIMIT_HELPER}
${polynomialHelpers(4)}
${CHUNK_START_HELPER}`,
    body: `
  let D = u.D;
  let DV = u.DV;
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let head = row / u.N;
  let i = row % u.N;
  let unit = head / u.G;
  let s = sigma[row];
  let limit = keyLimit(i, validKeys[unit]);
  var xi: array<f32, ${headDim}>;
  for (var d = 0u; d < D; d++) { xi[d] = x[row * D + d]; }
  var up: array<f32, ${valueDim}>;
  for (var c = 0u; c < DV; c++) { up[c] = upstream[row * (DV + 1u) + c]; }
  let upLast = upstream[row * (DV + 1u) + DV];
  var gradX: array<f32, ${headDim}>;
  var gradSigma = 0.0;
  for (var j = chunkStart(i); j < limit; j++) {
    let key = unit * u.M + j;
    var dot = 0.0;
    for (var d = 0u; d < D; d++) { dot += xi[d] * y[key * D + d]; }
    var g = upLast;
    for (var c = 0u; c < DV; c++) { g += up[c] * v[key * DV + c]; }
    let ds = g * polySlope(s * dot);
    gradSigma += ds * dot;
    for (var d = 0u; d < D; d++) { gradX[d] += ds * s * y[key * D + d]; }
  }
  for (var d = 0u; d < D; d++) { dx[row * D + d] = dx[row * D + d] + gradX[d]; }
  dsigma[row] = dsigma[row] + gradSigma;`,
  };
}

/**
 * Causal factorized backward, key side of the diagonal blocks: key j gets the query rows i with
 * chunkStart(i) <= j < keyLimit_i, at most one chunk of them per query head: dv_j += Σ w_ij
 * upstream_i[0..Dv) and dy_j += Σ ds_ij σ_i x_i.
 */
export function blockKeyProgram(headDim: number, valueDim: number): ProgramInfo {
  return {
    key: `blockKey:D${headDim}:Dv${valueDim}`,
    uniforms: BLOCK_UNIFORMS,
    bindings: [
      read('x'),
      read('sigma'),
      read('y'),
      read('v'),
      read('validKeys', 'u32'),
      read('upstream'),
      write('dy'),
      write('dv'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: `
${KEY_LIMIT_HELPER}
${polynomialHelpers(4)}
${CHUNK_START_HELPER}`,
    body: `
  let D = u.D;
  let DV = u.DV;
  let key = ${linearIndex(ROW_THREADS)};
  if (key >= u.rows) { return; }
  let unit = key / u.M;
  let j = key % u.M;
  let valid = validKeys[unit];
  if (j >= valid || u.chunk == 0u) { return; }
  // keyLimit_i > j from i >= j + N - M; chunkStart(i) <= j up to the end of that query's chunk.
  let reach = i32(j) + i32(u.N) - i32(u.M);
  if (reach < 0) { return; }
  let first = u32(reach);
  let last = min(u.N, (first / u.chunk + 1u) * u.chunk);
  var yj: array<f32, ${headDim}>;
  for (var d = 0u; d < D; d++) { yj[d] = y[key * D + d]; }
  var vj: array<f32, ${valueDim}>;
  for (var c = 0u; c < DV; c++) { vj[c] = v[key * DV + c]; }
  var gradY: array<f32, ${headDim}>;
  var gradV: array<f32, ${valueDim}>;
  for (var r = 0u; r < u.G; r++) {
    let head = unit * u.G + r;
    for (var i = first; i < last; i++) {
      if (j >= keyLimit(i, valid) || j < chunkStart(i)) { continue; }
      let row = head * u.N + i;
      let s = sigma[row];
      var dot = 0.0;
      for (var d = 0u; d < D; d++) { dot += x[row * D + d] * yj[d]; }
      let w = poly(s * dot);
      var g = upstream[row * (DV + 1u) + DV];
      for (var c = 0u; c < DV; c++) {
        let weight = upstream[row * (DV + 1u) + c];
        g += weight * vj[c];
        gradV[c] += w * weight;
      }
      let ds = g * polySlope(s * dot);
      for (var d = 0u; d < D; d++) { gradY[d] += ds * s * x[row * D + d]; }
    }
  }
  for (var d = 0u; d < D; d++) { dy[key * D + d] = dy[key * D + d] + gradY[d]; }
  for (var c = 0u; c < DV; c++) { dv[key * DV + c] = dv[key * DV + c] + gradV[c]; }`,
  };
}

/** Private and workgroup arrays are sized by the head dim rounded up to one of these. */
export const DIM_BUCKETS = [8, 16, 32, 64, 128, 256] as const;

export function dimBucket(dim: number): number {
  for (const bucket of DIM_BUCKETS) if (dim <= bucket) return bucket;
  throw new Error(`head dim ${dim} exceeds ${DIM_BUCKETS[DIM_BUCKETS.length - 1]}`);
}

/**
 * float16 storage: converts `count` values between an f32 and an f16 array, each at its own element
 * offset (so a slice of units needs no byte alignment). Compute always runs in f32.
 */
export function convertProgram(to: 'f16' | 'f32'): ProgramInfo {
  const from = to === 'f16' ? 'f32' : 'f16';
  return {
    key: `convert:${to}`,
    enables: ['f16'],
    uniforms: [
      { name: 'count', type: 'u32' },
      { name: 'sourceOffset', type: 'u32' },
      { name: 'targetOffset', type: 'u32' },
    ],
    bindings: [read('source', from), write('destination', to)],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let index = ${linearIndex(ROW_THREADS)};
  if (index >= u.count) { return; }
  destination[u.targetOffset + index] = ${to}(source[u.sourceOffset + index]);`,
  };
}

/** The argmax of no row (core's -1): every norm seen so far is 0. */
const NO_INDEX = '0xffffffffu';

/**
 * Backward of the normalization chain, step 1: argmax[seq, i] = the lowest index of the largest
 * value in values[seq, 0..i], or none while every value is 0: core's strict `>` scan, run serially
 * per sequence so the tie rule (lowest index) and the zero rule are literally core's.
 */
export function argmaxScanProgram(): ProgramInfo {
  return {
    key: 'argmaxScan',
    uniforms: [
      { name: 'sequences', type: 'u32' },
      { name: 'length', type: 'u32' },
    ],
    bindings: [read('values'), write('argmax', 'u32')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let sequence = ${linearIndex(ROW_THREADS)};
  if (sequence >= u.sequences) { return; }
  let base = sequence * u.length;
  var best = 0.0;
  var index = ${NO_INDEX};
  for (var i = 0u; i < u.length; i++) {
    let value = values[base + i];
    if (value > best) {
      best = value;
      index = i;
    }
    argmax[base + i] = index;
  }`,
  };
}

/**
 * Per query row, core's PreparationTrace: the query whose norm divides x_i and the key (within the
 * unit) whose norm divides y (max-norm) or scales σ_i (prefix-max-norm), read from the scans.
 */
export function traceArgmaxProgram(): ProgramInfo {
  return {
    key: 'traceArgmax',
    uniforms: [
      ...KEY_LIMIT_UNIFORMS,
      { name: 'rows', type: 'u32' },
      { name: 'G', type: 'u32' },
      { name: 'mode', type: 'u32' },
    ],
    bindings: [
      read('queryNorms'),
      read('queryScan', 'u32'),
      read('keyScan', 'u32'),
      read('validKeys', 'u32'),
      write('queryArgmax', 'u32'),
      write('keyArgmax', 'u32'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: KEY_LIMIT_HELPER,
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let head = row / u.N;
  let i = row % u.N;
  let unit = head / u.G;
  var queryIndex = ${NO_INDEX};
  var keyIndex = ${NO_INDEX};
  if (u.mode == 0u) {
    queryIndex = queryScan[head * u.N + u.N - 1u];
    let valid = validKeys[unit];
    if (valid > 0u) { keyIndex = keyScan[unit * u.M + valid - 1u]; }
  } else if (u.mode == 1u) {
    queryIndex = queryScan[row];
    let limit = keyLimit(i, validKeys[unit]);
    if (limit > 0u) { keyIndex = keyScan[unit * u.M + limit - 1u]; }
  } else if (u.mode == 2u && queryNorms[row] > 0.0) {
    queryIndex = i;
  }
  queryArgmax[row] = queryIndex;
  keyArgmax[row] = keyIndex;`,
  };
}

/** contribution[r] = −(grad_r · values_r)/divisor[r]: dL/d(divisor) of a row divided by it. */
export function divisorGradientProgram(): ProgramInfo {
  return {
    key: 'divisorGradient',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'dim', type: 'u32' },
    ],
    bindings: [read('grad'), read('values'), read('divisor'), write('contribution')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  var dot = 0.0;
  for (var d = 0u; d < u.dim; d++) { dot += grad[row * u.dim + d] * values[row * u.dim + d]; }
  contribution[row] = -dot / divisor[row];`,
  };
}

/** prefix-max-norm: σ_i = 1/(Mk_i·T), so dL/dMk_i = −dσ_i·σ_i²·T. */
export function sigmaGradientProgram(): ProgramInfo {
  return {
    key: 'sigmaGradient',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'temperature', type: 'f32' },
    ],
    bindings: [read('dsigma'), read('sigma'), write('contribution')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let s = sigma[row];
  contribution[row] = -dsigma[row] * s * s * u.temperature;`,
  };
}

/**
 * sums[seq, argmax(seq, r)] += contribution[seq, r] over r in order, one invocation per sequence:
 * the gradient of a maximum flows to its argmax row, summed in a fixed order (no float atomics, so
 * the result is deterministic). argmax(seq, r) = argmax[seq·argStride + r·argStep] (argStep 0: one
 * argmax for the whole sequence). `sums` must be zeroed.
 */
export function argmaxScatterProgram(): ProgramInfo {
  return {
    key: 'argmaxScatter',
    uniforms: [
      { name: 'sequences', type: 'u32' },
      { name: 'length', type: 'u32' },
      { name: 'targets', type: 'u32' },
      { name: 'argStride', type: 'u32' },
      { name: 'argStep', type: 'u32' },
    ],
    bindings: [read('contribution'), read('argmax', 'u32'), write('sums')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let sequence = ${linearIndex(ROW_THREADS)};
  if (sequence >= u.sequences) { return; }
  for (var r = 0u; r < u.length; r++) {
    let index = argmax[sequence * u.argStride + r * u.argStep];
    if (index != ${NO_INDEX}) {
      let slot = sequence * u.targets + index;
      sums[slot] = sums[slot] + contribution[sequence * u.length + r];
    }
  }`,
  };
}

/**
 * The rest of core's prepareScoresBackward for one side, per row r (row j of owner o, R per owner):
 * dc = grad/divisor (l2 keys, `project` 1: (grad − (grad·z) z)/divisor), plus the norm gradient
 * routed to this row, Σ_{g<count} scatter[(o·count + g)·R + j], times ∂|c|/∂c = c/|c| = z·divisor/|c|;
 * then, when `centered`, the gradient through centering (subtract the row mean).
 */
export function chainRowsProgram(): ProgramInfo {
  return {
    key: 'chainRows',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'dim', type: 'u32' },
      { name: 'R', type: 'u32' },
      { name: 'count', type: 'u32' },
      { name: 'project', type: 'u32' },
      { name: 'centered', type: 'u32' },
    ],
    bindings: [read('grad'), read('z'), read('divisor'), read('norms'), read('scatter'), write('result')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let owner = row / u.R;
  let j = row % u.R;
  let base = row * u.dim;
  let inverse = 1.0 / divisor[row];
  var projection = 0.0;
  if (u.project == 1u) {
    for (var d = 0u; d < u.dim; d++) { projection += grad[base + d] * z[base + d]; }
  }
  var routed = 0.0;
  for (var g = 0u; g < u.count; g++) { routed += scatter[(owner * u.count + g) * u.R + j]; }
  var along = 0.0;
  if (norms[row] > 0.0) { along = routed * divisor[row] / norms[row]; }
  var mean = 0.0;
  for (var d = 0u; d < u.dim; d++) {
    let value = (grad[base + d] - projection * z[base + d]) * inverse + along * z[base + d];
    result[base + d] = value;
    mean += value;
  }
  if (u.centered == 1u) {
    mean /= f32(u.dim);
    for (var d = 0u; d < u.dim; d++) { result[base + d] = result[base + d] - mean; }
  }`,
  };
}

/** rows[j] = [v_j | 1]: the key rows the factorized backward's query side dots its upstream with. */
export function valueRowsProgram(): ProgramInfo {
  return {
    key: 'valueRows',
    uniforms: [
      { name: 'rows', type: 'u32' },
      { name: 'Dv', type: 'u32' },
    ],
    bindings: [read('values'), write('extended')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  for (var c = 0u; c < u.Dv; c++) { extended[row * (u.Dv + 1u) + c] = values[row * u.Dv + c]; }
  extended[row * (u.Dv + 1u) + u.Dv] = 1.0;`,
  };
}

/** total[i] += source[i]: key-side gradients of a unit whose query heads ran in several passes. */
export function addProgram(): ProgramInfo {
  return {
    key: 'add',
    uniforms: [{ name: 'count', type: 'u32' }],
    bindings: [read('source'), write('total')],
    workgroupSize: [ROW_THREADS, 1, 1],
    body: `
  let i = ${linearIndex(ROW_THREADS)};
  if (i >= u.count) { return; }
  total[i] = total[i] + source[i];`,
  };
}
