import { createFastmax } from '@fastmax/core';
import { it } from 'vitest';
import { cpuBackend } from '../src/index.js';

it('speed', async () => {
  const N = 16384, D = 64;
  const mk = () => ({ shape: [1, 1, N, D] as const, data: Float32Array.from({ length: N * D }, () => Math.random() - 0.5) });
  const q = mk(), k = mk(), v = mk();
  for (const threads of [1, 2]) {
    const fm = await createFastmax({ backend: cpuBackend({ threads }) });
    for (const causal of [true, false]) {
      const times = [];
      for (let r = 0; r < 4; r++) {
        const t = performance.now();
        await fm.attention(q, k, v, { order: 2, causal });
        times.push(performance.now() - t);
      }
      console.log(`threads ${threads} causal ${causal}`, times.map((t) => t.toFixed(0)).join(' '));
    }
    await fm.dispose();
  }
}, 300000);
