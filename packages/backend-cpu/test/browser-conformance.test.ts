import { runConformance } from '@fastmax/conformance';
import { describe, it } from 'vitest';
import { CHROMIUM, chromiumMissing, cpuProxy, openCpuPage, pageFacts } from './browser-support.js';

/**
 * The conformance suite against the CPU backend running in a cross-origin isolated chromium page:
 * a Node-side proxy forwards every call to the page, where `cpuBackend({ threads: 2,
 * parallelThreshold: 0 })` sends every call it can split to its two Web Workers and runs the
 * relaxed-SIMD kernels (checked when the backend is created, so the suite never passes on a
 * one-thread or plain-SIMD fallback by accident).
 */
if (chromiumMissing) {
  describe('conformance: cpu in chromium', () => {
    it.skip(`no chromium at ${CHROMIUM}`, () => {});
  });
} else {
  runConformance({
    name: 'cpu in chromium (2 Web Workers, relaxed SIMD)',
    create: async () => {
      const browser = await openCpuPage(true);
      try {
        const facts = await pageFacts(browser.page);
        if (facts.threadCount !== 2 || facts.kernelVariant !== 'relaxed-simd') {
          throw new Error(
            `expected 2 threads and the relaxed-SIMD kernels in the isolated page, got ${JSON.stringify(facts)}`,
          );
        }
        return await cpuProxy(browser);
      } catch (error) {
        await browser.close();
        throw error;
      }
    },
    sizes: 'full',
  });
}
