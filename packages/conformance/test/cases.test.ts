import type { BackendCapabilities } from '@fastmax/core';
import { resolveOptions } from '@fastmax/core';
import { referenceBackend } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import {
  type AttentionSpec,
  adaptToCapabilities,
  type ConformanceCase,
  compareTensors,
  conformanceCases,
  NORMALIZATIONS,
  ORDERS,
  QUICK_MAX_LENGTH,
  randomTensor,
  SCALE_FLOOR,
} from '../src/index.js';

const full: BackendCapabilities = referenceBackend().capabilities;

type Axis = (spec: AttentionSpec) => string;
const axes: Record<string, Axis> = {
  order: (s) => String(s.options.order),
  normalization: (s) =>
    typeof s.options.normalization === 'object' ? 'scale' : String(s.options.normalization),
  path: (s) => String(s.options.path),
  causal: (s) => String(s.options.causal ?? false),
  padding: (s) => String(s.options.keyLengths !== undefined),
  gqa: (s) => String(s.kvHeads !== s.heads),
  cross: (s) => String(s.keyLength !== s.queryLength),
};
const values: Record<string, string[]> = {
  order: ORDERS.map(String),
  normalization: [...NORMALIZATIONS],
  path: ['factorized', 'direct'],
  causal: ['false', 'true'],
  padding: ['false', 'true'],
  gqa: ['false', 'true'],
  cross: ['false', 'true'],
};

function missingPairs(specs: readonly AttentionSpec[], allowed: Record<string, string[]>): string[] {
  const names = Object.keys(axes);
  const missing: string[] = [];
  for (let a = 0; a < names.length; a++) {
    for (let b = a + 1; b < names.length; b++) {
      const [x, y] = [names[a]!, names[b]!];
      const seen = new Set(specs.map((s) => `${axes[x]!(s)}|${axes[y]!(s)}`));
      for (const vx of allowed[x]!) {
        for (const vy of allowed[y]!) if (!seen.has(`${vx}|${vy}`)) missing.push(`${x}=${vx} × ${y}=${vy}`);
      }
    }
  }
  return missing;
}

const specsOf = (list: readonly ConformanceCase[], kind: 'forward' | 'backward') =>
  list.flatMap((c) =>
    c.kind === kind && c.group !== 'shapes' && c.group !== 'large' && c.skip === undefined ? [c.spec] : [],
  );

describe('conformanceCases', () => {
  const cases = conformanceCases(full);

  it('gives every case a unique, stable name', () => {
    const names = cases.map((c) => `${c.group} > ${c.name}`);
    expect(new Set(names).size).toBe(names.length);
    expect(conformanceCases(full).map((c) => c.name)).toEqual(cases.map((c) => c.name));
  });

  it('skips nothing for a backend that declares every capability', () => {
    expect(cases.filter((c) => c.skip !== undefined && c.kind !== 'contract').map((c) => c.name)).toEqual([]);
  });

  it('covers every pair of axis values in the forward and the backward matrix', () => {
    expect(missingPairs(specsOf(cases, 'forward'), values)).toEqual([]);
    expect(missingPairs(specsOf(cases, 'backward'), values)).toEqual([]);
  });

  it('keeps every supported pair covered when a backend lacks one optional feature', () => {
    const features = [
      ['causal', 'causal'],
      ['keyPadding', 'padding'],
      ['groupedQuery', 'gqa'],
      ['crossAttention', 'cross'],
    ] as const;
    for (const [capability, axis] of features) {
      const partial = conformanceCases({ ...full, [capability]: false });
      const allowed = { ...values, [axis]: ['false'] };
      expect(missingPairs(specsOf(partial, 'forward'), allowed), capability).toEqual([]);
      const skipped = partial.filter((c) => c.skip?.includes(`capabilities.${capability}`));
      expect(skipped.length, capability).toBeGreaterThan(0);
    }
    // A backend with one path runs the matrix on that path ('auto'), so no pair is lost.
    const caps = { ...full, paths: ['factorized'] as const };
    const onePath = conformanceCases(caps).map((c) => adaptToCapabilities(c, caps));
    const effective = specsOf(onePath, 'forward').map((s) => ({
      ...s,
      options: { ...s.options, path: s.options.path === 'auto' ? ('factorized' as const) : s.options.path },
    })) as AttentionSpec[];
    expect(missingPairs(effective, { ...values, path: ['factorized'] })).toEqual([]);
    expect(
      onePath
        .filter((c) => c.skip?.includes("the 'direct' path"))
        .every((c) => c.group === 'shapes' || c.group === 'large' || c.name.startsWith('shape')),
    ).toBe(true);
  });

  it('includes every odd N and D, Dv != D, and the N = 4096 case on both paths', () => {
    const shapes = cases.flatMap((c) => (c.kind === 'forward' && c.group === 'shapes' ? [c.spec] : []));
    expect(new Set(shapes.map((s) => s.queryLength))).toEqual(new Set([1, 2, 7, 63, 64, 65, 300]));
    expect(new Set(shapes.map((s) => s.headDim))).toEqual(new Set([1, 3, 16, 33, 64]));
    expect(shapes.every((s) => s.valueDim !== s.headDim)).toBe(true);
    const large = cases.flatMap((c) => (c.kind === 'forward' && c.group === 'large' ? [c.spec] : []));
    expect(new Set(large.map((s) => s.options.path))).toEqual(new Set(['factorized', 'direct']));
    expect(large.every((s) => s.queryLength === 4096)).toBe(true);
  });

  it('generates only valid options', () => {
    for (const c of cases)
      if ('spec' in c) expect(() => resolveOptions(c.spec.options), c.name).not.toThrow();
  });

  it("sizes: 'quick' skips the long sequences and says so", () => {
    const quick = conformanceCases(full, 'quick');
    const skipped = quick.filter((c) => c.skip !== undefined && c.kind !== 'contract');
    expect(skipped.length).toBeGreaterThan(0);
    for (const c of skipped) {
      expect(c.skip).toContain("sizes: 'quick'");
      expect('spec' in c && Math.max(c.spec.queryLength, c.spec.keyLength) >= QUICK_MAX_LENGTH).toBe(true);
    }
    expect(quick.some((c) => c.group === 'large' && c.skip === undefined)).toBe(false);
  });

  it('names the missing capability in each skip reason', () => {
    const noBackward = conformanceCases({ ...full, backward: false, state: false, orders: [1, 2] });
    const byKind = (kind: ConformanceCase['kind']) => noBackward.filter((c) => c.kind === kind);
    expect(byKind('backward').every((c) => c.skip !== undefined)).toBe(true);
    const lowOrder = byKind('backward').filter((c) => 'spec' in c && (c.spec.options.order ?? 2) <= 2);
    expect(lowOrder.length).toBeGreaterThan(0);
    expect(lowOrder.every((c) => c.skip?.includes('capabilities.backward'))).toBe(true);
    expect(byKind('state').every((c) => c.skip !== undefined)).toBe(true);
    expect(byKind('state').some((c) => c.skip?.includes('capabilities.state'))).toBe(true);
    expect(byKind('forward').some((c) => c.skip?.includes('order 3'))).toBe(true);
  });

  it('honours maxQueryLength', () => {
    const limited = conformanceCases(full, 'full', { maxQueryLength: 64 });
    const skipped = limited.filter((c) => c.skip?.includes('maxQueryLength'));
    expect(skipped.map((c) => ('spec' in c ? c.spec.queryLength : 0)).every((n) => n > 64)).toBe(true);
    // N = 65 and N = 300 on two paths, forward and backward, the four N = 4096 cases and the two
    // N = 4096 cases of options.out.
    expect(skipped.length).toBe(2 * 2 * 2 + 4 + 2);
  });
});

describe('compareTensors', () => {
  it('measures error relative to the largest expected magnitude', () => {
    const result = compareTensors([1, 2.0001, -4], [1, 2, -4], 1e-4);
    expect(result.scale).toBe(4);
    expect(result.maxAbsError).toBeCloseTo(1e-4, 12);
    expect(result.maxRelError).toBeCloseTo(2.5e-5, 10);
    expect(result.worstIndex).toBe(1);
    expect(result.ok).toBe(true);
    expect(compareTensors([1, 2.001, -4], [1, 2, -4], 1e-4).ok).toBe(false);
  });
  it('fails on NaN, Infinity and length mismatches', () => {
    expect(compareTensors([Number.NaN], [0]).ok).toBe(false);
    expect(compareTensors([Number.POSITIVE_INFINITY, 0], [1, 0]).nonFinite).toBe(1);
    expect(compareTensors([1, 2], [1, 2, 3]).ok).toBe(false);
  });
  it('demands near-exact zeros when the expectation is all zeros (scale floor)', () => {
    expect(compareTensors([0, 0], [0, 0]).ok).toBe(true);
    expect(compareTensors([1e-9, 0], [0, 0], 1e-4).ok).toBe(false);
    expect(compareTensors([1e-11, 0], [0, 0], 1e-4).scale).toBe(SCALE_FLOOR);
  });
});

describe('randomTensor', () => {
  it('is deterministic per seed and differs across seeds', () => {
    const a = randomTensor([1, 2, 3, 4], 7);
    expect(Array.from(randomTensor([1, 2, 3, 4], 7).data)).toEqual(Array.from(a.data));
    expect(Array.from(randomTensor([1, 2, 3, 4], 8).data)).not.toEqual(Array.from(a.data));
    expect(a.data.every((x) => x >= -1 && x <= 1)).toBe(true);
  });
  it('rounds to the grid exactly', () => {
    const t = randomTensor([1, 1, 50, 4], 3, { grid: 64 });
    expect(t.data.every((x) => Number.isInteger(x * 64))).toBe(true);
  });
});
