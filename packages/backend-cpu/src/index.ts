export { type CpuBackend, type CpuBackendOptions, cpuBackend } from './backend.js';
