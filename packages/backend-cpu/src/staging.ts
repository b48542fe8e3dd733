import { KEY_ROWS, QUERY_ROWS } from './engine.js';

/**
 * SharedArrayBuffer scratch that the workers read and write, kept from one call to the next. Fresh
 * memory is paid for in page faults on first touch, which on this kind of machine cost as much as
 * the whole p = 1 forward at N = 16384 (about 10 ms for 4 MB of new shared memory, against 0.2 ms to
 * copy into memory already touched). Buffers grow as needed. Up to `keepBytes` stay for good; more
 * stays while calls keep coming and is let go once no call has come for `idleMillis` (0: right
 * after the call), so a run of large calls (a training loop over long sequences) does not pay its
 * page faults again on every call, and one large call does not pin its memory.
 */
export class SharedStaging {
  private readonly buffers = new Map<string, Float32Array>();
  private readonly counters = new Map<string, Int32Array>();
  /** Serializes the calls that use the staging: each one writes the same buffers. */
  private tail: Promise<unknown> = Promise.resolve();
  /** The pending release of staging above `keepBytes` (see trim). */
  private releaseTimer: ReturnType<typeof setTimeout> | null = null;

  constructor(
    private readonly keepBytes: number,
    private readonly idleMillis: number,
  ) {}

  /** Runs `task` after every earlier task, then trims the staging. */
  exclusive<T>(task: () => Promise<T>): Promise<T> {
    const result = this.tail
      .then(() => {
        this.cancelRelease();
        return task();
      })
      .finally(() => this.trim());
    this.tail = result.catch(() => {});
    return result;
  }

  /** Bytes of shared memory held (buffers and counters). */
  get heldBytes(): number {
    let bytes = 0;
    for (const buffer of this.buffers.values()) bytes += buffer.buffer.byteLength;
    for (const counters of this.counters.values()) bytes += counters.byteLength;
    return bytes;
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
    if (this.heldBytes <= this.keepBytes) return;
    if (this.idleMillis <= 0) {
      this.release();
      return;
    }
    this.releaseTimer = setTimeout(() => {
      this.releaseTimer = null;
      this.buffers.clear();
    }, this.idleMillis);
    // A pending release must not keep a Node process alive (browsers' timers have no unref).
    (this.releaseTimer as { unref?: () => void }).unref?.();
  }

  private cancelRelease(): void {
    if (this.releaseTimer !== null) clearTimeout(this.releaseTimer);
    this.releaseTimer = null;
  }

  release(): void {
    this.cancelRelease();
    this.buffers.clear();
  }
}

/** Rows [start, end) of a tensor. */
export interface RowSpan {
  readonly start: number;
  readonly end: number;
}

/**
 * Staged copies of one head's q, k and v that the calling thread fills block by block after the
 * workers have started (AttentionJob.stagedRows): the query rows in `queries` and the key and value
 * rows in `keys` are the ones the workers read, and `rows` counts how far each has been copied (an
 * index into the whole tensor), which workers wait on (Atomics.wait) before reading past it.
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
    private readonly queries: RowSpan,
    private readonly keys: RowSpan,
  ) {
    this.q = staging.place('q', sourceQ);
    this.k = staging.place('k', sourceK);
    this.v = staging.place('v', sourceV);
    this.rows = staging.takeCounters('rows', 2);
    Atomics.store(this.rows, QUERY_ROWS, queries.start);
    Atomics.store(this.rows, KEY_ROWS, keys.start);
  }

  /** Copies rows [from, to) of each span, counted from its start, and counts them. */
  stage(from: number, to: number): void {
    const copy = (target: Float32Array, source: Float32Array, width: number, span: RowSpan): number => {
      const first = span.start + from;
      const end = Math.min(span.start + to, span.end);
      if (target !== source && first < end)
        target.set(source.subarray(first * width, end * width), first * width);
      return Math.max(span.start, end);
    };
    const queryRows = copy(this.q, this.sourceQ, this.headDim, this.queries);
    copy(this.v, this.sourceV, this.valueDim, this.keys);
    this.publish(queryRows, copy(this.k, this.sourceK, this.headDim, this.keys));
  }

  /**
   * Stages the rows after the first `block`, then lets the counts run to their largest value, so
   * that no worker can wait for ever (if this throws, or a worker reads past what it needs).
   */
  finish(block: number): void {
    const longest = Math.max(this.queries.end - this.queries.start, this.keys.end - this.keys.start);
    try {
      for (let from = block; from < longest; from += block) this.stage(from, from + block);
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
