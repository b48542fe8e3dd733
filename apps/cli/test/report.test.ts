import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  collectGarbage,
  createProgressBar,
  formatDuration,
  formatError,
  formatSpeedup,
  formatTable,
  isCI,
  measure,
  measureInterleaved,
  median,
  writeJsonResult,
} from '../src/report.js';

describe('median', () => {
  it('takes the middle value, or the mean of the two middle values', () => {
    expect(median([5, 1, 3])).toBe(3);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
    expect(() => median([])).toThrow(RangeError);
  });
});

describe('collectGarbage', () => {
  // V8 frees the backing stores of collected ArrayBuffers on a background thread, so the process's
  // count drops shortly after the collection, not always by the time it returns (about 1 run in 6
  // saw no drop yet): the test waits up to a second for it, as the benchmark rests 10 s after.
  it('frees an unreachable ArrayBuffer', async () => {
    let big: Float32Array | null = new Float32Array(2 ** 24).fill(1);
    const held = process.memoryUsage().arrayBuffers;
    expect(big.length).toBe(2 ** 24);
    big = null;
    collectGarbage();
    const freed = () => held - process.memoryUsage().arrayBuffers;
    for (let waited = 0; freed() < 2 ** 26 && waited < 1000; waited += 20)
      await new Promise((resolve) => setTimeout(resolve, 20));
    expect(freed()).toBeGreaterThanOrEqual(2 ** 26);
  });
});

describe('measureInterleaved', () => {
  it('warms every function up, then alternates them call by call', async () => {
    const calls: string[] = [];
    const result = await measureInterleaved([() => calls.push('a'), () => calls.push('b')], {
      warmup: 2,
      runs: 3,
    });
    expect(calls.join('')).toBe('aabbababab');
    expect(result.map((m) => m.runs.length)).toEqual([3, 3]);
  });

  it('reports each function its own median', async () => {
    const wait = (ms: number) => () => new Promise((resolve) => setTimeout(resolve, ms));
    const [fast, slow] = await measureInterleaved([wait(1), wait(30)], { warmup: 0, runs: 3 });
    expect(slow!.median).toBeGreaterThan(fast!.median);
    expect(slow!.median).toBeGreaterThanOrEqual(29);
  });

  it('rejects a non-positive run count', async () => {
    await expect(measureInterleaved([() => 0], { runs: 0 })).rejects.toThrow(RangeError);
  });
});

describe('measure', () => {
  it('runs the warm-up untimed, then times each run and reports their median', async () => {
    let calls = 0;
    const result = await measure(
      async () => {
        calls++;
      },
      { warmup: 2, runs: 5 },
    );
    expect(calls).toBe(7);
    expect(result.runs).toHaveLength(5);
    expect(result.median).toBe(median(result.runs));
    for (const time of result.runs) expect(time).toBeGreaterThanOrEqual(0);
  });

  it('times what the function does, awaiting promises', async () => {
    const result = await measure(() => new Promise((resolve) => setTimeout(resolve, 20)), {
      warmup: 0,
      runs: 3,
    });
    // setTimeout never fires early by more than timer granularity; 15 ms leaves room for that.
    expect(result.median).toBeGreaterThanOrEqual(15);
  });

  it('stops early once the timed runs exceed maxTimeMs, after at least one', async () => {
    let calls = 0;
    const slow = () =>
      new Promise((resolve) => {
        calls++;
        setTimeout(resolve, 10);
      });
    const result = await measure(slow, { warmup: 1, runs: 50, maxTimeMs: 25 });
    const sum = (times: readonly number[]) => times.reduce((a, b) => a + b, 0);
    // It stopped at the first run that brought the total to 25 ms, not before and not after.
    expect(sum(result.runs)).toBeGreaterThanOrEqual(25);
    expect(sum(result.runs.slice(0, -1))).toBeLessThan(25);
    expect(result.runs.length).toBeLessThan(50);
    expect(calls).toBe(result.runs.length + 1);
    const single = await measure(slow, { warmup: 0, runs: 5, maxTimeMs: 0 });
    expect(single.runs).toHaveLength(1);
  });

  it('refuses run counts that cannot give a median', async () => {
    await expect(measure(() => 0, { runs: 0 })).rejects.toThrow(RangeError);
    await expect(measure(() => 0, { warmup: -1 })).rejects.toThrow(RangeError);
  });
});

describe('formatTable', () => {
  it('pads every column to its widest cell, right-aligned unless asked otherwise', () => {
    const table = formatTable(
      [{ header: 'N' }, { header: 'name', align: 'left' }, { header: 'time' }],
      [
        ['256', 'a', '1.00 ms'],
        ['16384', 'longer', '12.0 s'],
      ],
    );
    expect(table.split('\n')).toEqual([
      '    N  name       time',
      '-----  ------  -------',
      '  256  a       1.00 ms',
      '16384  longer   12.0 s',
    ]);
  });

  it('refuses rows with the wrong number of cells', () => {
    expect(() => formatTable([{ header: 'a' }], [['1', '2']])).toThrow(RangeError);
  });
});

describe('number formats', () => {
  it('picks a unit with three significant digits', () => {
    expect(formatDuration(0.0123)).toBe('12.3 µs');
    expect(formatDuration(12.34)).toBe('12.3 ms');
    expect(formatDuration(1234)).toBe('1.23 s');
  });

  it('formats speedups and errors', () => {
    expect(formatSpeedup(300, 100)).toBe('3.00x');
    expect(formatSpeedup(2500, 100)).toBe('25.0x');
    expect(formatError(0)).toBe('0');
    expect(formatError(1.234e-7)).toBe('1.23e-7');
    expect(formatError(Number.NaN)).toBe('NaN');
  });
});

describe('writeJsonResult', () => {
  it('writes <dir>/<name>.json with the results and the machine', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fastmax-report-'));
    try {
      const path = await writeJsonResult('demo', { rows: [1, 2] }, { dir });
      expect(path).toBe(join(dir, 'demo.json'));
      const document = JSON.parse(await readFile(path, 'utf8'));
      expect(document.name).toBe('demo');
      expect(document.results).toEqual({ rows: [1, 2] });
      expect(document.environment.node).toBe(process.version);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('refuses names that are not plain file names', async () => {
    await expect(writeJsonResult('../escape', {})).rejects.toThrow(RangeError);
  });
});

describe('progress bar', () => {
  const sink = (isTTY: boolean) => {
    const writes: string[] = [];
    return { writes, stream: { isTTY, columns: 80, write: (text: string) => writes.push(text) } };
  };

  it('draws on a terminal and clears itself when done', () => {
    const { writes, stream } = sink(true);
    const bar = createProgressBar(4, { stream, env: {} });
    bar.tick('step one');
    bar.tick('step two');
    bar.done();
    expect(writes[1]).toContain('50%');
    expect(writes[1]).toContain('step two');
    expect(writes.at(-1)).toBe('\r\x1b[2K');
  });

  it('stays quiet when stderr is not a terminal or under CI', () => {
    for (const [isTTY, env] of [
      [false, {}],
      [true, { CI: 'true' }],
      [true, { CI: '1' }],
    ] as const) {
      const { writes, stream } = sink(isTTY);
      const bar = createProgressBar(2, { stream, env });
      bar.tick('x');
      bar.done();
      expect(writes).toEqual([]);
    }
  });

  it('treats CI=false and CI=0 as not CI', () => {
    expect(isCI({ CI: 'false' })).toBe(false);
    expect(isCI({ CI: '0' })).toBe(false);
    expect(isCI({})).toBe(false);
    expect(isCI({ CI: 'true' })).toBe(true);
  });
});
