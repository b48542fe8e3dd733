import { referenceAttention } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import { checkAgainstOracle, sampledOracleRows, sampleRowIndices } from '../src/check.js';
import { attentionWorkload } from '../src/workload.js';

describe('sampleRowIndices', () => {
  it('returns distinct sorted rows including the first and last', () => {
    const rows = sampleRowIndices(1000, 64, 3);
    expect(rows).toHaveLength(64);
    expect(rows[0]).toBe(0);
    expect(rows.at(-1)).toBe(999);
    expect(new Set(rows).size).toBe(64);
    expect([...rows].sort((a, b) => a - b)).toEqual(rows);
  });

  it('returns every row when asked for at least as many as there are', () => {
    expect(sampleRowIndices(5, 8, 1)).toEqual([0, 1, 2, 3, 4]);
  });
});

describe('sampledOracleRows', () => {
  // The sub-problems must reproduce the full oracle's rows; both are float64 evaluations of the
  // same sums in a different order, so they agree to rounding (1e-12 relative is ~10^4 ulps).
  const shape = { batch: 2, heads: 4, kvHeads: 2, queryLength: 70, headDim: 8, valueDim: 5 };
  const cases = [
    { causal: false },
    { causal: true },
    { causal: false, normalization: 'prefix-max-norm' as const },
    { causal: true, normalization: 'l2' as const },
    { causal: true, order: 3 as const },
    { causal: false, normalization: { scale: 0.3 } },
  ];
  it.each(cases)('matches the full oracle on the sampled rows for %j', (options) => {
    const { q, k, v } = attentionWorkload(shape, 11);
    // Scale one early query up so it sets the divisor of most rows but is not itself sampled.
    for (let bh = 0; bh < 8; bh++) for (let d = 0; d < 8; d++) q.data[(bh * 70 + 3) * 8 + d]! *= 4;
    const rows = [0, 10, 33, 34, 69];
    const full = referenceAttention(q, k, v, options).output;
    const sampled = sampledOracleRows(q, k, v, options, rows);
    for (let bh = 0; bh < 8; bh++) {
      rows.forEach((i, r) => {
        for (let d = 0; d < 5; d++) {
          const expected = full[(bh * 70 + i) * 5 + d]!;
          expect(Math.abs(sampled[(bh * rows.length + r) * 5 + d]! - expected)).toBeLessThanOrEqual(
            1e-12 * Math.max(1, Math.abs(expected)),
          );
        }
      });
    }
  });
});

describe('checkAgainstOracle', () => {
  const shape = { batch: 1, heads: 2, queryLength: 40, headDim: 8 };
  const { q, k, v } = attentionWorkload(shape, 5);
  const oracleOutput = (causal: boolean) => ({
    shape: [1, 2, 40, 8] as const,
    data: Float32Array.from(referenceAttention(q, k, v, { causal }).output),
  });

  it.each([
    [false, 100],
    [true, 100],
    [true, 10],
  ])('finds float32 rounding only in the oracle itself (causal %s, full-check limit %d)', (causal, limit) => {
    const check = checkAgainstOracle(
      q,
      k,
      v,
      oracleOutput(causal),
      { causal },
      {
        fullCheckLimit: limit,
        sampleRows: 12,
        seed: 1,
      },
    );
    expect(check.sampled).toBe(limit < 40);
    expect(check.rowsChecked).toBe(limit < 40 ? 12 : 40);
    // float32 rounding of the output: at most 2^-24 relative to the row's largest value.
    expect(check.maxRelativeError).toBeLessThanOrEqual(2 ** -24);
  });

  it('catches a wrong value in a checked row, and NaN', () => {
    const wrong = oracleOutput(true);
    wrong.data[(40 + 39) * 8 + 2]! += 1e-3;
    const check = checkAgainstOracle(
      q,
      k,
      v,
      wrong,
      { causal: true },
      { fullCheckLimit: 10, sampleRows: 12, seed: 1 },
    );
    expect(check.maxRelativeError).toBeGreaterThan(1e-4);
    const nan = oracleOutput(false);
    nan.data[0] = Number.NaN;
    const nanCheck = checkAgainstOracle(q, k, v, nan, {}, { fullCheckLimit: 100, sampleRows: 12, seed: 1 });
    expect(nanCheck.maxRelativeError).toBeNaN();
  });
});
