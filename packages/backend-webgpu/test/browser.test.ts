import { referenceAttention } from '@fastmax/core/reference';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CHROMIUM, chromiumMissing, openWebgpuPage, type WebgpuPage } from './browser-support.js';
import { maxRelativeError, randomTensor } from './support.js';

describe.skipIf(chromiumMissing)(`browser (chromium at ${CHROMIUM})`, () => {
  let browser: WebgpuPage | undefined;

  beforeAll(async () => {
    browser = await openWebgpuPage();
  }, 60_000);

  afterAll(async () => {
    await browser?.close();
  });

  it('runs a causal forward pass through navigator.gpu and matches the float64 oracle', async () => {
    const q = randomTensor([1, 2, 19, 8], 31);
    const k = randomTensor([1, 1, 19, 8], 32);
    const v = randomTensor([1, 1, 19, 6], 33);
    const options = { causal: true, order: 2, path: 'factorized', chunkSize: 8 } as const;
    const plain = (t: typeof q) => ({ shape: t.shape, data: Array.from(t.data) });
    const result = (await browser!.page.evaluate(
      (input) =>
        (window as unknown as { fastmax: { runForward(i: unknown): Promise<unknown> } }).fastmax.runForward(
          input,
        ),
      { q: plain(q), k: plain(k), v: plain(v), options },
    )) as { output?: number[]; error?: { message: string }; path?: string };
    expect(result.error, 'navigator.gpu offered no adapter').toBeUndefined();
    expect(result.path).toBe('factorized');
    const want = referenceAttention(q, k, v, options);
    expect(maxRelativeError(result.output ?? [], want.output)).toBeLessThan(1e-4);
  }, 120_000);
});
