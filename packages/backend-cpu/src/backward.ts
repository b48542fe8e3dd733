import {
  type BackwardRequest,
  type BackwardResult,
  checkFinite,
  dividedSides,
  type HostTensor,
  type PrepareScratch,
  preparationArrays,
  prepareDivisors,
  preparedScores,
  querySchedule,
  sumNormGradients,
} from '@fastmax/core';
import { type BackwardEngine, sequenceStateFloats } from './backward-engine.js';
import {
  balancedFeatureBounds,
  featureShareWork,
  PREPARATION_COST,
  type ShareBalance,
  sequenceBounds,
  sharesPerHead,
  unevenSpeeds,
} from './balance.js';
import { batchUnits, evenRange, type WorkUnit } from './engine.js';
import type { RunTotals, WorkerPool } from './pool.js';
import { kernelSetup, packedSchedule } from './setup.js';
import { type SharedStaging, touchedFloat32 } from './staging.js';
import {
  type BackwardJob,
  backwardHead,
  backwardUnit,
  type FinishRange,
  type PreparationJob,
  preparationRows,
} from './worker.js';

/**
 * The call's arrays in the backend's reused shared staging (staging.ts: fresh memory costs page
 * faults on first touch, more than the arithmetic done on it). Float64 arrays are views of float32
 * staging of twice the length. They hold the previous call's values: each pass writes every element
 * of what it produces (backward-engine.ts, worker.ts), so nothing is cleared.
 */
function stagedF32(staging: SharedStaging, role: string, length: number): Float32Array {
  return staging.take(`backward.${role}`, length);
}

function stagedF64(staging: SharedStaging, role: string, length: number): Float64Array {
  const floats = staging.take(`backward.${role}`, 2 * length);
  return new Float64Array(floats.buffer, floats.byteOffset, length);
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
 * Backward on the CPU: core's normalization (`prepareScores`, float64, linear memory) gives z = σx
 * and y, the WebAssembly kernels give dz, dy and dv per head in two passes (backward-engine.ts), a
 * third pass sums the shares and forms dx = σ·dz and dσ = dz·x (worker.ts), and core's
 * `prepareScoresBackward` chains dx, dy and dσ back to dq and dk. All of it runs on the workers:
 * core's normalization and its backward as its row steps over ranges of rows (PreparationJob), with
 * only their scalar work per row in the calling thread.
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
  /** Sizing one head's feature shares to the workers' speeds (balance.ts); null: equal shares. */
  balance: ShareBalance | null = null,
): Promise<BackwardResult> {
  const { shape, options, plan } = request;
  const { batch: B, heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = shape;
  const factorized = plan.path === 'factorized';
  const scratch = prepareScratch(staging);
  const arrays = preparationArrays(shape, options, scratch);
  // One range of query rows and one of key rows per worker: the steps are row-local and even.
  const rowParts = pool === null ? 1 : pool.size;
  const rowRanges = queryKeyRanges(B * H * N, B * Hkv * M, rowParts);
  const dz = stagedF64(staging, 'dz', B * H * N * D);
  const preparation: PreparationJob = {
    step: 'center',
    headDim: D,
    valueDim: Dv,
    q: staging.input('backward.q', q.data),
    k: staging.input('backward.k', k.data),
    v: staging.input('backward.v', v.data),
    dOut: staging.input('backward.dOut', dOut.data),
    checkFinite: options.checkFinite,
    arrays,
    z: stagedF32(staging, 'z', B * H * N * D),
    y: stagedF32(staging, 'y', arrays.y.length),
    // The gradients' arrays are given by the last two steps.
    dx: dz,
    dy: dz,
    dv: dz,
    queryDivisorGradients: stagedF64(staging, 'queryDivisorGradients', B * H * N),
    keyDivisorGradients: stagedF64(staging, 'keyDivisorGradients', B * Hkv * M),
    queryNormGradients: null,
    keyNormGradients: null,
    dq32: stagedF32(staging, 'dq32', B * H * N * D),
    dk32: stagedF32(staging, 'dk32', B * Hkv * M * D),
    dv32: stagedF32(staging, 'dv32', B * Hkv * M * Dv),
  };
  /** Runs a step over every range; returns what preparationRows counted. */
  const runStep = async (job: PreparationJob): Promise<number> => {
    if (pool !== null) return (await pool.preparation(job, rowRanges)).nonFiniteInputs;
    let found = 0;
    for (const range of rowRanges) found += preparationRows(job, range);
    return found;
  };
  // The backend declares checksFiniteBackwardInputs: the first step flags NaN and ±Infinity in the
  // rows it reads anyway (norms of q and k) and in v and dOut; core's scans then name the value.
  if ((await runStep(preparation)) > 0) {
    checkFinite(q, 'q');
    checkFinite(k, 'k');
    checkFinite(v, 'v');
    checkFinite(dOut, 'dOut');
  }
  prepareDivisors(arrays, shape, options);
  await runStep({ ...preparation, step: 'divide' });
  const prepared = preparedScores(arrays);
  const setup = kernelSetup(D, options.order, options.coefficients, factorized);
  const chunked = factorized && options.causal;
  const scheduleChunk =
    chunked && options.chunkSize === undefined ? Math.min(plan.chunkSize, BACKWARD_CHUNK) : plan.chunkSize;
  const chunkSize = chunked ? scheduleChunk : 256;
  engine.prepare(setup, Dv, chunkSize);

  const heads = B * H;
  // Fewer heads than workers: split each head into shares. Every share walks all tokens (it
  // builds their features for its own feature range), so this pays only when F is large.
  // Work a share has whatever its features, in features' worth (five F × (Dv + 1) products per
  // token): every share prepares each token again in both passes and takes every shares-th query
  // block's diagonal part. The direct path's shares are query blocks, which repeat nothing.
  const fixedFeaturesFor = (shares: number): number =>
    (2 * PREPARATION_COST * (N + M) * (D + Dv) +
      (options.causal ? (2.5 * N * chunkSize * (D + Dv)) / (2 * shares) : 0)) /
    (2.5 * (N + M) * (Dv + 1));
  // Only with fewer heads than workers: with more, the shares' repeated work cost as much as the
  // idle last round saved (3 heads on 2 workers, p = 2, N = 4096 and 8192: 1.02 to 1.05× whole
  // heads' time), unlike the forward's.
  const shares =
    pool !== null && splitHeads && heads < pool.size
      ? factorized
        ? sharesPerHead(
            heads,
            pool.size,
            setup.paddedFeatures / 4,
            (s) => fixedFeaturesFor(s) / setup.paddedFeatures,
          )
        : sharesPerHead(heads, pool.size, Number.POSITIVE_INFINITY, () => 0)
      : 1;
  const slots = heads * shares;
  // Causal heads with few features split by queries instead (BackwardJob.queryBounds): pass 1's
  // later shares fold the keys before their first query into their state, pass 2's earlier ones
  // the queries after their last key into theirs, so each pass gets bounds of its own (pass 2's
  // mirror pass 1's). A key costs what a query costs with the moments alone.
  const byQueries =
    pool !== null && !splitHeads && factorized && options.causal && heads < pool.size && N > 0;
  const queryShares = byQueries ? sharesPerHead(heads, pool.size, Math.ceil(N / scheduleChunk), () => 0) : 1;
  // Non-causal ones split by sequence (BackwardJob.sequenceSplit): each pass adds its share of the
  // tokens to partial moments, then reads its share of the rows out against their sum, so a share
  // repeats nothing (by queries, each share would fold every key into its state).
  const bySequence =
    pool !== null && !splitHeads && factorized && !options.causal && heads < pool.size && N > 0;
  const sequenceParts = bySequence
    ? sharesPerHead(heads, pool.size, Math.max(1, Math.floor(Math.max(N, M) / 64)), () => 0)
    : 1;
  let passBounds: { first: Int32Array; second: Int32Array } | null = null;
  if (queryShares > 1) {
    const W = Dv + 1;
    const rowCost = 2 * plan.featureCount * W + scheduleChunk * (D + Dv) + PREPARATION_COST * (2 * D + Dv);
    const foldCost = plan.featureCount * W + PREPARATION_COST * (D + Dv);
    const none = new Array<number>(queryShares).fill(0);
    const ones = new Array<number>(queryShares).fill(1);
    const forward = sequenceBounds(N, queryShares, scheduleChunk, rowCost, foldCost, none, ones);
    const mirrored = new Int32Array(queryShares + 1);
    for (let s = 1; s < queryShares; s++) {
      const start = N - forward[queryShares - s]!;
      mirrored[s] = Math.min(
        N,
        Math.max(mirrored[s - 1]!, Math.round(start / scheduleChunk) * scheduleChunk),
      );
    }
    mirrored[queryShares] = N;
    passBounds = { first: forward, second: mirrored };
  }
  const validKeys = new Int32Array(B);
  const schedules: Int32Array[] = [];
  for (let b = 0; b < B; b++) {
    validKeys[b] = options.keyLengths === null ? M : options.keyLengths[b]!;
    schedules.push(packedSchedule(querySchedule(b, shape, options, plan.path, scheduleChunk)));
  }
  // One head in as many feature shares as workers: share s runs on worker s (WorkerPool.run), sized
  // to that worker's measured speed, as in the forward, its fixed work counted (fixedFeaturesFor).
  const balanced = balance !== null && pool !== null && factorized && heads === 1 && shares === pool.size;
  const fixedFeatures = fixedFeaturesFor(shares);
  const featureBounds = balanced
    ? balancedFeatureBounds(setup.paddedFeatures, unevenSpeeds(balance.speeds, shares), fixedFeatures)
    : null;
  const first: BackwardJob = {
    pass: 1,
    z: preparation.z,
    y: preparation.y,
    v: preparation.v,
    dOut: preparation.dOut,
    gradA: stagedF32(staging, 'gradA', slots * N * D),
    gradB: stagedF32(staging, 'gradB', slots * N * D),
    den: stagedF64(staging, 'den', slots * N),
    betaDen: stagedF64(staging, 'betaDen', slots * N),
    // Written in full by pass 2.
    dz,
    dy: stagedF64(staging, 'dy', slots * M * D),
    dv: stagedF64(staging, 'dv', slots * M * Dv),
    x: prepared.x,
    sigma: prepared.sigma,
    dsigma: stagedF64(staging, 'dsigma', heads * N),
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
    featureBounds,
    queryBounds: passBounds?.first ?? null,
    sequenceSplit:
      sequenceParts > 1
        ? {
            phase: 'moments',
            parts: sequenceParts,
            states: stagedF32(
              staging,
              'sequenceStates',
              heads * sequenceParts * sequenceStateFloats(setup.paddedFeatures, Dv),
            ),
          }
        : null,
  };
  const second: BackwardJob = { ...first, pass: 2, queryBounds: passBounds?.second ?? null };

  const third: BackwardJob = { ...first, pass: 3, queryBounds: null, sequenceSplit: null };
  const units: WorkUnit[] = [];
  const unitsPerHead = Math.max(shares, queryShares, sequenceParts);
  for (let head = 0; head < heads; head++)
    for (let s = 0; s < unitsPerHead; s++) units.push({ head, share: s });
  // The result arrays, allocated and every page of them touched (first-touch page faults cost 12 to
  // 20 ms per 4 MiB on the VMs we measure on): work that does not depend on pass 1, done in this
  // thread while the workers run it.
  // The caller's arrays when given (options.gradientsOut): nothing to allocate.
  const results: { dq?: Float32Array; dk?: Float32Array; dv?: Float32Array } = { ...request.out };
  const allocateResults = (): void => {
    if (request.out !== undefined) return;
    results.dq = touchedFloat32(heads * N * D);
    results.dk = touchedFloat32(B * Hkv * M * D);
    results.dv = touchedFloat32(B * Hkv * M * Dv);
  };
  // Timings of passes 1 and 2 (batch i is share i when balanced: one unit a batch, all workers idle
  // at the start).
  const passTimings: RunTotals['timings'][] = [];
  // With a pool, even a single unit runs on a worker: the calling thread allocates the results
  // meanwhile.
  const runPass = async (job: BackwardJob, alongside?: () => void): Promise<void> => {
    if (pool !== null) {
      passTimings.push((await pool.backward(job, batchUnits(units, pool.size), alongside)).timings);
    } else {
      for (const unit of units) backwardHead(engine, job, unit);
      alongside?.();
    }
  };
  // A pass split by sequence runs twice: the partial moments, then the readout against their sum.
  const readout = (job: BackwardJob): BackwardJob => ({
    ...job,
    sequenceSplit: job.sequenceSplit && { ...job.sequenceSplit, phase: 'readout' },
  });
  await runPass(first, allocateResults);
  if (first.sequenceSplit !== null) await runPass(readout(first));
  await runPass(second);
  if (second.sequenceSplit !== null) await runPass(readout(second));
  if (balanced) {
    const { work, millis } = featureShareWork(
      passTimings,
      setup.paddedFeatures,
      shares,
      featureBounds,
      fixedFeatures,
    );
    balance.learn(work, millis);
  }
  // Pass 3: the shares' sums and ∂L/∂x, ∂L/∂σ, over ranges of query and key rows.
  const finish = queryKeyRanges(heads * N, heads * M, rowParts);
  if (pool !== null)
    await pool.backward(
      third,
      finish.map((range) => [range]),
    );
  else for (const range of finish) backwardUnit(engine, third, range);

  // Each head's shares are summed into its first slice: gather those, then sum per kv head.
  const grouped = (perHead: Float64Array, role: string, size: number): Float64Array =>
    H === Hkv ? perHead : sumGroups(perHead, B, H, Hkv, size, stagedF64(staging, role, B * Hkv * size));
  const gradients = {
    dx: dz,
    dy: grouped(firstSlices(first.dy, heads, shares, M * D), 'dyKv', M * D),
    dv: grouped(firstSlices(first.dv, heads, shares, M * Dv), 'dvKv', M * Dv),
  };
  const { queriesDivided, keysDivided } = dividedSides(options);
  if (queriesDivided || keysDivided) await runStep({ ...preparation, ...gradients, step: 'divideBackward' });
  const norms = sumNormGradients(
    prepared,
    shape,
    options,
    preparation.queryDivisorGradients,
    preparation.keyDivisorGradients,
    first.dsigma,
    scratch,
  );
  await runStep({
    ...preparation,
    ...gradients,
    queryNormGradients: norms.queries,
    keyNormGradients: norms.keys,
    step: 'finish',
  });
  results.dq!.set(preparation.dq32);
  results.dk!.set(preparation.dk32);
  results.dv!.set(preparation.dv32);
  return {
    dq: { shape: [B, H, N, D], data: results.dq! },
    dk: { shape: [B, Hkv, M, D], data: results.dk! },
    dv: { shape: [B, Hkv, M, Dv], data: results.dv! },
  };
}

/** `queryRows` and `keyRows` each in `parts` near-equal ranges, one of each per unit. */
function queryKeyRanges(queryRows: number, keyRows: number, parts: number): FinishRange[] {
  return Array.from({ length: parts }, (_, index) => ({
    queries: evenRange(queryRows, index, parts),
    keys: evenRange(keyRows, index, parts),
  }));
}

/**
 * The first slice of each head's shares ([heads, shares, size]), moved in place to the front and
 * returned as [heads, size], without allocating.
 */
function firstSlices(slices: Float64Array, heads: number, shares: number, size: number): Float64Array {
  if (shares === 1) return slices;
  // Slice `head` lies at or before slice `head·shares`: copying in increasing order is safe.
  for (let head = 1; head < heads; head++)
    slices.copyWithin(head * size, head * shares * size, (head * shares + 1) * size);
  return slices.subarray(0, heads * size);
}

/** Sums the per-query-head slices of each kv head's group, [B, H, size], into `out`, [B, Hkv, size]. */
function sumGroups(
  perHead: Float64Array,
  B: number,
  H: number,
  Hkv: number,
  size: number,
  out: Float64Array,
): Float64Array {
  out.fill(0);
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
