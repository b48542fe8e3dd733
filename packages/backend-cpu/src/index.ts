export { type CpuBackendOptions, cpuBackend } from './backend.js';
