import type { ResolvedStateOptions, StateOptions } from './contract.js';
import { describeValue, FastmaxError } from './errors.js';
import { resolveOptions } from './options.js';
import type { Tensor } from './tensor.js';
import { type AttentionShape, validateAttentionInputs } from './validate.js';

function positiveInteger(value: unknown, argument: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
    throw new FastmaxError('INVALID_OPTION', `${argument} must be a positive integer`, {
      argument,
      expected: 'an integer >= 1',
      actual: describeValue(value),
    });
  }
  return value;
}

export function resolveStateOptions(options: StateOptions): ResolvedStateOptions {
  if (typeof options !== 'object' || options === null) {
    throw new FastmaxError('INVALID_OPTION', 'createState needs options', {
      argument: 'options',
      expected: '{ batch, heads, headDim, ... }',
      actual: describeValue(options),
    });
  }
  const batch = positiveInteger(options.batch, 'options.batch');
  const heads = positiveInteger(options.heads, 'options.heads');
  const kvHeads = positiveInteger(options.kvHeads ?? heads, 'options.kvHeads');
  const headDim = positiveInteger(options.headDim, 'options.headDim');
  const valueDim = positiveInteger(options.valueDim ?? headDim, 'options.valueDim');
  if (heads % kvHeads !== 0) {
    throw new FastmaxError('INVALID_HEADS', 'query heads must be a multiple of key/value heads', {
      argument: 'options.kvHeads',
      expected: `a divisor of heads = ${heads}`,
      actual: String(kvHeads),
    });
  }
  const normalization = options.normalization ?? 'prefix-max-norm';
  const decodable =
    normalization === 'prefix-max-norm' || (typeof normalization === 'object' && normalization !== null);
  if (!decodable) {
    throw new FastmaxError('INVALID_OPTION', 'decoding needs a normalization that does not look ahead', {
      argument: 'options.normalization',
      expected: "'prefix-max-norm' | { scale: number }",
      actual: describeValue(normalization),
    });
  }
  const resolved = resolveOptions({
    causal: true,
    normalization,
    ...(options.order === undefined ? {} : { order: options.order }),
    ...(options.coefficients === undefined ? {} : { coefficients: options.coefficients }),
    ...(options.temperature === undefined ? {} : { temperature: options.temperature }),
    ...(options.onDegenerateRow === undefined ? {} : { onDegenerateRow: options.onDegenerateRow }),
    ...(options.checkFinite === undefined ? {} : { checkFinite: options.checkFinite }),
  });
  return { batch, heads, kvHeads, headDim, valueDim, options: resolved };
}

/** Checks one decoding step's tensors against the state's sizes; returns the step's shape. */
export function validateStepInputs(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  state: ResolvedStateOptions,
): AttentionShape {
  const shape = validateAttentionInputs(q, k, v, state.options);
  const expected: [string, number, number][] = [
    ['q.shape[0]', state.batch, shape.batch],
    ['q.shape[1]', state.heads, shape.heads],
    ['k.shape[1]', state.kvHeads, shape.kvHeads],
    ['q.shape[3]', state.headDim, shape.headDim],
    ['v.shape[3]', state.valueDim, shape.valueDim],
  ];
  for (const [argument, want, got] of expected) {
    if (want !== got) {
      throw new FastmaxError('SHAPE_MISMATCH', 'step inputs must match the state', {
        argument,
        expected: String(want),
        actual: String(got),
      });
    }
  }
  if (shape.keyLength !== shape.queryLength) {
    throw new FastmaxError('SHAPE_MISMATCH', 'each step appends as many keys as queries', {
      argument: 'k.shape[2]',
      expected: String(shape.queryLength),
      actual: String(shape.keyLength),
    });
  }
  return shape;
}
