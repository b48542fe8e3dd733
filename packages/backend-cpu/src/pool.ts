import { FastmaxError } from '@fastmax/core';
import type { AttentionJob, RowRange, WorkUnit } from './engine.js';
import { WORKER_SOURCE } from './generated/kernels.js';
import type {
  BackwardJob,
  BackwardUnit,
  FinishRange,
  PreparationJob,
  WorkerReply,
  WorkerRequest,
} from './worker.js';

/** The part of a Node `Worker` or a browser `Worker` the pool uses. */
interface PortableWorker {
  post(message: WorkerRequest): void;
  /** Keep the process alive while the worker has work (Node); no-op in browsers. */
  hold(busy: boolean): void;
  /** `crash`: end it the way a crash would, reporting `died` (tests of the recovery path). */
  terminate(crash?: boolean): void;
}

interface WorkerEvents {
  message(reply: WorkerReply): void;
  /** The worker died (uncaught error, exit, out of memory). */
  died(reason: string): void;
}

type WorkerFactory = (events: WorkerEvents) => PortableWorker;

/** What a run's units report, summed: degenerate rows, and input rows with NaN or infinite values. */
export interface RunTotals {
  readonly degenerate: number;
  readonly nonFiniteInputs: number;
  /** How long each batch took in the worker that ran it (balance.ts), in the order they finished. */
  readonly timings: readonly BatchTiming[];
}

export interface BatchTiming {
  /** Index of the batch in the run's list. */
  readonly batch: number;
  /** Which worker ran it (0 to size − 1). */
  readonly slot: number;
  readonly millis: number;
}

/** What one worker reports for one batch. */
interface BatchReport {
  readonly degenerate: number;
  readonly nonFiniteInputs: number;
  readonly millis: number;
}

interface Slot {
  worker: PortableWorker;
  /** Resolves or rejects the unit batch in flight, if any. */
  task: { resolve: (report: BatchReport) => void; reject: (error: Error) => void } | null;
  /** Bumped when the worker is replaced, so events of a dead worker are ignored. */
  generation: number;
}

const isNode = (): boolean =>
  typeof process === 'object' && process !== null && typeof process.versions?.node === 'string';

/** Node worker_threads or, in browsers with cross-origin isolation, Web Workers from a Blob URL. */
export async function workerFactory(): Promise<WorkerFactory | null> {
  if (typeof SharedArrayBuffer === 'undefined') return null;
  if (isNode()) {
    const { Worker } = await import('node:worker_threads');
    return (events) => {
      const worker = new Worker(WORKER_SOURCE, { eval: true });
      let alive = true;
      worker.on('message', (reply: WorkerReply) => events.message(reply));
      worker.on('error', (error: Error) => {
        if (alive) events.died(error.message);
        alive = false;
      });
      worker.on('exit', (code: number) => {
        if (alive) events.died(`exited with code ${code}`);
        alive = false;
      });
      // After the listeners: adding a 'message' listener refs the port again. An idle worker must
      // not keep the process alive; `hold` refs it while it has work.
      worker.unref();
      return {
        post: (message) => worker.postMessage(message),
        hold: (busy) => (busy ? worker.ref() : worker.unref()),
        terminate: (crash = false) => {
          if (!crash) alive = false;
          void worker.terminate();
        },
      };
    };
  }
  const scope = globalThis as { crossOriginIsolated?: boolean; Worker?: typeof Worker };
  if (scope.crossOriginIsolated !== true || scope.Worker === undefined) return null;
  const url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: 'text/javascript' }));
  return (events) => {
    const worker = new Worker(url);
    worker.onmessage = (event: MessageEvent<WorkerReply>) => events.message(event.data);
    worker.onerror = (event: ErrorEvent) => events.died(event.message);
    return {
      post: (message) => worker.postMessage(message),
      hold: () => {},
      terminate: (crash = false) => {
        worker.terminate();
        if (crash) events.died('terminated');
      },
    };
  };
}

/**
 * A fixed set of workers, each with its own instance of the kernels. `run` hands out batches of
 * work units to idle workers until none is left. A worker that dies fails the run in flight with
 * BACKEND_ERROR and is replaced at once, so the next run finds a full pool.
 */
export class WorkerPool {
  private readonly slots: Slot[] = [];
  private nextId = 1;
  private disposed = false;
  /** Runs go one after another: each one spreads over every worker. */
  private tail: Promise<unknown> = Promise.resolve();

  constructor(
    readonly size: number,
    private readonly module: WebAssembly.Module,
    private readonly factory: WorkerFactory,
  ) {
    for (let i = 0; i < size; i++) {
      const slot: Slot = { worker: null as unknown as PortableWorker, task: null, generation: 0 };
      this.slots.push(slot);
      this.spawn(slot);
    }
  }

  private spawn(slot: Slot): void {
    const generation = ++slot.generation;
    slot.worker = this.factory({
      message: (reply) => {
        if (slot.generation !== generation) return;
        const task = slot.task;
        slot.task = null;
        slot.worker.hold(false);
        if (task === null) return;
        if ('error' in reply) {
          task.reject(
            new FastmaxError(
              reply.memory ? 'RESOURCE_EXHAUSTED' : 'BACKEND_ERROR',
              `a CPU worker failed: ${reply.error}`,
              {
                argument: 'q',
              },
            ),
          );
        } else task.resolve(reply);
      },
      died: (reason) => {
        if (slot.generation !== generation) return;
        const task = slot.task;
        slot.task = null;
        if (!this.disposed) this.spawn(slot);
        task?.reject(
          new FastmaxError('BACKEND_ERROR', `a CPU worker crashed (${reason}); the pool replaced it`),
        );
      },
    });
    slot.worker.post({ type: 'init', module: this.module });
  }

  /**
   * Runs the forward batches on the workers; resolves with the summed degenerate rows. With every
   * worker idle (runs go one after another), batch i < size starts on worker i. `alongside`
   * runs in the calling thread once the workers have their first batches (work that would
   * otherwise leave a core idle before or after them); if it throws, the run still finishes (the
   * workers are using the job's memory) and then rejects with that error.
   */
  run(
    job: AttentionJob,
    batches: readonly (readonly WorkUnit[])[],
    alongside?: () => void,
  ): Promise<RunTotals> {
    return this.enqueue((id, units) => ({ type: 'run', id, job, units }), batches, alongside);
  }

  /** Finishes a feature-split forward (`combineShares`), one range of rows per worker. */
  combine(job: AttentionJob, ranges: readonly RowRange[]): Promise<RunTotals> {
    return this.enqueue(
      (id, units) => ({ type: 'combine', id, job, units }),
      ranges.map((range) => [range]),
    );
  }

  /** Runs a pass of the backward (worker.ts: BackwardJob) over the units in `batches`. */
  backward(
    job: BackwardJob,
    batches: readonly (readonly BackwardUnit[])[],
    alongside?: () => void,
  ): Promise<RunTotals> {
    return this.enqueue((id, units) => ({ type: 'backward', id, job, units }), batches, alongside);
  }

  /** Runs a step of a backward's normalization (worker.ts: PreparationJob), one range per worker. */
  preparation(job: PreparationJob, ranges: readonly FinishRange[]): Promise<RunTotals> {
    return this.enqueue(
      (id, units) => ({ type: 'preparation', id, job, units }),
      ranges.map((range) => [range]),
    );
  }

  private enqueue<Unit>(
    request: (id: number, units: readonly Unit[]) => WorkerRequest,
    batches: readonly (readonly Unit[])[],
    alongside?: () => void,
  ): Promise<RunTotals> {
    const result = this.tail.then(() => this.execute(request, batches, alongside));
    this.tail = result.catch(() => {});
    return result;
  }

  private execute<Unit>(
    request: (id: number, units: readonly Unit[]) => WorkerRequest,
    batches: readonly (readonly Unit[])[],
    alongside?: () => void,
  ): Promise<RunTotals> {
    if (this.disposed) return Promise.reject(new FastmaxError('DISPOSED', 'the CPU backend was disposed'));
    return new Promise((resolve, reject) => {
      let next = 0;
      let pending = 0;
      let degenerate = 0;
      let nonFiniteInputs = 0;
      const timings: BatchTiming[] = [];
      let failed = false;
      // Settling waits for `alongside` too, whose error (if any) wins over the workers' result.
      let alongsideDone = false;
      let alongsideError: { error: unknown } | null = null;
      const settleIfDone = (): void => {
        if (failed || pending !== 0 || next < batches.length || !alongsideDone) return;
        if (alongsideError === null) resolve({ degenerate, nonFiniteInputs, timings });
        else reject(alongsideError.error);
      };
      const feed = (slot: Slot): void => {
        if (failed || next >= batches.length) {
          settleIfDone();
          return;
        }
        const batch = next++;
        const units = batches[batch]!;
        const id = this.nextId++;
        pending++;
        slot.task = {
          resolve: (report) => {
            pending--;
            degenerate += report.degenerate;
            nonFiniteInputs += report.nonFiniteInputs;
            timings.push({ batch, slot: this.slots.indexOf(slot), millis: report.millis });
            feed(slot);
          },
          reject: (error) => {
            pending--;
            if (!failed) {
              failed = true;
              reject(error);
            }
          },
        };
        slot.worker.hold(true);
        slot.worker.post(request(id, units));
      };
      const idle = this.slots.filter((slot) => slot.task === null);
      if (idle.length === 0) {
        reject(new FastmaxError('BACKEND_ERROR', 'the CPU worker pool is busy'));
        return;
      }
      for (const slot of idle) feed(slot);
      try {
        alongside?.();
      } catch (error) {
        alongsideError = { error };
        // The result is lost anyway: hand out no more batches.
        next = batches.length;
      }
      alongsideDone = true;
      settleIfDone();
    });
  }

  /** Workers with a batch in flight (tests: none may stay busy after a failed run). */
  busyWorkersForTesting(): number {
    return this.slots.filter((slot) => slot.task !== null).length;
  }

  /** Ends a worker the way a crash would (tests of the recovery path). */
  crashWorkerForTesting(index: number): void {
    this.slots[index]?.worker.terminate(true);
  }

  dispose(): void {
    this.disposed = true;
    for (const slot of this.slots) {
      slot.generation++;
      slot.worker.terminate();
      slot.task?.reject(new FastmaxError('DISPOSED', 'the CPU backend was disposed'));
      slot.task = null;
    }
  }
}
