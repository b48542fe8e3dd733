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
  type KernelSetup,
  type RowRange,
  type WorkUnit,
} from './engine.js';

/**
 * A backward call's data. With workers, dz and dy are written per (query head, column range) and
 * dv per query head (its column ranges are disjoint); the caller sums them.
 */
export interface BackwardJob {
  readonly z: Float32Array;
  readonly y: Float32Array;
  readonly v: Float32Array;
  readonly dOut: Float32Array;
  /** B×H×parts×N×D (parts = columnBounds.length - 1). */
  readonly dz: Float64Array;
  /**
   * B×H×parts×M×D: one slice per query head and column range, so heads sharing a kv head (and
   * column ranges of one head) never write the same memory.
   */
  readonly dy: Float64Array;
  /** B×H×M×Dv, likewise. */
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
  /** Boundaries of the value-column ranges a head is split into: [0, ..., valueDim]. */
  readonly columnBounds: Int32Array;
}

/**
 * Runs the backward of one query head over the value columns of `unit` (prepared for that many);
 * its dz, dy, dv go to the slices `dzBase`, `dyBase`, `dvBase`.
 */
export function backwardHead(
  engine: BackwardEngine,
  job: BackwardJob,
  unit: WorkUnit,
  dzBase: number,
  dyBase: number,
  dvBase: number,
): void {
  const head = unit.head;
  const { heads: H, kvHeads: Hkv, queryLength: N, keyLength: M, headDim: D, valueDim: Dv } = job;
  const b = Math.floor(head / H);
  const kvHead = b * Hkv + Math.floor((head % H) / (H / Hkv));
  const task: BackwardHead = {
    z: job.z,
    zBase: head * N * D,
    y: job.y,
    yBase: kvHead * M * D,
    v: job.v,
    vBase: kvHead * M * Dv,
    dOut: job.dOut,
    dOutBase: head * N * Dv,
    dz: job.dz,
    dzBase,
    dy: job.dy,
    dyBase,
    dv: job.dv,
    dvBase,
    rows: N,
    valid: job.validKeys[b]!,
    causal: job.causal,
    causalShift: M - N,
    headDim: D,
    valueDim: Dv,
    c0: unit.c0,
    c1: unit.c1,
    path: job.path,
    schedule: job.schedules[b]!,
  };
  engine.run(task);
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
        const parts = job.columnBounds.length - 1;
        for (const unit of request.units) {
          const slot = unit.head * parts + job.columnBounds.indexOf(unit.c0);
          backward.prepare(job.setup, unit.c1 - unit.c0, job.chunkSize);
          backwardHead(
            backward,
            job,
            unit,
            slot * job.queryLength * job.headDim,
            slot * job.keyLength * job.headDim,
            unit.head * job.keyLength * job.valueDim,
          );
        }
      }
      post({ id: request.id, degenerate });
    } catch (error) {
      const text = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
      post({ id: request.id, error: text, memory: error instanceof RangeError });
    }
  };
}
