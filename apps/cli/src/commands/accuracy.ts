import {
  type AttentionSpec,
  adaptToCapabilities,
  buildSpec,
  type CheckContext,
  type Comparison,
  type ConformanceCase,
  caseInputs,
  compareGradients,
  compareTensors,
  conformanceCases,
  createCheckContext,
  describeComparison,
  FORWARD_TOLERANCE,
  type ForwardCase,
  GRADIENT_TOLERANCE,
  type Sizes,
  type StateCase,
  skipReason,
  sliceTokens,
  stateOptionsFor,
} from '@fastmax/conformance/kit';
import {
  type AttentionPath,
  createFastmax,
  type Fastmax,
  type FastmaxBackend,
  type Order,
  toHost,
} from '@fastmax/core';
import { referenceBackward } from '@fastmax/core/reference';
import { EXIT_CHECK_FAILED, EXIT_OK, parseFlags, parseSizes, stringFlag } from '../args.js';
import { availableBackends, type BackendFactory, loadBackends } from '../backends.js';
import { type CliIO, println } from '../io.js';
import { createProgressBar, formatDuration, formatError, formatTable, writeJsonResult } from '../report.js';

/**
 * The N sweep: forward error of the factorized path as the sequence grows, where float32
 * accumulation error would show. p = 2 and D = Dv = 16 with one head, as the conformance suite's
 * 'large' cases (whose seeds it reuses, so its N = 4096 rows are those cases).
 */
const SWEEP = { order: 2 as Order, headDim: 16, sizes: [256, 1024, 4096], quickSizes: [256] };

export const ACCURACY_HELP = `Usage: fastmax accuracy [options]

Measures how far a backend's results are from the float64 oracle (referenceAttention,
referenceBackward from @fastmax/core/reference) on the conformance suite's cases
(@fastmax/conformance), and prints the largest relative error per (order, path, causal):
  forward   the output,
  backward  dq, dk and dv (where the backend declares backward),
  state     outputs of a decoding state stepped token by token or in chunks, against the
            parallel causal oracle (where the backend declares state),
then the forward error against N for p=${SWEEP.order}, D=${SWEEP.headDim}, factorized, non-causal and causal.
Relative error = max |actual - expected| / max |expected| over a tensor (compareTensors).
Exits 1 when an error exceeds the conformance tolerances: ${FORWARD_TOLERANCE} forward and state,
${GRADIENT_TOLERANCE} for gradients.

Options:
  --backend <names>    backends to measure, comma-separated (default: every available one)
  --sizes <list>       extra sequence lengths for the N sweep, comma-separated (always run:
                       ${SWEEP.sizes.join(', ')}; with --quick: ${SWEEP.quickSizes.join(', ')})
  --quick              only the suite's small cases (N, M < 256): a check in seconds
  --json               also write bench-results/accuracy-<backend>.json
  -h, --help           show this help
`;

const FLAGS = {
  backend: { type: 'string' },
  sizes: { type: 'string' },
  quick: { type: 'boolean' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

type Measured = 'forward' | 'backward' | 'state';

/** One case's largest relative error. */
export interface CaseError {
  readonly kind: Measured;
  readonly name: string;
  readonly order: Order;
  /** The planner's path for the call; 'stepping' for a decoding state, which has no plan. */
  readonly path: AttentionPath | 'stepping';
  readonly causal: boolean;
  /** Infinity when the backend threw or returned a wrong length or a non-finite value. */
  readonly maxRelativeError: number;
  readonly tolerance: number;
  readonly ok: boolean;
  /** Why it failed: the worst comparison, or the error thrown. */
  readonly failure?: string;
}

export interface AccuracyGroup {
  readonly order: Order;
  readonly path: string;
  readonly causal: boolean;
  readonly cases: number;
  /** null: no case of that kind in the group. */
  readonly forward: number | null;
  readonly backward: number | null;
  readonly state: number | null;
}

export interface SweepRow {
  readonly n: number;
  readonly causal: boolean;
  readonly maxRelativeError: number;
  readonly ok: boolean;
  /** Why the row did not run on this backend. */
  readonly skip?: string;
}

export interface AccuracyReport {
  readonly backend: string;
  readonly sizes: Sizes;
  readonly tolerances: { readonly forward: number; readonly gradient: number };
  readonly groups: readonly AccuracyGroup[];
  readonly worst: AccuracyGroup;
  readonly sweep: readonly SweepRow[];
  readonly cases: readonly CaseError[];
  readonly seconds: number;
}

export interface AccuracyOptions {
  /** The backends to choose from; default `availableBackends()`. Tests pass their own. */
  readonly backends?: readonly BackendFactory[];
  /** Where `--json` writes; default `bench-results` under the current directory. */
  readonly jsonDir?: string;
}

function describeError(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}

function worstOf(comparisons: readonly Comparison[]): Comparison {
  // NaN cannot occur here (compareTensors turns non-finite values into Infinity), so > is enough.
  return comparisons.reduce((worst, c) => (c.maxRelError > worst.maxRelError || !c.ok ? c : worst));
}

async function measureForward(fm: Fastmax, ctx: CheckContext, spec: AttentionSpec) {
  const inputs = caseInputs(spec);
  const result = await fm.attention(inputs.q, inputs.k, inputs.v, spec.options);
  const output = await toHost(result.output);
  const comparison = compareTensors(output.data, ctx.reference(spec, inputs).output, FORWARD_TOLERANCE);
  return { path: result.plan.path, comparison, label: 'output' };
}

async function measureBackward(fm: Fastmax, spec: AttentionSpec) {
  const { q, k, v, dOut } = caseInputs(spec);
  const path = fm.plan(q, k, v, spec.options).path;
  const result = await fm.backward(q, k, v, dOut, spec.options);
  const expected = referenceBackward(q, k, v, dOut, spec.options);
  const host = { dq: await toHost(result.dq), dk: await toHost(result.dk), dv: await toHost(result.dv) };
  const byName = compareGradients(
    { dq: host.dq.data, dk: host.dk.data, dv: host.dv.data },
    expected,
    GRADIENT_TOLERANCE,
  );
  const comparisons = (['dq', 'dk', 'dv'] as const).map((label) => ({ label, comparison: byName[label] }));
  const worst = worstOf(comparisons.map((c) => c.comparison));
  return { path, comparison: worst, label: comparisons.find((c) => c.comparison === worst)!.label };
}

/** Steps a decoding state through the case's tokens and compares every output with the parallel oracle. */
async function measureState(fm: Fastmax, ctx: CheckContext, testCase: StateCase) {
  const { spec, stepLength } = testCase;
  const inputs = caseInputs(spec);
  const state = await fm.createState(stateOptionsFor(spec));
  const N = spec.queryLength;
  const Dv = spec.valueDim;
  const heads = spec.batch * spec.heads;
  const output = new Float32Array(heads * N * Dv);
  try {
    for (let start = 0; start < N; start += stepLength) {
      const end = Math.min(N, start + stepLength);
      const step = await state.step(
        sliceTokens(inputs.q, start, end),
        sliceTokens(inputs.k, start, end),
        sliceTokens(inputs.v, start, end),
      );
      const host = await toHost(step.output);
      for (let head = 0; head < heads; head++) {
        output.set(
          host.data.subarray(head * (end - start) * Dv, (head + 1) * (end - start) * Dv),
          (head * N + start) * Dv,
        );
      }
    }
  } finally {
    state.dispose();
  }
  const comparison = compareTensors(output, ctx.reference(spec, inputs).output, FORWARD_TOLERANCE);
  return { path: 'stepping' as const, comparison, label: `stepping by ${stepLength}` };
}

type MeasurableCase = ConformanceCase & { kind: Measured };

function isMeasurable(testCase: ConformanceCase): testCase is MeasurableCase {
  return testCase.kind === 'forward' || testCase.kind === 'backward' || testCase.kind === 'state';
}

async function measureCase(fm: Fastmax, ctx: CheckContext, testCase: MeasurableCase): Promise<CaseError> {
  const { spec } = testCase;
  const order = spec.options.order ?? 2;
  const causal = spec.options.causal ?? false;
  const tolerance = testCase.kind === 'backward' ? GRADIENT_TOLERANCE : FORWARD_TOLERANCE;
  const base = { kind: testCase.kind, name: testCase.name, order, causal, tolerance };
  try {
    const measured =
      testCase.kind === 'forward'
        ? await measureForward(fm, ctx, spec)
        : testCase.kind === 'backward'
          ? await measureBackward(fm, spec)
          : await measureState(fm, ctx, testCase);
    const { comparison } = measured;
    return {
      ...base,
      path: measured.path,
      maxRelativeError: comparison.maxRelError,
      ok: comparison.ok,
      ...(comparison.ok ? {} : { failure: describeComparison(measured.label, comparison) }),
    };
  } catch (error) {
    const requested = spec.options.path;
    return {
      ...base,
      path: testCase.kind === 'state' ? 'stepping' : requested === 'direct' ? 'direct' : 'factorized',
      maxRelativeError: Number.POSITIVE_INFINITY,
      ok: false,
      failure: `threw ${describeError(error)}`,
    };
  }
}

const PATH_ORDER = ['factorized', 'direct', 'stepping'];

function groupErrors(cases: readonly CaseError[]): AccuracyGroup[] {
  const groups = new Map<string, CaseError[]>();
  for (const c of cases) {
    const key = `${c.order}|${c.path}|${c.causal}`;
    groups.set(key, [...(groups.get(key) ?? []), c]);
  }
  return [...groups.values()]
    .map((members) => summarize(members, members[0]!.order, members[0]!.path, members[0]!.causal))
    .sort(
      (a, b) =>
        a.order - b.order ||
        PATH_ORDER.indexOf(a.path) - PATH_ORDER.indexOf(b.path) ||
        Number(a.causal) - Number(b.causal),
    );
}

function summarize(
  members: readonly CaseError[],
  order: Order,
  path: string,
  causal: boolean,
): AccuracyGroup {
  const worst = (kind: Measured): number | null => {
    const errors = members.filter((c) => c.kind === kind).map((c) => c.maxRelativeError);
    return errors.length === 0 ? null : Math.max(...errors);
  };
  return {
    order,
    path,
    causal,
    cases: members.length,
    forward: worst('forward'),
    backward: worst('backward'),
    state: worst('state'),
  };
}

function sweepSpec(n: number, causal: boolean): AttentionSpec {
  return buildSpec({
    order: SWEEP.order,
    normalization: causal ? 'prefix-max-norm' : 'max-norm',
    causal,
    path: 'factorized',
    heads: 1,
    queryLength: n,
    headDim: SWEEP.headDim,
    valueDim: SWEEP.headDim,
    seed: causal ? 9001 : 9002,
  });
}

async function measureSweep(
  fm: Fastmax,
  ctx: CheckContext,
  sizes: readonly number[],
  tick: (label: string) => void,
): Promise<SweepRow[]> {
  const rows: SweepRow[] = [];
  for (const n of sizes) {
    for (const causal of [false, true]) {
      const spec = sweepSpec(n, causal);
      const asCase: ForwardCase = {
        kind: 'forward',
        group: 'large',
        name: `sweep N=${n}`,
        spec,
        strictPath: true,
      };
      tick(`N sweep: N=${n}${causal ? ' causal' : ''}`);
      const skip = skipReason(asCase, fm.backend.capabilities);
      if (skip !== undefined) {
        rows.push({ n, causal, maxRelativeError: Number.NaN, ok: true, skip });
        continue;
      }
      const error = await measureCase(fm, ctx, asCase as MeasurableCase);
      rows.push({ n, causal, maxRelativeError: error.maxRelativeError, ok: error.ok });
    }
  }
  return rows;
}

function cell(value: number | null): string {
  return value === null ? '-' : formatError(value);
}

async function measureBackend(
  backend: FastmaxBackend,
  sizes: Sizes,
  sweepSizes: readonly number[],
  io: CliIO,
): Promise<AccuracyReport> {
  const started = performance.now();
  const fm = await createFastmax({ backend });
  try {
    // The memoized oracle of the suite: the N = 4096 cases share inputs across their two paths.
    const ctx = createCheckContext(fm);
    const cases = conformanceCases(backend.capabilities, sizes)
      .filter((c) => c.skip === undefined)
      .filter(isMeasurable)
      .map((c) => adaptToCapabilities(c, backend.capabilities));
    const progress = createProgressBar(cases.length + 2 * sweepSizes.length, {
      stream: io.stderr,
      env: io.env,
    });
    const errors: CaseError[] = [];
    let sweep: SweepRow[];
    try {
      for (const testCase of cases) {
        progress.update(`${testCase.kind} ${testCase.name}`);
        errors.push(await measureCase(fm, ctx, testCase));
        progress.tick();
      }
      sweep = await measureSweep(fm, ctx, sweepSizes, (label) => progress.tick(label));
    } finally {
      progress.done();
    }
    const groups = groupErrors(errors);
    const all = summarize(errors, 2, 'all', false);
    return {
      backend: backend.name,
      sizes,
      tolerances: { forward: FORWARD_TOLERANCE, gradient: GRADIENT_TOLERANCE },
      groups,
      worst: all,
      sweep,
      cases: errors,
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    await fm.dispose();
  }
}

function printReport(report: AccuracyReport, factory: BackendFactory, io: CliIO): number {
  const { stdout } = io;
  println(stdout, `Backend: ${factory.name}: ${factory.summary}`);
  println(stdout);
  println(
    stdout,
    formatTable(
      [
        { header: 'order' },
        { header: 'path', align: 'left' },
        { header: 'causal', align: 'left' },
        { header: 'cases' },
        { header: 'forward' },
        { header: 'backward' },
        { header: 'state' },
      ],
      [
        ...report.groups.map((g) => [
          String(g.order),
          g.path,
          g.causal ? 'yes' : 'no',
          String(g.cases),
          cell(g.forward),
          cell(g.backward),
          cell(g.state),
        ]),
        [
          'worst',
          '',
          '',
          String(report.worst.cases),
          cell(report.worst.forward),
          cell(report.worst.backward),
          cell(report.worst.state),
        ],
      ],
    ),
  );
  println(stdout);
  println(
    stdout,
    formatTable(
      [{ header: 'N' }, { header: 'non-causal' }, { header: 'causal' }],
      [...new Set(report.sweep.map((row) => row.n))].map((n) => {
        const at = (causal: boolean) => {
          const row = report.sweep.find((r) => r.n === n && r.causal === causal)!;
          return row.skip === undefined ? formatError(row.maxRelativeError) : 'skipped';
        };
        return [String(n), at(false), at(true)];
      }),
    ),
  );
  println(stdout);
  const notes = [
    `Largest relative error max|actual - expected| / max|expected| per tensor against the float64`,
    `  oracle, over the conformance cases (sizes: '${report.sizes}'). cases: forward + backward + state`,
    `  cases in the group. path: the planner's path (for backward, the path the forward would take);`,
    `  stepping: a decoding state stepped through the tokens, compared with the parallel causal oracle.`,
    `  backward: worst of dq, dk, dv. '-': no case of that kind in the group (or not declared).`,
    `Second table: forward error against N for p=${SWEEP.order}, B=1, H=1, D=Dv=${SWEEP.headDim}, factorized path.`,
    `Tolerances: ${FORWARD_TOLERANCE} forward and state, ${GRADIENT_TOLERANCE} gradients. Took ${formatDuration(report.seconds * 1000)}.`,
  ];
  for (const note of notes) println(stdout, note);
  for (const row of report.sweep.filter((r) => r.skip !== undefined)) {
    println(stdout, `  N sweep N=${row.n}${row.causal ? ' causal' : ''} skipped: ${row.skip}`);
  }
  const failures = report.cases.filter((c) => !c.ok);
  const sweepFailures = report.sweep.filter((row) => !row.ok);
  for (const c of failures) println(stdout, `FAIL ${c.kind} ${c.name}: ${c.failure}`);
  for (const row of sweepFailures) {
    println(
      stdout,
      `FAIL N sweep N=${row.n}${row.causal ? ' causal' : ''}: ${formatError(row.maxRelativeError)}`,
    );
  }
  const total = failures.length + sweepFailures.length;
  println(
    stdout,
    total === 0
      ? `All ${report.cases.length + report.sweep.length} measurements within tolerance.`
      : `${total} of ${report.cases.length + report.sweep.length} measurements exceed their tolerance.`,
  );
  println(stdout);
  return total;
}

export async function runAccuracy(
  args: readonly string[],
  io: CliIO,
  options: AccuracyOptions = {},
): Promise<number> {
  const values = parseFlags(args, FLAGS);
  if (values.help === true) {
    io.stdout.write(ACCURACY_HELP);
    return EXIT_OK;
  }
  const quick = values.quick === true;
  const sizesText = stringFlag(values, 'sizes');
  const extra = sizesText === undefined ? [] : parseSizes(sizesText);
  const sweepSizes = [...new Set([...(quick ? SWEEP.quickSizes : SWEEP.sizes), ...extra])].sort(
    (a, b) => a - b,
  );
  const backendText = stringFlag(values, 'backend');
  const names = backendText?.split(',').map((name) => name.trim());
  const factories = availableBackends(names, options.backends);
  const named = names !== undefined;

  const { loaded, failed } = await loadBackends(factories, { named });
  const { stdout, stderr } = io;
  println(
    stdout,
    `Fastmax accuracy against the float64 oracle${quick ? ' (--quick: small cases only)' : ''}`,
  );
  let failures = 0;
  // A backend asked for by name that cannot run is a failure; in the automatic list it is skipped.
  for (const skip of failed) {
    println(named ? stderr : stdout, `  skipped ${skip.name}: ${skip.reason}`);
    if (named) failures++;
  }
  let measured = 0;
  for (const { factory, backend } of loaded) {
    const availability = await backend.isAvailable();
    if (!availability.available) {
      println(named ? stderr : stdout, `  skipped ${factory.name}: ${availability.reason}`);
      if (named) failures++;
      await backend.dispose();
      continue;
    }
    println(stdout);
    const report = await measureBackend(backend, quick ? 'quick' : 'full', sweepSizes, io);
    measured++;
    failures += printReport(report, factory, io);
    if (values.json === true) {
      const path = await writeJsonResult(
        `accuracy-${factory.name}`,
        report,
        options.jsonDir === undefined ? {} : { dir: options.jsonDir },
      );
      println(stderr, `Wrote ${path}`);
    }
  }
  if (measured === 0) {
    println(stderr, 'fastmax accuracy: no backend is available');
    return EXIT_CHECK_FAILED;
  }
  return failures === 0 ? EXIT_OK : EXIT_CHECK_FAILED;
}
