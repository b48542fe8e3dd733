import { defineConfig } from 'vitest/config';
import SummaryReporter from './vitest.summary.js';

// One root config; each package is a project (its own vitest.config.ts), so `vitest run` covers
// the whole repository and `vitest run --project @fastmax/core` narrows it.
export default defineConfig({
  test: {
    projects: ['packages/*', 'apps/*'],
    reporters: ['default', new SummaryReporter()],
  },
});
