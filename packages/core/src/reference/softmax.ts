import { describeValue, FastmaxError } from '../errors.js';
import { resolveOptions } from '../options.js';
import type { HostTensor } from '../tensor.js';
import { keyLimit, kvHeadOf, validateAttentionInputs } from '../validate.js';
import { requireHostTensors } from './oracle.js';

export interface SoftmaxOptions {
  /** Query i sees keys j <= i + M - N (the same rule as Fastmax). Default false. */
  readonly causal?: boolean;
  /** Per-batch count of valid keys. Default: all M keys. */
  readonly keyLengths?: readonly number[] | Int32Array;
  /** Scores are q·k·scale. Default 1/sqrt(D). */
  readonly scale?: number;
}

/**
 * Plain scaled dot-product softmax attention in float64, the baseline Fastmax approximates. It uses
 * the same GQA, causal and padding masks as Fastmax (through `keyLimit`), and a row that sees no key
 * outputs 0, like a degenerate Fastmax row.
 */
export function softmaxAttention(
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  options: SoftmaxOptions = {},
): { output: Float64Array } {
  requireHostTensors({ q, k, v });
  const { scale: requestedScale } = options;
  if (
    requestedScale !== undefined &&
    (typeof requestedScale !== 'number' || !Number.isFinite(requestedScale) || requestedScale <= 0)
  ) {
    throw new FastmaxError('INVALID_OPTION', 'scale must be a positive finite number', {
      argument: 'options.scale',
      expected: 'a finite number > 0',
      actual: describeValue(requestedScale),
    });
  }
  // Reuse Fastmax's option and shape checks so bad input fails with the same FastmaxErrors.
  const resolved = resolveOptions({
    ...(options.causal === undefined ? {} : { causal: options.causal }),
    ...(options.keyLengths === undefined ? {} : { keyLengths: options.keyLengths }),
  });
  const shape = validateAttentionInputs(q, k, v, resolved);
  const { batch: B, heads: H, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
  const scale = requestedScale ?? 1 / Math.sqrt(D);
  const output = new Float64Array(B * H * N * Dv);
  const scores = new Float64Array(M);

  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const keyHead = (b * shape.kvHeads + kvHeadOf(h, shape)) * M;
      for (let i = 0; i < N; i++) {
        const row = (b * H + h) * N + i;
        const limit = keyLimit(b, i, shape, resolved);
        if (limit === 0) continue;
        let max = Number.NEGATIVE_INFINITY;
        for (let j = 0; j < limit; j++) {
          let s = 0;
          for (let d = 0; d < D; d++) s += q.data[row * D + d]! * k.data[(keyHead + j) * D + d]!;
          scores[j] = s * scale;
          max = Math.max(max, scores[j]!);
        }
        // Subtracting the row maximum keeps every exponent <= 0, so nothing overflows.
        let den = 0;
        for (let j = 0; j < limit; j++) {
          scores[j] = Math.exp(scores[j]! - max);
          den += scores[j]!;
        }
        for (let j = 0; j < limit; j++) {
          const a = scores[j]! / den;
          for (let c = 0; c < Dv; c++) output[row * Dv + c]! += a * v.data[(keyHead + j) * Dv + c]!;
        }
      }
    }
  }
  return { output };
}
