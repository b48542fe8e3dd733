import { defineProject } from 'vitest/config';
import { sourceConditions } from '../../vitest.shared.js';

export default defineProject({
  ...sourceConditions,
  test: { name: '@fastmax/backend-webgpu', include: ['test/**/*.test.ts'] },
});
