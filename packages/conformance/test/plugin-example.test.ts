import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { FastmaxBackend } from '@fastmax/core';
import { runConformance } from '../src/index.js';

// Every docs example has a test: the example backend of docs/plugin-authoring.md §3, exactly as
// printed, must pass the suite for every capability it declares.
const guide = readFileSync(
  fileURLToPath(new URL('../../../docs/plugin-authoring.md', import.meta.url)),
  'utf8',
);
const section = guide.slice(guide.indexOf('## 3. A minimal working backend'));
const example = /```ts\n([\s\S]*?)```/.exec(section)?.[1];
if (example === undefined) throw new Error('docs/plugin-authoring.md §3 has no ```ts block');
// Written next to this test (git-ignored) so '@fastmax/core' resolves as it does for an author.
const directory = fileURLToPath(new URL('./generated/', import.meta.url));
mkdirSync(directory, { recursive: true });
writeFileSync(`${directory}plugin-example.ts`, example);
const { directBackend } = (await import(/* @vite-ignore */ `${directory}plugin-example.ts`)) as {
  directBackend: () => FastmaxBackend;
};

runConformance({ name: 'docs/plugin-authoring.md example', create: () => directBackend() });
