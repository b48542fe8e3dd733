import { describe, expect, it } from 'vitest';
import { webgpuBackend } from '../src/index.js';
import { allPrograms } from '../src/programs.js';
import { Runtime } from '../src/runtime.js';
import { adapterMissing } from './support.js';

const missing = await adapterMissing();

describe.skipIf(missing !== undefined)(
  `WGSL validation on Dawn${missing ? ` (skipped: ${missing})` : ''}`,
  () => {
    it('compiles and validates every program variant (every head-dim bucket up to 256, and with 4 KiB of workgroup storage)', async () => {
      const backend = webgpuBackend();
      const device = await backend.device();
      const runtime = new Runtime(device, 'validation', {}, true);
      const float16 = device.features.has('shader-f16');
      const programs = [
        ...allPrograms(device.limits.maxComputeWorkgroupStorageSize, float16),
        ...allPrograms(4096, float16),
      ];
      const unique = [...new Map(programs.map((p) => [p.key, p])).values()];
      const problems: string[] = [];
      for (const program of unique) problems.push(...(await runtime.validate(program)));
      expect(problems).toEqual([]);
      expect(unique.length).toBeGreaterThan(100);
      await backend.dispose();
    }, 120_000);
  },
);
