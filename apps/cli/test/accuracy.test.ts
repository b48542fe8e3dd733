import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  type BackendFault,
  brokenBackend,
  FORWARD_TOLERANCE,
  GRADIENT_TOLERANCE,
} from '@fastmax/conformance';
import type { FastmaxBackend } from '@fastmax/core';
import { referenceBackend } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import type { BackendFactory } from '../src/backends.js';
import { main } from '../src/cli.js';
import { type AccuracyReport, runAccuracy } from '../src/commands/accuracy.js';
import { memoryIO } from './memory-io.js';

function factory(name: string, create: () => FastmaxBackend): BackendFactory {
  return { name, summary: `${name} (test)`, tolerance: FORWARD_TOLERANCE, create: async () => create() };
}

const reference = factory('reference', referenceBackend);
const broken = (fault: BackendFault) => factory(fault, () => brokenBackend(referenceBackend(), fault));

/** The cells of the table row that starts with `label` (the 'worst' row), split on runs of spaces. */
function row(out: string, label: string): string[] {
  const line = out.split('\n').find((text) => text.startsWith(label));
  if (line === undefined) throw new Error(`no row '${label}' in:\n${out}`);
  return line.trim().split(/\s+/);
}

describe('fastmax accuracy', () => {
  it.each([[['accuracy', '--help']], [['help', 'accuracy']]])('%j prints its help', async (argv) => {
    const io = memoryIO();
    expect(await main(argv, io)).toBe(0);
    expect(io.out()).toContain('Usage: fastmax accuracy');
    expect(io.out()).toContain('--quick');
    expect(io.err()).toBe('');
  });

  it('is listed in the command list', async () => {
    const io = memoryIO();
    expect(await main(['--help'], io)).toBe(0);
    expect(io.out()).toMatch(/^ {2}accuracy /m);
  });

  it.each([
    [['accuracy', '--backend', 'quantum'], "unknown backend 'quantum'"],
    [['accuracy', '--sizes', 'ten'], '--sizes expects an integer'],
    [['accuracy', '--bogus'], "Unknown option '--bogus'"],
  ])('%j is a usage error', async (argv, message) => {
    const io = memoryIO();
    expect(await main(argv, io)).toBe(2);
    expect(io.err()).toContain(message);
  });

  it('measures the reference backend within tolerance, every kind, and writes the JSON', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fastmax-accuracy-'));
    try {
      const io = memoryIO();
      const code = await runAccuracy(['--backend', 'reference', '--quick', '--sizes', '64', '--json'], io, {
        backends: [reference],
        jsonDir: dir,
      });
      expect(code, io.out()).toBe(0);
      const out = io.out();
      expect(out).toContain('All ');
      expect(out).not.toContain('FAIL');
      // The float64 reference only rounds its outputs to float32 (2^-24 ≈ 6e-8 of the scale), so
      // every worst error sits far below the tolerances yet above 0 (the comparison really ran).
      const [, cases, forward, backward, state] = row(out, 'worst');
      expect(Number(cases)).toBeGreaterThan(50);
      for (const value of [forward, backward, state]) {
        expect(Number(value)).toBeGreaterThan(0);
        expect(Number(value)).toBeLessThan(1e-6);
      }
      // Both paths, causal and not, and the decoding state appear as groups.
      for (const group of [/^ +2 {2}factorized +no /m, /^ +2 {2}direct +yes /m, /^ +2 {2}stepping +yes /m])
        expect(out).toMatch(group);
      // N sweep: the default quick size and the extra --sizes, both masks.
      expect(row(out, ' 64')).toHaveLength(3);
      expect(row(out, '256')).toHaveLength(3);

      const written = JSON.parse(await readFile(join(dir, 'accuracy-reference.json'), 'utf8')) as {
        results: AccuracyReport;
      };
      expect(written.results.backend).toBe('reference');
      expect(written.results.sizes).toBe('quick');
      expect(written.results.cases.length).toBe(Number(cases));
      expect(written.results.sweep.map((r) => [r.n, r.causal])).toEqual([
        [64, false],
        [64, true],
        [256, false],
        [256, true],
      ]);
      expect(written.results.worst.forward).toBeLessThan(1e-6);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('exits 1 and names the cases when gradients are 1% off', async () => {
    const io = memoryIO();
    expect(await runAccuracy(['--quick'], io, { backends: [broken('wrong-gradient')] })).toBe(1);
    const [, , forward, backward] = row(io.out(), 'worst');
    expect(Number(forward)).toBeLessThan(FORWARD_TOLERANCE);
    // dk and dv scaled by 1.01: 1% of the gradient scale.
    expect(Number(backward)).toBeGreaterThan(GRADIENT_TOLERANCE);
    expect(Number(backward)).toBeLessThan(0.02);
    expect(io.out()).toMatch(/^FAIL backward .*: d[kv]: relative error/m);
    expect(io.out()).not.toMatch(/^FAIL forward/m);
  });

  it('exits 1 when outputs keep 11 bits (a float16 intermediate)', async () => {
    const io = memoryIO();
    expect(await runAccuracy(['--quick'], io, { backends: [broken('low-precision')] })).toBe(1);
    const [, , forward] = row(io.out(), 'worst');
    // 11 significant bits round by up to 2^-11 of a value, ≈ 2.4e-4 of the largest ones.
    expect(Number(forward)).toBeGreaterThan(FORWARD_TOLERANCE);
    expect(Number(forward)).toBeLessThan(1e-3);
    expect(io.out()).toMatch(/^FAIL forward /m);
  });

  it('exits 1 when a decoding state forgets earlier steps', async () => {
    const io = memoryIO();
    expect(await runAccuracy(['--quick'], io, { backends: [broken('forgetful-state')] })).toBe(1);
    const [, , forward, , state] = row(io.out(), 'worst');
    expect(Number(forward)).toBeLessThan(FORWARD_TOLERANCE);
    expect(Number(state)).toBeGreaterThan(FORWARD_TOLERANCE);
    expect(io.out()).toMatch(/^FAIL state stepping /m);
  });

  it("shows '-' for what the backend does not declare", async () => {
    const forwardOnly = factory('forward-only', () => {
      const inner = referenceBackend();
      return { ...inner, capabilities: { ...inner.capabilities, backward: false, state: false } };
    });
    const io = memoryIO();
    expect(await runAccuracy(['--quick'], io, { backends: [forwardOnly] })).toBe(0);
    const [, , forward, backward, state] = row(io.out(), 'worst');
    expect(Number(forward)).toBeLessThan(1e-6);
    expect([backward, state]).toEqual(['-', '-']);
    expect(io.out()).not.toMatch(/^ +\d {2}stepping /m);
  });

  it('measures every available backend in turn, skipping unavailable ones unless named', async () => {
    const unavailable = factory('offline', () => ({
      ...referenceBackend(),
      name: 'offline',
      isAvailable: async () => ({ available: false, reason: 'no device here' }),
    }));
    const io = memoryIO();
    const backends = [unavailable, reference, broken('wrong-gradient')];
    expect(await runAccuracy(['--quick'], io, { backends })).toBe(1);
    expect(io.out()).toContain('skipped offline: no device here');
    expect(io.out()).toContain('Backend: reference:');
    expect(io.out()).toContain('Backend: wrong-gradient:');

    const named = memoryIO();
    expect(await runAccuracy(['--quick', '--backend', 'offline'], named, { backends })).toBe(1);
    expect(named.err()).toContain('skipped offline: no device here');
    expect(named.err()).toContain('no backend is available');
  });
});
