import { runConformance } from '@fastmax/conformance';
import { describe, it } from 'vitest';
import { webgpuBackend } from '../src/index.js';
import { adapterMissing } from './support.js';

const missing = await adapterMissing();

// The full suite (N up to 4096) takes about 30 s on Dawn + lavapipe, so CI runs all of it.
if (missing === undefined) {
  runConformance({ name: 'webgpu (dawn)', create: () => webgpuBackend(), sizes: 'full' });
} else {
  describe('conformance: webgpu (dawn)', () => {
    it.skip(`no WebGPU adapter: ${missing}`, () => {});
  });
}
