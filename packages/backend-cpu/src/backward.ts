import {
  type BackwardRequest,
  type BackwardResult,
  type HostTensor,
  prepareScores,
  prepareScoresBackward,
  querySchedule,
} from '@fastmax/core';
import type { BackwardEngine } from './backward-engine.js';
import type { WorkUnit } from './engine.js';
import type { WorkerPool } from './pool.js';
import { kernelSetup } from './setup.js';
import { type BackwardJob, backwardHead } from './worker.js';

/** A Float32Array / Float64Array on shared memory when workers will read or write it. */
function sharedF32(data: Float32Array, share: boolean): Float32Array {
  if (!share || data.buffer instanceof SharedArrayBuffer) return data;
  const copy = new Float32Array(new SharedArrayBuffer(data.byteLength));
  copy.set(data);
  return copy;
}

function zerosF64(length: number, share: boolean): Float64Array {
  return share ? new Float64Array(new SharedArrayBuffer(length * 8)) : new Float64Array(length);
}

/**
 * Backward on the CPU: core's `prepareScores` (float64, linear memory) gives z = σx and y, the
 * WebAssembly kernels give dz, dy and dv per head (backward-engine.ts), and core's
 * `prepareScoresBackward` chains dx = σ·dz and dσ = dz·x back to dq and dk.
 */
export async function cpuBackward(
  request: BackwardRequest,
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  dOut: HostTensor,
  engine: BackwardEngine,
  /** Workers to spread the (batch, head) pairs over; null: the calling thread does them all. */
  pool: WorkerPool | null,
  /** Whether a head may be split by value columns when there are fewer heads than workers. */
  splitColumns: boolean,
): Promise<BackwardResult> {
  const { shape, options, plan } = request;
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
  const factorized = plan.path === 'factorized';
  const prepared = prepareScores(q, k, shape, options);
  const setup = kernelSetup(D, options.order, options.coefficients, factorized);
  const chunkSize = factorized && options.causal ? plan.chunkSize : 256;
  engine.prepare(setup, Dv, chunkSize);

  const heads = B * H;
  // Fewer heads than workers: split each head's value columns into panels of 8 (see
  // BackwardHead.c0): every range repeats the features and the denominator column, so this pays
  // only when F is large.
  const panels = Math.max(1, Math.ceil(Dv / 8));
  const parts =
    pool !== null && splitColumns && heads < pool.size ? Math.min(Math.ceil(pool.size / heads), panels) : 1;
  const share = pool !== null && (heads >= 2 || parts >= 2);
  const perPart = Math.ceil(panels / parts) * 8;
  const columnBounds = Int32Array.from({ length: parts + 1 }, (_, s) => Math.min(Dv, s * perPart));
  const z = share
    ? new Float32Array(new SharedArrayBuffer(B * H * N * D * 4))
    : new Float32Array(B * H * N * D);
  for (let row = 0; row < B * H * N; row++) {
    const sigma = prepared.sigma[row]!;
    for (let d = 0; d < D; d++) z[row * D + d] = sigma * prepared.x[row * D + d]!;
  }
  const y = sharedF32(Float32Array.from(prepared.y), share);
  const dz = zerosF64(B * H * parts * N * D, share);
  // With workers, each query head writes its own dy, dv slice (no two workers touch the same
  // memory); they are summed per kv head below. In one thread heads accumulate in place.
  const dyHeads = share ? heads : B * Hkv;
  const dy = zerosF64(dyHeads * parts * M * D, share);
  const dv = zerosF64(dyHeads * M * Dv, share);
  const validKeys = new Int32Array(B);
  const schedules: Int32Array[] = [];
  for (let b = 0; b < B; b++) {
    validKeys[b] = options.keyLengths === null ? M : options.keyLengths[b]!;
    schedules.push(
      Int32Array.from(
        querySchedule(b, shape, options, plan.path, plan.chunkSize).flatMap((c) => [
          c.queryStart,
          c.queryEnd,
          c.stateKeyEnd,
          c.directKeyEnd,
        ]),
      ),
    );
  }
  const job: BackwardJob = {
    z,
    y,
    v: sharedF32(v.data, share),
    dOut: sharedF32(dOut.data, share),
    dz,
    dy,
    dv,
    batch: B,
    heads: H,
    kvHeads: Hkv,
    queryLength: N,
    keyLength: M,
    headDim: D,
    valueDim: Dv,
    causal: options.causal,
    validKeys,
    path: plan.path,
    schedules,
    chunkSize,
    setup,
    columnBounds,
  };
  if (share) {
    const units: WorkUnit[] = [];
    for (let head = 0; head < heads; head++)
      for (let s = 0; s < parts; s++) units.push({ head, c0: columnBounds[s]!, c1: columnBounds[s + 1]! });
    const perBatch = Math.ceil(units.length / (pool.size * 2));
    const batches: WorkUnit[][] = [];
    for (let i = 0; i < units.length; i += perBatch) batches.push(units.slice(i, i + perBatch));
    await pool.backward(job, batches);
  } else {
    for (let head = 0; head < heads; head++) {
      const b = Math.floor(head / H);
      const kvHead = b * Hkv + Math.floor((head % H) / (H / Hkv));
      backwardHead(engine, job, { head, c0: 0, c1: Dv }, head * N * D, kvHead * M * D, kvHead * M * Dv);
    }
  }
  // Column ranges of a head each wrote a share of dz and dy (B·H·parts slices): sum them per head.
  const dzHeads = parts > 1 ? sumGroups(dz, 1, heads * parts, heads, N * D) : dz;
  const dyPerHead = parts > 1 ? sumGroups(dy, 1, heads * parts, heads, M * D) : dy;
  const dyKv = share ? sumGroups(dyPerHead, B, H, Hkv, M * D) : dy;
  const dvKv = share ? sumGroups(dv, B, H, Hkv, M * Dv) : dv;
  // z = σx: ∂L/∂x = σ·dz and ∂L/∂σ = dz·x.
  const dx = new Float64Array(dzHeads.length);
  const dsigma = new Float64Array(B * H * N);
  for (let row = 0; row < B * H * N; row++) {
    const sigma = prepared.sigma[row]!;
    let dot = 0;
    for (let d = 0; d < D; d++) {
      dx[row * D + d] = sigma * dzHeads[row * D + d]!;
      dot += dzHeads[row * D + d]! * prepared.x[row * D + d]!;
    }
    dsigma[row] = dot;
  }
  const { dq, dk } = prepareScoresBackward(prepared, shape, options, dx, dyKv, dsigma);
  return {
    dq: { shape: [B, H, N, D], data: Float32Array.from(dq) },
    dk: { shape: [B, Hkv, M, D], data: Float32Array.from(dk) },
    dv: { shape: [B, Hkv, M, Dv], data: Float32Array.from(dvKv) },
  };
}

/** Sums the per-query-head slices of each kv head's group: [B, H, size] -> [B, Hkv, size]. */
function sumGroups(perHead: Float64Array, B: number, H: number, Hkv: number, size: number): Float64Array {
  const out = new Float64Array(B * Hkv * size);
  const group = H / Hkv;
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const target = (b * Hkv + Math.floor(h / group)) * size;
      const source = (b * H + h) * size;
      for (let i = 0; i < size; i++) out[target + i]! += perHead[source + i]!;
    }
  }
  return out;
}
