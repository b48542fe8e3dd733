/// <reference types="@webgpu/types" />
export {
  WEBGPU_CAPABILITIES,
  type WebGpuBackend,
  type WebGpuBackendOptions,
  webgpuBackend,
} from './backend.js';
export type { WorkLimits } from './runtime.js';
export { WebGpuTensor } from './tensor.js';
