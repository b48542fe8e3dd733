import { FastmaxError } from '@fastmax/core';
import { BufferUsage, MapMode } from './gpu.js';
import { buildShader, type ProgramInfo, packUniforms, type UniformField, uniformFields } from './wgsl.js';

/** The device limits the backend splits its work by; tests shrink them to prove the splitting. */
export interface WorkLimits {
  readonly maxStorageBufferBindingSize: number;
  readonly maxBufferSize: number;
  readonly maxComputeWorkgroupsPerDimension: number;
  readonly maxComputeWorkgroupStorageSize: number;
}

interface CachedPipeline {
  readonly pipeline: GPUComputePipeline;
  readonly layout: GPUBindGroupLayout;
  readonly fields: readonly UniformField[];
  readonly program: ProgramInfo;
}

const STORAGE_USAGE = BufferUsage.STORAGE | BufferUsage.COPY_SRC | BufferUsage.COPY_DST;

/** Free buffers the pool keeps at most; past it, released buffers are destroyed. */
const POOL_BUDGET_BYTES = 512 * 2 ** 20;

/**
 * One device's pipelines, buffer pool and error handling. Pipelines are cached by program key;
 * storage buffers are pooled by power-of-two size class (exact size where the power of two would
 * exceed maxBufferSize), keeping at most POOL_BUDGET_BYTES of free buffers.
 */
export class Runtime {
  readonly limits: WorkLimits;
  private readonly pipelines = new Map<string, CachedPipeline>();
  private readonly pool = new Map<number, GPUBuffer[]>();
  private pooledBytes = 0;
  private lostReason: string | undefined;
  /** Error scopes around pipeline creations not yet checked; `submit` awaits them. */
  private pipelineChecks: Promise<GPUError | null>[] = [];
  private destroyed = false;

  constructor(
    readonly device: GPUDevice,
    readonly adapterDescription: string,
    limitOverrides: Partial<WorkLimits>,
    private readonly debug: boolean,
  ) {
    const deviceLimits = device.limits;
    const pick = (name: keyof WorkLimits): number =>
      Math.min(deviceLimits[name], limitOverrides[name] ?? Infinity);
    this.limits = {
      maxStorageBufferBindingSize: pick('maxStorageBufferBindingSize'),
      maxBufferSize: pick('maxBufferSize'),
      maxComputeWorkgroupsPerDimension: pick('maxComputeWorkgroupsPerDimension'),
      maxComputeWorkgroupStorageSize: pick('maxComputeWorkgroupStorageSize'),
    };
    device.lost.then((info) => {
      if (!this.destroyed) this.lostReason = `${info.reason}: ${info.message}`;
      else this.lostReason = 'destroyed';
    });
  }

  /** Throws DEVICE_LOST (or DISPOSED) when the device can no longer be used. */
  assertAlive(): void {
    if (this.destroyed)
      throw new FastmaxError('DISPOSED', 'this WebGPU backend was disposed', { argument: 'backend' });
    if (this.lostReason !== undefined) {
      throw new FastmaxError(
        'DEVICE_LOST',
        `the WebGPU device was lost (${this.lostReason}); create the backend again`,
        {
          argument: 'device',
        },
      );
    }
  }

  get lost(): boolean {
    return this.lostReason !== undefined;
  }

  pipeline(program: ProgramInfo): CachedPipeline {
    const cached = this.pipelines.get(program.key);
    if (cached !== undefined) return cached;
    // Always scoped, debug or not: an invalid pipeline would otherwise fail silently at dispatch.
    this.device.pushErrorScope('validation');
    const module = this.device.createShaderModule({ code: buildShader(program), label: program.key });
    const entries: GPUBindGroupLayoutEntry[] = [
      { binding: 0, visibility: 0x4, buffer: { type: 'uniform' } },
      ...program.bindings.map(
        (binding, index): GPUBindGroupLayoutEntry => ({
          binding: index + 1,
          visibility: 0x4,
          buffer: { type: binding.access === 'read' ? 'read-only-storage' : 'storage' },
        }),
      ),
    ];
    const layout = this.device.createBindGroupLayout({ entries, label: program.key });
    const pipeline = this.device.createComputePipeline({
      layout: this.device.createPipelineLayout({ bindGroupLayouts: [layout] }),
      compute: { module, entryPoint: 'main' },
      label: program.key,
    });
    this.pipelineChecks.push(this.device.popErrorScope());
    const entry = { pipeline, layout, fields: uniformFields(program), program };
    this.pipelines.set(program.key, entry);
    return entry;
  }

  /** Compiles a program and returns Dawn's compilation messages and any validation error. */
  async validate(program: ProgramInfo): Promise<string[]> {
    this.device.pushErrorScope('validation');
    const module = this.device.createShaderModule({ code: buildShader(program), label: program.key });
    const info = await module.getCompilationInfo();
    const problems = info.messages
      .filter((message) => message.type === 'error')
      .map((message) => `${program.key}:${message.lineNum}:${message.linePos} ${message.message}`);
    try {
      this.pipeline(program);
    } catch (error) {
      problems.push(`${program.key}: ${String(error)}`);
    }
    const checks = this.pipelineChecks;
    this.pipelineChecks = [];
    for (const error of [...(await Promise.all(checks)), await this.device.popErrorScope()]) {
      if (error !== null) problems.push(`${program.key}: ${error.message}`);
    }
    return problems;
  }

  private sizeClass(bytes: number): number {
    const size = Math.max(256, bytes);
    const rounded = 2 ** Math.ceil(Math.log2(size));
    return rounded <= this.limits.maxBufferSize ? rounded : Math.ceil(size / 4) * 4;
  }

  /** A storage buffer of at least `bytes` from the pool. */
  acquire(bytes: number): GPUBuffer {
    const size = this.sizeClass(bytes);
    if (size > this.limits.maxBufferSize) {
      throw new FastmaxError('RESOURCE_EXHAUSTED', 'a buffer exceeds the device maxBufferSize', {
        argument: 'q, k, v',
        expected: `<= ${this.limits.maxBufferSize} bytes`,
        actual: `${bytes} bytes`,
      });
    }
    const free = this.pool.get(size);
    const reused = free?.pop();
    if (reused !== undefined) {
      this.pooledBytes -= reused.size;
      return reused;
    }
    return this.device.createBuffer({ size, usage: STORAGE_USAGE });
  }

  release(buffer: GPUBuffer): void {
    if (this.destroyed) return;
    if (this.pooledBytes + buffer.size > POOL_BUDGET_BYTES) {
      buffer.destroy();
      return;
    }
    this.pooledBytes += buffer.size;
    const list = this.pool.get(buffer.size) ?? [];
    list.push(buffer);
    this.pool.set(buffer.size, list);
  }

  /** A buffer holding `data` (padded to 4 bytes). */
  upload(data: Float32Array | Uint32Array, pooled = true): GPUBuffer {
    const bytes = Math.max(4, data.byteLength);
    const buffer = pooled
      ? this.acquire(bytes)
      : this.device.createBuffer({ size: Math.ceil(bytes / 4) * 4, usage: STORAGE_USAGE });
    if (data.byteLength > 0)
      this.device.queue.writeBuffer(buffer, 0, data.buffer, data.byteOffset, data.byteLength);
    return buffer;
  }

  /**
   * Records one program over a grid of workgroups, split into several dispatches where a dimension
   * exceeds maxComputeWorkgroupsPerDimension (the program reads its slice's offsets from uniforms).
   * 1-D problems wrap into y (`linearGrid`), so their y may also be split.
   */
  dispatch(
    encoder: GPUCommandEncoder,
    program: ProgramInfo,
    buffers: Readonly<Record<string, GPUBuffer | { buffer: GPUBuffer; size: number }>>,
    values: Readonly<Record<string, number>>,
    grid: readonly [number, number, number],
    temporaries: GPUBuffer[],
  ): void {
    const [gx, gy, gz] = grid;
    if (gx === 0 || gy === 0 || gz === 0) return;
    const { pipeline, layout, fields } = this.pipeline(program);
    const maxDim = this.limits.maxComputeWorkgroupsPerDimension;
    const storageEntries: GPUBindGroupEntry[] = program.bindings.map((binding, index) => {
      const source = buffers[binding.name];
      if (source === undefined) throw new Error(`${program.key}: no buffer for ${binding.name}`);
      const resource =
        'buffer' in source
          ? { buffer: source.buffer, size: Math.ceil(source.size / 4) * 4 || 4 }
          : { buffer: source };
      return { binding: index + 1, resource };
    });
    for (let z = 0; z < gz; z += maxDim) {
      for (let y = 0; y < gy; y += maxDim) {
        for (let x = 0; x < gx; x += maxDim) {
          const uniforms = this.device.createBuffer({
            size: Math.max(16, Math.ceil((fields.length * 4) / 16) * 16),
            usage: BufferUsage.UNIFORM | BufferUsage.COPY_DST,
          });
          temporaries.push(uniforms);
          this.device.queue.writeBuffer(
            uniforms,
            0,
            packUniforms(fields, { ...values, offsetX: x, offsetY: y, offsetZ: z, gridX: gx }),
          );
          const bindGroup = this.device.createBindGroup({
            layout,
            entries: [{ binding: 0, resource: { buffer: uniforms } }, ...storageEntries],
          });
          const pass = encoder.beginComputePass();
          pass.setPipeline(pipeline);
          pass.setBindGroup(0, bindGroup);
          pass.dispatchWorkgroups(
            Math.min(maxDim, gx - x),
            Math.min(maxDim, gy - y),
            Math.min(maxDim, gz - z),
          );
          pass.end();
        }
      }
    }
  }

  /** Grid for a 1-D problem of `threads` invocations in workgroups of `perGroup`. */
  linearGrid(threads: number, perGroup: number): [number, number, number] {
    const groups = Math.ceil(threads / perGroup);
    const maxDim = this.limits.maxComputeWorkgroupsPerDimension;
    if (groups <= maxDim) return [groups, 1, 1];
    return [maxDim, Math.ceil(groups / maxDim), 1];
  }

  /** Submits the encoder; in debug mode validation and out-of-memory errors become BACKEND_ERROR. */
  async submit(encoder: GPUCommandEncoder, temporaries: GPUBuffer[]): Promise<void> {
    this.assertAlive();
    const checks = this.pipelineChecks;
    this.pipelineChecks = [];
    for (const check of await Promise.all(checks)) {
      if (check !== null) {
        for (const buffer of temporaries) buffer.destroy();
        temporaries.length = 0;
        throw new FastmaxError('BACKEND_ERROR', `a WGSL pipeline failed to build: ${check.message}`, {
          argument: 'device',
        });
      }
    }
    if (this.debug) {
      this.device.pushErrorScope('out-of-memory');
      this.device.pushErrorScope('validation');
    }
    this.device.queue.submit([encoder.finish()]);
    if (this.debug) {
      // Both pops before any await: another call's scopes must not interleave with these.
      const scopes = [this.device.popErrorScope(), this.device.popErrorScope()];
      const [validation, memory] = await Promise.all(scopes);
      const error = validation ?? memory ?? null;
      if (error !== null) {
        throw new FastmaxError('BACKEND_ERROR', `WebGPU reported an error: ${error.message}`, {
          argument: 'device',
        });
      }
    }
    await this.settle(this.device.queue.onSubmittedWorkDone());
    for (const buffer of temporaries) buffer.destroy();
    temporaries.length = 0;
  }

  /** Awaits a device promise, turning a loss while waiting into DEVICE_LOST. */
  async settle<T>(promise: Promise<T>): Promise<T> {
    try {
      const value = await promise;
      this.assertAlive();
      return value;
    } catch (error) {
      if (error instanceof FastmaxError) throw error;
      this.assertAlive();
      throw new FastmaxError('BACKEND_ERROR', `WebGPU operation failed: ${String(error)}`, {
        argument: 'device',
        cause: error,
      });
    }
  }

  /** Copies `bytes` from a buffer to host memory. */
  async read(source: GPUBuffer, bytes: number, offset = 0): Promise<Float32Array> {
    this.assertAlive();
    const size = Math.max(4, Math.ceil(bytes / 4) * 4);
    const staging = this.device.createBuffer({ size, usage: BufferUsage.MAP_READ | BufferUsage.COPY_DST });
    const encoder = this.device.createCommandEncoder();
    encoder.copyBufferToBuffer(source, offset, staging, 0, size);
    this.device.queue.submit([encoder.finish()]);
    try {
      await this.settle(staging.mapAsync(MapMode.READ));
      return new Float32Array(staging.getMappedRange().slice(0, bytes));
    } finally {
      if (staging.mapState === 'mapped') staging.unmap();
      staging.destroy();
    }
  }

  destroy(ownsDevice: boolean): void {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const list of this.pool.values()) for (const buffer of list) buffer.destroy();
    this.pool.clear();
    this.pooledBytes = 0;
    this.pipelines.clear();
    if (ownsDevice) this.device.destroy();
  }
}
