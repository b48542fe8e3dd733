// Compiles asm/kernels.ts to WebAssembly (SIMD, and SIMD + relaxed SIMD), bundles the worker
// (src/worker.ts, src/engine.ts, src/backward-engine.ts, and core's src/prepare-rows.ts as
// '@fastmax/core') into a classic script, and writes both
// into src/generated/kernels.ts, so the package loads the same way in Node and in browsers: no file
// or network fetch at run time.
// `node scripts/build-kernels.mjs --check` fails when the generated file is stale.
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import asc from 'assemblyscript/asc';
import ts from 'typescript';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const inputs = [
  'asm/kernels.ts',
  'src/engine.ts',
  'src/backward-engine.ts',
  'src/worker.ts',
  'scripts/build-kernels.mjs',
  '../core/src/prepare-rows.ts',
];
/**
 * The worker's modules by the specifier they are required by, bundled in this order (each may
 * require the ones before it). Of core, the workers get the row steps of the normalization only:
 * that file imports nothing, and `checkCoreImports` fails the build if a worker module imports
 * anything else from '@fastmax/core' at run time (it would be undefined in the worker).
 */
const workerModules = [
  ['@fastmax/core', '../core/src/prepare-rows.ts'],
  ['./engine.js', 'src/engine.ts'],
  ['./backward-engine.js', 'src/backward-engine.ts'],
  ['./worker.js', 'src/worker.ts'],
];
const target = join(root, 'src/generated/kernels.ts');

export function sourceHash() {
  const hash = createHash('sha256');
  for (const file of inputs) {
    hash.update(file);
    hash.update(readFileSync(join(root, file), 'utf8').replace(/\r\n/g, '\n'));
  }
  return hash.digest('hex');
}

async function compile(features) {
  let binary;
  const { error, stderr } = await asc.main(
    [
      join(root, 'asm/kernels.ts'),
      '-O3',
      '--noAssert',
      '--runtime',
      'stub',
      '--use',
      'abort=',
      '--enable',
      features,
      '--outFile',
      'kernels.wasm',
    ],
    {
      writeFile(name, contents) {
        if (name.endsWith('.wasm')) binary = contents;
      },
    },
  );
  if (error) throw new Error(`asc failed (${features}):\n${stderr.toString()}`);
  return Buffer.from(binary).toString('base64');
}

/** The names a module exports (declarations marked `export`). */
function exportedNames(file) {
  const source = ts.createSourceFile(file, readFileSync(join(root, file), 'utf8'), ts.ScriptTarget.ES2022);
  const names = new Set();
  for (const statement of source.statements) {
    const exported = ts.getModifiers?.(statement)?.some((m) => m.kind === ts.SyntaxKind.ExportKeyword);
    if (exported && statement.name) names.add(statement.name.text);
  }
  return names;
}

/** Throws when a worker module imports a value from '@fastmax/core' that the bundled part lacks. */
function checkCoreImports() {
  const [, coreFile] = workerModules[0];
  const available = exportedNames(coreFile);
  for (const [, file] of workerModules.slice(1)) {
    const source = ts.createSourceFile(file, readFileSync(join(root, file), 'utf8'), ts.ScriptTarget.ES2022);
    for (const statement of source.statements) {
      if (!ts.isImportDeclaration(statement) || statement.moduleSpecifier.text !== '@fastmax/core') continue;
      const clause = statement.importClause;
      if (clause === undefined || clause.isTypeOnly) continue;
      const named = clause.namedBindings;
      if (clause.name !== undefined || named === undefined || !ts.isNamedImports(named))
        throw new Error(`${file}: import only named values from '@fastmax/core' in worker code`);
      for (const element of named.elements) {
        if (element.isTypeOnly) continue;
        const name = (element.propertyName ?? element.name).text;
        if (!available.has(name))
          throw new Error(
            `${file} imports ${name} from '@fastmax/core', which the worker bundle (${coreFile}) lacks`,
          );
      }
    }
  }
}

function workerSource() {
  checkCoreImports();
  // Each module is transpiled to CommonJS and wrapped in a function that receives its exports and a
  // require that resolves the bundled modules by their import specifier.
  const modules = workerModules.map(([specifier, file]) => {
    const source = readFileSync(join(root, file), 'utf8');
    const { outputText } = ts.transpileModule(source, {
      compilerOptions: {
        module: ts.ModuleKind.CommonJS,
        target: ts.ScriptTarget.ES2022,
        removeComments: true,
      },
    });
    return `${JSON.stringify(specifier)}: function (exports, require) {\n${outputText}\n}`;
  });
  // Node evaluates the worker code as CommonJS or, when the process runs with
  // --input-type=module, as an ES module: dynamic import works in both (the port queues messages
  // until the listener is attached). Browsers run it as a classic script.
  return [
    '"use strict";',
    `const fastmaxSources = {\n${modules.join(',\n')}\n};`,
    'const fastmaxModules = {};',
    'function fastmaxRequire(name) {',
    '  if (!(name in fastmaxModules)) {',
    '    const exports = {};',
    '    fastmaxModules[name] = exports;',
    '    fastmaxSources[name](exports, fastmaxRequire);',
    '  }',
    '  return fastmaxModules[name];',
    '}',
    'const workerModule = fastmaxRequire("./worker.js");',
    'if (typeof process === "object" && process.versions && process.versions.node) {',
    '  import("node:worker_threads").then(({ parentPort }) => {',
    '    const onMessage = workerModule.serveWorker((reply) => parentPort.postMessage(reply));',
    '    parentPort.on("message", onMessage);',
    '  });',
    '} else {',
    '  const onMessage = workerModule.serveWorker((reply) => self.postMessage(reply));',
    '  self.onmessage = (event) => onMessage(event.data);',
    '}',
  ].join('\n');
}

const hash = sourceHash();
if (process.argv.includes('--check')) {
  const current = readFileSync(target, 'utf8').match(/SOURCE_HASH = '([0-9a-f]+)'/)?.[1];
  if (current !== hash) {
    console.error('src/generated/kernels.ts is stale: run `pnpm --filter @fastmax/backend-cpu build`');
    process.exit(1);
  }
} else {
  const simd = await compile('simd');
  const relaxed = await compile('simd,relaxed-simd');
  const worker = workerSource();
  mkdirSync(dirname(target), { recursive: true });
  writeFileSync(
    target,
    [
      '// Generated by scripts/build-kernels.mjs from asm/kernels.ts and src/engine.ts. Do not edit.',
      '/** sha256 of the sources this file was generated from (checked by test/generated.test.ts). */',
      `export const SOURCE_HASH = '${hash}';`,
      '/** The kernels with 128-bit SIMD (base64 WebAssembly). */',
      `export const KERNELS_SIMD = '${simd}';`,
      '/** The same kernels with relaxed-SIMD fused multiply-add, used when the engine validates it. */',
      `export const KERNELS_RELAXED_SIMD = '${relaxed}';`,
      "/** src/worker.ts with engine.ts, backward-engine.ts and core's prepare-rows.ts as one classic script (Node eval, or a Blob URL). */",
      `export const WORKER_SOURCE = ${JSON.stringify(worker)};`,
      '',
    ].join('\n'),
  );
  console.log(`wrote src/generated/kernels.ts (${simd.length + relaxed.length + worker.length} chars)`);
}
