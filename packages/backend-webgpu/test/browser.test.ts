import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, extname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { referenceAttention } from '@fastmax/core/reference';
import ts from 'typescript';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { maxRelativeError, randomTensor } from './support.js';

/**
 * One forward pass in a real browser: headless Debian chromium (its WebGPU runs on SwiftShader
 * here) loads the backend's own modules through an import map, no bundler. The sources are
 * transpiled file by file with TypeScript so the test does not depend on a prior build.
 */
const CHROMIUM = process.env.FASTMAX_CHROMIUM ?? '/usr/bin/chromium';
const here = dirname(fileURLToPath(import.meta.url));
const packages = resolve(here, '..', '..');

async function transpileTree(source: string, target: string): Promise<void> {
  await mkdir(target, { recursive: true });
  for (const entry of await readdir(source, { withFileTypes: true })) {
    const from = join(source, entry.name);
    if (entry.isDirectory()) {
      await transpileTree(from, join(target, entry.name));
    } else if (entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) {
      const output = ts.transpileModule(await readFile(from, 'utf8'), {
        compilerOptions: {
          module: ts.ModuleKind.ESNext,
          target: ts.ScriptTarget.ES2022,
          verbatimModuleSyntax: true,
        },
      });
      await writeFile(join(target, entry.name.replace(/\.ts$/, '.js')), output.outputText);
    }
  }
}

const PAGE = `<!doctype html>
<script type="importmap">{ "imports": { "@fastmax/core": "/core/index.js" } }</script>
<script type="module">
  import { createFastmax } from '@fastmax/core';
  import { webgpuBackend } from '/webgpu/index.js';
  window.runForward = async (input) => {
    const backend = webgpuBackend();
    const availability = await backend.isAvailable();
    if (!availability.available) return { error: availability.reason };
    const fm = await createFastmax({ backend });
    const tensor = (t) => ({ shape: t.shape, data: new Float32Array(t.data) });
    const result = await fm.attention(tensor(input.q), tensor(input.k), tensor(input.v), input.options);
    const output = Array.from(result.output.data);
    await fm.dispose();
    return { output, degenerateRows: result.degenerateRows, path: result.plan.path };
  };
  window.ready = true;
</script>`;

const TYPES: Record<string, string> = { '.js': 'text/javascript', '.html': 'text/html' };

describe.skipIf(!existsSync(CHROMIUM))(`browser (chromium at ${CHROMIUM})`, () => {
  let root = '';
  let server: Server | undefined;
  let origin = '';

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'fastmax-webgpu-page-'));
    await transpileTree(join(packages, 'core', 'src'), join(root, 'core'));
    await transpileTree(join(packages, 'backend-webgpu', 'src'), join(root, 'webgpu'));
    await writeFile(join(root, 'index.html'), PAGE);
    server = createServer(async (request, response) => {
      const path = resolve(root, `.${new URL(request.url ?? '/', 'http://x').pathname}`);
      if (!path.startsWith(root) || !existsSync(path)) {
        response.writeHead(404).end();
        return;
      }
      response.writeHead(200, { 'content-type': TYPES[extname(path)] ?? 'application/octet-stream' });
      response.end(await readFile(path));
    });
    await new Promise<void>((done) => server!.listen(0, '127.0.0.1', done));
    const address = server.address();
    origin = `http://127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}`;
  }, 60_000);

  afterAll(async () => {
    await new Promise((done) => server?.close(done));
    if (root !== '') await rm(root, { recursive: true, force: true });
  });

  it('runs a causal forward pass through navigator.gpu and matches the float64 oracle', async () => {
    const { chromium } = await import('playwright-core');
    const profile = await mkdtemp(join(tmpdir(), 'fastmax-chromium-'));
    const context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--no-sandbox',
        '--enable-unsafe-webgpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
      ],
    });
    try {
      const page = await context.newPage();
      const errors: string[] = [];
      page.on('pageerror', (error) => errors.push(String(error)));
      await page.goto(`${origin}/index.html`);
      await page.waitForFunction(() => (window as unknown as { ready?: boolean }).ready === true, undefined, {
        timeout: 30_000,
      });
      const q = randomTensor([1, 2, 19, 8], 31);
      const k = randomTensor([1, 1, 19, 8], 32);
      const v = randomTensor([1, 1, 19, 6], 33);
      const options = { causal: true, order: 2, path: 'factorized', chunkSize: 8 } as const;
      const plain = (t: typeof q) => ({ shape: t.shape, data: Array.from(t.data) });
      const result = (await page.evaluate(
        (input) => (window as unknown as { runForward(i: unknown): Promise<unknown> }).runForward(input),
        { q: plain(q), k: plain(k), v: plain(v), options },
      )) as { output?: number[]; error?: string; path?: string };
      expect(errors).toEqual([]);
      expect(result.error, 'navigator.gpu offered no adapter').toBeUndefined();
      expect(result.path).toBe('factorized');
      const want = referenceAttention(q, k, v, options);
      expect(maxRelativeError(result.output ?? [], want.output)).toBeLessThan(1e-4);
    } finally {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    }
  }, 120_000);
});
