export * from './kit.js';
export { type ConformanceConfig, runConformance } from './run.js';
