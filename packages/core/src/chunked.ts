import { describeValue, FastmaxError } from './errors.js';
import type { AttentionPath, ResolvedOptions } from './options.js';
import { type AttentionShape, keyLimit, validKeyCount } from './validate.js';

/**
 * A run of consecutive query rows and how they reach their keys. Every row i of the chunk sees keys
 * [0, keyLimit(i)), split in two:
 *
 * - keys [0, stateKeyEnd) through the moment state (the same keys for every row of the chunk);
 * - keys [stateKeyEnd, keyLimit(i)) directly, by evaluating f(s) pair by pair.
 *
 * Invariant: stateKeyEnd <= keyLimit(i) <= directKeyEnd for every row of the chunk, and stateKeyEnd
 * never decreases from one chunk to the next. The keys [previous chunk's stateKeyEnd, stateKeyEnd)
 * enter the state just before the chunk (forward), and in the backward pass they read the moments
 * of the queries of this chunk and all later ones.
 */
export interface QueryChunk {
  readonly queryStart: number;
  /** Exclusive. */
  readonly queryEnd: number;
  readonly stateKeyEnd: number;
  /** One past the last key any row of the chunk evaluates directly. */
  readonly directKeyEnd: number;
}

function requireLength(value: unknown, argument: string, minimum: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < minimum) {
    throw new FastmaxError('INVALID_OPTION', `${argument} must be an integer >= ${minimum}`, {
      argument,
      expected: `an integer >= ${minimum}`,
      actual: describeValue(value),
    });
  }
  return value;
}

/**
 * The causal chunk schedule: queries in chunks of `chunkSize`, query i seeing keys j <= i + M - N
 * among the first `validKeys`. Each chunk's state holds the keys before the chunk's own diagonal
 * block (for M > N that includes the M - N keys every query sees from the start), and the direct
 * block holds at most chunkSize keys: the C×C block on the diagonal, cut by padding.
 */
export function chunkRanges(
  queryLength: number,
  keyLength: number,
  chunkSize: number,
  validKeys: number = keyLength,
): QueryChunk[] {
  requireLength(queryLength, 'queryLength', 0);
  requireLength(keyLength, 'keyLength', 0);
  requireLength(chunkSize, 'chunkSize', 1);
  requireLength(validKeys, 'validKeys', 0);
  if (validKeys > keyLength) {
    throw new FastmaxError('INVALID_KEY_LENGTHS', 'validKeys cannot exceed keyLength', {
      argument: 'validKeys',
      expected: `an integer in [0, ${keyLength}]`,
      actual: String(validKeys),
    });
  }
  // Query i sees keys j < i + keyOffset + 1, the same rule as `keyLimit`.
  const keyOffset = keyLength - queryLength;
  const clampToValid = (end: number): number => Math.max(0, Math.min(validKeys, end));
  const chunks: QueryChunk[] = [];
  for (let start = 0; start < queryLength; start += chunkSize) {
    const end = Math.min(queryLength, start + chunkSize);
    chunks.push({
      queryStart: start,
      queryEnd: end,
      stateKeyEnd: clampToValid(start + keyOffset),
      directKeyEnd: clampToValid(end + keyOffset),
    });
  }
  return chunks;
}

/**
 * The schedule a backend follows for batch b, for either path, so both share one loop:
 *
 * - direct: one chunk, nothing in the state; every row evaluates its keys pair by pair;
 * - factorized, non-causal: one chunk, every valid key in the state, nothing direct;
 * - factorized, causal: `chunkRanges` with the plan's chunk size.
 */
export function querySchedule(
  batch: number,
  shape: AttentionShape,
  options: ResolvedOptions,
  path: AttentionPath,
  chunkSize: number,
): QueryChunk[] {
  const N = shape.queryLength;
  const valid = validKeyCount(batch, shape, options);
  if (path === 'direct') {
    // keyLimit only grows with i, so the last row sees the most keys.
    const directKeyEnd = N > 0 ? keyLimit(batch, N - 1, shape, options) : 0;
    return [{ queryStart: 0, queryEnd: N, stateKeyEnd: 0, directKeyEnd }];
  }
  if (!options.causal) return [{ queryStart: 0, queryEnd: N, stateKeyEnd: valid, directKeyEnd: valid }];
  return chunkRanges(N, shape.keyLength, chunkSize, valid);
}
