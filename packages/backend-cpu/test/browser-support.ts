import type { BackendCapabilities, FastmaxBackend } from '@fastmax/core';
import { chromium, type Page } from 'playwright-core';
import { type BrowserPage, openBrowserPage, packageSource } from '../../../test-support/browser.js';
import { backendPageHtml, CORE_TREE, proxyBackend } from '../../../test-support/browser-backend.js';

export { CHROMIUM, chromiumMissing } from '../../../test-support/browser.js';
export type CpuPage = BrowserPage<Page>;

/**
 * The smallest module using a relaxed-SIMD instruction: (v128, v128, v128) -> f32x4.relaxed_madd.
 * `WebAssembly.validate` of it says whether the engine has relaxed SIMD (Node 20 only behind
 * --experimental-wasm-relaxed-simd; Chrome since 114).
 */
export const RELAXED_SIMD_PROBE = Uint8Array.from(
  [
    '00 61 73 6d 01 00 00 00', // magic, version
    '01 08 01 60 03 7b 7b 7b 01 7b', // type section: (v128 v128 v128) -> v128
    '03 02 01 00', // function section: one function of that type
    '0a 0d 01 0b 00 20 00 20 01 20 02', // code section: no locals; local.get 0, 1, 2
    'fd 85 02 0b', // f32x4.relaxed_madd (0xfd 0x105 as LEB128), end
  ]
    .join(' ')
    .split(' ')
    .map((byte) => Number.parseInt(byte, 16)),
);

/** Makes the page cross-origin isolated, which is what gives it SharedArrayBuffer. */
export const ISOLATION_HEADERS = {
  'cross-origin-opener-policy': 'same-origin',
  'cross-origin-embedder-policy': 'require-corp',
} as const;

/** What the page's Worker wrapper saw of one message the pool posted. */
export interface PostedMessage {
  readonly type: string;
  /** job.shares of a 'run' or 'combine' message. */
  readonly shares?: number;
  /** Whether the job splits heads by queries (job.queryBounds set). */
  readonly byQueries?: boolean;
}

/**
 * The CPU backend (`cpuBackend({ threads: 2, parallelThreshold: 0 })` unless `create` says
 * otherwise, so every call that can be split goes to the workers) in headless chromium behind the
 * shared backend page. The page wraps `Worker` to count the workers started and record the
 * messages posted to them, so the tests can tell how a call was split; `window.cpu` exposes that
 * and a relaxed-SIMD probe.
 */
export function openCpuPage(
  isolated: boolean,
  create = 'cpuBackend({ threads: 2, parallelThreshold: 0 })',
): Promise<CpuPage> {
  return openBrowserPage(chromium, {
    trees: [CORE_TREE, packageSource('backend-cpu', 'cpu')],
    html: backendPageHtml({
      setup: `import { cpuBackend } from '/cpu/index.js';
  const posted = [];
  let workersStarted = 0;
  const NativeWorker = globalThis.Worker;
  globalThis.Worker = class extends NativeWorker {
    constructor(...args) { super(...args); workersStarted++; }
    postMessage(message, transfer) {
      posted.push({ type: message.type, shares: message.job?.shares, byQueries: message.job ? message.job.queryBounds != null : undefined });
      return super.postMessage(message, transfer);
    }
  };
  window.cpu = {
    takePosted: () => posted.splice(0),
    workersStarted: () => workersStarted,
    validates: (bytes) => WebAssembly.validate(new Uint8Array(bytes)),
  };`,
      create,
    }),
    ...(isolated ? { headers: ISOLATION_HEADERS } : {}),
  });
}

/** The page's globals, for `page.evaluate` callbacks. */
export interface CpuPageGlobals {
  fastmax: {
    backend(): {
      threadCount(): Promise<number>;
      kernelVariant(): Promise<'simd' | 'relaxed-simd'>;
      capabilities: unknown;
    };
  };
  cpu: {
    takePosted(): PostedMessage[];
    workersStarted(): number;
    validates(bytes: number[]): boolean;
  };
  crossOriginIsolated: boolean;
}

/** What the page says about itself and its backend. */
export async function pageFacts(page: Page) {
  return page.evaluate(async (probe) => {
    const w = window as unknown as CpuPageGlobals;
    const backend = w.fastmax.backend();
    return {
      crossOriginIsolated: w.crossOriginIsolated,
      sharedArrayBuffer: typeof SharedArrayBuffer !== 'undefined',
      threadCount: await backend.threadCount(),
      kernelVariant: await backend.kernelVariant(),
      relaxedSimdValidates: w.cpu.validates(probe),
      workersStarted: w.cpu.workersStarted(),
    };
  }, Array.from(RELAXED_SIMD_PROBE));
}

/** The messages posted to the workers since the last call. */
export function takePosted(page: Page): Promise<PostedMessage[]> {
  return page.evaluate(() => (window as unknown as CpuPageGlobals).cpu.takePosted());
}

/** A Node-side proxy of the page's backend, declaring the capabilities the page's backend has. */
export async function cpuProxy(browser: CpuPage): Promise<FastmaxBackend> {
  const capabilities = (await browser.page.evaluate(
    () => (window as unknown as CpuPageGlobals).fastmax.backend().capabilities,
  )) as BackendCapabilities;
  return proxyBackend(browser, { name: 'cpu-chromium', capabilities });
}
