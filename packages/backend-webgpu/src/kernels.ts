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
const TILE = 16;

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

const DIVISOR_HELPER = `
fn divisorOf(norm: f32) -> f32 { return select(1.0, norm, norm > 0.0); }
`;

/**
 * One invocation per query head scans its rows in order: the query divisor and σ of core's
 * prepareScores for every normalization. Running maxima start from (and end in) `runningQ` and
 * `runningK`, which is how a decoding state carries prefix-max-norm across steps.
 */
export function scanQueriesProgram(): ProgramInfo {
  return {
    key: 'scanQueries',
    uniforms: [
      ...KEY_LIMIT_UNIFORMS,
      { name: 'queryHeads', type: 'u32' },
      { name: 'G', type: 'u32' },
      { name: 'mode', type: 'u32' },
      { name: 'baseSigma', type: 'f32' },
    ],
    bindings: [
      read('queryNorms'),
      read('keyNorms'),
      read('validKeys', 'u32'),
      write('runningQ'),
      write('runningK'),
      write('queryDivisor'),
      write('sigma'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: KEY_LIMIT_HELPER + DIVISOR_HELPER,
    body: `
  let head = ${linearIndex(ROW_THREADS)};
  if (head >= u.queryHeads) { return; }
  let unit = head / u.G;
  let valid = validKeys[unit];
  var globalMax = 0.0;
  if (u.mode == 0u) {
    for (var i = 0u; i < u.N; i++) { globalMax = max(globalMax, queryNorms[head * u.N + i]); }
  }
  var runQ = runningQ[head];
  var runK = runningK[head];
  var scanned = 0u;
  for (var i = 0u; i < u.N; i++) {
    let row = head * u.N + i;
    let norm = queryNorms[row];
    runQ = max(runQ, norm);
    var divisor = 1.0;
    var s = u.baseSigma;
    if (u.mode == 0u) {
      divisor = divisorOf(globalMax);
    } else if (u.mode == 1u) {
      divisor = divisorOf(runQ);
      let limit = keyLimit(i, valid);
      for (; scanned < limit; scanned++) { runK = max(runK, keyNorms[unit * u.M + scanned]); }
      s = u.baseSigma / divisorOf(runK);
    } else if (u.mode == 2u) {
      divisor = divisorOf(norm);
    }
    queryDivisor[row] = divisor;
    sigma[row] = s;
  }
  runningQ[head] = runQ;
  runningK[head] = runK;`,
  };
}

/** One invocation per unit: the divisor of every key row (max over valid keys for max-norm). */
export function scanKeysProgram(): ProgramInfo {
  return {
    key: 'scanKeys',
    uniforms: [
      { name: 'units', type: 'u32' },
      { name: 'M', type: 'u32' },
      { name: 'mode', type: 'u32' },
    ],
    bindings: [read('keyNorms'), read('validKeys', 'u32'), write('keyDivisor')],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: DIVISOR_HELPER,
    body: `
  let unit = ${linearIndex(ROW_THREADS)};
  if (unit >= u.units) { return; }
  var headMax = 0.0;
  for (var j = 0u; j < validKeys[unit]; j++) { headMax = max(headMax, keyNorms[unit * u.M + j]); }
  for (var j = 0u; j < u.M; j++) {
    var divisor = 1.0;
    if (u.mode == 0u) { divisor = divisorOf(headMax); }
    if (u.mode == 2u) { divisor = divisorOf(keyNorms[unit * u.M + j]); }
    keyDivisor[unit * u.M + j] = divisor;
  }`,
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
 * Moments S[unit, f, c] += Σ_j w_f y_j^m [v_j | 1]_c over keys j in [j0, j1) below the unit's valid
 * count: a 16×16 tiled product whose left factor (the features of 16 keys) is built in workgroup
 * memory from y on the fly.
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
    workgroupSize: [TILE, TILE, 1],
    declarations: `
var<workgroup> featureTile: array<f32, ${TILE * TILE}>;
var<workgroup> valueTile: array<f32, ${TILE * TILE}>;
var<workgroup> sharedValid: u32;
`,
    body: `
  let unit = group.z;
  let featureBase = group.x * ${TILE}u;
  let columnBase = group.y * ${TILE}u;
  if (lid.x == 0u && lid.y == 0u) { sharedValid = validKeys[unit]; }
  let end = min(u.j1, workgroupUniformLoad(&sharedValid));
  let columns = u.Dv + 1u;
  var total = 0.0;
  for (var start = u.j0; start < end; start += ${TILE}u) {
    let j = start + lid.y;
    var phi = 0.0;
    let f = featureBase + lid.x;
    if (j < end && f < u.F) {${FEATURE_READ}
      ${monomial('y', '(unit * u.M + j) * u.D', 'packed', 'degree', 'product')}
      phi = weight * product;
    }
    featureTile[lid.y * ${TILE}u + lid.x] = phi;
    let c = columnBase + lid.x;
    var value = 0.0;
    if (j < end && c < u.Dv) { value = v[(unit * u.M + j) * u.Dv + c]; }
    if (j < end && c == u.Dv) { value = 1.0; }
    valueTile[lid.y * ${TILE}u + lid.x] = value;
    workgroupBarrier();
    for (var t = 0u; t < ${TILE}u; t++) {
      total += featureTile[t * ${TILE}u + lid.y] * valueTile[t * ${TILE}u + lid.x];
    }
    workgroupBarrier();
  }
  let f = featureBase + lid.y;
  let c = columnBase + lid.x;
  if (f < u.F && c < columns) {
    let at = (unit * u.F + f) * columns + c;
    S[at] = S[at] + total;
  }`,
  };
}

/**
 * Query side: acc[row, c] = Σ_f a_l σ_i^l x_i^m S[unit, f, c] for rows [i0, i1) of every query
 * head (overwrites acc). Tiled like `moments`, with the query features built in workgroup memory.
 */
export function applyProgram(order: number): ProgramInfo {
  return {
    key: `apply:p${order}`,
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
    workgroupSize: [TILE, TILE, 1],
    declarations: `
var<workgroup> featureTile: array<f32, ${TILE * TILE}>;
var<workgroup> momentTile: array<f32, ${TILE * TILE}>;
${polynomialHelpers(order)}`,
    body: `
  let head = group.z;
  let unit = head / u.G;
  let rowBase = u.i0 + group.x * ${TILE}u;
  let columnBase = group.y * ${TILE}u;
  let columns = u.Dv + 1u;
  let loadRow = rowBase + lid.y;
  var scale = 0.0;
  if (loadRow < u.i1) { scale = sigma[head * u.N + loadRow]; }
  var total = 0.0;
  for (var start = 0u; start < u.F; start += ${TILE}u) {
    let f = start + lid.x;
    var phi = 0.0;
    if (loadRow < u.i1 && f < u.F) {${FEATURE_READ}
      ${monomial('x', '(head * u.N + loadRow) * u.D', 'packed', 'degree', 'product')}
      phi = coefficient(degree) * pow(scale, f32(degree)) * product;
      if (degree == 0u) { phi = coefficient(0u); }
    }
    featureTile[lid.y * ${TILE}u + lid.x] = phi;
    let momentFeature = start + lid.y;
    let c = columnBase + lid.x;
    var moment = 0.0;
    if (momentFeature < u.F && c < columns) { moment = S[(unit * u.F + momentFeature) * columns + c]; }
    momentTile[lid.y * ${TILE}u + lid.x] = moment;
    workgroupBarrier();
    for (var t = 0u; t < ${TILE}u; t++) {
      total += featureTile[lid.y * ${TILE}u + t] * momentTile[t * ${TILE}u + lid.x];
    }
    workgroupBarrier();
  }
  let c = columnBase + lid.x;
  if (loadRow < u.i1 && c < columns) { acc[(head * u.N + loadRow) * columns + c] = total; }`,
  };
}

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
export function directProgram(order: number, headDim: number, valueDim: number, keyTile: number): ProgramInfo {
  return {
    key: `direct:p${order}:D${headDim}:Dv${valueDim}:T${keyTile}`,
    uniforms: [
      ...KEY_LIMIT_UNIFORMS,
      { name: 'G', type: 'u32' },
      { name: 'chunk', type: 'u32' },
      { name: 'accumulate', type: 'u32' },
      ...POLYNOMIAL_UNIFORMS,
    ],
    bindings: [read('x'), read('sigma'), read('y'), read('v'), read('validKeys', 'u32'), write('acc')],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: `
const D = ${headDim}u;
const DV = ${valueDim}u;
const KT = ${keyTile}u;
var<workgroup> keyTile: array<f32, ${keyTile * headDim}>;
var<workgroup> valueTile: array<f32, ${keyTile * valueDim}>;
var<workgroup> sharedValid: u32;
${KEY_LIMIT_HELPER}
${polynomialHelpers(order)}
fn chunkStart(i: u32) -> u32 {
  if (u.chunk == 0u) { return 0u; }
  let reach = i32((i / u.chunk) * u.chunk) + i32(u.M) - i32(u.N) + 1;
  return u32(clamp(reach, 0, i32(u.M)));
}`,
    body: `
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
  var xi: array<f32, ${headDim}>;
  if (rowActive) {
    start = chunkStart(i);
    limit = keyLimit(i, valid);
    s = sigma[head * u.N + i];
    for (var d = 0u; d < D; d++) { xi[d] = x[(head * u.N + i) * D + d]; }
  }
  var numerator: array<f32, ${valueDim}>;
  var denominator = 0.0;
  for (var tileStart = low; tileStart < high; tileStart += KT) {
    for (var e = lid.x; e < KT * D; e += ${ROW_THREADS}u) {
      let j = tileStart + e / D;
      var value = 0.0;
      if (j < high) { value = y[(unit * u.M + j) * D + e % D]; }
      keyTile[e] = value;
    }
    for (var e = lid.x; e < KT * DV; e += ${ROW_THREADS}u) {
      let j = tileStart + e / DV;
      var value = 0.0;
      if (j < high) { value = v[(unit * u.M + j) * DV + e % DV]; }
      valueTile[e] = value;
    }
    workgroupBarrier();
    for (var t = 0u; t < KT; t++) {
      let j = tileStart + t;
      if (rowActive && j >= start && j < limit) {
        var dot = 0.0;
        for (var d = 0u; d < D; d++) { dot += xi[d] * keyTile[t * D + d]; }
        let w = poly(s * dot);
        denominator += w;
        for (var c = 0u; c < DV; c++) { numerator[c] += w * valueTile[t * DV + c]; }
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
  { name: 'G', type: 'u32' as const },
  { name: 'rows', type: 'u32' as const },
  ...POLYNOMIAL_UNIFORMS,
];

/**
 * Backward, query side (direct form): per query row i, with g_ij = (dO_i·v_j − dO_i·o_i)/den_i and
 * ds_ij = g_ij f'(s_ij): dx_i = σ_i Σ_j ds_ij y_j, dσ_i = Σ_j ds_ij x_i·y_j, and δ_i = dO_i·o_i for
 * the key side. Degenerate rows (den <= 0) contribute nothing.
 */
export function backwardQueryProgram(order: number, headDim: number, valueDim: number): ProgramInfo {
  return {
    key: `backwardQuery:p${order}:D${headDim}:Dv${valueDim}`,
    uniforms: BACKWARD_UNIFORMS,
    bindings: [
      read('x'),
      read('sigma'),
      read('y'),
      read('v'),
      read('validKeys', 'u32'),
      read('output'),
      read('denominators'),
      read('dOut'),
      write('dx'),
      write('dsigma'),
      write('delta'),
    ],
    workgroupSize: [ROW_THREADS, 1, 1],
    declarations: `
const D = ${headDim}u;
const DV = ${valueDim}u;
${KEY_LIMIT_HELPER}
${polynomialHelpers(order)}`,
    body: `
  let row = ${linearIndex(ROW_THREADS)};
  if (row >= u.rows) { return; }
  let head = row / u.N;
  let i = row % u.N;
  let unit = head / u.G;
  let den = denominators[row];
  var gradX: array<f32, ${headDim}>;
  var gradSigma = 0.0;
  var rowDelta = 0.0;
  if (den > 0.0) {
    let s = sigma[row];
    for (var c = 0u; c < DV; c++) { rowDelta += dOut[row * DV + c] * output[row * DV + c]; }
    let limit = keyLimit(i, validKeys[unit]);
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
  delta[row] = rowDelta;`,
  };
}

/**
 * Backward, key side (direct form): per key row j of a unit, over every query head of the unit and
 * every query row that sees j: dv_j = Σ w_ij dO_i/den_i and dy_j = Σ ds_ij σ_i x_i.
 */
export function backwardKeyProgram(order: number, headDim: number, valueDim: number): ProgramInfo {
  return {
    key: `backwardKey:p${order}:D${headDim}:Dv${valueDim}`,
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
const D = ${headDim}u;
const DV = ${valueDim}u;
${KEY_LIMIT_HELPER}
${polynomialHelpers(order)}`,
    body: `
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
        let w = poly(s * dot);
        var dov = 0.0;
        for (var c = 0u; c < DV; c++) {
          dov += dOut[row * DV + c] * v[key * DV + c];
          gradV[c] += w * dOut[row * DV + c] / den;
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
