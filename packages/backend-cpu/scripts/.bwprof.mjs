import { cpuBackend } from '@fastmax/backend-cpu';
import { createFastmax } from '@fastmax/core';
const rand = (n, seed) => { const a = new Float32Array(n); let s = seed; for (let i = 0; i < n; i++) { s = (s * 1103515245 + 12345) >>> 0; a[i] = s / 2 ** 32 - 0.5; } return a; };
const N=16384, D=64;
const q = { shape: [1, 1, N, D], data: rand(N * D, 1) }, k = { shape: [1, 1, N, D], data: rand(N * D, 2) }, v = { shape: [1, 1, N, D], data: rand(N * D, 3) }, dO = { shape: [1, 1, N, D], data: rand(N * D, 4) };
const fm = await createFastmax({ backend: cpuBackend({ threads: 2 }) });
const opts = { order: 2, causal: true };
for (let i = 0; i < 5; i++) await fm.backward(q, k, v, dO, opts);
const t=[]; for (let i = 0; i < 12; i++) { const s=performance.now(); await fm.backward(q, k, v, dO, opts); t.push(performance.now()-s);}
t.sort((a,b)=>a-b); console.log('median', t[6].toFixed(1), 'min', t[0].toFixed(1));
fm.dispose();
