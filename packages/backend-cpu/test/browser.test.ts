import {
  compareGradients,
  compareTensors,
  describeComparison,
  GRADIENT_TOLERANCE,
  randomTensor,
} from '@fastmax/conformance';
import { createFastmax, type Fastmax, type FastmaxOptions, type HostTensor } from '@fastmax/core';
import { referenceAttention, referenceBackward } from '@fastmax/core/reference';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CHROMIUM,
  type CpuPage,
  chromiumMissing,
  cpuProxy,
  openCpuPage,
  pageFacts,
  takePosted,
} from './browser-support.js';

/**
 * The CPU backend in headless chromium: its pool of Web Workers (Blob URL, SharedArrayBuffer) in a
 * cross-origin isolated page, the relaxed-SIMD kernels chromium validates, and the one-thread
 * fallback of a page without isolation. Calls go through `createFastmax` in Node to a proxy of the
 * page's backend; the float64 oracle runs in Node. Tolerances are the conformance suite's
 * (packages/conformance/src/compare.ts explains them): forward 1e-4 of the output's scale,
 * gradients 1e-3 of each gradient's scale.
 */

const host = (tensor: unknown): HostTensor => tensor as HostTensor;

function expectForwardClose(actual: HostTensor, expected: Float64Array): void {
  const comparison = compareTensors(actual.data, expected);
  expect(comparison.ok, describeComparison('output', comparison, actual.data, expected)).toBe(true);
}

async function openFastmax(browser: CpuPage): Promise<Fastmax> {
  return createFastmax({ backend: await cpuProxy(browser) });
}

describe.skipIf(chromiumMissing)(`cross-origin isolated page (chromium at ${CHROMIUM})`, () => {
  let browser: CpuPage | undefined;
  let fm: Fastmax | undefined;

  beforeAll(async () => {
    browser = await openCpuPage(true);
    fm = await openFastmax(browser);
  }, 60_000);

  // Disposing the proxy closes the browser.
  afterAll(async () => {
    await (fm === undefined ? browser?.close() : fm.dispose());
  });

  it('is isolated, starts a pool of two Web Workers and compiles the relaxed-SIMD kernels', async () => {
    const facts = await pageFacts(browser!.page);
    expect(facts.crossOriginIsolated).toBe(true);
    expect(facts.sharedArrayBuffer).toBe(true);
    expect(facts.threadCount).toBe(2);
    expect(facts.workersStarted).toBe(2);
    // Chromium has shipped relaxed SIMD since 114: if it stopped validating, the relaxed kernels
    // would silently go untested here, so say so.
    expect(facts.relaxedSimdValidates, 'chromium no longer validates relaxed SIMD').toBe(true);
    expect(facts.kernelVariant).toBe(facts.relaxedSimdValidates ? 'relaxed-simd' : 'simd');
    // Each worker got the compiled module once.
    expect((await takePosted(browser!.page)).map((m) => m.type)).toEqual(['init', 'init']);
  });

  // How src/backend.ts splits a forward over two threads: one head with few features (p = 1, causal)
  // by queries, each share building the state of the keys before its first query; one head with
  // many features (p = 2, D = 32: F = 561) by features, with a second 'combine' pass that sums the
  // shares' numerators and denominators; four heads whole, one per unit.
  const cases: {
    name: string;
    q: [number, number, number, number];
    kv: [number, number, number];
    options: FastmaxOptions;
    want: { run: number; combine: number; shares: number; byQueries: boolean };
  }[] = [
    {
      name: 'one head split by queries (causal, p = 1)',
      q: [1, 1, 75, 16],
      kv: [1, 80, 12],
      options: { order: 1, causal: true, chunkSize: 8, path: 'factorized', keyLengths: [60] },
      // The calling thread answers the last share itself: one run goes to a worker.
      want: { run: 1, combine: 0, shares: 2, byQueries: true },
    },
    {
      name: 'one head split by features (causal, p = 2, D = 32)',
      q: [1, 1, 75, 32],
      kv: [1, 80, 12],
      options: { order: 2, causal: true, chunkSize: 8, path: 'factorized', keyLengths: [60] },
      want: { run: 2, combine: 2, shares: 2, byQueries: false },
    },
    {
      name: 'four whole heads (B = 2, H = 2, one kv head, key padding)',
      q: [2, 2, 70, 16],
      kv: [1, 70, 20],
      options: { order: 2, causal: true, keyLengths: [70, 33] },
      want: { run: 4, combine: 0, shares: 1, byQueries: false },
    },
  ];
  for (const { name, q: qShape, kv, options, want } of cases) {
    it(`forward on the workers: ${name}, matches the float64 oracle`, async () => {
      const [B, , N, D] = qShape;
      const [Hkv, M, Dv] = kv;
      const q = randomTensor(qShape, 11);
      const k = randomTensor([B, Hkv, M, D], 12);
      const v = randomTensor([B, Hkv, M, Dv], 13);
      const result = await fm!.attention(q, k, v, options);
      const posted = await takePosted(browser!.page);
      const runs = posted.filter((m) => m.type === 'run');
      expect(runs).toHaveLength(want.run);
      expect(posted.filter((m) => m.type === 'combine')).toHaveLength(want.combine);
      expect(posted).toHaveLength(want.run + want.combine);
      for (const run of runs) expect(run).toMatchObject({ shares: want.shares, byQueries: want.byQueries });
      const reference = referenceAttention(q, k, v, options);
      expect(result.output.shape).toEqual([B, qShape[1], N, Dv]);
      expect(result.degenerateRows).toBe(reference.degenerateRows);
      expectForwardClose(host(result.output), reference.output);
    }, 60_000);
  }

  it('backward of two heads on the workers (GQA) matches the float64 oracle', async () => {
    const q = randomTensor([1, 2, 50, 8], 21);
    const k = randomTensor([1, 1, 50, 8], 22);
    const v = randomTensor([1, 1, 50, 12], 23);
    const dOut = randomTensor([1, 2, 50, 12], 24);
    const options: FastmaxOptions = { order: 2, causal: true, chunkSize: 16 };
    const result = await fm!.backward(q, k, v, dOut, options);
    const posted = await takePosted(browser!.page);
    expect(posted.length).toBeGreaterThan(0);
    // The passes, and the normalization's row steps (core's prepare-rows.ts, bundled into the worker).
    expect(posted.some((m) => m.type === 'backward')).toBe(true);
    expect(posted.some((m) => m.type === 'preparation')).toBe(true);
    expect(posted.every((m) => m.type === 'backward' || m.type === 'preparation')).toBe(true);
    const want = referenceBackward(q, k, v, dOut, options);
    const actual = { dq: host(result.dq).data, dk: host(result.dk).data, dv: host(result.dv).data };
    const comparison = compareGradients(actual, want, GRADIENT_TOLERANCE);
    for (const name of ['dq', 'dk', 'dv'] as const) {
      expect(comparison[name].ok, describeComparison(name, comparison[name], actual[name], want[name])).toBe(
        true,
      );
    }
  }, 60_000);
});

// A page's main thread may not block (Atomics.wait throws there): in a prefix scan the calling
// thread takes the first share, which waits for no other, and only the workers wait, each for the
// share before it.
describe.skipIf(chromiumMissing)(`prefix scan over three threads (chromium at ${CHROMIUM})`, () => {
  let browser: CpuPage | undefined;
  let fm: Fastmax | undefined;

  beforeAll(async () => {
    browser = await openCpuPage(true, 'cpuBackend({ threads: 3, parallelThreshold: 0, queryScan: true })');
    fm = await openFastmax(browser);
  }, 60_000);

  afterAll(async () => {
    await (fm === undefined ? browser?.close() : fm.dispose());
  });

  it('splits one head by queries over the calling thread and two workers, matching the float64 oracle', async () => {
    expect((await pageFacts(browser!.page)).threadCount).toBe(3);
    await takePosted(browser!.page);
    const q = randomTensor([1, 1, 2600, 16], 31);
    const k = randomTensor([1, 1, 2609, 16], 32);
    const v = randomTensor([1, 1, 2609, 12], 33);
    const options: FastmaxOptions = { order: 1, causal: true, chunkSize: 16, keyLengths: [2500] };
    for (let call = 0; call < 2; call++) {
      const result = await fm!.attention(q, k, v, options);
      const runs = (await takePosted(browser!.page)).filter((m) => m.type === 'run');
      // The calling thread's share is not posted: two runs, one per worker.
      expect(runs).toHaveLength(2);
      for (const run of runs) expect(run).toMatchObject({ shares: 3, byQueries: true });
      const reference = referenceAttention(q, k, v, options);
      expect(result.degenerateRows).toBe(reference.degenerateRows);
      expectForwardClose(host(result.output), reference.output);
    }
  }, 60_000);
});

describe.skipIf(chromiumMissing)(`page without cross-origin isolation (chromium at ${CHROMIUM})`, () => {
  let browser: CpuPage | undefined;
  let fm: Fastmax | undefined;

  beforeAll(async () => {
    browser = await openCpuPage(false);
    fm = await openFastmax(browser);
  }, 60_000);

  afterAll(async () => {
    await (fm === undefined ? browser?.close() : fm.dispose());
  });

  it('falls back to one thread (no SharedArrayBuffer) and still matches the float64 oracle', async () => {
    const facts = await pageFacts(browser!.page);
    expect(facts.crossOriginIsolated).toBe(false);
    expect(facts.sharedArrayBuffer).toBe(false);
    expect(facts.threadCount).toBe(1);
    expect(facts.workersStarted).toBe(0);
    expect(facts.kernelVariant).toBe(facts.relaxedSimdValidates ? 'relaxed-simd' : 'simd');
    // Four heads: with a pool these would go to the workers.
    const q = randomTensor([2, 2, 70, 16], 31);
    const k = randomTensor([2, 1, 70, 16], 32);
    const v = randomTensor([2, 1, 70, 20], 33);
    const options: FastmaxOptions = { order: 2, causal: true, keyLengths: [70, 33] };
    const result = await fm!.attention(q, k, v, options);
    expect(await takePosted(browser!.page)).toEqual([]);
    const reference = referenceAttention(q, k, v, options);
    expect(result.degenerateRows).toBe(reference.degenerateRows);
    expectForwardClose(host(result.output), reference.output);
  }, 60_000);
});
