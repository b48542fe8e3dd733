import { describe, expect, it } from 'vitest';
import {
  type AttentionShape,
  estimateCosts,
  featureCount,
  planAttention,
  resolveOptions,
} from '../src/index.js';

const shape = (N: number, M: number, D = 64): AttentionShape => ({
  batch: 1,
  heads: 1,
  kvHeads: 1,
  queryLength: N,
  keyLength: M,
  headDim: D,
  valueDim: D,
});

describe('planAttention', () => {
  it('chooses direct for short sequences and factorized for long ones (p = 2, D = 64)', () => {
    const options = resolveOptions({ order: 2 });
    expect(planAttention(shape(64, 64), options).path).toBe('direct');
    expect(planAttention(shape(65536, 65536), options).path).toBe('factorized');
  });

  it('never plans a moment state beyond MAX_MOMENT_VALUES on its own (p = 4, D = 64)', () => {
    const options = resolveOptions({ order: 4 });
    expect(featureCount(64, 4)).toBe(814385);
    const plan = planAttention(shape(4_000_000, 4_000_000), options);
    expect(plan.path).toBe('direct');
    expect(plan.reason).toMatch(/moment state/);
  });

  it('honours a forced path and refuses one the backend lacks', () => {
    const options = resolveOptions({ path: 'factorized' });
    expect(planAttention(shape(8, 8), options).path).toBe('factorized');
    expect(() => planAttention(shape(8, 8), options, ['direct'])).toThrow(/UNSUPPORTED_CAPABILITY/);
  });

  it('counts only the causal pairs that exist when M < N', () => {
    const options = resolveOptions({ causal: true, order: 1 });
    const D = 4;
    // N = 10 queries, M = 3 keys: rows 7, 8, 9 see 1, 2, 3 keys: 6 pairs of (D + Dv + p) work.
    expect(estimateCosts(shape(10, 3, D), options, 4).direct).toBe(6 * (D + D + 1));
    // M >= N: N(N+1)/2 + N(M - N) pairs.
    expect(estimateCosts(shape(3, 5, D), options, 4).direct).toBe((6 + 3 * 2) * (D + D + 1));
  });
});
