import { execFileSync } from 'node:child_process';
import { compareTensors, describeComparison, randomTensor } from '@fastmax/conformance';
import { createFastmax, type FastmaxOptions, type HostTensor } from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import { cpuBackend } from '../src/index.js';
import { RELAXED_SIMD_PROBE } from './browser-support.js';

// Forward tolerance: the conformance suite's 1e-4 of the output scale (packages/conformance/src/compare.ts).
function expectForwardClose(actual: ArrayLike<number>, expected: Float64Array): void {
  const comparison = compareTensors(actual, expected);
  expect(comparison.ok, describeComparison('output', comparison, actual, expected)).toBe(true);
}

const relaxedSimdInThisProcess = WebAssembly.validate(RELAXED_SIMD_PROBE);

describe('kernelVariant', () => {
  it('is relaxed-simd exactly where the engine validates relaxed SIMD (Node 20 without flags: simd)', async () => {
    const backend = cpuBackend({ threads: 1 });
    expect(await backend.kernelVariant()).toBe(relaxedSimdInThisProcess ? 'relaxed-simd' : 'simd');
    if (
      process.versions.node.startsWith('20.') &&
      !process.execArgv.includes('--experimental-wasm-relaxed-simd')
    )
      expect(await backend.kernelVariant()).toBe('simd');
    await backend.dispose();
  });

  it('is simd with relaxedSimd: false, whose kernels match the float64 oracle', async () => {
    const backend = cpuBackend({ threads: 1, relaxedSimd: false });
    expect(await backend.kernelVariant()).toBe('simd');
    const q = randomTensor([1, 2, 40, 16], 1);
    const k = randomTensor([1, 1, 40, 16], 2);
    const v = randomTensor([1, 1, 40, 8], 3);
    const options: FastmaxOptions = { order: 2, causal: true };
    const fm = await createFastmax({ backend });
    const result = await fm.attention(q, k, v, options);
    await fm.dispose();
    expectForwardClose((result.output as HostTensor).data, referenceAttention(q, k, v, options).output);
  });

  it('runs the relaxed-SIMD kernels in Node with --experimental-wasm-relaxed-simd (two worker threads), matching the oracle', () => {
    const q = randomTensor([1, 2, 40, 16], 4);
    const k = randomTensor([1, 1, 40, 16], 5);
    const v = randomTensor([1, 1, 40, 8], 6);
    const options: FastmaxOptions = { order: 2, causal: true, chunkSize: 8, path: 'factorized' };
    const script = `
      import { readFileSync } from 'node:fs';
      import { cpuBackend } from '@fastmax/backend-cpu';
      import { createFastmax } from '@fastmax/core';
      const input = JSON.parse(readFileSync(0, 'utf8'));
      const tensor = (t) => ({ shape: t.shape, data: Float32Array.from(t.data) });
      const backend = cpuBackend({ threads: 2, parallelThreshold: 0 });
      const fm = await createFastmax({ backend });
      const result = await fm.attention(tensor(input.q), tensor(input.k), tensor(input.v), input.options);
      const facts = { variant: await backend.kernelVariant(), threads: await backend.threadCount() };
      await fm.dispose();
      console.log(JSON.stringify({ ...facts, output: Array.from(result.output.data) }));
    `;
    const plain = (t: HostTensor) => ({ shape: t.shape, data: Array.from(t.data) });
    // Engines with relaxed SIMD on by default need (and may not know) the flag.
    const flags = relaxedSimdInThisProcess ? [] : ['--experimental-wasm-relaxed-simd'];
    // Runs the built package (dist): `pnpm test` builds before it tests.
    const out = execFileSync(process.execPath, [...flags, '--input-type=module', '-e', script], {
      cwd: new URL('..', import.meta.url),
      input: JSON.stringify({ q: plain(q), k: plain(k), v: plain(v), options }),
      timeout: 30_000,
      stdio: 'pipe',
    }).toString();
    const result = JSON.parse(out) as { variant: string; threads: number; output: number[] };
    expect(result.variant).toBe('relaxed-simd');
    expect(result.threads).toBe(2);
    expectForwardClose(result.output, referenceAttention(q, k, v, options).output);
  });
});
