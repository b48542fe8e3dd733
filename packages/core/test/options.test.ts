import { describe, expect, it } from 'vitest';
import { FastmaxError, featureCount, resolveOptions } from '../src/index.js';

describe('resolveOptions', () => {
  it('defaults to order 2 with Taylor coefficients and max-norm', () => {
    const options = resolveOptions();
    expect(options.order).toBe(2);
    expect(Array.from(options.coefficients)).toEqual([1, 1, 0.5]);
    expect(options.normalization).toEqual({ kind: 'max-norm' });
  });
  it('defaults to prefix-max-norm when causal', () => {
    expect(resolveOptions({ causal: true }).normalization).toEqual({ kind: 'prefix-max-norm' });
  });
  it('rejects non-finite coefficients naming the index', () => {
    expect(() => resolveOptions({ order: 1, coefficients: [1, Number.NaN] })).toThrow(/coefficients\[1\]/);
    try {
      resolveOptions({ order: 1, coefficients: [1, Number.POSITIVE_INFINITY] });
    } catch (error) {
      expect(error).toBeInstanceOf(FastmaxError);
      expect((error as FastmaxError).code).toBe('INVALID_COEFFICIENTS');
    }
  });
});

describe('featureCount', () => {
  it('packs symmetric monomials: p = 2, D = 64 gives 2145', () => {
    expect(featureCount(64, 2)).toBe(2145);
  });
});
