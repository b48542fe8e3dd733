import { describeValue, FastmaxError } from './errors.js';

/** Row-major shape [batch, heads, sequence, features]. */
export type Shape4 = readonly [number, number, number, number];

/**
 * A tensor in host memory, row-major B×H×N×D. This is what crosses the backend contract by default;
 * users build it with a plain object literal.
 */
export interface HostTensor {
  readonly shape: Shape4;
  readonly data: Float32Array;
}

/**
 * A tensor that lives in a backend's memory (a GPU buffer), so layers can chain without readback.
 * Only the backend named in `backend` can consume it; everyone can read it back.
 */
export interface DeviceTensor {
  readonly location: 'device';
  /** Name of the backend that owns the memory. */
  readonly backend: string;
  readonly shape: Shape4;
  readonly dtype: 'float32' | 'float16';
  /** Copies the values to host memory (as float32). */
  read(): Promise<HostTensor>;
  /** Releases the device memory; reading afterwards throws `DISPOSED`. */
  dispose(): void;
}

export type Tensor = HostTensor | DeviceTensor;

export function isDeviceTensor(tensor: Tensor): tensor is DeviceTensor {
  return (tensor as Partial<DeviceTensor>).location === 'device';
}

export function isHostTensor(tensor: Tensor): tensor is HostTensor {
  return !isDeviceTensor(tensor);
}

export function shapeSize(shape: Shape4): number {
  return shape[0] * shape[1] * shape[2] * shape[3];
}

export function hostTensor(shape: Shape4, data?: Float32Array): HostTensor {
  const size = shapeSize(shape);
  if (data !== undefined && data.length !== size) {
    throw new FastmaxError('INVALID_SHAPE', 'data length does not match the shape', {
      argument: 'data',
      expected: `${size} values for shape ${describeValue(shape)}`,
      actual: `${data.length} values`,
    });
  }
  return { shape: [shape[0], shape[1], shape[2], shape[3]], data: data ?? new Float32Array(size) };
}

/** Reads any tensor into host memory; host tensors are returned as they are. */
export async function toHost(tensor: Tensor): Promise<HostTensor> {
  return isDeviceTensor(tensor) ? tensor.read() : tensor;
}
