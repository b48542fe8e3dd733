import { createFastmax } from '@fastmax/core';
import { cpuBackend } from '@fastmax/backend-cpu';
const N = Number(process.argv[2] ?? 16384), D = 64, order = Number(process.argv[3] ?? 2), causal = process.argv[4] !== 'nc';
const mk = (s) => { let x = s; const a = new Float32Array(N * D); for (let i = 0; i < a.length; i++) { x = (Math.imul(x, 1664525) + 1013904223) >>> 0; a[i] = x / 2 ** 32 - 0.5; } return { shape: [1, 1, N, D], data: a }; };
const q = mk(1), k = mk(2), v = mk(3);
for (const threads of [1, 2]) {
  const fm = await createFastmax({ backend: cpuBackend({ threads }) });
  const times = [];
  for (let r = 0; r < 6; r++) { const t = performance.now(); await fm.attention(q, k, v, { order, causal }); times.push(performance.now() - t); }
  console.log(`N ${N} p ${order} causal ${causal} threads ${threads}:`, times.map((t) => t.toFixed(0)).join(' '));
  await fm.dispose();
}
