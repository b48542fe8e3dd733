import { createFastmax, type Fastmax, type FastmaxBackend } from '@fastmax/core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type CaseGroup,
  type CaseLimits,
  type ConformanceCase,
  conformanceCases,
  type Sizes,
  skipReason,
} from './cases.js';
import { type CheckContext, type CheckSettings, checkCase, createCheckContext } from './checks.js';

export interface ConformanceConfig {
  /** Shown in the report: `conformance: <name>`. */
  readonly name: string;
  /** Called once per test file (in `beforeAll`); the backend is disposed in `afterAll`. */
  readonly create: () => FastmaxBackend | Promise<FastmaxBackend>;
  /**
   * Forward tolerance relative to the output scale (default 1e-4, right for float32). Only a
   * backend that computes in lower precision (a float16 dtype) should change it, and by its
   * documented precision, never to make a failing backend pass.
   */
  readonly tolerance?: number;
  /** Gradient tolerance relative to each gradient's scale (default 1e-3). Same rule. */
  readonly gradientTolerance?: number;
  /** `'quick'` leaves out the cases with N or M >= 256 (for slow devices); default `'full'`. */
  readonly sizes?: Sizes;
  /** Skip cases whose N or M exceeds it. */
  readonly maxQueryLength?: number;
  /** Per-test timeout in ms (default 120 000; the N = 4096 cases are the slow ones). */
  readonly timeoutMs?: number;
  /** How long a call on NaN input with checkFinite: false may take to settle (default 10 000 ms). */
  readonly settleTimeoutMs?: number;
}

const GROUP_ORDER: readonly CaseGroup[] = [
  'contract',
  'forward',
  'shapes',
  'large',
  'output buffer',
  'backward',
  'finite differences',
  'key padding',
  'causality',
  'key permutation',
  'degenerate rows',
  'state',
  'invalid input',
  'non-finite propagation',
  'property',
];

/**
 * Registers the whole conformance suite as vitest tests, one `it` per case, grouped by what they
 * check. Whatever the backend does not declare in its capabilities is skipped with the reason
 * (shown as the skip note in the report); size limits likewise.
 */
export function runConformance(config: ConformanceConfig): void {
  const sizes = config.sizes ?? 'full';
  const limits: CaseLimits =
    config.maxQueryLength === undefined ? {} : { maxQueryLength: config.maxQueryLength };
  const settings: Partial<CheckSettings> = {
    ...(config.tolerance === undefined ? {} : { tolerance: config.tolerance }),
    ...(config.gradientTolerance === undefined ? {} : { gradientTolerance: config.gradientTolerance }),
    ...(config.settleTimeoutMs === undefined ? {} : { settleTimeoutMs: config.settleTimeoutMs }),
  };
  const timeout = config.timeoutMs ?? 120_000;
  // Capabilities are unknown until the backend exists, so tests are registered for every case and
  // the capability check happens inside each test.
  const cases = conformanceCases(undefined, sizes, limits);

  describe(`conformance: ${config.name}`, () => {
    let fm: Fastmax | undefined;
    let context: CheckContext | undefined;

    beforeAll(async () => {
      fm = await createFastmax({ backend: await config.create() });
      context = createCheckContext(fm, settings);
    }, timeout);

    afterAll(async () => {
      await fm?.dispose();
    });

    const byGroup = new Map<CaseGroup, ConformanceCase[]>();
    for (const testCase of cases)
      byGroup.set(testCase.group, [...(byGroup.get(testCase.group) ?? []), testCase]);

    for (const group of GROUP_ORDER) {
      const members = byGroup.get(group) ?? [];
      if (members.length === 0) continue;
      describe(group, () => {
        for (const testCase of members) {
          it(
            testCase.name,
            async (ctx) => {
              if (context === undefined) throw new Error('the backend was not created (see beforeAll)');
              const reason = skipReason(testCase, context.fm.backend.capabilities, sizes, limits);
              if (reason !== undefined) ctx.skip(reason);
              const report = await checkCase(context, testCase);
              if (!report.ok) {
                const notes = report.notes.length > 0 ? `\n(notes: ${report.notes.join('; ')})` : '';
                throw new Error(`${report.failures.join('\n')}${notes}`);
              }
              expect(report.failures).toEqual([]);
            },
            timeout,
          );
        }
      });
    }
  });
}
