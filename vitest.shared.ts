// Workspace imports resolve to TypeScript sources under the `@fastmax/source` export condition,
// so tests run against the code being edited rather than a possibly stale `dist`.
const conditions = ['@fastmax/source', 'module', 'node', 'development|production'];

export const sourceConditions = {
  resolve: { conditions },
  ssr: { resolve: { conditions, externalConditions: ['@fastmax/source'] } },
};
