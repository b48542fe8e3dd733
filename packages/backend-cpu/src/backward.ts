import {
  type BackwardRequest,
  type BackwardResult,
  type HostTensor,
  type PrepareScratch,
  prepareScores,
  prepareScoresBackward,
  querySchedule,
} from '@fastmax/core';
import type { BackwardEngine } from './backward-engine.js';
import type { WorkUnit } from './engine.js';
import type { WorkerPool } from './pool.js';
import { kernelSetup } from './setup.js';
import { type SharedStaging, touchedFloat32 } from './staging.js';
import { type BackwardJob, backwardHead } from './worker.js';

/**
 * The call's arrays in the backend's reused shared staging (staging.ts: fresh memory costs page
 * faults on first touch, more than the arithmetic done on it). Float64 arrays are views of float32
 * staging of twice the length. `zero` clears what the call accumulates into.
 */
function stagedF32(staging: SharedStaging, role: string, length: number, zero: boolean): Float32Array {
  const array = staging.take(`backward.${role}`, length);
  return zero ? array.fill(0) : array;
}

function stagedF64(staging: SharedStaging, role: string, length: number, zero: boolean): Float64Array {
  const floats = staging.take(`backward.${role}`, 2 * length);
  const array = new Float64Array(floats.buffer, floats.byteOffset, length);
  return zero ? array.fill(0) : array;
}

/** Core's `prepareScores` arrays in the staging too (they are written in full: no clearing). */
function prepareScratch(staging: SharedStaging): PrepareScratch {
  return {
    float64: (role, length) => {
      const floats = staging.take(`prepare.${role}`, 2 * length);
      return new Float64Array(floats.buffer, floats.byteOffset, length);
    },
    int32: (role, length) => {
      const floats = staging.take(`prepare.${role}`, length);
      return new Int32Array(floats.buffer, floats.byteOffset, length);
    },
  };
}

/**
 * The backward's causal chunk when the caller leaves it to the planner. Its diagonal blocks cost
 * five C×C products against the forward's two, so it gains from shorter chunks than the planner's:
 * at p = 2, D = 64, N = 16384 (two threads), 128 measured 5 to 7% faster than the planner's 256,
 * and 64 no faster than 128.
 */
const BACKWARD_CHUNK = 128;

/**
 * Backward on the CPU: core's `prepareScores` (float64, linear memory) gives z = σx and y, the
 * WebAssembly kernels give dz, dy and dv per head in two passes (backward-engine.ts) with this
 * thread forming α, β, g and the state's dz in between, and core's `prepareScoresBackward` chains
 * dx = σ·dz and dσ = dz·x back to dq and dk.
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
  /** Whether a head may be split into shares (features and query blocks) when heads are few. */
  splitHeads: boolean,
  /** Where the arrays the kernels read and write live; the caller runs this call exclusively. */
  staging: SharedStaging,
): Promise<BackwardResult> {
  const { shape, options, plan } = request;
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
  const factorized = plan.path === 'factorized';
  const prepared = prepareScores(q, k, shape, options, prepareScratch(staging));
  const setup = kernelSetup(D, options.order, options.coefficients, factorized);
  const chunked = factorized && options.causal;
  const scheduleChunk =
    chunked && options.chunkSize === undefined ? Math.min(plan.chunkSize, BACKWARD_CHUNK) : plan.chunkSize;
  const chunkSize = chunked ? scheduleChunk : 256;
  engine.prepare(setup, Dv, chunkSize);

  const heads = B * H;
  // Fewer heads than workers: split each head into shares. Every share walks all tokens (it
  // builds their features for its own feature range), so this pays only when F is large.
  const shares = pool !== null && splitHeads && heads < pool.size ? Math.ceil(pool.size / heads) : 1;
  const parallel = pool !== null && (heads >= 2 || shares >= 2);
  const slots = heads * shares;
  const z = stagedF32(staging, 'z', heads * N * D, false);
  for (let row = 0; row < heads * N; row++) {
    const sigma = prepared.sigma[row]!;
    for (let d = 0; d < D; d++) z[row * D + d] = sigma * prepared.x[row * D + d]!;
  }
  // Float64 to float32 by `set`, which converts natively.
  const y = stagedF32(staging, 'y', prepared.y.length, false);
  y.set(prepared.y);
  const validKeys = new Int32Array(B);
  const schedules: Int32Array[] = [];
  for (let b = 0; b < B; b++) {
    validKeys[b] = options.keyLengths === null ? M : options.keyLengths[b]!;
    schedules.push(
      Int32Array.from(
        querySchedule(b, shape, options, plan.path, scheduleChunk).flatMap((c) => [
          c.queryStart,
          c.queryEnd,
          c.stateKeyEnd,
          c.directKeyEnd,
        ]),
      ),
    );
  }
  const first: BackwardJob = {
    pass: 1,
    z,
    y,
    v: staging.input('backward.v', v.data),
    dOut: staging.input('backward.dOut', dOut.data),
    gradA: stagedF32(staging, 'gradA', slots * N * D, true),
    gradB: stagedF32(staging, 'gradB', slots * N * D, true),
    den: stagedF64(staging, 'den', slots * N, true),
    betaDen: stagedF64(staging, 'betaDen', slots * N, true),
    // Written between the passes (combineFirstPass, which skips degenerate rows): cleared by
    // `beforeSecondPass`, as are pass 2's sums.
    g: stagedF32(staging, 'g', heads * N * (Dv + 1), false),
    dz: stagedF64(staging, 'dz', heads * N * D, false),
    dy: stagedF64(staging, 'dy', slots * M * D, false),
    dv: stagedF64(staging, 'dv', slots * M * Dv, false),
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
    shares,
  };
  const second: BackwardJob = { ...first, pass: 2 };
  const units: WorkUnit[] = [];
  for (let head = 0; head < heads; head++) for (let s = 0; s < shares; s++) units.push({ head, share: s });
  // The result arrays, allocated and every page of them touched (first-touch page faults cost 12 to
  // 20 ms per 4 MiB on the VMs we measure on), and what the rest accumulates into cleared: work
  // that does not depend on pass 1, done in this thread while the workers run it.
  const results: { dq?: Float32Array; dk?: Float32Array; dv?: Float32Array } = {};
  const beforeSecondPass = (): void => {
    first.g.fill(0);
    first.dz.fill(0);
    first.dy.fill(0);
    first.dv.fill(0);
    results.dq = touchedFloat32(heads * N * D);
    results.dk = touchedFloat32(B * Hkv * M * D);
    results.dv = touchedFloat32(B * Hkv * M * Dv);
  };
  const runPass = async (job: BackwardJob, alongside?: () => void): Promise<void> => {
    if (parallel) {
      const perBatch = Math.ceil(units.length / (pool.size * 2));
      const batches: WorkUnit[][] = [];
      for (let i = 0; i < units.length; i += perBatch) batches.push(units.slice(i, i + perBatch));
      await pool.backward(job, batches, alongside);
    } else {
      for (const unit of units) backwardHead(engine, job, unit);
      alongside?.();
    }
  };
  await runPass(first, beforeSecondPass);
  combineFirstPass(first, heads * N);
  await runPass(second);

  // Shares of a head each wrote a part of dy and dv (B·H·shares slices): sum them per head, then
  // per kv head.
  const dyKv = sumGroups(sumShares(first.dy, heads, shares, M * D), B, H, Hkv, M * D);
  const dvKv = sumGroups(sumShares(first.dv, heads, shares, M * Dv), B, H, Hkv, M * Dv);
  // z = σx: ∂L/∂σ = dz·x and ∂L/∂x = σ·dz, the latter in place (dz is not needed afterwards).
  const dx = first.dz;
  const dsigma = new Float64Array(heads * N);
  for (let row = 0; row < heads * N; row++) {
    const sigma = prepared.sigma[row]!;
    let dot = 0;
    for (let d = row * D; d < (row + 1) * D; d++) {
      dot += dx[d]! * prepared.x[d]!;
      dx[d] = sigma * dx[d]!;
    }
    dsigma[row] = dot;
  }
  const { dq, dk } = prepareScoresBackward(prepared, shape, options, dx, dyKv, dsigma);
  // Float64 to float32 by `set`, which converts natively.
  results.dq!.set(dq);
  results.dk!.set(dk);
  results.dv!.set(dvKv);
  return {
    dq: { shape: [B, H, N, D], data: results.dq! },
    dk: { shape: [B, Hkv, M, D], data: results.dk! },
    dv: { shape: [B, Hkv, M, Dv], data: results.dv! },
  };
}

/**
 * Between the passes: adds the shares' den, β·den, A and B of each query row and forms
 * α = 1/den (0 for a degenerate row), β, the state's dz = α(A - βB) and g = [α dO | -αβ]
 * (backward-engine.ts).
 */
function combineFirstPass(job: BackwardJob, rows: number): void {
  const { shares, headDim: D, valueDim: Dv, gradA, gradB, dOut, g, dz } = job;
  const N = job.queryLength;
  for (let row = 0; row < rows; row++) {
    const head = Math.floor(row / N);
    const firstSlotRow = head * shares * N + (row - head * N);
    let den = 0;
    let betaDen = 0;
    for (let s = 0; s < shares; s++) {
      den += job.den[firstSlotRow + s * N]!;
      betaDen += job.betaDen[firstSlotRow + s * N]!;
    }
    // A degenerate row keeps g = 0 and dz = 0: its gradients contribute nothing.
    if (!(den > 0)) continue;
    const alpha = 1 / den;
    const beta = betaDen * alpha;
    for (let d = 0; d < D; d++) {
      let a = 0;
      let b = 0;
      for (let s = 0; s < shares; s++) {
        a += gradA[(firstSlotRow + s * N) * D + d]!;
        b += gradB[(firstSlotRow + s * N) * D + d]!;
      }
      dz[row * D + d] = alpha * (a - beta * b);
    }
    for (let c = 0; c < Dv; c++) g[row * (Dv + 1) + c] = alpha * dOut[row * Dv + c]!;
    g[row * (Dv + 1) + Dv] = -alpha * beta;
  }
}

/**
 * Sums each head's share slices ([heads, shares, size]) in place into the first `heads` slices and
 * returns those, without allocating.
 */
function sumShares(slices: Float64Array, heads: number, shares: number, size: number): Float64Array {
  if (shares === 1) return slices;
  for (let head = 0; head < heads; head++) {
    const first = head * shares * size;
    for (let s = 1; s < shares; s++) {
      const from = (head * shares + s) * size;
      for (let i = 0; i < size; i++) slices[first + i]! += slices[from + i]!;
    }
    // Slice `head` lies at or before slice `head·shares`: copying in increasing order is safe.
    if (head > 0) slices.copyWithin(head * size, first, first + size);
  }
  return slices.subarray(0, heads * size);
}

/**
 * Sums the per-query-head slices of each kv head's group: [B, H, size] -> [B, Hkv, size]. Groups of
 * one slice need no sum: the input comes back as it is.
 */
function sumGroups(perHead: Float64Array, B: number, H: number, Hkv: number, size: number): Float64Array {
  if (H === Hkv) return perHead;
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
