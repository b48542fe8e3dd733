import { mkdir, writeFile } from 'node:fs/promises';
import { arch, cpus, platform } from 'node:os';
import { join, resolve } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

/**
 * Shared reporting for `fastmax demo` and every `fastmax bench` backend: timing, tables, JSON
 * results and a progress bar. Benchmarks print their numbers through these so every table in
 * docs/benchmarks.md is measured and laid out the same way.
 */

/** Where text goes. `process.stdout`/`process.stderr` fit; tests pass in-memory sinks. */
export interface OutputStream {
  write(text: string): unknown;
  readonly isTTY?: boolean;
  readonly columns?: number;
}

export interface MeasureOptions {
  /** Untimed calls first, so JIT compilation, lazy allocation and GPU pipeline creation are not timed. */
  readonly warmup?: number;
  /** Timed calls; the median is reported. */
  readonly runs?: number;
  /**
   * Stop timing early once the timed calls add up to this many milliseconds (after at least one),
   * so one slow size does not take minutes; `runs` in the result says how many ran.
   */
  readonly maxTimeMs?: number;
}

export interface Measurement {
  /** Median of `runs`, in milliseconds. */
  readonly median: number;
  /** Every timed call in milliseconds, in the order they ran. */
  readonly runs: readonly number[];
}

function checkCount(value: number, name: string, min: number): void {
  if (!Number.isInteger(value) || value < min) {
    throw new RangeError(`${name} must be an integer >= ${min}, got ${String(value)}`);
  }
}

/** The middle value (mean of the two middle values for an even count). */
export function median(values: readonly number[]): number {
  if (values.length === 0) throw new RangeError('median of an empty list');
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/**
 * Times `fn` (awaited when it returns a promise): `warmup` untimed calls, then `runs` timed ones.
 * The median rather than the mean, because one slow run (GC, another process on a shared core)
 * should not move the reported number.
 */
export async function measure(fn: () => unknown, options: MeasureOptions = {}): Promise<Measurement> {
  const warmup = options.warmup ?? 1;
  const runs = options.runs ?? 5;
  checkCount(warmup, 'warmup', 0);
  checkCount(runs, 'runs', 1);
  for (let i = 0; i < warmup; i++) await fn();
  const maxTimeMs = options.maxTimeMs ?? Number.POSITIVE_INFINITY;
  const times: number[] = [];
  let total = 0;
  while (times.length < runs && (times.length === 0 || total < maxTimeMs)) {
    const start = performance.now();
    await fn();
    const time = performance.now() - start;
    times.push(time);
    total += time;
  }
  return { median: median(times), runs: times };
}

/**
 * Times several functions call by call in turn (each warmed up first), so that a machine that
 * slows down or speeds up during the run (other tenants, frequency changes, a core that is shared
 * for a while) affects all of them alike: the ratio of two medians is then what compares them,
 * which is what the side-by-side targets check. `maxTimeMs` is not applied.
 */
export async function measureInterleaved(
  fns: readonly (() => unknown)[],
  options: Omit<MeasureOptions, 'maxTimeMs'> = {},
): Promise<Measurement[]> {
  const warmup = options.warmup ?? 1;
  const runs = options.runs ?? 5;
  checkCount(warmup, 'warmup', 0);
  checkCount(runs, 'runs', 1);
  for (const fn of fns) for (let i = 0; i < warmup; i++) await fn();
  const times: number[][] = fns.map(() => []);
  for (let r = 0; r < runs; r++) {
    for (const [index, fn] of fns.entries()) {
      const start = performance.now();
      await fn();
      times[index]!.push(performance.now() - start);
    }
  }
  return times.map((list) => ({ median: median(list), runs: list }));
}

/**
 * A full garbage collection now, so that a baseline's garbage (gigabytes, for onnxruntime's plain
 * graph) is not collected during the next thing timed. `--expose-gc` is turned on at run time
 * (`v8.setFlagsFromString`) and `gc` is taken from a fresh context, where that flag installs it.
 */
export function collectGarbage(): void {
  setFlagsFromString('--expose-gc');
  (runInNewContext('gc') as () => void)();
}

/** `0.42 ms`, `12.3 ms`, `1.25 s`: three significant digits, in the unit that reads best. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return String(ms);
  if (ms < 1) return `${(ms * 1000).toPrecision(3)} µs`;
  if (ms < 1000) return `${ms.toPrecision(3)} ms`;
  return `${(ms / 1000).toPrecision(3)} s`;
}

/** `3.21x`: how many times faster the candidate is than the baseline. */
export function formatSpeedup(baselineMs: number, candidateMs: number): string {
  const ratio = baselineMs / candidateMs;
  if (!Number.isFinite(ratio)) return '-';
  return `${ratio >= 10 ? ratio.toFixed(1) : ratio.toFixed(2)}x`;
}

/** Errors span many decades, so they are printed in scientific notation. */
export function formatError(value: number): string {
  if (value === 0) return '0';
  return Number.isFinite(value) ? value.toExponential(2) : String(value);
}

export interface Column {
  readonly header: string;
  /** Numbers read best right-aligned; default `'right'`. */
  readonly align?: 'left' | 'right';
}

/**
 * A fixed-width text table: every column as wide as its widest cell, two spaces between columns,
 * a dashed rule under the header. Cells are already formatted strings, so callers pick the units.
 */
export function formatTable(columns: readonly Column[], rows: readonly (readonly string[])[]): string {
  for (const [index, row] of rows.entries()) {
    if (row.length !== columns.length) {
      throw new RangeError(
        `table row ${index} has ${row.length} cells, the table has ${columns.length} columns`,
      );
    }
  }
  const widths = columns.map((column, c) =>
    Math.max(column.header.length, ...rows.map((row) => row[c]!.length)),
  );
  const line = (cells: readonly string[]): string =>
    cells
      .map((cell, c) => (columns[c]!.align === 'left' ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!)))
      .join('  ')
      .trimEnd();
  return [
    line(columns.map((column) => column.header)),
    widths.map((width) => '-'.repeat(width)).join('  '),
    ...rows.map(line),
  ].join('\n');
}

export interface JsonResultOptions {
  /** Default: `bench-results` under the current directory (gitignored). */
  readonly dir?: string;
}

/**
 * Writes `<dir>/<name>.json` with the results and the machine they were measured on, and returns
 * the path. Numbers without their machine cannot be compared, so the environment always goes in.
 */
export async function writeJsonResult(
  name: string,
  results: unknown,
  options: JsonResultOptions = {},
): Promise<string> {
  if (!/^[A-Za-z0-9][\w.-]*$/.test(name)) {
    throw new RangeError(
      `result name must be a plain file name (letters, digits, '.', '-', '_'), got '${name}'`,
    );
  }
  const dir = resolve(options.dir ?? 'bench-results');
  await mkdir(dir, { recursive: true });
  const path = join(dir, `${name}.json`);
  const cpuList = cpus();
  const document = {
    name,
    date: new Date().toISOString(),
    environment: {
      node: process.version,
      platform: platform(),
      arch: arch(),
      cpu: cpuList[0]?.model ?? 'unknown',
      cores: cpuList.length,
    },
    results,
  };
  await writeFile(path, `${JSON.stringify(document, null, 2)}\n`);
  return path;
}

export interface ProgressBar {
  /** Moves the bar forward by `steps` (default 1) and shows what is running now. */
  tick(label?: string, steps?: number): void;
  /** Shows what is running now without moving the bar. */
  update(label: string): void;
  /** Clears the bar so the table that follows starts on a clean line. */
  done(): void;
}

export interface ProgressOptions {
  /** Default `process.stderr`: progress is not output, so it never mixes into piped stdout. */
  readonly stream?: OutputStream;
  /** Default `process.env`. */
  readonly env?: Readonly<Record<string, string | undefined>>;
}

/** CI logs keep every carriage-return frame, so a bar there is noise; any value but '0'/'false' counts. */
export function isCI(env: Readonly<Record<string, string | undefined>>): boolean {
  const value = env.CI;
  return value !== undefined && value !== '' && value !== '0' && value.toLowerCase() !== 'false';
}

/**
 * A one-line progress bar redrawn in place on stderr. Silent (every method a no-op) when the
 * stream is not a terminal or under CI, where redraws would only fill logs.
 */
export function createProgressBar(total: number, options: ProgressOptions = {}): ProgressBar {
  checkCount(total, 'total', 0);
  const stream = options.stream ?? process.stderr;
  const env = options.env ?? process.env;
  if (stream.isTTY !== true || isCI(env)) {
    return { tick() {}, update() {}, done() {} };
  }
  let completed = 0;
  let current = '';
  let drawn = false;
  const draw = (): void => {
    const width = 24;
    const fraction = total === 0 ? 1 : Math.min(1, completed / total);
    const filled = Math.round(fraction * width);
    const bar = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${String(Math.round(fraction * 100)).padStart(3)}%`;
    // columns is undefined or 0 when the terminal size is unknown.
    const room = Math.max(0, (stream.columns || 80) - bar.length - 2);
    // \x1b[2K clears the whole line, so a shorter label does not leave the end of a longer one.
    stream.write(`\r\x1b[2K${bar}  ${current.slice(0, room)}`);
    drawn = true;
  };
  return {
    tick(label, steps = 1) {
      completed += steps;
      if (label !== undefined) current = label;
      draw();
    },
    update(label) {
      current = label;
      draw();
    },
    done() {
      if (drawn) stream.write('\r\x1b[2K');
      drawn = false;
    },
  };
}

/** One row of a backend benchmark table: every backend's `fastmax bench` prints the same columns. */
export interface BenchRow {
  readonly case: string;
  readonly N: number;
  readonly fastmaxMs: number;
  readonly baselineMs?: number;
  readonly baseline?: string;
  readonly gflops?: number;
  readonly target: string;
  /** null when the row checks nothing (context rows, --quick, targets for other hardware). */
  readonly met: boolean | null;
}

/** Two significant decimals below 10 GFLOP/s (software adapters), one above. */
export function formatGflops(value: number): string {
  return value < 10 ? value.toFixed(2) : value.toFixed(1);
}

/** The benchmark table: ratio is fastmax time / baseline time (below 1: fastmax is faster). */
export function formatBenchTable(rows: readonly BenchRow[]): string {
  return formatTable(
    [
      { header: 'case', align: 'left' },
      { header: 'N' },
      { header: 'fastmax' },
      { header: 'GFLOP/s' },
      { header: 'baseline', align: 'left' },
      { header: 'baseline time' },
      { header: 'ratio' },
      { header: 'target', align: 'left' },
      { header: 'met', align: 'left' },
    ],
    rows.map((row) => [
      row.case,
      String(row.N),
      formatDuration(row.fastmaxMs),
      row.gflops === undefined ? '-' : formatGflops(row.gflops),
      row.baseline ?? '-',
      row.baselineMs === undefined ? '-' : formatDuration(row.baselineMs),
      row.baselineMs === undefined ? '-' : (row.fastmaxMs / row.baselineMs).toFixed(3),
      row.target,
      row.met === null ? '-' : row.met ? 'yes' : 'NO',
    ]),
  );
}
