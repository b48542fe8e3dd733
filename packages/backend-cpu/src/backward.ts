import {
  type BackwardRequest,
  type BackwardResult,
  type HostTensor,
  prepareScores,
  prepareScoresBackward,
  querySchedule,
} from '@fastmax/core';
import type { BackwardEngine } from './backward-engine.js';
import { kernelSetup } from './setup.js';

/**
 * Backward on the CPU: core's `prepareScores` (float64, linear memory) gives z = σx and y, the
 * WebAssembly kernels give dz, dy and dv per head (backward-engine.ts), and core's
 * `prepareScoresBackward` chains dx = σ·dz and dσ = dz·x back to dq and dk.
 */
export function cpuBackward(
  request: BackwardRequest,
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  dOut: HostTensor,
  engine: BackwardEngine,
): BackwardResult {
  const { shape, options, plan } = request;
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
  const factorized = plan.path === 'factorized';
  const prepared = prepareScores(q, k, shape, options);
  const setup = kernelSetup(D, options.order, options.coefficients, factorized);
  engine.prepare(setup, Dv, factorized && options.causal ? plan.chunkSize : 256);

  const z = new Float32Array(B * H * N * D);
  for (let row = 0; row < B * H * N; row++) {
    const sigma = prepared.sigma[row]!;
    for (let d = 0; d < D; d++) z[row * D + d] = sigma * prepared.x[row * D + d]!;
  }
  const y = Float32Array.from(prepared.y);
  const dz = new Float64Array(B * H * N * D);
  const dy = new Float64Array(B * Hkv * M * D);
  const dv = new Float64Array(B * Hkv * M * Dv);
  for (let b = 0; b < B; b++) {
    const schedule = Int32Array.from(
      querySchedule(b, shape, options, plan.path, plan.chunkSize).flatMap((c) => [
        c.queryStart,
        c.queryEnd,
        c.stateKeyEnd,
        c.directKeyEnd,
      ]),
    );
    const valid = options.keyLengths === null ? M : options.keyLengths[b]!;
    for (let h = 0; h < H; h++) {
      const head = b * H + h;
      const kvHead = b * Hkv + Math.floor(h / (H / Hkv));
      engine.run({
        z,
        zBase: head * N * D,
        y,
        yBase: kvHead * M * D,
        v: v.data,
        vBase: kvHead * M * Dv,
        dOut: dOut.data,
        dOutBase: head * N * Dv,
        dz,
        dzBase: head * N * D,
        dy,
        dyBase: kvHead * M * D,
        dv,
        dvBase: kvHead * M * Dv,
        rows: N,
        valid,
        causal: options.causal,
        causalShift: M - N,
        headDim: D,
        valueDim: Dv,
        path: plan.path,
        schedule,
      });
    }
  }
  // z = σx: ∂L/∂x = σ·dz and ∂L/∂σ = dz·x.
  const dx = new Float64Array(dz.length);
  const dsigma = new Float64Array(B * H * N);
  for (let row = 0; row < B * H * N; row++) {
    const sigma = prepared.sigma[row]!;
    let dot = 0;
    for (let d = 0; d < D; d++) {
      dx[row * D + d] = sigma * dz[row * D + d]!;
      dot += dz[row * D + d]! * prepared.x[row * D + d]!;
    }
    dsigma[row] = dot;
  }
  const { dq, dk } = prepareScoresBackward(prepared, shape, options, dx, dy, dsigma);
  return {
    dq: { shape: [B, H, N, D], data: Float32Array.from(dq) },
    dk: { shape: [B, Hkv, M, D], data: Float32Array.from(dk) },
    dv: { shape: [B, Hkv, M, Dv], data: Float32Array.from(dv) },
  };
}
