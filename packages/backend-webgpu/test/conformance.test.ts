import { runConformance } from '@fastmax/conformance';
import { describe, it } from 'vitest';
import { webgpuBackend } from '../src/index.js';
import { adapterMissing } from './support.js';

const missing = await adapterMissing();

// Lavapipe and SwiftShader run well under 1 GFLOP/s: the N >= 256 cases (sizes 'full') are run in
// CI only where FASTMAX_WEBGPU_CONFORMANCE=full is set; 'quick' covers every capability and case kind.
const sizes = process.env.FASTMAX_WEBGPU_CONFORMANCE === 'full' ? 'full' : 'quick';

if (missing === undefined) {
  runConformance({ name: 'webgpu (dawn)', create: () => webgpuBackend(), sizes, timeoutMs: 600_000 });
} else {
  describe('conformance: webgpu (dawn)', () => {
    it.skip(`no WebGPU adapter: ${missing}`, () => {});
  });
}
