import { KEY_ROWS, QUERY_ROWS } from './engine.js';

/**
 * SharedArrayBuffer scratch that the workers read and write, kept from one call to the next. Fresh
 * memory is paid for in page faults on first touch, which on this kind of machine cost as much as
 * the whole p = 1 forward at N = 16384 (about 10 ms for 4 MB of new shared memory, against 0.2 ms to
 * copy into memory already touched). Buffers grow as needed; after a call, everything is let go
 * when the staging holds more than `keepBytes`, so one huge call does not pin its memory.
 */
export class SharedStaging {
  private readonly buffers = new Map<string, Float32Array>();
  private readonly counters = new Map<string, Int32Array>();
  /** Serializes the calls that use the staging: each one writes the same buffers. */
  private tail: Promise<unknown> = Promise.resolve();

  constructor(private readonly keepBytes: number) {}

  /** Runs `task` after every earlier task, then trims the staging. */
  exclusive<T>(task: () => Promise<T>): Promise<T> {
    const result = this.tail.then(task).finally(() => this.trim());
    this.tail = result.catch(() => {});
    return result;
  }

  /** A shared buffer of `length` floats for `role`; its contents are whatever the last call left. */
  take(role: string, length: number): Float32Array {
    const current = this.buffers.get(role);
    if (current !== undefined && current.length >= length) return current.subarray(0, length);
    const created = new Float32Array(new SharedArrayBuffer(length * 4));
    this.buffers.set(role, created);
    return created;
  }

  /** Where the workers read `data`: itself when already shared, else the buffer for `role` (unfilled). */
  place(role: string, data: Float32Array): Float32Array {
    return data.buffer instanceof SharedArrayBuffer ? data : this.take(role, data.length);
  }

  /** `data` where the workers can read it: itself when already shared, else copied into `role`. */
  input(role: string, data: Float32Array): Float32Array {
    const staged = this.place(role, data);
    if (staged !== data) staged.set(data);
    return staged;
  }

  /** A shared Int32Array of `length` counters for `role` (see ProgressiveStaging), kept like the buffers. */
  takeCounters(role: string, length: number): Int32Array {
    const current = this.counters.get(role);
    if (current !== undefined && current.length >= length) return current;
    const created = new Int32Array(new SharedArrayBuffer(length * 4));
    this.counters.set(role, created);
    return created;
  }

  private trim(): void {
    let bytes = 0;
    for (const buffer of this.buffers.values()) bytes += buffer.byteLength;
    if (bytes > this.keepBytes) this.buffers.clear();
  }

  release(): void {
    this.buffers.clear();
  }
}

/**
 * Staged copies of one head's q, k and v that the calling thread fills block by block after the
 * workers have started (AttentionJob.stagedRows): `rows` counts the query rows and the key and
 * value rows copied so far, and workers wait on it (Atomics.wait) before reading past them.
 * Inputs already in shared memory are used as they are (nothing to copy; counted with the rest).
 */
export class ProgressiveStaging {
  readonly q: Float32Array;
  readonly k: Float32Array;
  readonly v: Float32Array;
  readonly rows: Int32Array;

  constructor(
    staging: SharedStaging,
    private readonly sourceQ: Float32Array,
    private readonly sourceK: Float32Array,
    private readonly sourceV: Float32Array,
    private readonly headDim: number,
    private readonly valueDim: number,
  ) {
    this.q = staging.place('q', sourceQ);
    this.k = staging.place('k', sourceK);
    this.v = staging.place('v', sourceV);
    this.rows = staging.takeCounters('rows', 2);
    Atomics.store(this.rows, QUERY_ROWS, 0);
    Atomics.store(this.rows, KEY_ROWS, 0);
  }

  /** Copies rows [from, to) (up to `queryRows` of q and `keyRows` of k and v) and counts them. */
  stage(from: number, to: number, queryRows: number, keyRows: number): void {
    const copy = (target: Float32Array, source: Float32Array, width: number, limit: number): void => {
      const end = Math.min(to, limit);
      if (target !== source && from < end)
        target.set(source.subarray(from * width, end * width), from * width);
    };
    copy(this.q, this.sourceQ, this.headDim, queryRows);
    copy(this.k, this.sourceK, this.headDim, keyRows);
    copy(this.v, this.sourceV, this.valueDim, keyRows);
    this.publish(Math.min(to, queryRows), Math.min(to, keyRows));
  }

  /**
   * Stages the rows after the first block, then lets the counts run to their largest value, so
   * that no worker can wait for ever (if this throws, or a worker reads past what it needs).
   */
  finish(block: number, queryRows: number, keyRows: number): void {
    try {
      for (let from = block; from < Math.max(queryRows, keyRows); from += block)
        this.stage(from, from + block, queryRows, keyRows);
    } finally {
      this.publish(0x7fffffff, 0x7fffffff);
    }
  }

  /** Sets the two counts and wakes the workers waiting on them. */
  private publish(queryRows: number, keyRows: number): void {
    Atomics.store(this.rows, QUERY_ROWS, queryRows);
    Atomics.store(this.rows, KEY_ROWS, keyRows);
    Atomics.notify(this.rows, QUERY_ROWS);
    Atomics.notify(this.rows, KEY_ROWS);
  }
}

/** Floats in a 4 KiB memory page, the unit of first-touch page faults. */
export const FLOATS_PER_PAGE = 1024;

/**
 * Milliseconds per page to write one float in each of `pages` pages spread evenly over `array` (a
 * fresh array, its first touch): about 0.011 where the allocator took the memory fresh from the
 * system on the VMs we measure, microseconds in all where it recycled memory (already touched when
 * calloc zeroed it). Spread, because an allocation can be recycled memory at its start and fresh
 * memory at its end (the heap grown for it).
 */
export function firstTouchMs(array: Float32Array, pages: number): number {
  const total = Math.ceil(array.length / FLOATS_PER_PAGE);
  const count = Math.min(pages, total);
  if (count === 0) return 0;
  const start = performance.now();
  for (let i = 0; i < count; i++) array[Math.floor((i * total) / count) * FLOATS_PER_PAGE] = 0;
  return (performance.now() - start) / count;
}

/** Writes one float of every page of `array` (see touchedFloat32). */
export function touchPages(array: Float32Array): void {
  for (let i = 0; i < array.length; i += FLOATS_PER_PAGE) array[i] = 0;
}

/**
 * A new float32 array with one float of every page written, so that its first-touch page faults
 * (12 to 20 ms per 4 MiB on the VMs we measure on) are paid now: in the calling thread while the
 * workers compute, rather than in the copy after them.
 */
export function touchedFloat32(length: number): Float32Array {
  const array = new Float32Array(length);
  touchPages(array);
  return array;
}
