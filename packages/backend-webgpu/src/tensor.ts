import { type DeviceTensor, FastmaxError, type HostTensor, type Shape4, shapeSize } from '@fastmax/core';
import { convertProgram } from './kernels.js';
import type { Runtime } from './runtime.js';

export const BACKEND_NAME = 'webgpu';

/**
 * A tensor in a GPU buffer of the backend's device, row-major, float32 or float16 (storage only:
 * kernels convert to float32 when they read it). Layers chain on it without readback.
 */
export class WebGpuTensor implements DeviceTensor {
  readonly location = 'device' as const;
  readonly backend = BACKEND_NAME;
  private released = false;

  constructor(
    readonly runtime: Runtime,
    private readonly gpuBuffer: GPUBuffer,
    readonly shape: Shape4,
    readonly dtype: 'float32' | 'float16' = 'float32',
  ) {}

  /** The buffer, row-major float32; valid until `dispose()`. */
  get buffer(): GPUBuffer {
    if (this.released)
      throw new FastmaxError('DISPOSED', 'this device tensor was disposed', { argument: 'tensor' });
    return this.gpuBuffer;
  }

  get byteLength(): number {
    return shapeSize(this.shape) * (this.dtype === 'float16' ? 2 : 4);
  }

  async read(): Promise<HostTensor> {
    const shape = [...this.shape] as unknown as Shape4;
    if (this.dtype === 'float32')
      return { shape, data: await this.runtime.read(this.buffer, this.byteLength) };
    const count = shapeSize(this.shape);
    const single = this.runtime.acquire(count * 4);
    const temporaries: GPUBuffer[] = [];
    try {
      const encoder = this.runtime.device.createCommandEncoder();
      this.runtime.dispatch(
        encoder,
        convertProgram('f32'),
        {
          source: { buffer: this.buffer, size: this.buffer.size },
          destination: { buffer: single, size: count * 4 },
        },
        { count, sourceOffset: 0, targetOffset: 0 },
        this.runtime.linearGrid(count, 64),
        temporaries,
      );
      await this.runtime.submit(encoder, temporaries);
      return { shape, data: await this.runtime.read(single, count * 4) };
    } finally {
      this.runtime.release(single);
    }
  }

  dispose(): void {
    if (this.released) return;
    this.released = true;
    this.gpuBuffer.destroy();
  }
}
