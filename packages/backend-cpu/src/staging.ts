/**
 * SharedArrayBuffer scratch that the workers read and write, kept from one call to the next. Fresh
 * memory is paid for in page faults on first touch, which on this kind of machine cost as much as
 * the whole p = 1 forward at N = 16384 (about 10 ms for 4 MB of new shared memory, against 0.2 ms to
 * copy into memory already touched). Buffers grow as needed; after a call, everything is let go
 * when the staging holds more than `keepBytes`, so one huge call does not pin its memory.
 */
export class SharedStaging {
  private readonly buffers = new Map<string, Float32Array>();
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

  /**
   * `data` where the workers can read it: itself when already shared, else its first `floats`
   * values (all by default) copied into `role`; the rest of the copy is whatever the last call left.
   */
  input(role: string, data: Float32Array, floats = data.length): Float32Array {
    if (data.buffer instanceof SharedArrayBuffer) return data;
    const staged = this.take(role, data.length);
    staged.set(floats >= data.length ? data : data.subarray(0, floats));
    return staged;
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
