import type { GradientBuffers } from './contract.js';
import { describeValue, FastmaxError } from './errors.js';
import type { ResolvedOptions } from './options.js';
import { hasNonFinite } from './prepare-rows.js';
import { isDeviceTensor, type Shape4, shapeSize, type Tensor } from './tensor.js';

/** The sizes of one attention call: q is [B, H, N, D], k is [B, Hkv, M, D], v is [B, Hkv, M, Dv]. */
export interface AttentionShape {
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
}

function checkTensor(tensor: unknown, name: string): Shape4 {
  if (typeof tensor !== 'object' || tensor === null || !('shape' in tensor)) {
    throw new FastmaxError('INVALID_SHAPE', `${name} must be a tensor { shape, data }`, {
      argument: name,
      expected: '{ shape: [B, H, N, D], data: Float32Array }',
      actual: describeValue(tensor),
    });
  }
  const shape = (tensor as { shape: unknown }).shape;
  if (!Array.isArray(shape) || shape.length !== 4) {
    throw new FastmaxError('INVALID_SHAPE', `${name} must have rank 4 (row-major B×H×N×D)`, {
      argument: `${name}.shape`,
      expected: 'rank 4',
      actual: Array.isArray(shape) ? `rank ${shape.length} ${describeValue(shape)}` : describeValue(shape),
    });
  }
  shape.forEach((size, axis) => {
    // Empty dimensions are refused rather than special-cased in every backend.
    if (!Number.isInteger(size) || (size as number) < 1) {
      throw new FastmaxError('INVALID_SHAPE', `${name} dimensions must be positive integers`, {
        argument: `${name}.shape[${axis}]`,
        expected: 'an integer >= 1',
        actual: describeValue(size),
      });
    }
  });
  const typedShape = shape as unknown as Shape4;
  if (!isDeviceTensor(tensor as Tensor)) {
    const data = (tensor as unknown as { data: unknown }).data;
    if (!(data instanceof Float32Array)) {
      throw new FastmaxError('INVALID_SHAPE', `${name}.data must be a Float32Array`, {
        argument: `${name}.data`,
        expected: 'Float32Array',
        actual: data === null || data === undefined ? String(data) : (data as object).constructor.name,
      });
    }
    if (data.length !== shapeSize(typedShape)) {
      throw new FastmaxError('INVALID_SHAPE', `${name}.data length does not match its shape`, {
        argument: `${name}.data`,
        expected: `${shapeSize(typedShape)} values for shape ${describeValue(shape)}`,
        actual: `${data.length} values`,
      });
    }
  }
  return typedShape;
}

function mismatch(argument: string, expected: number, actual: number, what: string): FastmaxError {
  return new FastmaxError('SHAPE_MISMATCH', `${what} must agree`, {
    argument,
    expected: String(expected),
    actual: String(actual),
  });
}

/** Rejects NaN and ±Infinity in a host tensor, naming the first bad flat index. */
export function checkFinite(tensor: Tensor, name: string): void {
  if (isDeviceTensor(tensor)) return;
  const data = tensor.data;
  const length = data.length;
  if (!hasNonFinite(data, 0, length)) return;
  for (let index = 0; index < length; index++) {
    const value = data[index]!;
    if (value - value !== 0) {
      throw new FastmaxError('NON_FINITE_INPUT', `${name} holds a non-finite value`, {
        argument: `${name}.data[${index}]`,
        expected: 'a finite number',
        actual: describeValue(value),
      });
    }
  }
}

/**
 * Checks shapes, heads and key lengths, and scans q, k and v for non-finite values when
 * `options.checkFinite` and `scanValues` (false when the backend scans them itself) are both true.
 */
export function validateAttentionInputs(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  options: ResolvedOptions,
  scanValues = true,
): AttentionShape {
  const [batch, heads, queryLength, headDim] = checkTensor(q, 'q');
  const [kBatch, kvHeads, keyLength, kDim] = checkTensor(k, 'k');
  const [vBatch, vHeads, vLength, valueDim] = checkTensor(v, 'v');
  if (kBatch !== batch) throw mismatch('k.shape[0]', batch, kBatch, 'batch sizes of q and k');
  if (vBatch !== batch) throw mismatch('v.shape[0]', batch, vBatch, 'batch sizes of q and v');
  if (kDim !== headDim) throw mismatch('k.shape[3]', headDim, kDim, 'head dims D of q and k');
  if (vHeads !== kvHeads) throw mismatch('v.shape[1]', kvHeads, vHeads, 'head counts of k and v');
  if (vLength !== keyLength)
    throw mismatch('v.shape[2]', keyLength, vLength, 'sequence lengths M of k and v');
  if (kvHeads === 0 || heads % kvHeads !== 0) {
    throw new FastmaxError('INVALID_HEADS', 'query heads must be a multiple of key/value heads', {
      argument: 'k.shape[1]',
      expected: `a divisor of H = ${heads} (and > 0)`,
      actual: String(kvHeads),
    });
  }
  const keyLengths = options.keyLengths;
  if (keyLengths !== null) {
    if (keyLengths.length !== batch) {
      throw new FastmaxError('INVALID_KEY_LENGTHS', 'keyLengths needs one entry per batch', {
        argument: 'options.keyLengths',
        expected: `${batch} entries`,
        actual: `${keyLengths.length} entries`,
      });
    }
    keyLengths.forEach((length, b) => {
      if (length < 0 || length > keyLength) {
        throw new FastmaxError('INVALID_KEY_LENGTHS', 'a key length is out of range', {
          argument: `options.keyLengths[${b}]`,
          expected: `an integer in [0, ${keyLength}]`,
          actual: String(length),
        });
      }
    });
  }
  if (options.checkFinite && scanValues) {
    checkFinite(q, 'q');
    checkFinite(k, 'k');
    checkFinite(v, 'v');
  }
  return { batch, heads, kvHeads, queryLength, keyLength, headDim, valueDim };
}

/**
 * dOut must have the output's shape [B, H, N, Dv]; its values are scanned for NaN and ±Infinity when
 * `options.checkFinite` and `scanValues` (false when the backend scans them itself) are both true.
 */
export function validateOutputGradient(
  dOut: Tensor,
  shape: AttentionShape,
  options: ResolvedOptions,
  scanValues = true,
): void {
  const [b, h, n, dv] = checkTensor(dOut, 'dOut');
  const expected = [shape.batch, shape.heads, shape.queryLength, shape.valueDim];
  [b, h, n, dv].forEach((size, axis) => {
    if (size !== expected[axis])
      throw mismatch(`dOut.shape[${axis}]`, expected[axis]!, size, 'dOut and the output shape');
  });
  if (options.checkFinite && scanValues) checkFinite(dOut, 'dOut');
}

/**
 * A caller's output array (`options.out`): a Float32Array of B·H·N·Dv floats that shares no memory
 * with q, k or v. Backends write output rows while they still read inputs (a calling thread computes
 * its share into the caller's array while workers read staged copies), so an overlap would feed
 * results back in as inputs.
 */
export function validateOutputBuffer(
  out: unknown,
  shape: AttentionShape,
  inputs: { readonly q: Tensor; readonly k: Tensor; readonly v: Tensor },
): Float32Array {
  return validateResultArray(
    out,
    'options.out',
    'the output',
    'B·H·N·Dv',
    [shape.batch, shape.heads, shape.queryLength, shape.valueDim],
    inputs,
    {},
  );
}

/**
 * A caller's gradient arrays (`options.gradientsOut`): dq, dk and dv as Float32Arrays of the
 * gradients' sizes, sharing no memory with q, k, v, dOut or one another (a backend writes one
 * while it reads the others).
 */
export function validateGradientBuffers(
  buffers: unknown,
  shape: AttentionShape,
  inputs: { readonly q: Tensor; readonly k: Tensor; readonly v: Tensor; readonly dOut: Tensor },
): GradientBuffers {
  if (buffers === null || typeof buffers !== 'object') {
    throw new FastmaxError('INVALID_OPTION', 'options.gradientsOut must be an object of dq, dk and dv', {
      argument: 'options.gradientsOut',
      expected: '{ dq, dk, dv } of Float32Arrays',
      actual: describeValue(buffers),
    });
  }
  const given = buffers as Record<'dq' | 'dk' | 'dv', unknown>;
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
  const gradients = [
    ['dq', 'B·H·N·D', [B, H, N, D]],
    ['dk', 'B·Hkv·M·D', [B, Hkv, M, D]],
    ['dv', 'B·Hkv·M·Dv', [B, Hkv, M, Dv]],
  ] as const;
  const checked: Record<string, Float32Array> = {};
  for (const [name, sizeName, dims] of gradients) {
    const argument = `options.gradientsOut.${name}`;
    checked[argument] = validateResultArray(given[name], argument, name, sizeName, dims, inputs, checked);
  }
  return {
    dq: checked['options.gradientsOut.dq']!,
    dk: checked['options.gradientsOut.dk']!,
    dv: checked['options.gradientsOut.dv']!,
  };
}

/**
 * A caller's host array for a result (`argument`): a Float32Array of the result's size that shares
 * no memory with the inputs or with `others`. Backends write results while they still read inputs
 * (a calling thread computes its share into the caller's array while workers read staged copies),
 * so an overlap would feed them their own partial results.
 */
function validateResultArray(
  value: unknown,
  argument: string,
  result: string,
  sizeName: string,
  dims: readonly number[],
  inputs: Readonly<Record<string, Tensor>>,
  others: Readonly<Record<string, Float32Array>>,
): Float32Array {
  const length = dims.reduce((product, size) => product * size, 1);
  if (!(value instanceof Float32Array)) {
    throw new FastmaxError('INVALID_OPTION', `${argument} must be a Float32Array`, {
      argument,
      expected: `a Float32Array of ${sizeName} = ${length} values`,
      actual:
        value === null || typeof value !== 'object'
          ? describeValue(value)
          : (value as object).constructor.name,
    });
  }
  if (value.length !== length) {
    throw new FastmaxError('INVALID_SHAPE', `${argument} does not fit ${result}`, {
      argument,
      expected: `${length} values (${sizeName} for [${dims.join(', ')}])`,
      actual: `${value.length} values`,
    });
  }
  const names = Object.keys(inputs);
  for (const name of names) {
    const tensor = inputs[name]!;
    if (isDeviceTensor(tensor) || !overlaps(value, tensor.data)) continue;
    throw new FastmaxError('INVALID_OPTION', `${argument} shares memory with ${name}.data`, {
      argument,
      expected: `an array that shares no memory with ${names.slice(0, -1).join(', ')} or ${names.at(-1)}`,
      actual: `bytes [${value.byteOffset}, ${value.byteOffset + value.byteLength}) of the buffer that holds ${name}.data at [${tensor.data.byteOffset}, ${tensor.data.byteOffset + tensor.data.byteLength})`,
    });
  }
  for (const [name, other] of Object.entries(others)) {
    if (!overlaps(value, other)) continue;
    throw new FastmaxError('INVALID_OPTION', `${argument} shares memory with ${name}`, {
      argument,
      expected: `an array that shares no memory with ${name}`,
      actual: `bytes [${value.byteOffset}, ${value.byteOffset + value.byteLength}) of the buffer that holds ${name} at [${other.byteOffset}, ${other.byteOffset + other.byteLength})`,
    });
  }
  return value;
}

function overlaps(a: Float32Array, b: Float32Array): boolean {
  return (
    a.buffer === b.buffer &&
    a.byteOffset < b.byteOffset + b.byteLength &&
    b.byteOffset < a.byteOffset + a.byteLength
  );
}

/** The key/value head that query head h reads: consecutive query heads share one (GQA/MQA). */
export function kvHeadOf(head: number, shape: AttentionShape): number {
  return Math.floor(head / (shape.heads / shape.kvHeads));
}

/** Number of keys of batch b that are not padding. */
export function validKeyCount(batch: number, shape: AttentionShape, options: ResolvedOptions): number {
  return options.keyLengths === null ? shape.keyLength : options.keyLengths[batch]!;
}

/**
 * One past the last key query i may see: min(valid keys, i + M - N + 1) when causal, else the valid
 * key count. Everything a backend needs to mask is this one number per query row.
 */
export function keyLimit(
  batch: number,
  query: number,
  shape: AttentionShape,
  options: ResolvedOptions,
): number {
  const valid = validKeyCount(batch, shape, options);
  if (!options.causal) return valid;
  return Math.max(0, Math.min(valid, query + shape.keyLength - shape.queryLength + 1));
}
