import { describe, expect, it } from 'vitest';
import { allPrograms } from '../src/programs.js';
import { webgpuBackend } from '../src/index.js';
import { Runtime } from '../src/runtime.js';
import { adapterMissing } from './support.js';

const missing = await adapterMissing();

describe.skipIf(missing !== undefined)(`WGSL validation on Dawn${missing ? ` (skipped: ${missing})` : ''}`, () => {
  it('compiles and validates every program variant, including D = Dv = 256 and tiny workgroup storage', async () => {
    const backend = webgpuBackend();
    const device = await backend.device();
    const runtime = new Runtime(device, 'validation', {}, true);
    const dims = [
      [1, 1],
      [8, 5],
      [64, 64],
      [128, 32],
      [256, 256],
    ] as const;
    const programs = [...allPrograms(dims, device.limits.maxComputeWorkgroupStorageSize), ...allPrograms(dims, 4096)];
    const unique = [...new Map(programs.map((p) => [p.key, p])).values()];
    const problems: string[] = [];
    for (const program of unique) problems.push(...(await runtime.validate(program)));
    expect(problems).toEqual([]);
    expect(unique.length).toBeGreaterThan(40);
    await backend.dispose();
  }, 120_000);
});
