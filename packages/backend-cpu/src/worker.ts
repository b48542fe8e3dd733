/**
 * The worker side of the pool: one kernel instance per worker for the forward (engine.ts) and one
 * for the backward (backward-engine.ts). The build bundles this file with those two into
 * src/generated/kernels.ts (WORKER_SOURCE), wrapped in a few lines of glue that connect it to the
 * platform's message port. Of @fastmax/core it takes only the row steps of the normalization
 * (core's prepare-rows.ts, which imports nothing), bundled with it; the build fails if a worker
 * module takes anything else from core at run time.
 */
import {
  centerDivideRowRange,
  divideRowRangeBackward,
  hasNonFinite,
  normAndCenterRowRangeBackward,
  type PreparationArrays,
  rowStatsRange,
} from '@fastmax/core';
import {
  BackwardEngine,
  type BackwardHead,
  type SequenceSplitShare,
  sumOverShares,
} from './backward-engine.js';
import {
  type AttentionJob,
  chunksStartingIn,
  combineShares,
  Engine,
  evenRange,
  featureShare,
  type KernelSetup,
  kvHeadSlot,
  type RowRange,
  type WorkUnit,
} from './engine.js';

/**
 * A backward call's data, for one of its three passes (backward-engine.ts). In passes 1 and 2 each
 * head is split into `shares` (a share: a range of the features and every shares-th query block);
 * outputs are written per (query head, share) slot, slot = head·shares + share, so no two units
 * write the same memory (dz has no slots: each share writes the rows of its own query blocks).
 * Pass 3 sums the shares, row range by row range.
 */
export interface BackwardJob {
  /**
   * 1: `gradients` (den, β·den, A, B); 2: `keyGradients` (dy, dv, the direct blocks' dz);
   * 3: `finishQueryRows` and `finishKeyRows`.
   */
  readonly pass: 1 | 2 | 3;
  readonly z: Float32Array;
  readonly y: Float32Array;
  readonly v: Float32Array;
  readonly dOut: Float32Array;
  /** Pass 1 output: A and B, slots×N×D; den and β·den, slots×N. */
  readonly gradA: Float32Array;
  readonly gradB: Float32Array;
  readonly den: Float64Array;
  readonly betaDen: Float64Array;
  /**
   * B×H×N×D: pass 2 writes the direct blocks' dz (0 where there are none), pass 3 adds the state's
   * and turns it into ∂L/∂x = σ·dz in place.
   */
  readonly dz: Float64Array;
  /** Pass 2 output: dy, slots×M×D, and dv, slots×M×Dv (pass 3 sums each head's into its first slot). */
  readonly dy: Float64Array;
  readonly dv: Float64Array;
  /** Core's prepared queries x (B×H×N×D) and σ (B×H×N), and pass 3's ∂L/∂σ = dz·x (B×H×N). */
  readonly x: Float64Array;
  readonly sigma: Float64Array;
  readonly dsigma: Float64Array;
  readonly batch: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly queryLength: number;
  readonly keyLength: number;
  readonly headDim: number;
  readonly valueDim: number;
  readonly causal: boolean;
  readonly validKeys: Int32Array;
  readonly path: 'factorized' | 'direct';
  readonly schedules: readonly Int32Array[];
  readonly chunkSize: number;
  readonly setup: KernelSetup;
  readonly shares: number;
  /**
   * Padded-feature boundaries of the shares when they are sized to the workers' measured speeds
   * (balance.ts), as AttentionJob.featureBounds; null: equal counts.
   */
  readonly featureBounds: Int32Array | null;
  /**
   * Causal heads with few features split by queries instead (shares is then 1: one slot a head):
   * unit share s answers the schedule's chunks starting in [queryBounds[s], queryBounds[s + 1])
   * (BackwardEngine: BackwardHead.firstChunk), each pass with bounds of its own. Null: no such split.
   */
  readonly queryBounds: Int32Array | null;
  /**
   * Non-causal heads with few features split by sequence instead (shares is then 1: one slot a
   * head): `parts` units a head, each pass run twice, in phase 'moments' then 'readout'
   * (backward-engine.ts: SequenceSplitShare), unit s taking queries [N·s/parts, N·(s + 1)/parts)
   * and valid keys [valid·s/parts, valid·(s + 1)/parts). `states` holds a partial moment state per
   * (head, unit): slot head·parts + s. Null: no such split.
   */
  readonly sequenceSplit: {
    readonly phase: 'moments' | 'readout';
    readonly parts: number;
    readonly states: Float32Array;
  } | null;
}

/**
 * Pass 3's unit: query rows [start, end) of the B·H·N, and key rows of the B·H·M. A preparation
 * step's unit: query rows of the B·H·N, and key rows of the B·Hkv·M.
 */
export interface FinishRange {
  readonly queries: RowRange;
  readonly keys: RowRange;
}

/** Passes 1 and 2 take (head, share) units, pass 3 row ranges. */
export type BackwardUnit = WorkUnit | FinishRange;

export function backwardUnit(engine: BackwardEngine, job: BackwardJob, unit: BackwardUnit): void {
  if ('queries' in unit) {
    finishQueryRows(job, unit.queries);
    finishKeyRows(job, unit.keys);
  } else {
    backwardHead(engine, job, unit);
  }
}

/**
 * Pass 3 for query rows: adds the shares' den, β·den, A and B, forms α = 1/den (a degenerate row,
 * den not > 0, has no state part: g = 0 made its direct part 0 too), β and the state's
 * dz = α(A - βB), adds it to the direct blocks' dz, and with z = σx leaves ∂L/∂x = σ·dz in dz and
 * ∂L/∂σ = dz·x in dsigma.
 */
export function finishQueryRows(job: BackwardJob, rows: RowRange): void {
  const { shares, headDim: D, queryLength: N, gradA, gradB, dz, x, sigma, dsigma } = job;
  const shareStride = N * D;
  for (let row = rows.start; row < rows.end; row++) {
    const head = Math.floor(row / N);
    const firstSlotRow = row + head * (shares - 1) * N;
    const den = sumOverShares(job.den, firstSlotRow, shares, N);
    const betaDen = sumOverShares(job.betaDen, firstSlotRow, shares, N);
    const base = row * D;
    const scale = sigma[row]!;
    let dot = 0;
    if (den > 0) {
      const alpha = 1 / den;
      const beta = betaDen * alpha;
      const first = firstSlotRow * D;
      const last = first + shares * shareStride;
      for (let d = 0; d < D; d++) {
        let a = gradA[first + d]!;
        let b = gradB[first + d]!;
        for (let from = first + shareStride + d; from < last; from += shareStride) {
          a += gradA[from]!;
          b += gradB[from]!;
        }
        const total = alpha * (a - beta * b) + dz[base + d]!;
        dot += total * x[base + d]!;
        dz[base + d] = scale * total;
      }
    } else {
      for (let d = base; d < base + D; d++) {
        dot += dz[d]! * x[d]!;
        dz[d] = scale * dz[d]!;
      }
    }
    dsigma[row] = dot;
  }
}

/** Pass 3 for key rows (of B·H·M): adds each head's share slices of dy and dv into its first. */
export function finishKeyRows(job: BackwardJob, rows: RowRange): void {
  const { shares, headDim: D, valueDim: Dv, keyLength: M, dy, dv } = job;
  if (shares === 1) return;
  for (const [sums, width] of [
    [dy, D],
    [dv, Dv],
  ] as const) {
    const shareStride = M * width;
    for (let row = rows.start; row < rows.end; row++) {
      const head = Math.floor(row / M);
      const first = (row + head * (shares - 1) * M) * width;
      for (let s = 1; s < shares; s++) {
        const from = first + s * shareStride;
        for (let c = 0; c < width; c++) sums[first + c]! += sums[from + c]!;
      }
    }
  }
}

/**
 * A backward call's normalization and its backward (core's prepareScores and prepareScoresBackward),
 * run as core's row steps over ranges of rows; between steps the calling thread does core's scalar
 * work per row (prepareDivisors, sumNormGradients). Every array is in shared memory.
 */
export interface PreparationJob {
  /**
   * 'center': the means and norms of the q and k rows; 'divide': x and y, the rows centered and
   * divided by their divisors, and the kernels' float32 inputs z = σx and y; 'divideBackward': dx and dy back through the
   * division, with each row's part of its divisor's gradient; 'finish': back through the norms and
   * the centering, and dq, dk and dv in float32.
   */
  readonly step: 'center' | 'divide' | 'divideBackward' | 'finish';
  readonly headDim: number;
  readonly valueDim: number;
  readonly q: Float32Array;
  readonly k: Float32Array;
  /** Read by 'center' only, for NaN and ±Infinity (with q and k, when `checkFinite`). */
  readonly v: Float32Array;
  readonly dOut: Float32Array;
  readonly checkFinite: boolean;
  readonly arrays: PreparationArrays;
  readonly z: Float32Array;
  readonly y: Float32Array;
  /** ∂L/∂x (B×H×N×D) and ∂L/∂y (B×Hkv×M×D), turned into dq and dk in place. */
  readonly dx: Float64Array;
  readonly dy: Float64Array;
  readonly queryDivisorGradients: Float64Array;
  readonly keyDivisorGradients: Float64Array;
  /** ∂L/∂|c| per row (core's sumNormGradients); null where no norm divides a side. */
  readonly queryNormGradients: Float64Array | null;
  readonly keyNormGradients: Float64Array | null;
  /** ∂L/∂v, B×Hkv×M×Dv. */
  readonly dv: Float64Array;
  readonly dq32: Float32Array;
  readonly dk32: Float32Array;
  readonly dv32: Float32Array;
}

/**
 * Runs `job.step` over the unit's query and key rows. Returns, for 'center' with `checkFinite`, how
 * many of q, k, v and dOut hold a NaN or an infinity in these rows (a row of q or k does when its
 * norm is not finite: float64 squares of float32 values cannot overflow); 0 otherwise.
 */
export function preparationRows(job: PreparationJob, unit: FinishRange): number {
  const { headDim: D, valueDim: Dv, arrays } = job;
  const { queries, keys } = unit;
  switch (job.step) {
    case 'center': {
      rowStatsRange(
        job.q,
        D,
        arrays.centered,
        arrays.queryMeans,
        arrays.queryNorms,
        queries.start,
        queries.end,
      );
      rowStatsRange(job.k, D, arrays.centered, arrays.keyMeans, arrays.keyNorms, keys.start, keys.end);
      if (!job.checkFinite) return 0;
      return (
        Number(hasNonFinite(arrays.queryNorms, queries.start, queries.end)) +
        Number(hasNonFinite(arrays.keyNorms, keys.start, keys.end)) +
        Number(hasNonFinite(job.v, keys.start * Dv, keys.end * Dv)) +
        Number(hasNonFinite(job.dOut, queries.start * Dv, queries.end * Dv))
      );
    }
    case 'divide':
      // x and the kernels' z = σx, y and its float32 copy, each in one pass over the raw rows.
      centerDivideRowRange(
        job.q,
        arrays.queryMeans,
        arrays.queryDivisors,
        D,
        arrays.x,
        queries.start,
        queries.end,
        job.z,
        arrays.sigma,
      );
      centerDivideRowRange(
        job.k,
        arrays.keyMeans,
        arrays.keyDivisors,
        D,
        arrays.y,
        keys.start,
        keys.end,
        job.y,
      );
      return 0;
    case 'divideBackward':
      if (arrays.queriesDivided)
        divideRowRangeBackward(
          job.dx,
          arrays.x,
          arrays.queryDivisors,
          D,
          job.queryDivisorGradients,
          queries.start,
          queries.end,
        );
      if (arrays.keysDivided)
        divideRowRangeBackward(
          job.dy,
          arrays.y,
          arrays.keyDivisors,
          D,
          job.keyDivisorGradients,
          keys.start,
          keys.end,
        );
      return 0;
    case 'finish': {
      const { centered, x, y, queryDivisors, keyDivisors, queryNorms, keyNorms } = arrays;
      const { dx, dy, dv, valueDim: Dv } = job;
      normAndCenterRowRangeBackward(
        dx,
        x,
        queryDivisors,
        queryNorms,
        job.queryNormGradients,
        D,
        centered,
        job.dq32,
        queries.start,
        queries.end,
      );
      normAndCenterRowRangeBackward(
        dy,
        y,
        keyDivisors,
        keyNorms,
        job.keyNormGradients,
        D,
        centered,
        job.dk32,
        keys.start,
        keys.end,
      );
      job.dv32.set(dv.subarray(keys.start * Dv, keys.end * Dv), keys.start * Dv);
      return 0;
    }
  }
}

/** Runs `job.pass` (1 or 2) of share `unit.share` (0 when absent) of query head `unit.head`. */
export function backwardHead(engine: BackwardEngine, job: BackwardJob, unit: WorkUnit): void {
  const head = unit.head;
  const bounds = job.queryBounds;
  // A share by queries or by sequence writes its rows of the head's one slot; a feature share a slot
  // of its own.
  const share = bounds === null && job.sequenceSplit === null ? (unit.share ?? 0) : 0;
  const { heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv, shares } = job;
  const b = Math.floor(head / H);
  const kvHead = kvHeadSlot(head, H, Hkv);
  const slot = head * shares + share;
  const schedule = job.schedules[b]!;
  const { first: firstChunk, end: endChunk } =
    bounds === null
      ? { first: 0, end: schedule.length / 4 }
      : chunksStartingIn(schedule, bounds[unit.share ?? 0]!, bounds[(unit.share ?? 0) + 1]!);
  // An empty share owns no rows and no keys (its neighbours meet where it would have been).
  if (bounds !== null && firstChunk === endChunk) return;
  const features = featureShare(job.setup.paddedFeatures, share, shares, job.featureBounds);
  const split = job.sequenceSplit;
  let sequenceSplit: SequenceSplitShare | null = null;
  let chunks = { schedule, firstChunk, endChunk };
  if (split !== null) {
    const part = unit.share ?? 0;
    const valid = job.validKeys[b]!;
    sequenceSplit = {
      phase: split.phase,
      states: split.states,
      slot: head * split.parts + part,
      firstSlot: head * split.parts,
      slots: split.parts,
      queries: evenRange(N, part, split.parts),
      keys: evenRange(valid, part, split.parts),
      last: part === split.parts - 1,
    };
    // Pass 1 reads out its queries as a schedule of one chunk of them, every key in the state.
    chunks = {
      schedule: Int32Array.of(sequenceSplit.queries.start, sequenceSplit.queries.end, valid, valid),
      firstChunk: 0,
      endChunk: 1,
    };
  }
  const task: BackwardHead = {
    z: job.z,
    zBase: head * N * D,
    y: job.y,
    yBase: kvHead * M * D,
    v: job.v,
    vBase: kvHead * M * Dv,
    dOut: job.dOut,
    dOutBase: head * N * Dv,
    gradA: job.gradA,
    gradB: job.gradB,
    gradBase: slot * N * D,
    den: job.den,
    betaDen: job.betaDen,
    rowBase: slot * N,
    firstRowBase: head * shares * N,
    dz: job.dz,
    dzBase: head * N * D,
    dy: job.dy,
    dyBase: slot * M * D,
    dv: job.dv,
    dvBase: slot * M * Dv,
    rows: N,
    keys: M,
    valid: job.validKeys[b]!,
    causal: job.causal,
    causalShift: M - N,
    headDim: D,
    valueDim: Dv,
    featureStart: features.start,
    featureEnd: features.end,
    share,
    shares,
    path: job.path,
    ...chunks,
    sequenceSplit,
  };
  if (job.pass === 1) engine.gradients(task);
  else engine.keyGradients(task);
}

/** Messages from the pool to a worker. */
export type WorkerRequest =
  | { readonly type: 'init'; readonly module: WebAssembly.Module }
  | {
      readonly type: 'run';
      readonly id: number;
      readonly job: AttentionJob;
      readonly units: readonly WorkUnit[];
    }
  | {
      readonly type: 'combine';
      readonly id: number;
      readonly job: AttentionJob;
      readonly units: readonly RowRange[];
    }
  | {
      readonly type: 'backward';
      readonly id: number;
      readonly job: BackwardJob;
      readonly units: readonly BackwardUnit[];
    }
  | {
      readonly type: 'preparation';
      readonly id: number;
      readonly job: PreparationJob;
      readonly units: readonly FinishRange[];
    };

/**
 * Replies of a worker: degenerate rows of the units, the input rows the kernels found NaN or
 * infinite values in (forward runs; see Engine.nonFiniteInputs) and the time the units took in the
 * worker (balance.ts), or why they failed.
 */
export type WorkerReply =
  | {
      readonly id: number;
      readonly degenerate: number;
      readonly nonFiniteInputs: number;
      readonly millis: number;
    }
  | { readonly id: number; readonly error: string; readonly memory: boolean };

export function serveWorker(post: (reply: WorkerReply) => void): (request: WorkerRequest) => void {
  let module: WebAssembly.Module | null = null;
  let forward: Engine | null = null;
  let backward: BackwardEngine | null = null;
  return (request) => {
    if (request.type === 'init') {
      module = request.module;
      return;
    }
    try {
      if (module === null) throw new Error('worker used before init');
      let degenerate = 0;
      let nonFiniteInputs = 0;
      const start = performance.now();
      if (request.type === 'run') {
        forward ??= new Engine(module);
        forward.nonFiniteInputs = 0;
        forward.waitedMillis = 0;
        for (const unit of request.units) degenerate += forward.runUnit(request.job, unit);
        nonFiniteInputs = forward.nonFiniteInputs;
      } else if (request.type === 'combine') {
        for (const rows of request.units) degenerate += combineShares(request.job, rows);
      } else if (request.type === 'preparation') {
        for (const rows of request.units) nonFiniteInputs += preparationRows(request.job, rows);
      } else {
        const job = request.job;
        backward ??= new BackwardEngine(module);
        backward.prepare(job.setup, job.valueDim, job.chunkSize);
        for (const unit of request.units) backwardUnit(backward, job, unit);
      }
      // Time spent waiting for another share is not this worker's speed (balance.ts).
      const waited = request.type === 'run' ? forward!.waitedMillis : 0;
      post({ id: request.id, degenerate, nonFiniteInputs, millis: performance.now() - start - waited });
    } catch (error) {
      const text = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
      post({ id: request.id, error: text, memory: error instanceof RangeError });
    }
  };
}
