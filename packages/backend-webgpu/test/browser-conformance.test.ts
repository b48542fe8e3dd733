import { runConformance } from '@fastmax/conformance';
import { describe, it } from 'vitest';
import { proxyBackend } from '../../../test-support/browser-backend.js';
import { WEBGPU_CAPABILITIES } from '../src/index.js';
import { CHROMIUM, chromiumMissing, openWebgpuPage } from './browser-support.js';

/**
 * The conformance suite against the backend running in chromium (SwiftShader's WebGPU): a Node-side
 * proxy backend forwards every call to the page, where the real backend runs on navigator.gpu.
 * Device tensors stay a Node-side concern here (the proxy declares none); everything else is the
 * backend's own code on the browser's WebGPU implementation.
 */
if (chromiumMissing) {
  describe('conformance: webgpu in chromium', () => {
    it.skip(`no chromium at ${CHROMIUM}`, () => {});
  });
} else {
  // The full suite takes about 70 s through SwiftShader on the 2-core CI machine.
  runConformance({
    name: 'webgpu in chromium (SwiftShader)',
    create: async () =>
      proxyBackend(await openWebgpuPage(), {
        name: 'webgpu-chromium',
        capabilities: { ...WEBGPU_CAPABILITIES, deviceTensors: false, dtypes: ['float32'] },
      }),
    sizes: 'full',
  });
}
