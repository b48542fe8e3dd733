import { runConformance } from '@fastmax/conformance';
import { cpuBackend } from '../src/index.js';

// The whole suite in the calling thread, then with a pool of two workers. parallelThreshold: 0
// sends every call, however small, through the workers, so the pool is what gets checked.
runConformance({ name: 'cpu (1 thread)', create: () => cpuBackend({ threads: 1 }) });
runConformance({
  name: 'cpu (2 worker threads)',
  create: () => cpuBackend({ threads: 2, parallelThreshold: 0 }),
});
// Three workers splitting one head by queries as a prefix scan (and two heads in three shares each).
runConformance({
  name: 'cpu (3 worker threads, prefix scan)',
  create: () => cpuBackend({ threads: 3, parallelThreshold: 0, queryScan: true }),
});
