import {
  createFastmax,
  type FastmaxOptions,
  featureCount,
  isFastmaxError,
  type Order,
  toHost,
} from '@fastmax/core';
import { softmaxAttention } from '@fastmax/core/reference';
import {
  EXIT_CHECK_FAILED,
  EXIT_OK,
  parseCausal,
  parseFlags,
  parseInteger,
  parseSizes,
  stringFlag,
} from '../args.js';
import { availableBackends, type BackendFactory, loadBackends } from '../backends.js';
import { checkAgainstOracle } from '../check.js';
import { type CliIO, println } from '../io.js';
import {
  createProgressBar,
  formatDuration,
  formatError,
  formatSpeedup,
  formatTable,
  measure,
  writeJsonResult,
} from '../report.js';
import { attentionWorkload } from '../workload.js';

// Sized so the default run stays around half a minute on a 2-core machine with the reference
// backend, and long enough to show where the O(N) method overtakes the O(N²) one. D = 32 rather
// than 64 because F = C(D+2, 2) grows as D²: at D = 32 (F = 561) the factorized path wins from
// N ≈ 600 (non-causal), at D = 64 (F = 2145) only past N ≈ 2k non-causal and 4k causal, which
// plain JavaScript cannot reach in that time (`--head-dim 64` shows it).
const DEFAULTS = {
  sizes: [256, 512, 1024, 2048, 4096],
  causal: 'both',
  order: 2 as Order,
  runs: 5,
  warmup: 1,
  // A measurement stops adding runs once they total this long, so the largest sizes take one or two.
  maxTimeMs: 1000,
  seed: 1,
  batch: 1,
  heads: 2,
  headDim: 32,
  // The oracle costs as much as the softmax baseline; above this many rows it checks a sample.
  fullCheckLimit: 1024,
  sampleRows: 64,
};

export const DEMO_HELP = `Usage: fastmax demo [options]

Runs Fastmax on seeded random q, k, v (B=${DEFAULTS.batch}, H=${DEFAULTS.heads}, D=Dv=${DEFAULTS.headDim}) with the
first available backend, checks every output against the float64 oracle referenceAttention and
times it against softmax attention (softmaxAttention: O(N²), float64 JavaScript). Exits 1 when
an output is outside the backend's tolerance.

Options:
  --sizes <list>       sequence lengths N, comma-separated (default ${DEFAULTS.sizes.join(',')})
  --causal <mode>      on, off or both (default ${DEFAULTS.causal})
  --order <p>          Taylor order 1..4 (default ${DEFAULTS.order})
  --head-dim <d>       head dim D = Dv (default ${DEFAULTS.headDim})
  --backend <names>    backends to try, comma-separated, in order (default: all, fastest first)
  --runs <n>           timed runs per measurement, at most; the median is shown (default
                       ${DEFAULTS.runs}, fewer once a measurement has taken ${DEFAULTS.maxTimeMs / 1000} s)
  --warmup <n>         untimed runs before timing the first size (default ${DEFAULTS.warmup})
  --seed <n>           seed of the random inputs (default ${DEFAULTS.seed})
  --json               also write bench-results/demo.json
  -h, --help           show this help
`;

const FLAGS = {
  sizes: { type: 'string' },
  causal: { type: 'string' },
  order: { type: 'string' },
  'head-dim': { type: 'string' },
  backend: { type: 'string' },
  runs: { type: 'string' },
  warmup: { type: 'string' },
  seed: { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

export interface DemoRow {
  readonly n: number;
  readonly causal: boolean;
  readonly path: string;
  readonly fastmaxMs: number;
  readonly fastmaxRunsMs: readonly number[];
  readonly softmaxMs: number;
  readonly softmaxRunsMs: readonly number[];
  readonly maxRelativeError: number;
  readonly rowsChecked: number;
  readonly sampled: boolean;
  readonly pass: boolean;
}

export interface DemoOptions {
  /** The backends to choose from; default `availableBackends()`. Tests pass their own. */
  readonly backends?: readonly BackendFactory[];
}

export async function runDemo(
  args: readonly string[],
  io: CliIO,
  options: DemoOptions = {},
): Promise<number> {
  const values = parseFlags(args, FLAGS);
  if (values.help === true) {
    io.stdout.write(DEMO_HELP);
    return EXIT_OK;
  }
  const sizesText = stringFlag(values, 'sizes');
  const sizes = sizesText === undefined ? DEFAULTS.sizes : parseSizes(sizesText);
  const causalModes = parseCausal(stringFlag(values, 'causal') ?? DEFAULTS.causal);
  const orderText = stringFlag(values, 'order');
  const order = (
    orderText === undefined ? DEFAULTS.order : parseInteger(orderText, '--order', 1, 4)
  ) as Order;
  const headDimText = stringFlag(values, 'head-dim');
  const headDim =
    headDimText === undefined ? DEFAULTS.headDim : parseInteger(headDimText, '--head-dim', 1, 1024);
  const runsText = stringFlag(values, 'runs');
  const runs = runsText === undefined ? DEFAULTS.runs : parseInteger(runsText, '--runs', 1);
  const warmupText = stringFlag(values, 'warmup');
  const warmup = warmupText === undefined ? DEFAULTS.warmup : parseInteger(warmupText, '--warmup', 0);
  const seedText = stringFlag(values, 'seed');
  const seed = seedText === undefined ? DEFAULTS.seed : parseInteger(seedText, '--seed', 0, 2 ** 32 - 1);
  const backendText = stringFlag(values, 'backend');
  const names = backendText?.split(',').map((name) => name.trim());
  const factories = availableBackends(names, options.backends);

  const { loaded, failed } = await loadBackends(factories, { named: names !== undefined });
  let fm: Awaited<ReturnType<typeof createFastmax>>;
  try {
    fm = await createFastmax({ backend: loaded.map((entry) => entry.backend) });
  } catch (error) {
    if (!isFastmaxError(error) || error.code !== 'BACKEND_UNAVAILABLE') throw error;
    println(io.stderr, `fastmax demo: no backend is available`);
    for (const skip of failed) println(io.stderr, `  ${skip.name}: ${skip.reason}`);
    println(io.stderr, `  ${error.message}`);
    return EXIT_CHECK_FAILED;
  }
  const chosen = loaded.find((entry) => entry.backend === fm.backend)!.factory;

  const { stdout } = io;
  println(stdout, `Fastmax demo: order-${order} Fastmax against softmax attention on seeded random inputs`);
  println(stdout, `Backend: ${chosen.name} (${chosen.summary})`);
  println(stdout, `  tried in order: ${factories.map((factory) => factory.name).join(', ')}`);
  for (const skip of [...failed, ...fm.skipped]) println(stdout, `  skipped ${skip.name}: ${skip.reason}`);
  println(
    stdout,
    `Workload: B=${DEFAULTS.batch}, H=${DEFAULTS.heads}, D=Dv=${headDim}, p=${order} ` +
      `(F=${featureCount(headDim, order)} features), seed ${seed}`,
  );
  println(
    stdout,
    `Times: median of up to ${runs} run${runs === 1 ? '' : 's'} per cell (fewer once a cell has taken ` +
      `${DEFAULTS.maxTimeMs / 1000} s; the runs column), after ${warmup} warm-up run${warmup === 1 ? '' : 's'} at N=${sizes[0]}`,
  );
  println(stdout);

  const cases = sizes.flatMap((n) => causalModes.map((causal) => ({ n, causal })));
  // Three equal steps per case (Fastmax, softmax, oracle check): their costs differ, but the bar
  // only has to show that work is moving.
  const progress = createProgressBar(cases.length * 3, { stream: io.stderr, env: io.env });
  const rows: DemoRow[] = [];
  try {
    for (const { n, causal } of cases) {
      // Warm-up exists to get the JIT and first allocations out of the timings; after the first size
      // that has happened, and at large N a warm-up run would cost as much as a timed one.
      const timing = { warmup: n === sizes[0] ? warmup : 0, runs, maxTimeMs: DEFAULTS.maxTimeMs };
      const label = `N=${n}${causal ? ' causal' : ''}`;
      const { q, k, v } = attentionWorkload(
        { batch: DEFAULTS.batch, heads: DEFAULTS.heads, queryLength: n, headDim },
        seed,
      );
      const callOptions: FastmaxOptions = { causal, order };
      const plan = fm.plan(q, k, v, callOptions);

      progress.update(`${label}: Fastmax (${chosen.name})`);
      let last: Awaited<ReturnType<typeof fm.attention>> | undefined;
      const fastmax = await measure(async () => {
        last = await fm.attention(q, k, v, callOptions);
      }, timing);
      const output = await toHost(last!.output);

      progress.tick(`${label}: softmax attention`);
      const softmax = await measure(() => softmaxAttention(q, k, v, { causal }), timing);

      progress.tick(`${label}: checking against the float64 oracle`);
      const check = checkAgainstOracle(q, k, v, output, callOptions, {
        fullCheckLimit: DEFAULTS.fullCheckLimit,
        sampleRows: DEFAULTS.sampleRows,
        seed: seed + n,
      });
      progress.tick();
      rows.push({
        n,
        causal,
        path: plan.path,
        fastmaxMs: fastmax.median,
        fastmaxRunsMs: fastmax.runs,
        softmaxMs: softmax.median,
        softmaxRunsMs: softmax.runs,
        maxRelativeError: check.maxRelativeError,
        rowsChecked: check.rowsChecked,
        sampled: check.sampled,
        // Written so that a NaN error fails.
        pass: check.maxRelativeError <= chosen.tolerance,
      });
    }
  } finally {
    progress.done();
    await fm.dispose();
  }

  println(
    stdout,
    formatTable(
      [
        { header: 'N' },
        { header: 'causal', align: 'left' },
        { header: 'path', align: 'left' },
        { header: 'Fastmax' },
        { header: 'softmax' },
        { header: 'speedup' },
        { header: 'runs' },
        { header: 'max rel. error' },
        { header: 'rows checked' },
        { header: 'check', align: 'left' },
      ],
      rows.map((row) => [
        String(row.n),
        row.causal ? 'yes' : 'no',
        row.path,
        formatDuration(row.fastmaxMs),
        formatDuration(row.softmaxMs),
        formatSpeedup(row.softmaxMs, row.fastmaxMs),
        row.fastmaxRunsMs.length === row.softmaxRunsMs.length
          ? String(row.fastmaxRunsMs.length)
          : `${row.fastmaxRunsMs.length}/${row.softmaxRunsMs.length}`,
        formatError(row.maxRelativeError),
        row.sampled ? `${row.rowsChecked} of ${row.n}` : 'all',
        row.pass ? 'pass' : 'FAIL',
      ]),
    ),
  );
  println(stdout);
  const notes = [
    `Fastmax: the ${chosen.name} backend. softmax: softmaxAttention, O(N²) float64 JavaScript.`,
    `speedup: softmax time / Fastmax time. runs: timed runs behind each median (Fastmax/softmax).`,
    `path: the planner's choice. direct evaluates f(s) for every query-key pair (cheaper for short`,
    `  sequences); factorized sums the keys into moments once and is O(N).`,
    `max rel. error: largest max|o - o_ref| / max|o_ref| over the rows checked, with o_ref from the`,
    `  float64 oracle referenceAttention; tolerance for ${chosen.name}: ${formatError(chosen.tolerance)}.`,
  ];
  if (rows.some((row) => row.sampled)) {
    notes.push(
      `rows checked: every row up to N=${DEFAULTS.fullCheckLimit}. Above that, to keep the demo fast, ${DEFAULTS.sampleRows} sampled`,
      `  query rows (first, last, evenly spread, random) in every head, each compared exactly on the`,
      `  smallest sub-problem that determines it.`,
    );
  }
  for (const note of notes) println(stdout, note);
  println(stdout);
  const failures = rows.filter((row) => !row.pass).length;
  println(
    stdout,
    failures === 0 ? `All ${rows.length} checks passed.` : `${failures} of ${rows.length} checks FAILED.`,
  );

  if (values.json === true) {
    const path = await writeJsonResult('demo', {
      backend: chosen.name,
      tolerance: chosen.tolerance,
      workload: { batch: DEFAULTS.batch, heads: DEFAULTS.heads, headDim, order, seed },
      runs,
      warmup,
      rows,
    });
    println(io.stderr, `Wrote ${path}`);
  }
  return failures === 0 ? EXIT_OK : EXIT_CHECK_FAILED;
}
