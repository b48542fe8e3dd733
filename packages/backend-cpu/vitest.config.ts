import { defineProject } from 'vitest/config';
import { sourceConditions } from '../../vitest.shared.js';

export default defineProject({
  ...sourceConditions,
  test: { name: '@fastmax/backend-cpu', include: ['test/**/*.test.ts'] },
});
