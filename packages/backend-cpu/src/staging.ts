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

  /** `data` where the workers can read it: itself when already shared, else copied into `role`. */
  input(role: string, data: Float32Array): Float32Array {
    if (data.buffer instanceof SharedArrayBuffer) return data;
    const staged = this.take(role, data.length);
    staged.set(data);
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
const FLOATS_PER_PAGE = 1024;

/**
 * A new float32 array with one float of every page written, so that its first-touch page faults
 * (12 to 20 ms per 4 MiB on the VMs we measure on) are paid now: in the calling thread while the
 * workers compute, rather than in the copy after them.
 */
export function touchedFloat32(length: number): Float32Array {
  const array = new Float32Array(length);
  for (let i = 0; i < length; i += FLOATS_PER_PAGE) array[i] = 0;
  return array;
}
