import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, extname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BrowserContext, Page } from 'playwright-core';
import ts from 'typescript';

/**
 * A real browser for the WebGPU tests: headless Debian chromium (its WebGPU runs on SwiftShader
 * here) loads the backend's own modules through an import map, no bundler. The sources are
 * transpiled file by file with TypeScript so the tests do not depend on a prior build.
 */
export const CHROMIUM = process.env.FASTMAX_CHROMIUM ?? '/usr/bin/chromium';
export const chromiumMissing = !existsSync(CHROMIUM);

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

/**
 * The page: `window.fastmax` holds one backend and answers forward/backward/state calls whose
 * tensors and resolved options arrive as plain data (typed arrays rebuilt here).
 */
const PAGE = `<!doctype html>
<script type="importmap">{ "imports": { "@fastmax/core": "/core/index.js" } }</script>
<script type="module">
  import { createFastmax } from '@fastmax/core';
  import { webgpuBackend } from '/webgpu/index.js';
  const tensor = (t) => ({ shape: t.shape, data: new Float32Array(t.data) });
  const resolved = (o) => ({
    ...o,
    coefficients: new Float64Array(o.coefficients),
    keyLengths: o.keyLengths === null ? null : new Int32Array(o.keyLengths),
  });
  const plain = (t) => ({ shape: t.shape, data: Array.from(t.data) });
  const fail = (error) => ({ error: { message: String(error && error.message || error), code: error && error.code } });
  let backend;
  const states = new Map();
  let nextState = 1;
  window.fastmax = {
    async isAvailable() {
      backend ??= webgpuBackend();
      return backend.isAvailable();
    },
    async forward(r) {
      try {
        const result = await backend.forward({ ...r, q: tensor(r.q), k: tensor(r.k), v: tensor(r.v), options: resolved(r.options), keepOnDevice: false });
        return { output: plain(result.output), degenerateRows: result.degenerateRows };
      } catch (error) { return fail(error); }
    },
    async backward(r) {
      try {
        const result = await backend.backward({ ...r, q: tensor(r.q), k: tensor(r.k), v: tensor(r.v), dOut: tensor(r.dOut), options: resolved(r.options), keepOnDevice: false });
        return { dq: plain(result.dq), dk: plain(result.dk), dv: plain(result.dv) };
      } catch (error) { return fail(error); }
    },
    async createState(o) {
      try {
        const id = nextState++;
        states.set(id, await backend.createState({ ...o, options: resolved(o.options) }));
        return { id };
      } catch (error) { return fail(error); }
    },
    async step(id, q, k, v) {
      try {
        const state = states.get(id);
        const result = await state.step(tensor(q), tensor(k), tensor(v));
        return { output: plain(result.output), degenerateRows: result.degenerateRows, tokens: state.tokens };
      } catch (error) { return fail(error); }
    },
    reset(id) { states.get(id).reset(); },
    disposeState(id) { states.get(id)?.dispose(); states.delete(id); },
    async runForward(input) {
      const fm = await createFastmax({ backend: webgpuBackend() });
      try {
        const result = await fm.attention(tensor(input.q), tensor(input.k), tensor(input.v), input.options);
        return { output: Array.from(result.output.data), path: result.plan.path };
      } catch (error) { return fail(error); }
      finally { await fm.dispose(); }
    },
  };
  window.ready = true;
</script>`;

const TYPES: Record<string, string> = { '.js': 'text/javascript', '.html': 'text/html' };

export interface BrowserPage {
  readonly page: Page;
  close(): Promise<void>;
}

/** Transpiles the sources, serves them on 127.0.0.1, starts chromium and opens the page. */
export async function openBrowserPage(): Promise<BrowserPage> {
  const root = await mkdtemp(join(tmpdir(), 'fastmax-webgpu-page-'));
  await transpileTree(join(packages, 'core', 'src'), join(root, 'core'));
  await transpileTree(join(packages, 'backend-webgpu', 'src'), join(root, 'webgpu'));
  await writeFile(join(root, 'index.html'), PAGE);
  const server = createServer(async (request, response) => {
    const path = resolve(root, `.${new URL(request.url ?? '/', 'http://x').pathname}`);
    if (!path.startsWith(root) || !existsSync(path)) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { 'content-type': TYPES[extname(path)] ?? 'application/octet-stream' });
    response.end(await readFile(path));
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const address = server.address();
  const origin = `http://127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}`;
  const { chromium } = await import('playwright-core');
  const profile = await mkdtemp(join(tmpdir(), 'fastmax-chromium-'));
  let context: BrowserContext | undefined;
  const close = async (): Promise<void> => {
    await context?.close();
    await new Promise((done) => server.close(done));
    await rm(profile, { recursive: true, force: true });
    await rm(root, { recursive: true, force: true });
  };
  try {
    context = await chromium.launchPersistentContext(profile, {
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
    const page = await context.newPage();
    page.on('pageerror', (error) => {
      throw error;
    });
    await page.goto(`${origin}/index.html`);
    await page.waitForFunction(() => (window as unknown as { ready?: boolean }).ready === true, undefined, {
      timeout: 30_000,
    });
    return { page, close };
  } catch (error) {
    await close();
    throw error;
  }
}
