import type {
  AttentionPath,
  BackendCapabilities,
  FastmaxErrorCode,
  FastmaxOptions,
  HostTensor,
  Normalization,
  NormalizationKind,
  Order,
} from '@fastmax/core';

export type Sizes = 'full' | 'quick';

/** Sizes and options of one generated attention call; the inputs come from `seed` (see `caseInputs`). */
export interface AttentionSpec {
  readonly batch: number;
  readonly heads: number;
  readonly kvHeads: number;
  /** N */
  readonly queryLength: number;
  /** M */
  readonly keyLength: number;
  /** D */
  readonly headDim: number;
  /** Dv */
  readonly valueDim: number;
  readonly options: FastmaxOptions;
  readonly seed: number;
}

/** Which part of the suite a case belongs to (one vitest `describe` each). */
export type CaseGroup =
  | 'contract'
  | 'forward'
  | 'shapes'
  | 'large'
  | 'output buffer'
  | 'backward'
  | 'finite differences'
  | 'key padding'
  | 'causality'
  | 'key permutation'
  | 'degenerate rows'
  | 'state'
  | 'invalid input'
  | 'non-finite propagation'
  | 'property';

interface CaseBase {
  /** Stable across runs and machines: the same capabilities and sizes give the same names. */
  readonly name: string;
  readonly group: CaseGroup;
  /** Set when the case cannot run on this backend or at these sizes; says why. */
  readonly skip?: string;
}

export interface ContractCase extends CaseBase {
  readonly kind: 'contract';
  readonly check: 'capabilities' | 'device-output';
}
/**
 * `strictPath`: the case exists to test `spec.options.path` (shapes, large), so it is skipped when
 * the backend does not declare that path. Every other case treats a forced path as a preference:
 * on a backend without it, the case runs with `path: 'auto'` (the planner picks a declared path),
 * so that its other axes stay covered.
 */
export interface ForwardCase extends CaseBase {
  readonly kind: 'forward';
  readonly spec: AttentionSpec;
  readonly strictPath?: boolean;
  /**
   * Run with `options.out`: a caller array prefilled with NaN, which must come back as
   * `output.data` with every element written (a backend declaring `writesIntoOut` must return that
   * very array from `forward`, not leave core to copy its result in).
   */
  readonly intoOut?: boolean;
}
export interface BackwardCase extends CaseBase {
  readonly kind: 'backward';
  readonly spec: AttentionSpec;
  readonly strictPath?: boolean;
  /**
   * Run with `options.gradientsOut`: caller arrays prefilled with NaN, which must come back as the
   * gradients' data with every element written (a backend declaring `writesGradientsIntoOut` must
   * return those very arrays from `backward`, not leave core to copy its gradients in).
   */
  readonly intoOut?: boolean;
}
export interface GradientFiniteDifferenceCase extends CaseBase {
  readonly kind: 'gradient-fd';
  readonly spec: AttentionSpec;
}
export interface PaddingInvarianceCase extends CaseBase {
  readonly kind: 'padding-invariance';
  readonly spec: AttentionSpec;
}
export interface CausalPrefixCase extends CaseBase {
  readonly kind: 'causal-prefix';
  readonly spec: AttentionSpec;
  /** Query rows 0..prefix-1 must not change when anything after them changes. */
  readonly prefix: number;
}
export interface KeyPermutationCase extends CaseBase {
  readonly kind: 'key-permutation';
  readonly spec: AttentionSpec;
}
export interface DegenerateCase extends CaseBase {
  readonly kind: 'degenerate';
  /** Explicit inputs: degenerate rows need exact values, not random ones. */
  readonly inputs: () => { q: HostTensor; k: HostTensor; v: HostTensor };
  readonly options: FastmaxOptions;
  readonly requires: Partial<Requirements>;
  /** Flat B×H×N indices of the rows that must be zero. */
  readonly degenerateRows: readonly number[];
}
export interface StateCase extends CaseBase {
  readonly kind: 'state';
  readonly spec: AttentionSpec;
  /** Tokens appended per `step` (the last step may be shorter). */
  readonly stepLength: number;
}
export interface InvalidInputCase extends CaseBase {
  readonly kind: 'invalid-input';
  readonly call: 'attention' | 'backward';
  readonly inputs: () => { q: unknown; k: unknown; v: unknown; dOut?: unknown; options?: unknown };
  readonly code: FastmaxErrorCode;
  /** The `argument` the error must name, where it is fully determined (a non-finite value's index). */
  readonly argument?: string;
  readonly requires: Partial<Requirements>;
}
export interface NonFiniteCase extends CaseBase {
  readonly kind: 'non-finite';
  readonly call: 'attention' | 'backward';
  readonly spec: AttentionSpec;
  /** Which input gets the bad value, and the value. */
  readonly poison: { readonly tensor: 'q' | 'k' | 'v' | 'dOut'; readonly value: number };
}
export interface PropertyCase extends CaseBase {
  readonly kind: 'property';
  readonly runs: number;
  readonly seed: number;
}

export type ConformanceCase =
  | ContractCase
  | ForwardCase
  | BackwardCase
  | GradientFiniteDifferenceCase
  | PaddingInvarianceCase
  | CausalPrefixCase
  | KeyPermutationCase
  | DegenerateCase
  | StateCase
  | InvalidInputCase
  | NonFiniteCase
  | PropertyCase;

/** What a case needs from a backend's capabilities. */
export interface Requirements {
  readonly orders: readonly Order[];
  readonly normalizations: readonly NormalizationKind[];
  readonly headDim: number;
  readonly causal: boolean;
  readonly keyPadding: boolean;
  readonly groupedQuery: boolean;
  readonly crossAttention: boolean;
  readonly backward: boolean;
  readonly state: boolean;
  readonly deviceTensors: boolean;
  readonly path: AttentionPath | undefined;
  /** max(N, M), compared with `maxQueryLength`. */
  readonly sequenceLength: number;
}

export const NORMALIZATIONS: readonly NormalizationKind[] = ['max-norm', 'prefix-max-norm', 'l2', 'scale'];
export const ORDERS: readonly Order[] = [1, 2, 3, 4];

/**
 * Scale for `{ scale }` cases. Inputs are uniform in [-1, 1], so |q·k| <= D. Even orders have
 * f(s) > 0 everywhere, so 1/√D keeps scores O(1) and exercises every degree. Odd orders have a real
 * root (p = 1 at s = -1, p = 3 at s ≈ -1.6), so 0.8/D keeps |s| <= 0.8 and every denominator far
 * from 0: a float32 backend cannot be judged against float64 on a row whose denominator is 0 ± a
 * rounding error.
 */
export function scaleFor(order: Order, headDim: number): number {
  return order % 2 === 0 ? 1 / Math.sqrt(headDim) : 0.8 / headDim;
}

/**
 * Order 1 with the default coefficients is f(s) = 1 + s, which reaches 0 at s = -1, a score the
 * centered normalizations do produce exactly (D = 2: all centered vectors are collinear). A
 * temperature of 1.25 keeps |s| <= 0.8 and f(s) >= 0.2, for the same conditioning reason as above.
 * Degenerate rows are tested on purpose, with exact inputs, in the 'degenerate rows' group.
 */
function temperatureFor(order: Order, base: number): number {
  return order === 1 ? base * 1.25 : base;
}

/** Custom coefficients for the variant rows: positive on |s| <= 1 for every order. */
const CUSTOM_COEFFICIENTS = [1, 0.8, 0.3, 0.05, 0.01];

function normalizationOption(kind: NormalizationKind, order: Order, headDim: number): Normalization {
  return kind === 'scale' ? { scale: scaleFor(order, headDim) } : kind;
}

export interface SpecInput {
  readonly order: Order;
  readonly normalization: NormalizationKind;
  readonly causal?: boolean;
  readonly padded?: boolean;
  readonly gqa?: boolean;
  readonly cross?: boolean;
  readonly path?: AttentionPath;
  readonly variant?: boolean;
  readonly chunkSize?: number;
  readonly batch?: number;
  readonly queryLength: number;
  readonly keyLength?: number;
  readonly headDim: number;
  readonly valueDim: number;
  readonly seed: number;
  /** Heads when not grouped, or [H, Hkv] when grouped. */
  readonly heads?: number | readonly [number, number];
  readonly keyLengths?: readonly number[];
}

export function buildSpec(input: SpecInput): AttentionSpec {
  const N = input.queryLength;
  const M = input.keyLength ?? N;
  const padded = input.padded ?? false;
  const batch = input.batch ?? (padded ? 2 : 1);
  const heads = input.heads ?? (input.gqa ? ([4, 2] as const) : 2);
  const [H, Hkv] = typeof heads === 'number' ? [heads, heads] : heads;
  const keyLengths = padded
    ? (input.keyLengths ?? Array.from({ length: batch }, (_, b) => Math.max(0, M - 1 - 2 * b)))
    : undefined;
  const options: FastmaxOptions = {
    order: input.order,
    normalization: normalizationOption(input.normalization, input.order, input.headDim),
    causal: input.causal ?? false,
    temperature: temperatureFor(input.order, input.variant ? 2 : 1),
    ...(input.variant ? { coefficients: CUSTOM_COEFFICIENTS.slice(0, input.order + 1) } : {}),
    ...(keyLengths === undefined ? {} : { keyLengths }),
    ...(input.path === undefined ? {} : { path: input.path }),
    ...(input.chunkSize === undefined ? {} : { chunkSize: input.chunkSize }),
  };
  return {
    batch,
    heads: H,
    kvHeads: Hkv,
    queryLength: N,
    keyLength: M,
    headDim: input.headDim,
    valueDim: input.valueDim,
    options,
    seed: input.seed,
  };
}

/** `p=2 max-norm causal+padded factorized [B2 H4/2 N7 M9 D3 Dv5]`: every parameter that varies. */
export function describeSpec(spec: AttentionSpec): string {
  const o = spec.options;
  const norm =
    typeof o.normalization === 'object' ? `scale=${o.normalization.scale.toPrecision(3)}` : o.normalization;
  const flags = [
    o.causal ? 'causal' : '',
    o.keyLengths === undefined ? '' : `keyLengths=${Array.from(o.keyLengths).join(',')}`,
    spec.kvHeads !== spec.heads ? 'gqa' : '',
    spec.keyLength !== spec.queryLength ? 'cross' : '',
    o.coefficients === undefined ? '' : `a=${o.coefficients.join(',')}`,
    o.temperature === undefined || o.temperature === 1 ? '' : `T=${o.temperature}`,
    o.chunkSize === undefined ? '' : `chunk=${o.chunkSize}`,
  ].filter((flag) => flag !== '');
  const sizes = `B${spec.batch} H${spec.heads}/${spec.kvHeads} N${spec.queryLength} M${spec.keyLength} D${spec.headDim} Dv${spec.valueDim}`;
  return `p=${o.order} ${norm}${flags.length > 0 ? ` ${flags.join(' ')}` : ''} ${o.path ?? 'auto'} [${sizes}]`;
}

export function requirementsOf(spec: AttentionSpec, extra: Partial<Requirements> = {}): Requirements {
  const o = spec.options;
  const kind: NormalizationKind =
    typeof o.normalization === 'object'
      ? 'scale'
      : (o.normalization ?? (o.causal ? 'prefix-max-norm' : 'max-norm'));
  return {
    orders: [o.order ?? 2],
    normalizations: [kind],
    headDim: Math.max(spec.headDim, spec.valueDim),
    causal: o.causal ?? false,
    keyPadding: o.keyLengths !== undefined,
    groupedQuery: spec.kvHeads !== spec.heads,
    crossAttention: spec.keyLength !== spec.queryLength,
    backward: false,
    state: false,
    deviceTensors: false,
    path: o.path === 'auto' ? undefined : o.path,
    sequenceLength: Math.max(spec.queryLength, spec.keyLength),
    ...extra,
  };
}

const NO_REQUIREMENTS: Requirements = {
  orders: [],
  normalizations: [],
  headDim: 0,
  causal: false,
  keyPadding: false,
  groupedQuery: false,
  crossAttention: false,
  backward: false,
  state: false,
  deviceTensors: false,
  path: undefined,
  sequenceLength: 0,
};

/** What a case needs; cases without a spec state theirs explicitly. */
export function caseRequirements(testCase: ConformanceCase): Requirements {
  switch (testCase.kind) {
    case 'contract':
      return { ...NO_REQUIREMENTS, deviceTensors: testCase.check === 'device-output' };
    case 'forward':
      return requirementsOf(testCase.spec, testCase.strictPath ? {} : { path: undefined });
    case 'backward':
      return requirementsOf(testCase.spec, {
        backward: true,
        ...(testCase.strictPath ? {} : { path: undefined }),
      });
    case 'padding-invariance':
    case 'causal-prefix':
    case 'key-permutation':
      return requirementsOf(testCase.spec, { path: undefined });
    case 'gradient-fd':
      return requirementsOf(testCase.spec, { backward: true, path: undefined });
    case 'state':
      return requirementsOf(testCase.spec, { state: true, path: undefined });
    case 'non-finite':
      return requirementsOf(testCase.spec, { backward: testCase.call === 'backward', path: undefined });
    case 'degenerate':
    case 'invalid-input':
      return { ...NO_REQUIREMENTS, ...testCase.requires };
    case 'property':
      return NO_REQUIREMENTS;
  }
}

/** The case as it runs on a backend: a preferred path it lacks becomes 'auto' (see `ForwardCase`). */
export function adaptToCapabilities<T extends ConformanceCase>(
  testCase: T,
  capabilities: BackendCapabilities,
): T {
  if (!('spec' in testCase)) return testCase;
  const path = testCase.spec.options.path;
  if (path === undefined || path === 'auto' || capabilities.paths.includes(path)) return testCase;
  return { ...testCase, spec: { ...testCase.spec, options: { ...testCase.spec.options, path: 'auto' } } };
}

/** Why `capabilities` cannot run a case with these requirements, or undefined when it can. */
export function unmetCapability(
  requirements: Requirements,
  capabilities: BackendCapabilities,
): string | undefined {
  const missing = (what: string, field: string) =>
    `the backend does not declare ${what} (capabilities.${field})`;
  for (const order of requirements.orders) {
    if (!capabilities.orders.includes(order)) return missing(`order ${order}`, 'orders');
  }
  for (const kind of requirements.normalizations) {
    if (!capabilities.normalizations.includes(kind))
      return missing(`normalization '${kind}'`, 'normalizations');
  }
  if (requirements.headDim > capabilities.maxHeadDim) {
    return `head dim ${requirements.headDim} > capabilities.maxHeadDim = ${capabilities.maxHeadDim}`;
  }
  if (requirements.causal && !capabilities.causal) return missing('causal attention', 'causal');
  if (requirements.keyPadding && !capabilities.keyPadding) return missing('key padding', 'keyPadding');
  if (requirements.groupedQuery && !capabilities.groupedQuery) {
    return missing('grouped-query attention', 'groupedQuery');
  }
  if (requirements.crossAttention && !capabilities.crossAttention) {
    return missing('cross-attention (N != M)', 'crossAttention');
  }
  if (requirements.backward && !capabilities.backward) return missing('a backward pass', 'backward');
  if (requirements.state && !capabilities.state) return missing('recurrent state', 'state');
  if (requirements.deviceTensors && !capabilities.deviceTensors)
    return missing('device tensors', 'deviceTensors');
  if (requirements.path !== undefined && !capabilities.paths.includes(requirements.path)) {
    return missing(`the '${requirements.path}' path`, 'paths');
  }
  return undefined;
}

export interface CaseLimits {
  /** Skip cases whose N or M exceeds it (for backends with a hard length limit). */
  readonly maxQueryLength?: number;
}

/** Why a case is skipped whatever the backend: the run's sizes or limits. */
function sizeSkip(testCase: ConformanceCase, sizes: Sizes, limits: CaseLimits): string | undefined {
  const { sequenceLength } = caseRequirements(testCase);
  if (limits.maxQueryLength !== undefined && sequenceLength > limits.maxQueryLength) {
    return `sequence length ${sequenceLength} > maxQueryLength = ${limits.maxQueryLength}`;
  }
  if (sizes === 'quick' && sequenceLength >= QUICK_MAX_LENGTH) {
    return `sizes: 'quick' leaves out sequences of ${QUICK_MAX_LENGTH} tokens or more (this one: ${sequenceLength})`;
  }
  return undefined;
}

/** `sizes: 'quick'` drops every case with N or M at or above this (N = 300 and N = 4096). */
export const QUICK_MAX_LENGTH = 256;

/** Why this case is skipped for this backend and run, or undefined when it runs. */
export function skipReason(
  testCase: ConformanceCase,
  capabilities: BackendCapabilities | undefined,
  sizes: Sizes = 'full',
  limits: CaseLimits = {},
): string | undefined {
  const fromSizes = sizeSkip(testCase, sizes, limits);
  if (fromSizes !== undefined) return fromSizes;
  return capabilities === undefined ? undefined : unmetCapability(caseRequirements(testCase), capabilities);
}

const FEATURES = ['causal', 'padded', 'gqa', 'cross'] as const;
type Feature = (typeof FEATURES)[number];

interface MatrixRow {
  readonly order: Order;
  readonly normalization: NormalizationKind;
  readonly path: AttentionPath;
  readonly features: readonly Feature[];
}

/**
 * The forward/backward matrix. Every value of every axis appears and every pair of values of two
 * axes appears (order × normalization × path × causal × key padding × GQA × cross-attention), and it
 * degrades gracefully: the pairs among supported values stay covered when a backend lacks an
 * optional feature, because each pair is covered by a row that turns on only the features the pair
 * names.
 * - 16 plain rows: the full order × normalization grid, no optional feature, paths alternating so
 *   that each order and each normalization meets both paths;
 * - 16 single-feature rows: each feature with each order, each normalization and both paths;
 * - 6 rows, one per pair of features (both on);
 * - 4 rows with every feature on (one per order), for the interactions of more than two.
 */
export function matrixRows(): MatrixRow[] {
  const rows: MatrixRow[] = [];
  const pathOf = (i: number): AttentionPath => (i % 2 === 0 ? 'factorized' : 'direct');
  ORDERS.forEach((order, o) => {
    NORMALIZATIONS.forEach((normalization, n) => {
      rows.push({ order, normalization, path: pathOf(o + n), features: [] });
    });
  });
  FEATURES.forEach((feature, f) => {
    ORDERS.forEach((order, o) => {
      rows.push({
        order,
        normalization: NORMALIZATIONS[(o + f + 1) % 4]!,
        path: pathOf(o + f),
        features: [feature],
      });
    });
  });
  let pair = 0;
  for (let a = 0; a < FEATURES.length; a++) {
    for (let b = a + 1; b < FEATURES.length; b++) {
      rows.push({
        order: ORDERS[pair % 4]!,
        normalization: NORMALIZATIONS[(pair + 2) % 4]!,
        path: pathOf(pair),
        features: [FEATURES[a]!, FEATURES[b]!],
      });
      pair++;
    }
  }
  ORDERS.forEach((order, o) => {
    rows.push({
      order,
      normalization: NORMALIZATIONS[(o + 1) % 4]!,
      path: pathOf(o + 1),
      features: FEATURES,
    });
  });
  return rows;
}

const ROW_QUERY_LENGTHS = [5, 8, 3, 11, 6, 9, 4, 7, 10, 2];
const ROW_HEAD_DIMS = [4, 3, 6, 2, 5, 8, 1];

function matrixSpec(row: MatrixRow, r: number): AttentionSpec {
  const has = (feature: Feature) => row.features.includes(feature);
  const N = ROW_QUERY_LENGTHS[r % ROW_QUERY_LENGTHS.length]!;
  const D = ROW_HEAD_DIMS[r % ROW_HEAD_DIMS.length]!;
  const valueDim = r % 3 === 0 ? D : r % 3 === 1 ? D + 2 : Math.max(1, D - 1);
  // Cross rows alternate M > N and M < N; causal with M < N leaves early rows without keys.
  const keyLength = has('cross') ? (r % 2 === 0 ? N + 3 : Math.max(1, N - 2)) : N;
  const causal = has('causal');
  return buildSpec({
    order: row.order,
    normalization: row.normalization,
    causal,
    padded: has('padded'),
    gqa: has('gqa'),
    ...(has('gqa') ? { heads: r % 2 === 0 ? ([4, 2] as const) : ([3, 1] as const) } : { heads: 1 + (r % 2) }),
    batch: has('padded') ? 2 : 1 + (r % 2),
    path: row.path,
    variant: r % 3 === 2,
    // Small chunks so the causal factorized path crosses chunk boundaries on short sequences.
    ...(causal && r % 4 !== 0 ? { chunkSize: 2 + (r % 3) } : {}),
    queryLength: N,
    keyLength,
    headDim: D,
    valueDim,
    seed: 1000 + 17 * r,
  });
}

/** Odd shapes: every N in {1, 2, 7, 63, 64, 65, 300} and every D in {1, 3, 16, 33, 64}, Dv != D. */
const SHAPES: readonly { N: number; D: number; Dv: number }[] = [
  { N: 1, D: 64, Dv: 48 },
  { N: 2, D: 33, Dv: 35 },
  { N: 7, D: 1, Dv: 2 },
  { N: 63, D: 16, Dv: 9 },
  { N: 64, D: 3, Dv: 5 },
  { N: 65, D: 64, Dv: 40 },
  { N: 300, D: 16, Dv: 24 },
];

function shapeSpecs(): { spec: AttentionSpec; index: number }[] {
  const specs: { spec: AttentionSpec; index: number }[] = [];
  SHAPES.forEach(({ N, D, Dv }, index) => {
    for (const path of ['factorized', 'direct'] as const) {
      specs.push({
        index,
        spec: buildSpec({
          order: 2,
          normalization: index % 2 === 0 ? 'prefix-max-norm' : 'max-norm',
          causal: index % 2 === 0,
          path,
          heads: 1,
          queryLength: N,
          headDim: D,
          valueDim: Dv,
          seed: 5000 + 31 * index,
        }),
      });
    }
  });
  return specs;
}

/** The 1e-4 claim at a realistic length: N = M = 4096, p = 2, D = Dv = 16, one head. */
function largeSpecs(): AttentionSpec[] {
  const specs: AttentionSpec[] = [];
  for (const causal of [false, true]) {
    for (const path of ['factorized', 'direct'] as const) {
      specs.push(
        buildSpec({
          order: 2,
          normalization: causal ? 'prefix-max-norm' : 'max-norm',
          causal,
          path,
          heads: 1,
          queryLength: 4096,
          headDim: 16,
          valueDim: 16,
          seed: causal ? 9001 : 9002,
        }),
      );
    }
  }
  return specs;
}

/**
 * Specs for `options.out`: each order once with every feature and rows that must be exactly 0 (a
 * batch without keys, causal queries before the first key), a plain one every backend runs, and the
 * long ones where a backend splits one head over threads.
 */
function outputBufferSpecs(): AttentionSpec[] {
  const specs = ORDERS.map((order, o) =>
    buildSpec({
      order,
      normalization: NORMALIZATIONS[o]!,
      causal: true,
      padded: true,
      keyLengths: [6, 0],
      gqa: true,
      cross: true,
      queryLength: 9,
      keyLength: 7,
      headDim: 5,
      valueDim: 3,
      path: o % 2 === 0 ? 'factorized' : 'direct',
      seed: 9100 + o,
    }),
  );
  specs.push(
    buildSpec({ order: 2, normalization: 'max-norm', queryLength: 9, headDim: 4, valueDim: 6, seed: 9110 }),
  );
  for (const order of [1, 2] as const) {
    specs.push(
      buildSpec({
        order,
        normalization: 'prefix-max-norm',
        causal: true,
        heads: 1,
        queryLength: 4096,
        keyLength: 4090,
        headDim: 16,
        valueDim: 16,
        seed: 9120 + order,
      }),
    );
  }
  return specs;
}

function fdSpecs(): AttentionSpec[] {
  const orders: Order[] = [2, 3, 1, 4, 3, 2, 4, 1];
  return orders.map((order, i) =>
    buildSpec({
      order,
      normalization: NORMALIZATIONS[i % 4]!,
      causal: i >= 4,
      gqa: i % 2 === 1,
      ...(i % 2 === 1 ? { heads: [2, 1] as const } : { heads: 1 }),
      padded: i % 3 === 2,
      cross: i % 4 === 3,
      queryLength: 6,
      keyLength: i % 4 === 3 ? 8 : 6,
      headDim: 4,
      valueDim: 3,
      path: i % 2 === 0 ? 'factorized' : 'direct',
      ...(i >= 4 ? { chunkSize: 2 } : {}),
      seed: 7000 + 13 * i,
    }),
  );
}

function invalidInputCases(): InvalidInputCase[] {
  const t = (shape: number[], fill = 0.5) => ({
    shape,
    data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(fill),
  });
  const ok = () => ({ q: t([1, 2, 3, 4]), k: t([1, 2, 3, 4]), v: t([1, 2, 3, 5]) });
  const poisoned = (which: 'q' | 'k' | 'v', value: number) => () => {
    const inputs = ok();
    inputs[which].data[2] = value;
    return inputs;
  };
  const backwardRequires = {
    backward: true,
    orders: [2],
    normalizations: ['max-norm'],
    headDim: 5,
  } satisfies Partial<Requirements>;
  const list: Omit<InvalidInputCase, 'kind' | 'group'>[] = [
    {
      name: 'q of rank 3 -> INVALID_SHAPE',
      call: 'attention',
      code: 'INVALID_SHAPE',
      requires: {},
      inputs: () => ({ ...ok(), q: t([2, 3, 4]) }),
    },
    {
      name: 'k of rank 5 -> INVALID_SHAPE',
      call: 'attention',
      code: 'INVALID_SHAPE',
      requires: {},
      inputs: () => ({ ...ok(), k: t([1, 1, 2, 3, 4]) }),
    },
    {
      // Empty dimensions are refused by core rather than special-cased in every backend.
      name: 'q with N = 0 -> INVALID_SHAPE',
      call: 'attention',
      code: 'INVALID_SHAPE',
      requires: {},
      inputs: () => ({ ...ok(), q: t([1, 2, 0, 4]) }),
    },
    {
      name: 'v data length != shape -> INVALID_SHAPE',
      call: 'attention',
      code: 'INVALID_SHAPE',
      requires: {},
      inputs: () => ({ ...ok(), v: { shape: [1, 2, 3, 5], data: new Float32Array(29) } }),
    },
    {
      name: 'q data not a Float32Array -> INVALID_SHAPE',
      call: 'attention',
      code: 'INVALID_SHAPE',
      requires: {},
      inputs: () => ({ ...ok(), q: { shape: [1, 2, 3, 4], data: new Array(24).fill(0) } }),
    },
    {
      name: 'batch of k != batch of q -> SHAPE_MISMATCH',
      call: 'attention',
      code: 'SHAPE_MISMATCH',
      requires: {},
      inputs: () => ({ ...ok(), k: t([2, 2, 3, 4]) }),
    },
    {
      name: 'D of k != D of q -> SHAPE_MISMATCH',
      call: 'attention',
      code: 'SHAPE_MISMATCH',
      requires: {},
      inputs: () => ({ ...ok(), k: t([1, 2, 3, 3]) }),
    },
    {
      name: 'M of v != M of k -> SHAPE_MISMATCH',
      call: 'attention',
      code: 'SHAPE_MISMATCH',
      requires: {},
      inputs: () => ({ ...ok(), v: t([1, 2, 4, 5]) }),
    },
    {
      name: 'heads of v != heads of k -> SHAPE_MISMATCH',
      call: 'attention',
      code: 'SHAPE_MISMATCH',
      requires: {},
      inputs: () => ({ ...ok(), v: t([1, 1, 3, 5]) }),
    },
    {
      name: 'H = 3 with Hkv = 2 -> INVALID_HEADS',
      call: 'attention',
      code: 'INVALID_HEADS',
      requires: {},
      inputs: () => ({ q: t([1, 3, 3, 4]), k: t([1, 2, 3, 4]), v: t([1, 2, 3, 5]) }),
    },
    {
      name: 'keyLengths entry > M -> INVALID_KEY_LENGTHS',
      call: 'attention',
      code: 'INVALID_KEY_LENGTHS',
      requires: {},
      inputs: () => ({ ...ok(), options: { keyLengths: [4] } }),
    },
    {
      name: 'keyLengths entry < 0 -> INVALID_KEY_LENGTHS',
      call: 'attention',
      code: 'INVALID_KEY_LENGTHS',
      requires: {},
      inputs: () => ({ ...ok(), options: { keyLengths: [-1] } }),
    },
    {
      name: 'keyLengths entry not an integer -> INVALID_KEY_LENGTHS',
      call: 'attention',
      code: 'INVALID_KEY_LENGTHS',
      requires: {},
      inputs: () => ({ ...ok(), options: { keyLengths: [1.5] } }),
    },
    {
      name: 'keyLengths with 2 entries for B = 1 -> INVALID_KEY_LENGTHS',
      call: 'attention',
      code: 'INVALID_KEY_LENGTHS',
      requires: {},
      inputs: () => ({ ...ok(), options: { keyLengths: [3, 3] } }),
    },
    {
      name: 'coefficient NaN -> INVALID_COEFFICIENTS',
      call: 'attention',
      code: 'INVALID_COEFFICIENTS',
      requires: {},
      inputs: () => ({ ...ok(), options: { order: 2, coefficients: [1, Number.NaN, 0.5] } }),
    },
    {
      name: 'coefficient Infinity -> INVALID_COEFFICIENTS',
      call: 'attention',
      code: 'INVALID_COEFFICIENTS',
      requires: {},
      inputs: () => ({ ...ok(), options: { order: 1, coefficients: [1, Number.POSITIVE_INFINITY] } }),
    },
    {
      name: 'p + 2 coefficients -> INVALID_COEFFICIENTS',
      call: 'attention',
      code: 'INVALID_COEFFICIENTS',
      requires: {},
      inputs: () => ({ ...ok(), options: { order: 2, coefficients: [1, 1, 0.5, 0.1] } }),
    },
    {
      name: 'order 5 -> UNSUPPORTED_ORDER',
      call: 'attention',
      code: 'UNSUPPORTED_ORDER',
      requires: {},
      inputs: () => ({ ...ok(), options: { order: 5 } }),
    },
    {
      name: 'order 0 -> UNSUPPORTED_ORDER',
      call: 'attention',
      code: 'UNSUPPORTED_ORDER',
      requires: {},
      inputs: () => ({ ...ok(), options: { order: 0 } }),
    },
    // Whether core scans the values or the backend does (capabilities.checksFiniteInputs), the
    // error names the first bad flat index of the first bad tensor in the order q, k, v.
    {
      name: 'NaN in q -> NON_FINITE_INPUT',
      call: 'attention',
      code: 'NON_FINITE_INPUT',
      argument: 'q.data[2]',
      requires: {},
      inputs: poisoned('q', Number.NaN),
    },
    {
      name: 'Infinity in k -> NON_FINITE_INPUT',
      call: 'attention',
      code: 'NON_FINITE_INPUT',
      argument: 'k.data[2]',
      requires: {},
      inputs: poisoned('k', Number.POSITIVE_INFINITY),
    },
    {
      name: '-Infinity in v -> NON_FINITE_INPUT',
      call: 'attention',
      code: 'NON_FINITE_INPUT',
      argument: 'v.data[2]',
      requires: {},
      inputs: poisoned('v', Number.NEGATIVE_INFINITY),
    },
    {
      name: 'NaN in k and v, Infinity later in q -> NON_FINITE_INPUT naming q',
      call: 'attention',
      code: 'NON_FINITE_INPUT',
      argument: 'q.data[23]',
      requires: {},
      inputs: () => {
        const inputs = ok();
        inputs.q.data[23] = Number.POSITIVE_INFINITY;
        inputs.k.data[0] = Number.NaN;
        inputs.v.data[29] = Number.NaN;
        return inputs;
      },
    },
    ...(['attention', 'backward'] as const).map((call) => ({
      name: `${call === 'backward' ? 'backward: ' : ''}NaN in a padded key (keyLengths) -> NON_FINITE_INPUT`,
      call,
      code: 'NON_FINITE_INPUT' as const,
      argument: 'k.data[11]',
      requires: call === 'backward' ? { ...backwardRequires, keyPadding: true } : { keyPadding: true },
      inputs: () => {
        const inputs = { ...ok(), dOut: t([1, 2, 3, 5]) };
        inputs.k.data[11] = Number.NaN;
        return { ...inputs, options: { keyLengths: [1] } };
      },
    })),
    // createFastmax checks capabilities before dOut, so these need what the call itself needs.
    // Whether core scans the backward's inputs or the backend does
    // (capabilities.checksFiniteBackwardInputs), the error names the first bad flat index of the
    // first bad tensor in the order q, k, v, dOut.
    {
      name: 'NaN in dOut -> NON_FINITE_INPUT',
      call: 'backward',
      code: 'NON_FINITE_INPUT',
      argument: 'dOut.data[0]',
      requires: backwardRequires,
      inputs: () => {
        const dOut = t([1, 2, 3, 5]);
        dOut.data[0] = Number.NaN;
        return { ...ok(), dOut };
      },
    },
    ...(
      [
        ['q', Number.NaN],
        ['k', Number.POSITIVE_INFINITY],
        ['v', Number.NEGATIVE_INFINITY],
      ] as const
    ).map(([which, value]) => ({
      name: `backward: ${value} in ${which} -> NON_FINITE_INPUT`,
      call: 'backward' as const,
      code: 'NON_FINITE_INPUT' as const,
      argument: `${which}.data[2]`,
      requires: backwardRequires,
      inputs: () => ({ ...poisoned(which, value)(), dOut: t([1, 2, 3, 5]) }),
    })),
    {
      name: 'backward: NaN in v and dOut, Infinity later in k -> NON_FINITE_INPUT naming k',
      call: 'backward',
      code: 'NON_FINITE_INPUT',
      argument: 'k.data[23]',
      requires: backwardRequires,
      inputs: () => {
        const inputs = { ...ok(), dOut: t([1, 2, 3, 5]) };
        inputs.k.data[23] = Number.POSITIVE_INFINITY;
        inputs.v.data[0] = Number.NaN;
        inputs.dOut.data[4] = Number.NaN;
        return inputs;
      },
    },
    {
      name: 'dOut of the wrong shape -> SHAPE_MISMATCH',
      call: 'backward',
      code: 'SHAPE_MISMATCH',
      requires: backwardRequires,
      inputs: () => ({ ...ok(), dOut: t([1, 2, 3, 4]) }),
    },
  ];
  return list.map((c) => ({ ...c, kind: 'invalid-input', group: 'invalid input' }));
}

function host(shape: [number, number, number, number], values: number[]): HostTensor {
  return { shape, data: Float32Array.from(values) };
}

function degenerateCases(): DegenerateCase[] {
  const variants: {
    label: string;
    options: FastmaxOptions;
    base: Omit<DegenerateCase, 'kind' | 'group' | 'name' | 'options'>;
  }[] = [
    {
      // f(s) = 1 + s with s = 1·(1·-1) = -1: row 0 has den = 0; row 1 (q = -1) has s = 1, w = 2.
      // Row 0 (q = 1) scores s = -1 against both keys (k = -1): den = 0. Row 1 (q = -1) has s = 1.
      label: 'p=1 {scale:1} q=[1] k=[-1]: w = 1 + s = 0',
      options: { order: 1, normalization: { scale: 1 } },
      base: {
        inputs: () => ({
          q: host([1, 1, 2, 1], [1, -1]),
          k: host([1, 1, 2, 1], [-1, -1]),
          v: host([1, 1, 2, 2], [5, -3, 1, 2]),
        }),
        requires: { orders: [1], normalizations: ['scale'] },
        degenerateRows: [0],
      },
    },
    {
      // keyLengths[1] = 0: no query row of batch 1 sees any key.
      label: 'keyLengths[b] = 0',
      options: { keyLengths: [3, 0] },
      base: {
        inputs: () => ({
          q: host([2, 1, 3, 2], [1, 0, 0, 1, 2, -1, 1, 1, -1, 0, 0, 2]),
          k: host([2, 1, 3, 2], [1, 2, 0, 1, -1, 0, 3, 1, 2, 2, 0, 1]),
          v: host([2, 1, 3, 1], [1, 2, 3, 4, 5, 6]),
        }),
        requires: { keyPadding: true },
        degenerateRows: [3, 4, 5],
      },
    },
    {
      // Causal with M = 2 < N = 4: row i sees keys j <= i - 2, so rows 0 and 1 see none.
      label: 'causal with M < N',
      options: { causal: true },
      base: {
        inputs: () => ({
          q: host([1, 1, 4, 2], [1, 0, 0, 1, 1, 1, -1, 2]),
          k: host([1, 1, 2, 2], [1, 2, -1, 0]),
          v: host([1, 1, 2, 1], [7, -2]),
        }),
        requires: { causal: true, crossAttention: true },
        degenerateRows: [0, 1],
      },
    },
  ];
  const out: DegenerateCase[] = [];
  for (const { label, options, base } of variants) {
    for (const policy of ['zero', 'throw'] as const) {
      out.push({
        ...base,
        kind: 'degenerate',
        group: 'degenerate rows',
        name:
          policy === 'zero'
            ? `${label} -> zero rows, counted in degenerateRows`
            : `${label} with onDegenerateRow 'throw' -> DEGENERATE_DENOMINATOR`,
        options: { ...options, onDegenerateRow: policy },
      });
    }
  }
  return out;
}

/**
 * Every case of the suite, in a stable order with stable names. With `capabilities`, cases the
 * backend cannot run carry `skip` with the reason; without them only size skips are marked (this
 * is how `runConformance` registers tests before the backend exists).
 */
export function conformanceCases(
  capabilities?: BackendCapabilities,
  sizes: Sizes = 'full',
  limits: CaseLimits = {},
): ConformanceCase[] {
  const cases: ConformanceCase[] = [];
  cases.push({
    kind: 'contract',
    group: 'contract',
    name: 'capabilities are well formed and the backend is available',
    check: 'capabilities',
  });
  cases.push({
    kind: 'contract',
    group: 'contract',
    name: "output: 'device' reads back equal to the host result",
    check: 'device-output',
  });

  const rows = matrixRows();
  const matrix = rows.map((row, r) => ({ spec: matrixSpec(row, r), r, row }));
  for (const { spec, r, row } of matrix) {
    const label = row.features.length === 0 ? 'plain' : row.features.join('+');
    cases.push({ kind: 'forward', group: 'forward', name: `#${r} ${label}: ${describeSpec(spec)}`, spec });
  }
  for (const { spec, index } of shapeSpecs()) {
    cases.push({
      kind: 'forward',
      group: 'shapes',
      name: `shape ${index}: ${describeSpec(spec)}`,
      spec,
      strictPath: true,
    });
  }
  for (const spec of largeSpecs()) {
    cases.push({
      kind: 'forward',
      group: 'large',
      name: `large: ${describeSpec(spec)}`,
      spec,
      strictPath: true,
    });
  }
  for (const spec of outputBufferSpecs()) {
    cases.push({
      kind: 'forward',
      group: 'output buffer',
      name: `into options.out: ${describeSpec(spec)}`,
      spec,
      intoOut: true,
    });
  }
  for (const { spec, r, row } of matrix) {
    const label = row.features.length === 0 ? 'plain' : row.features.join('+');
    cases.push({ kind: 'backward', group: 'backward', name: `#${r} ${label}: ${describeSpec(spec)}`, spec });
  }
  for (const { spec, index } of shapeSpecs()) {
    cases.push({
      kind: 'backward',
      group: 'backward',
      name: `shape ${index}: ${describeSpec(spec)}`,
      spec,
      strictPath: true,
    });
  }
  // The short ones only: the float64 reference backward of N = 4096 costs seconds a case.
  for (const spec of outputBufferSpecs().filter((spec) => spec.queryLength <= 64)) {
    cases.push({
      kind: 'backward',
      group: 'output buffer',
      name: `backward into options.gradientsOut: ${describeSpec(spec)}`,
      spec,
      intoOut: true,
    });
  }
  fdSpecs().forEach((spec, i) => {
    cases.push({
      kind: 'gradient-fd',
      group: 'finite differences',
      name: `fd ${i}: ${describeSpec(spec)}`,
      spec,
    });
  });
  NORMALIZATIONS.forEach((normalization, i) => {
    const order = ORDERS[(i + 1) % 4]!;
    const spec = buildSpec({
      order,
      normalization,
      causal: i % 2 === 1,
      padded: true,
      batch: 3,
      keyLengths: [9, 6, 2],
      gqa: i === 2,
      ...(i === 2 ? { heads: [4, 2] as const } : {}),
      queryLength: i === 3 ? 7 : 9,
      keyLength: 9,
      headDim: 5,
      valueDim: 4,
      path: i % 2 === 0 ? 'factorized' : 'direct',
      seed: 3000 + i,
    });
    cases.push({
      kind: 'padding-invariance',
      group: 'key padding',
      name: `padded k, v changed -> same output: ${describeSpec(spec)}`,
      spec,
    });
  });
  (['prefix-max-norm', 'scale'] as const).forEach((normalization, i) => {
    for (const cross of [false, true]) {
      const order = ORDERS[(2 * i + (cross ? 1 : 0)) % 4]!;
      const spec = buildSpec({
        order,
        normalization,
        causal: true,
        cross,
        queryLength: 12,
        keyLength: cross ? 15 : 12,
        headDim: 4,
        valueDim: 5,
        path: cross ? 'direct' : 'factorized',
        chunkSize: 4,
        seed: 3100 + 2 * i + (cross ? 1 : 0),
      });
      cases.push({
        kind: 'causal-prefix',
        group: 'causality',
        name: `rows < 5 unchanged when later tokens change: ${describeSpec(spec)}`,
        spec,
        prefix: 5,
      });
    }
  });
  NORMALIZATIONS.forEach((normalization, i) => {
    const spec = buildSpec({
      order: ORDERS[i]!,
      normalization,
      padded: i === 3,
      gqa: i === 1,
      cross: i === 2,
      queryLength: 6,
      keyLength: i === 2 ? 10 : 6,
      headDim: 4,
      valueDim: 3,
      path: i % 2 === 0 ? 'factorized' : 'direct',
      seed: 3200 + i,
    });
    cases.push({
      kind: 'key-permutation',
      group: 'key permutation',
      name: `permuting keys with values -> same output: ${describeSpec(spec)}`,
      spec,
    });
  });
  cases.push(...degenerateCases());
  const stateRuns: {
    normalization: 'prefix-max-norm' | 'scale';
    order: Order;
    step: number;
    gqa: boolean;
  }[] = [
    { normalization: 'prefix-max-norm', order: 2, step: 1, gqa: false },
    { normalization: 'prefix-max-norm', order: 3, step: 3, gqa: true },
    { normalization: 'scale', order: 2, step: 1, gqa: false },
    { normalization: 'scale', order: 4, step: 3, gqa: false },
    { normalization: 'prefix-max-norm', order: 1, step: 3, gqa: false },
  ];
  stateRuns.forEach(({ normalization, order, step, gqa }, i) => {
    const spec = buildSpec({
      order,
      normalization,
      causal: true,
      gqa,
      ...(gqa ? { heads: [4, 2] as const } : {}),
      batch: 2,
      queryLength: 10,
      headDim: 4,
      valueDim: 3,
      seed: 3300 + i,
    });
    const how = step === 1 ? 'token by token' : `in chunks of ${step}`;
    cases.push({
      kind: 'state',
      group: 'state',
      name: `stepping ${how} = parallel causal: ${describeSpec(spec)}`,
      spec,
      stepLength: step,
    });
  });
  cases.push(...invalidInputCases());
  const poisonSpec = buildSpec({
    order: 2,
    normalization: 'max-norm',
    queryLength: 4,
    headDim: 3,
    valueDim: 2,
    seed: 3400,
  });
  const poisons: { call: 'attention' | 'backward'; tensor: 'q' | 'k' | 'v' | 'dOut'; value: number }[] = [
    { call: 'attention', tensor: 'q', value: Number.NaN },
    { call: 'attention', tensor: 'k', value: Number.POSITIVE_INFINITY },
    { call: 'attention', tensor: 'v', value: Number.NEGATIVE_INFINITY },
    { call: 'backward', tensor: 'dOut', value: Number.NaN },
  ];
  for (const { call, tensor, value } of poisons) {
    cases.push({
      kind: 'non-finite',
      group: 'non-finite propagation',
      name: `${call} with ${value} in ${tensor} and checkFinite: false settles in time`,
      call,
      spec: { ...poisonSpec, options: { ...poisonSpec.options, checkFinite: false } },
      poison: { tensor, value },
    });
  }
  cases.push({
    kind: 'property',
    group: 'property',
    name: 'random small shapes and options match the oracle (fast-check)',
    runs: sizes === 'quick' ? 25 : 100,
    seed: 20261127,
  });

  return cases.map((testCase) => {
    const skip = skipReason(testCase, capabilities, sizes, limits);
    return skip === undefined ? testCase : { ...testCase, skip };
  });
}
