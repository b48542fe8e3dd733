import { existsSync, readdirSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Order } from '@fastmax/core';
import {
  EXIT_OK,
  EXIT_USAGE,
  type FlagConfig,
  type FlagValues,
  parseCausal,
  parseFlags,
  parseInteger,
  parseSizes,
  stringFlag,
  UsageError,
} from '../args.js';
import { type CliIO, println } from '../io.js';

/** What `fastmax bench` hands a backend's benchmark after parsing the common flags. */
export interface BenchContext {
  /** The `--backend` name, which is also the module's file name. */
  readonly backend: string;
  /** `--sizes`; undefined means the benchmark's own defaults. */
  readonly sizes: readonly number[] | undefined;
  /** `--causal`; undefined means the benchmark's own defaults. */
  readonly causal: readonly boolean[] | undefined;
  /** `--order`; undefined means the benchmark's own defaults. */
  readonly order: Order | undefined;
  /** `--runs`: timed runs per measurement (the median is reported). The team guide asks for >= 5. */
  readonly runs: number;
  readonly warmup: number;
  readonly seed: number;
  /** `--json`: also write bench-results/<name>.json with `writeJsonResult`. */
  readonly json: boolean;
  /** Values of the module's own `flags`. */
  readonly flags: FlagValues;
  readonly io: CliIO;
}

/**
 * A backend's benchmark: `src/bench/<backend>.ts`, exporting `run` and optionally `description`,
 * `flags` (extra options in node:util parseArgs form) and `flagHelp` (their help lines).
 */
export interface BenchModule {
  readonly description?: string;
  readonly flags?: FlagConfig;
  readonly flagHelp?: string;
  /** Returns the exit code: 0, or 1 when a check inside the benchmark failed. */
  run(context: BenchContext): Promise<number>;
}

const COMMON_FLAGS = {
  backend: { type: 'string' },
  sizes: { type: 'string' },
  causal: { type: 'string' },
  order: { type: 'string' },
  runs: { type: 'string' },
  warmup: { type: 'string' },
  seed: { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const satisfies FlagConfig;

const BENCH_DEFAULTS = { runs: 5, warmup: 1, seed: 1 };

export interface BenchCommandOptions {
  /** Where the benchmark modules live; tests point it elsewhere. */
  readonly benchDir?: URL;
}

const DEFAULT_BENCH_DIR = new URL('../bench/', import.meta.url);

/** Built output has `bench/<name>.js`; running from source (vitest) has `bench/<name>.ts`. */
function benchModulePath(dir: URL, name: string): string | undefined {
  for (const extension of ['.js', '.ts']) {
    const path = fileURLToPath(new URL(`${name}${extension}`, dir));
    if (existsSync(path)) return path;
  }
  return undefined;
}

export function benchmarkNames(dir: URL = DEFAULT_BENCH_DIR): string[] {
  const path = fileURLToPath(dir);
  if (!existsSync(path)) return [];
  const names = readdirSync(path)
    .filter((file) => /^[a-z][a-z0-9-]*\.(js|ts)$/.test(file) && !file.endsWith('.d.ts'))
    .map((file) => file.replace(/\.(js|ts)$/, ''));
  return [...new Set(names)].sort();
}

function benchHelp(available: readonly string[], module?: BenchModule): string {
  const list = available.length === 0 ? 'none yet' : available.join(', ');
  return `Usage: fastmax bench --backend <name> [options]

Benchmarks one backend (the tables in docs/benchmarks.md come from here). Benchmarks available
in this build: ${list}.${module?.description === undefined ? '' : `\n\n${module.description}`}

Options:
  --backend <name>     which benchmark to run (required)
  --sizes <list>       sequence lengths N, comma-separated (default: the benchmark's)
  --causal <mode>      on, off or both (default: the benchmark's)
  --order <p>          Taylor order 1..4 (default: the benchmark's)
  --runs <n>           timed runs per measurement; the median is shown (default ${BENCH_DEFAULTS.runs})
  --warmup <n>         untimed runs before timing (default ${BENCH_DEFAULTS.warmup})
  --seed <n>           seed of the random inputs (default ${BENCH_DEFAULTS.seed})
  --json               also write bench-results/<backend>.json
  -h, --help           show this help${module?.flagHelp === undefined ? '' : `\n${module.flagHelp.trimEnd()}`}
`;
}

/** The `--backend` value, read before strict parsing because it decides which extra flags exist. */
function peekBackend(args: readonly string[]): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === '--') return undefined;
    if (arg === '--backend') return args[i + 1];
    if (arg.startsWith('--backend=')) return arg.slice('--backend='.length);
  }
  return undefined;
}

async function loadBenchModule(path: string, name: string): Promise<BenchModule> {
  const module = (await import(pathToFileURL(path).href)) as Partial<BenchModule>;
  if (typeof module.run !== 'function') {
    throw new UsageError(`the benchmark for '${name}' (${path}) does not export a run function`);
  }
  return module as BenchModule;
}

export async function runBench(
  args: readonly string[],
  io: CliIO,
  options: BenchCommandOptions = {},
): Promise<number> {
  const dir = options.benchDir ?? DEFAULT_BENCH_DIR;
  const available = benchmarkNames(dir);
  const name = peekBackend(args);
  if (name !== undefined && !/^[a-z][a-z0-9-]*$/.test(name)) {
    throw new UsageError(`--backend expects a backend name such as cpu or webgpu, got '${name}'`);
  }
  const path = name === undefined ? undefined : benchModulePath(dir, name);
  const module = path === undefined || name === undefined ? undefined : await loadBenchModule(path, name);
  const values = parseFlags(args, { ...module?.flags, ...COMMON_FLAGS });
  if (values.help === true) {
    io.stdout.write(benchHelp(available, module));
    return EXIT_OK;
  }
  if (name === undefined) throw new UsageError('bench needs --backend <name>');
  if (module === undefined) {
    println(
      io.stderr,
      `fastmax bench: the benchmark for backend '${name}' is not available in this build ` +
        `(available: ${available.length === 0 ? 'none yet' : available.join(', ')}).`,
    );
    return EXIT_USAGE;
  }
  const text = (flag: string): string | undefined => stringFlag(values, flag);
  const sizes = text('sizes');
  const causal = text('causal');
  const order = text('order');
  const runs = text('runs');
  const warmup = text('warmup');
  const seed = text('seed');
  const flags: FlagValues = {};
  for (const flag of Object.keys(module.flags ?? {})) flags[flag] = values[flag];
  return module.run({
    backend: name,
    sizes: sizes === undefined ? undefined : parseSizes(sizes),
    causal: causal === undefined ? undefined : parseCausal(causal),
    order: order === undefined ? undefined : (parseInteger(order, '--order', 1, 4) as Order),
    runs: runs === undefined ? BENCH_DEFAULTS.runs : parseInteger(runs, '--runs', 1),
    warmup: warmup === undefined ? BENCH_DEFAULTS.warmup : parseInteger(warmup, '--warmup', 0),
    seed: seed === undefined ? BENCH_DEFAULTS.seed : parseInteger(seed, '--seed', 0, 2 ** 32 - 1),
    json: values.json === true,
    flags,
    io,
  });
}
