import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, extname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

/**
 * A real browser for the packages' tests: headless Debian chromium loads a package's own modules
 * through an import map, no bundler. The sources are transpiled file by file with TypeScript so the
 * tests do not depend on a prior build.
 *
 * playwright-core is a devDependency of each package that opens a browser, not of the repository
 * root, so the caller passes its `chromium` in; the page keeps playwright's own `Page` type.
 */
export const CHROMIUM = process.env.FASTMAX_CHROMIUM ?? '/usr/bin/chromium';
export const chromiumMissing = !existsSync(CHROMIUM);

/** The repository's `packages` folder, where the source trees live. */
export const PACKAGES = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'packages');

/** A package's `src` folder, served (transpiled) under `/<prefix>/`. */
export interface SourceTree {
  readonly source: string;
  readonly prefix: string;
}

/** `packages/<name>/src` under `/<prefix>/`. */
export const packageSource = (name: string, prefix: string): SourceTree => ({
  source: join(PACKAGES, name, 'src'),
  prefix,
});

export interface PageSite {
  readonly trees: readonly SourceTree[];
  /** Served as `/index.html`, the page that is opened. */
  readonly html: string;
  /** Added to every response (e.g. COOP and COEP for cross-origin isolation). */
  readonly headers?: Readonly<Record<string, string>>;
  /** Chromium flags beyond the common ones (e.g. `--enable-unsafe-webgpu`). */
  readonly chromiumArgs?: readonly string[];
  /** How long the page may take to set `window.ready` (default 30 s). */
  readonly readyTimeoutMs?: number;
}

/** The part of a playwright `Page` this module drives. */
export interface PageControls {
  on(event: 'pageerror', listener: (error: Error) => void): unknown;
  goto(url: string): Promise<unknown>;
  waitForFunction(
    pageFunction: () => boolean,
    arg: undefined,
    options: { timeout: number },
  ): Promise<unknown>;
}

/** The part of playwright-core's `chromium` this module uses. */
export interface ChromiumLauncher<Page extends PageControls> {
  launchPersistentContext(
    userDataDir: string,
    options: { executablePath: string; headless: boolean; args: string[] },
  ): Promise<{ newPage(): Promise<Page>; close(): Promise<void> }>;
}

export interface BrowserPage<Page> {
  readonly page: Page;
  /** Ends chromium and the server and removes the temporary files; safe to call twice. */
  close(): Promise<void>;
}

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

const TYPES: Record<string, string> = { '.js': 'text/javascript', '.html': 'text/html' };

/**
 * Transpiles the source trees, serves them and the page on 127.0.0.1 (a secure context, so
 * cross-origin isolation is possible), starts chromium and opens the page once it sets
 * `window.ready = true`. An uncaught error in the page fails the test that is running.
 */
export async function openBrowserPage<Page extends PageControls>(
  chromium: ChromiumLauncher<Page>,
  site: PageSite,
): Promise<BrowserPage<Page>> {
  const root = await mkdtemp(join(tmpdir(), 'fastmax-page-'));
  for (const tree of site.trees) await transpileTree(tree.source, join(root, tree.prefix));
  await writeFile(join(root, 'index.html'), site.html);
  const server = createServer(async (request, response) => {
    const path = resolve(root, `.${new URL(request.url ?? '/', 'http://x').pathname}`);
    if (!path.startsWith(root) || !existsSync(path)) {
      response.writeHead(404, site.headers).end();
      return;
    }
    response.writeHead(200, {
      ...site.headers,
      'content-type': TYPES[extname(path)] ?? 'application/octet-stream',
    });
    response.end(await readFile(path));
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const address = server.address();
  const origin = `http://127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}`;
  const profile = await mkdtemp(join(tmpdir(), 'fastmax-chromium-'));
  let context: { close(): Promise<void> } | undefined;
  let closed: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closed ??= (async () => {
      await context?.close();
      await new Promise((done) => server.close(done));
      await rm(profile, { recursive: true, force: true });
      await rm(root, { recursive: true, force: true });
    })();
    return closed;
  };
  try {
    const opened = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--no-sandbox',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
        ...(site.chromiumArgs ?? []),
      ],
    });
    context = opened;
    const page = await opened.newPage();
    page.on('pageerror', (error) => {
      throw error;
    });
    await page.goto(`${origin}/index.html`);
    await page.waitForFunction(() => (window as unknown as { ready?: boolean }).ready === true, undefined, {
      timeout: site.readyTimeoutMs ?? 30_000,
    });
    return { page, close };
  } catch (error) {
    await close();
    throw error;
  }
}
