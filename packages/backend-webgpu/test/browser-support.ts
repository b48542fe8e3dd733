import { chromium, type Page } from 'playwright-core';
import { type BrowserPage, openBrowserPage, packageSource } from '../../../test-support/browser.js';
import { backendPageHtml, CORE_TREE } from '../../../test-support/browser-backend.js';

export { CHROMIUM, chromiumMissing } from '../../../test-support/browser.js';
export type WebgpuPage = BrowserPage<Page>;

/**
 * The WebGPU backend in headless chromium, whose WebGPU runs on SwiftShader here: the backend's own
 * sources behind the shared page of test-support/browser-backend.ts.
 */
export function openWebgpuPage(): Promise<WebgpuPage> {
  return openBrowserPage(chromium, {
    trees: [CORE_TREE, packageSource('backend-webgpu', 'webgpu')],
    html: backendPageHtml({
      setup: `import { webgpuBackend } from '/webgpu/index.js';`,
      create: 'webgpuBackend()',
    }),
    chromiumArgs: ['--enable-unsafe-webgpu'],
  });
}
