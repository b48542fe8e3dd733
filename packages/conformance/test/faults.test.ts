import { createFastmax, type Fastmax } from '@fastmax/core';
import { referenceBackend } from '@fastmax/core/reference';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  BACKEND_FAULTS,
  type BackendFault,
  brokenBackend,
  type CheckContext,
  type ConformanceCase,
  checkCase,
  conformanceCases,
  createCheckContext,
} from '../src/index.js';

// The suite is only worth something if it fails broken backends. Each test double injects one
// fault into the (correct) reference backend; the cases that target that fault must all report
// failures, and the same cases must pass on the healthy backend (so the failure is the fault's).
const cases = conformanceCases(referenceBackend().capabilities);
const plainForward = cases.filter((c) => c.kind === 'forward' && c.name.includes(' plain: '));

const targets: Record<BackendFault, ConformanceCase[]> = {
  'leaks-padded-keys': cases.filter((c) => c.kind === 'padding-invariance' || c.kind === 'property'),
  'ignores-causal-mask': cases.filter((c) => c.kind === 'causal-prefix'),
  'wrong-kv-head': cases.filter(
    (c) => c.kind === 'forward' && c.spec.kvHeads > 1 && c.spec.kvHeads !== c.spec.heads,
  ),
  'low-precision': cases.filter(
    (c) => c.group === 'shapes' && c.kind === 'forward' && c.spec.queryLength > 2,
  ),
  'wrong-gradient': cases.filter(
    (c) =>
      c.kind === 'gradient-fd' ||
      c.kind === 'property' ||
      (c.kind === 'backward' && c.name.includes(' plain: ')),
  ),
  'uncounted-degenerate-rows': cases.filter((c) => c.kind === 'degenerate'),
  'forgetful-state': cases.filter((c) => c.kind === 'state'),
  'hangs-on-non-finite': cases.filter((c) => c.kind === 'non-finite'),
  'mutates-inputs': plainForward.slice(0, 4),
  'skips-zero-rows-of-out': cases.filter(
    (c) => c.kind === 'forward' && c.intoOut === true && c.spec.options.keyLengths !== undefined,
  ),
  'ignores-gradients-out': cases.filter((c) => c.kind === 'backward' && c.intoOut === true),
  'skips-finite-check': cases.filter((c) => c.kind === 'invalid-input' && c.code === 'NON_FINITE_INPUT'),
};

describe('the suite catches injected faults', () => {
  const instances = new Map<BackendFault | 'healthy', CheckContext>();
  const opened: Fastmax[] = [];

  beforeAll(async () => {
    const open = async (key: BackendFault | 'healthy') => {
      const backend = key === 'healthy' ? referenceBackend() : brokenBackend(referenceBackend(), key);
      const fm = await createFastmax({ backend });
      opened.push(fm);
      // A short settle bound so the hanging double fails fast.
      instances.set(key, createCheckContext(fm, { settleTimeoutMs: 300 }));
    };
    await open('healthy');
    for (const fault of BACKEND_FAULTS) await open(fault);
  });

  afterAll(async () => {
    for (const fm of opened) await fm.dispose();
  });

  for (const fault of BACKEND_FAULTS) {
    it(`${fault}: every targeted case fails, and passes on the healthy backend`, async () => {
      const list = targets[fault];
      expect(list.length).toBeGreaterThan(0);
      for (const testCase of list) {
        expect(testCase.skip, testCase.name).toBeUndefined();
        const healthy = await checkCase(instances.get('healthy')!, testCase);
        expect(healthy.failures, `healthy: ${testCase.name}`).toEqual([]);
        const broken = await checkCase(instances.get(fault)!, testCase);
        expect(broken.ok, `${fault} should fail: ${testCase.name}`).toBe(false);
      }
    });
  }

  it('low-precision results (11 significant bits) exceed the 1e-4 tolerance by a wide margin', async () => {
    const testCase = cases.find(
      (c) => c.group === 'large' && c.kind === 'forward' && !c.spec.options.causal,
    )!;
    const report = await checkCase(instances.get('low-precision')!, testCase);
    expect(report.ok).toBe(false);
    const error = Number(/relative error ([0-9.e+-]+)/.exec(report.failures.join(' '))?.[1]);
    expect(error).toBeGreaterThan(2e-4);
  });
});
