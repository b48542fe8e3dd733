/**
 * The worker side of the pool: one kernel instance per worker for the forward (engine.ts) and one
 * for the backward (backward-engine.ts). The build bundles this file with those two into
 * src/generated/kernels.ts (WORKER_SOURCE), wrapped in a few lines of glue that connect it to the
 * platform's message port; it imports nothing else at run time.
 */
import { BackwardEngine, type BackwardHead } from './backward-engine.js';
import {
  type AttentionJob,
  combineShares,
  Engine,
  featureShare,
  type KernelSetup,
  kvHeadSlot,
  type RowRange,
  type WorkUnit,
} from './engine.js';

/**
 * A backward call's data, for one of its two passes (backward-engine.ts). Each head is split into
 * `shares` (a share: a range of the features and every shares-th query block); outputs are written
 * per (query head, share) slot, slot = head·shares + share, so no two units write the same memory
 * (except dz, where each share adds only the rows of its own query blocks); the caller sums them.
 */
export interface BackwardJob {
  /** 1: `gradients` (den, β·den, A, B); 2: `keyGradients` (dy, dv, the direct blocks' dz). */
  readonly pass: 1 | 2;
  readonly z: Float32Array;
  readonly y: Float32Array;
  readonly v: Float32Array;
  readonly dOut: Float32Array;
  /** Pass 1 output: A and B, slots×N×D; den and β·den, slots×N. */
  readonly gradA: Float32Array;
  readonly gradB: Float32Array;
  readonly den: Float64Array;
  readonly betaDen: Float64Array;
  /** Pass 2 input: g, B×H×N×(Dv + 1); dz, B×H×N×D (pass 2 adds the direct blocks to it). */
  readonly g: Float32Array;
  readonly dz: Float64Array;
  /** Pass 2 output: dy, slots×M×D, and dv, slots×M×Dv. */
  readonly dy: Float64Array;
  readonly dv: Float64Array;
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
}

/** Runs `job.pass` of share `unit.share` (0 when absent) of query head `unit.head`. */
export function backwardHead(engine: BackwardEngine, job: BackwardJob, unit: WorkUnit): void {
  const head = unit.head;
  const share = unit.share ?? 0;
  const { heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv, shares } = job;
  const b = Math.floor(head / H);
  const kvHead = kvHeadSlot(head, H, Hkv);
  const slot = head * shares + share;
  const features = featureShare(job.setup.paddedFeatures, share, shares);
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
    g: job.g,
    gBase: head * N * (Dv + 1),
    dz: job.dz,
    dzBase: head * N * D,
    dy: job.dy,
    dyBase: slot * M * D,
    dv: job.dv,
    dvBase: slot * M * Dv,
    rows: N,
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
    schedule: job.schedules[b]!,
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
      readonly units: readonly WorkUnit[];
    };

/** Replies of a worker: degenerate rows of the units, or why they failed. */
export type WorkerReply =
  | { readonly id: number; readonly degenerate: number }
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
      if (request.type === 'run') {
        forward ??= new Engine(module);
        for (const unit of request.units) degenerate += forward.runUnit(request.job, unit);
      } else if (request.type === 'combine') {
        for (const rows of request.units) degenerate += combineShares(request.job, rows);
      } else {
        const job = request.job;
        backward ??= new BackwardEngine(module);
        backward.prepare(job.setup, job.valueDim, job.chunkSize);
        for (const unit of request.units) backwardHead(backward, job, unit);
      }
      post({ id: request.id, degenerate });
    } catch (error) {
      const text = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
      post({ id: request.id, error: text, memory: error instanceof RangeError });
    }
  };
}
