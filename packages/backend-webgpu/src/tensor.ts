import { type DeviceTensor, FastmaxError, type HostTensor, type Shape4, shapeSize } from '@fastmax/core';
import type { Runtime } from './runtime.js';

export const BACKEND_NAME = 'webgpu';

/** A float32 tensor in a GPU buffer of the backend's device; layers chain on it without readback. */
export class WebGpuTensor implements DeviceTensor {
  readonly location = 'device' as const;
  readonly backend = BACKEND_NAME;
  readonly dtype = 'float32' as const;
  private released = false;

  constructor(
    readonly runtime: Runtime,
    private readonly gpuBuffer: GPUBuffer,
    readonly shape: Shape4,
  ) {}

  /** The buffer, row-major float32; valid until `dispose()`. */
  get buffer(): GPUBuffer {
    if (this.released)
      throw new FastmaxError('DISPOSED', 'this device tensor was disposed', { argument: 'tensor' });
    return this.gpuBuffer;
  }

  get byteLength(): number {
    return shapeSize(this.shape) * 4;
  }

  async read(): Promise<HostTensor> {
    const data = await this.runtime.read(this.buffer, this.byteLength);
    return { shape: [...this.shape] as unknown as Shape4, data };
  }

  dispose(): void {
    if (this.released) return;
    this.released = true;
    this.gpuBuffer.destroy();
  }
}
