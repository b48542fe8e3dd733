import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { expect, it, vi } from 'vitest';

// Every docs example has a test: the README's usage snippet runs as written.
it('the README usage example runs and prints the backend, the path and the output shape', async () => {
  const readme = readFileSync(fileURLToPath(new URL('../../../README.md', import.meta.url)), 'utf8');
  const snippet = /```ts\n([\s\S]*?)```/.exec(readme)?.[1];
  expect(snippet, 'README.md has a ```ts usage block').toBeDefined();
  // Written next to this test (git-ignored) so the workspace packages resolve as they do for users.
  const directory = fileURLToPath(new URL('./generated/', import.meta.url));
  mkdirSync(directory, { recursive: true });
  const file = `${directory}readme-example.ts`;
  writeFileSync(file, `${snippet}\nexport {};\n`);
  const log = vi.spyOn(console, 'log').mockImplementation(() => {});
  try {
    await import(/* @vite-ignore */ file);
    expect(log).toHaveBeenCalledTimes(1);
    const [backend, path, shape] = log.mock.calls[0]!;
    expect(['webgpu', 'cpu']).toContain(backend);
    expect(['factorized', 'direct']).toContain(path);
    expect(shape).toEqual([1, 8, 4096, 64]);
  } finally {
    log.mockRestore();
  }
}, 60_000);
