import { describe, expect, it } from 'vitest';
import { checkFinite, FastmaxError, featureCount, resolveOptions } from '../src/index.js';

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

describe('checkFinite', () => {
  it('names the first non-finite value wherever it sits, and passes finite data', () => {
    for (const bad of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
      for (const at of [0, 5, 6, 7, 8]) {
        const data = new Float32Array(9).fill(1.5);
        data[at] = bad;
        expect(() => checkFinite({ shape: [1, 1, 3, 3], data }, 'q')).toThrow(`q.data[${at}]`);
      }
    }
    expect(() =>
      checkFinite({ shape: [1, 1, 3, 3], data: new Float32Array(9).fill(-3e38) }, 'q'),
    ).not.toThrow();
  });
});
