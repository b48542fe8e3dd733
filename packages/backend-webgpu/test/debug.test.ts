import { createFastmax } from '@fastmax/core';
import { it } from 'vitest';
import { webgpuBackend } from '../src/index.js';
import { randomTensor } from './support.js';

it('debug', async () => {
  let t0 = performance.now();
  const fm = await createFastmax({ backend: webgpuBackend() });
  console.log('created', performance.now() - t0);
  const q = randomTensor([2, 2, 11, 2], 1);
  for (const path of ['direct', 'direct', 'direct', 'factorized', 'factorized', 'factorized'] as const) {
    t0 = performance.now();
    await fm.attention(q, q, q, { path });
    console.log(path, performance.now() - t0);
  }
  t0 = performance.now();
  await fm.backward(q, q, q, q, { path: 'direct' });
  console.log('backward', performance.now() - t0);
  t0 = performance.now();
  await fm.backward(q, q, q, q, { path: 'direct' });
  console.log('backward', performance.now() - t0);
}, 120000);
