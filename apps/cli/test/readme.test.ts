import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { expect, it, vi } from 'vitest';

// Every docs example has a test: each README's usage snippet runs as written.
async function runSnippet(readmePath: string, name: string): Promise<void> {
  const readme = readFileSync(fileURLToPath(new URL(readmePath, import.meta.url)), 'utf8');
  const snippet = /```ts\n([\s\S]*?)```/.exec(readme)?.[1];
  expect(snippet, `${readmePath} has a \`\`\`ts usage block`).toBeDefined();
  // Written next to this test (git-ignored) so the workspace packages resolve as they do for users.
  const directory = fileURLToPath(new URL('./generated/', import.meta.url));
  mkdirSync(directory, { recursive: true });
  const file = `${directory}${name}.ts`;
  writeFileSync(file, `${snippet}\nexport {};\n`);
  await import(/* @vite-ignore */ file);
}

it('the README usage example runs and prints the backend, the path and the output shape', async () => {
  const log = vi.spyOn(console, 'log').mockImplementation(() => {});
  try {
    await runSnippet('../../../README.md', 'readme-example');
    expect(log).toHaveBeenCalledTimes(1);
    const [backend, path, shape] = log.mock.calls[0]!;
    expect(['webgpu', 'cpu']).toContain(backend);
    expect(['factorized', 'direct']).toContain(path);
    expect(shape).toEqual([1, 8, 4096, 64]);
  } finally {
    log.mockRestore();
  }
}, 60_000);

it("@fastmax/core's README example runs", async () => {
  await expect(
    runSnippet('../../../packages/core/README.md', 'core-readme-example'),
  ).resolves.toBeUndefined();
}, 60_000);

it("@fastmax/backend-cpu's README example runs", async () => {
  await expect(
    runSnippet('../../../packages/backend-cpu/README.md', 'cpu-readme-example'),
  ).resolves.toBeUndefined();
}, 60_000);
