/**
 * Every failure Fastmax reports on purpose is a `FastmaxError` with a stable `code`, so callers can
 * branch on it and the conformance suite can check that each kind of bad input is named correctly.
 */
export type FastmaxErrorCode =
  /** A tensor does not have rank 4 or its data length does not match its shape. */
  | 'INVALID_SHAPE'
  /** Two tensors disagree on a dimension they must share (B, N/M, D, heads). */
  | 'SHAPE_MISMATCH'
  /** Query heads H are not a multiple of key/value heads Hkv. */
  | 'INVALID_HEADS'
  /** `keyLengths` has the wrong length or an entry outside [0, M]. */
  | 'INVALID_KEY_LENGTHS'
  /** `coefficients` has the wrong length or a non-finite entry. */
  | 'INVALID_COEFFICIENTS'
  /** `order` is not one of 1, 2, 3, 4. */
  | 'UNSUPPORTED_ORDER'
  /** Any other option outside its domain (temperature, scale, chunkSize, path, ...). */
  | 'INVALID_OPTION'
  /** An input holds NaN or ±Infinity. */
  | 'NON_FINITE_INPUT'
  /** A row's denominator Σ_j f(s_ij) is <= 0 and `onDegenerateRow: 'throw'` was asked for. */
  | 'DEGENERATE_DENOMINATOR'
  /** The backend does not declare the capability this call needs. */
  | 'UNSUPPORTED_CAPABILITY'
  /** No backend in the list is available (each one's reason is attached). */
  | 'BACKEND_UNAVAILABLE'
  /** The backend does not implement the contract version this core speaks. */
  | 'SPEC_VERSION_MISMATCH'
  /** The object was used after `dispose()`. */
  | 'DISPOSED'
  /** The GPU device was lost; create the backend again. */
  | 'DEVICE_LOST'
  /** An input or request exceeds what the backend can hold (and it cannot split the work). */
  | 'RESOURCE_EXHAUSTED'
  /** A backend failed in a way it could not classify (a crashed worker, a driver error). */
  | 'BACKEND_ERROR';

export interface FastmaxErrorDetails {
  /** The argument or option at fault, e.g. `'k'`, `'options.keyLengths[1]'`. */
  readonly argument?: string;
  /** What was expected, in words or as a value. */
  readonly expected?: string;
  /** What was received. */
  readonly actual?: string;
  readonly cause?: unknown;
}

export class FastmaxError extends Error {
  override readonly name = 'FastmaxError';
  readonly code: FastmaxErrorCode;
  readonly argument: string | undefined;
  readonly expected: string | undefined;
  readonly actual: string | undefined;

  constructor(code: FastmaxErrorCode, message: string, details: FastmaxErrorDetails = {}) {
    const parts = [message];
    if (details.argument !== undefined) parts.push(`argument: ${details.argument}`);
    if (details.expected !== undefined) parts.push(`expected: ${details.expected}`);
    if (details.actual !== undefined) parts.push(`actual: ${details.actual}`);
    super(
      `[${code}] ${parts.join('; ')}`,
      details.cause === undefined ? undefined : { cause: details.cause },
    );
    this.code = code;
    this.argument = details.argument;
    this.expected = details.expected;
    this.actual = details.actual;
  }
}

export function isFastmaxError(value: unknown, code?: FastmaxErrorCode): value is FastmaxError {
  return value instanceof FastmaxError && (code === undefined || value.code === code);
}

/** Shortens a value for an error message without dumping whole arrays. */
export function describeValue(value: unknown): string {
  if (typeof value === 'number') return Number.isNaN(value) ? 'NaN' : String(value);
  if (typeof value === 'string') return JSON.stringify(value);
  if (value === null || value === undefined) return String(value);
  if (Array.isArray(value) || ArrayBuffer.isView(value)) {
    const items = Array.from(value as ArrayLike<unknown>);
    const shown = items.slice(0, 8).map(describeValue).join(', ');
    return `[${shown}${items.length > 8 ? `, … (${items.length} items)` : ''}]`;
  }
  if (typeof value === 'object') {
    try {
      return JSON.stringify(value);
    } catch {
      return Object.prototype.toString.call(value);
    }
  }
  return String(value);
}
