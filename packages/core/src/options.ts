import { describeValue, FastmaxError } from './errors.js';

/** Degree p of the Taylor polynomial f(s) = Σ_{l<=p} a_l s^l. */
export type Order = 1 | 2 | 3 | 4;
export const SUPPORTED_ORDERS: readonly Order[] = [1, 2, 3, 4];

export type NormalizationMode = 'max-norm' | 'prefix-max-norm' | 'l2';
/** `{ scale }`: no centering, s = scale · q·k (the authors' code uses scale = 1/(8·sqrt(D))). */
export type Normalization = NormalizationMode | { readonly scale: number };
/** The names backends declare in their capabilities. */
export type NormalizationKind = NormalizationMode | 'scale';
export const NORMALIZATION_KINDS: readonly NormalizationKind[] = [
  'max-norm',
  'prefix-max-norm',
  'l2',
  'scale',
];

export type ResolvedNormalization =
  | { readonly kind: NormalizationMode }
  | { readonly kind: 'scale'; readonly scale: number };

/** Both paths are exact; they differ in cost. `'auto'` lets the planner choose. */
export type AttentionPath = 'factorized' | 'direct';

/** What to do with a query row whose denominator Σ_j f(s_ij) is <= 0 (see docs/math.md). */
export type DegenerateRowPolicy = 'zero' | 'throw';

export interface FastmaxOptions {
  /** Taylor order p in {1, 2, 3, 4}. Default 2. */
  readonly order?: Order;
  /** a_0..a_p, length order + 1, finite. Default a_l = 1/l!. */
  readonly coefficients?: readonly number[];
  /** Default `'max-norm'`, or `'prefix-max-norm'` when `causal`. */
  readonly normalization?: Normalization;
  /** Scores are divided by it; default 1. */
  readonly temperature?: number;
  /** Query i sees keys j <= i + M - N. Default false. */
  readonly causal?: boolean;
  /** Per-batch count of valid keys (keys at or past it are padding). Default: all M keys. */
  readonly keyLengths?: readonly number[] | Int32Array;
  /** Force a path instead of the planner's choice. Default `'auto'`. */
  readonly path?: 'auto' | AttentionPath;
  /** Chunk length of the causal factorized algorithm. Default: the planner's choice. */
  readonly chunkSize?: number;
  /** Default `'zero'`: such rows output zeros and are counted in the result. */
  readonly onDegenerateRow?: DegenerateRowPolicy;
  /** Scan host inputs for NaN/±Infinity and refuse them. Default true. */
  readonly checkFinite?: boolean;
}

/** Options after defaults and validation; this is what backends receive. */
export interface ResolvedOptions {
  readonly order: Order;
  readonly coefficients: Float64Array;
  readonly normalization: ResolvedNormalization;
  readonly temperature: number;
  readonly causal: boolean;
  /** null when every key of every batch is valid. */
  readonly keyLengths: Int32Array | null;
  readonly path: 'auto' | AttentionPath;
  readonly chunkSize: number | undefined;
  readonly onDegenerateRow: DegenerateRowPolicy;
  readonly checkFinite: boolean;
}

export function defaultCoefficients(order: Order): Float64Array {
  const coefficients = new Float64Array(order + 1);
  let factorial = 1;
  for (let l = 0; l <= order; l++) {
    if (l > 0) factorial *= l;
    coefficients[l] = 1 / factorial;
  }
  return coefficients;
}

export function normalizationKind(normalization: ResolvedNormalization): NormalizationKind {
  return normalization.kind;
}

function resolveOrder(order: unknown): Order {
  if (order === undefined) return 2;
  if (!SUPPORTED_ORDERS.includes(order as Order)) {
    throw new FastmaxError('UNSUPPORTED_ORDER', 'order must be 1, 2, 3 or 4', {
      argument: 'options.order',
      expected: '1 | 2 | 3 | 4',
      actual: describeValue(order),
    });
  }
  return order as Order;
}

function resolveCoefficients(coefficients: unknown, order: Order): Float64Array {
  if (coefficients === undefined) return defaultCoefficients(order);
  if (!Array.isArray(coefficients) && !ArrayBuffer.isView(coefficients)) {
    throw new FastmaxError('INVALID_COEFFICIENTS', 'coefficients must be an array of numbers', {
      argument: 'options.coefficients',
      expected: `${order + 1} finite numbers`,
      actual: describeValue(coefficients),
    });
  }
  const values = Array.from(coefficients as ArrayLike<unknown>);
  if (values.length !== order + 1) {
    throw new FastmaxError('INVALID_COEFFICIENTS', 'coefficients must hold a_0..a_p', {
      argument: 'options.coefficients',
      expected: `${order + 1} values for order ${order}`,
      actual: `${values.length} values`,
    });
  }
  values.forEach((value, l) => {
    if (typeof value !== 'number' || !Number.isFinite(value)) {
      throw new FastmaxError('INVALID_COEFFICIENTS', 'every coefficient must be a finite number', {
        argument: `options.coefficients[${l}]`,
        expected: 'a finite number',
        actual: describeValue(value),
      });
    }
  });
  return Float64Array.from(values as number[]);
}

function resolveNormalization(normalization: unknown, causal: boolean): ResolvedNormalization {
  if (normalization === undefined) return { kind: causal ? 'prefix-max-norm' : 'max-norm' };
  if (normalization === 'max-norm' || normalization === 'prefix-max-norm' || normalization === 'l2') {
    return { kind: normalization };
  }
  if (typeof normalization === 'object' && normalization !== null && 'scale' in normalization) {
    const scale = (normalization as { scale: unknown }).scale;
    if (typeof scale !== 'number' || !Number.isFinite(scale) || scale <= 0) {
      throw new FastmaxError('INVALID_OPTION', 'normalization scale must be a positive finite number', {
        argument: 'options.normalization.scale',
        expected: 'a finite number > 0',
        actual: describeValue(scale),
      });
    }
    return { kind: 'scale', scale };
  }
  throw new FastmaxError('INVALID_OPTION', 'unknown normalization', {
    argument: 'options.normalization',
    expected: "'max-norm' | 'prefix-max-norm' | 'l2' | { scale: number }",
    actual: describeValue(normalization),
  });
}

function resolveBoolean(value: unknown, name: string, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') {
    throw new FastmaxError('INVALID_OPTION', `${name} must be a boolean`, {
      argument: `options.${name}`,
      expected: 'true | false',
      actual: describeValue(value),
    });
  }
  return value;
}

function resolveEnum<T extends string>(value: unknown, name: string, allowed: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  if (!allowed.includes(value as T)) {
    throw new FastmaxError('INVALID_OPTION', `unknown ${name}`, {
      argument: `options.${name}`,
      expected: allowed.map((item) => `'${item}'`).join(' | '),
      actual: describeValue(value),
    });
  }
  return value as T;
}

/**
 * Applies defaults and checks every option that does not depend on tensor shapes. `keyLengths` is
 * only checked for type here; its range is checked against the shapes in `validateAttentionInputs`.
 */
export function resolveOptions(options: FastmaxOptions = {}): ResolvedOptions {
  if (typeof options !== 'object' || options === null) {
    throw new FastmaxError('INVALID_OPTION', 'options must be an object', {
      argument: 'options',
      expected: 'an object or undefined',
      actual: describeValue(options),
    });
  }
  const order = resolveOrder(options.order);
  const causal = resolveBoolean(options.causal, 'causal', false);
  const temperature = options.temperature ?? 1;
  if (typeof temperature !== 'number' || !Number.isFinite(temperature) || temperature <= 0) {
    throw new FastmaxError('INVALID_OPTION', 'temperature must be a positive finite number', {
      argument: 'options.temperature',
      expected: 'a finite number > 0',
      actual: describeValue(temperature),
    });
  }
  const chunkSize = options.chunkSize;
  if (chunkSize !== undefined && (!Number.isInteger(chunkSize) || chunkSize < 1 || chunkSize > 65536)) {
    throw new FastmaxError('INVALID_OPTION', 'chunkSize must be an integer in [1, 65536]', {
      argument: 'options.chunkSize',
      expected: 'an integer in [1, 65536]',
      actual: describeValue(chunkSize),
    });
  }
  let keyLengths: Int32Array | null = null;
  if (options.keyLengths !== undefined) {
    const raw = options.keyLengths as unknown;
    if (!Array.isArray(raw) && !(raw instanceof Int32Array)) {
      throw new FastmaxError('INVALID_KEY_LENGTHS', 'keyLengths must be an array of integers', {
        argument: 'options.keyLengths',
        expected: 'number[] or Int32Array with one entry per batch',
        actual: describeValue(raw),
      });
    }
    const values = Array.from(raw as ArrayLike<unknown>);
    values.forEach((value, b) => {
      if (typeof value !== 'number' || !Number.isInteger(value)) {
        throw new FastmaxError('INVALID_KEY_LENGTHS', 'every key length must be an integer', {
          argument: `options.keyLengths[${b}]`,
          expected: 'an integer in [0, M]',
          actual: describeValue(value),
        });
      }
    });
    keyLengths = Int32Array.from(values as number[]);
  }
  return {
    order,
    coefficients: resolveCoefficients(options.coefficients, order),
    normalization: resolveNormalization(options.normalization, causal),
    temperature,
    causal,
    keyLengths,
    path: resolveEnum(options.path, 'path', ['auto', 'factorized', 'direct'] as const, 'auto'),
    chunkSize,
    onDegenerateRow: resolveEnum(
      options.onDegenerateRow,
      'onDegenerateRow',
      ['zero', 'throw'] as const,
      'zero',
    ),
    checkFinite: resolveBoolean(options.checkFinite, 'checkFinite', true),
  };
}
