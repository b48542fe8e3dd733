import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { type FastmaxBackend, toHost } from '@fastmax/core';
import { referenceBackend } from '@fastmax/core/reference';
import { describe, expect, it } from 'vitest';
import type { BackendFactory } from '../src/backends.js';
import { main } from '../src/cli.js';
import { runBench } from '../src/commands/bench.js';
import { runDemo } from '../src/commands/demo.js';
import { memoryIO } from './memory-io.js';

describe('fastmax help', () => {
  it.each([['--help'], ['-h'], ['help']])('prints the command list for %s', async (flag) => {
    const io = memoryIO();
    expect(await main([flag], io)).toBe(0);
    expect(io.out()).toContain('Usage: fastmax [command] [options]');
    for (const command of ['demo', 'bench', 'help'])
      expect(io.out()).toMatch(new RegExp(`^  ${command} `, 'm'));
    expect(io.out()).toContain('reference');
  });

  it.each([
    [['demo', '--help'], 'Usage: fastmax demo'],
    [['help', 'demo'], 'Usage: fastmax demo'],
    [['bench', '--help'], 'Usage: fastmax bench'],
    [['help', 'bench'], 'Usage: fastmax bench'],
    [['help', '--help'], 'Usage: fastmax help'],
  ])('%j prints that command’s help', async (argv, heading) => {
    const io = memoryIO();
    expect(await main(argv, io)).toBe(0);
    expect(io.out()).toContain(heading);
    expect(io.err()).toBe('');
  });

  it('prints the version from package.json', async () => {
    const io = memoryIO();
    expect(await main(['--version'], io)).toBe(0);
    expect(io.out()).toMatch(/^\d+\.\d+\.\d+/);
  });
});

describe('command-line mistakes exit with 2 and say what was wrong', () => {
  it.each([
    [['nonsense'], "unknown command 'nonsense'"],
    [['toString'], "unknown command 'toString'"],
    [['help', 'nonsense'], "unknown command 'nonsense'"],
    [['demo', '--bogus'], "Unknown option '--bogus'"],
    [['--bogus'], "Unknown option '--bogus'"],
    [['demo', '--sizes', 'ten'], '--sizes expects an integer'],
    [['demo', '--order', '7'], '--order expects an integer in 1..4'],
    [['demo', '--causal', 'maybe'], '--causal expects on, off or both'],
    [['demo', '--backend', 'quantum'], "unknown backend 'quantum'"],
    [['bench'], 'bench needs --backend'],
    [['bench', '--backend', '../etc'], '--backend expects a backend name'],
  ])('%j', async (argv, message) => {
    const io = memoryIO();
    expect(await main(argv, io)).toBe(2);
    expect(io.err()).toContain(message);
    expect(io.err()).toContain("Run 'fastmax help' for usage.");
  });
});

describe('fastmax bench', () => {
  it('exits 2 when the backend has no benchmark in this build', async () => {
    const io = memoryIO();
    expect(await main(['bench', '--backend', 'no-such-backend'], io)).toBe(2);
    expect(io.err()).toContain("the benchmark for backend 'no-such-backend' is not available");
  });

  it('runs bench/<backend> with the parsed common flags and its own flags', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fastmax-bench-'));
    try {
      await writeFile(
        join(dir, 'fake.js'),
        `export const description = 'A fake benchmark.';
export const flags = { tile: { type: 'string' } };
export const flagHelp = '  --tile <n>           tile size';
export async function run(context) {
  context.io.stdout.write(JSON.stringify({ ...context, io: undefined }));
  return 0;
}
`,
      );
      const benchDir = pathToFileURL(`${dir}/`);
      const io = memoryIO();
      const code = await runBench(
        ['--backend', 'fake', '--sizes', '64,128', '--causal', 'on', '--runs', '7', '--tile', '32', '--json'],
        io,
        { benchDir },
      );
      expect(code).toBe(0);
      expect(JSON.parse(io.out())).toEqual({
        backend: 'fake',
        sizes: [64, 128],
        causal: [true],
        runs: 7,
        warmup: 1,
        seed: 1,
        json: true,
        flags: { tile: '32' },
      });

      const help = memoryIO();
      expect(await runBench(['--backend', 'fake', '--help'], help, { benchDir })).toBe(0);
      expect(help.out()).toContain('A fake benchmark.');
      expect(help.out()).toContain('--tile <n>');
      expect(help.out()).toMatch(/available\s+in this build: fake\./);

      const wrong = memoryIO();
      await expect(runBench(['--backend', 'fake', '--tiles', '3'], wrong, { benchDir })).rejects.toThrow(
        "Unknown option '--tiles'",
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('fastmax demo', () => {
  it('passes its oracle checks on small sizes, causal and not', async () => {
    const io = memoryIO();
    // The reference backend by name: this tests the demo, not which backends this machine has.
    const code = await main(
      [
        'demo',
        '--backend',
        'reference',
        '--sizes',
        '16,48',
        '--causal',
        'both',
        '--runs',
        '1',
        '--warmup',
        '0',
      ],
      io,
    );
    expect(io.err()).toBe('');
    expect(code).toBe(0);
    const out = io.out();
    expect(out).toContain('Backend: reference');
    expect(out).toContain('All 4 checks passed.');
    const rows = out.split('\n').filter((line) => /^\s*(16|48)\s/.test(line));
    expect(rows).toHaveLength(4);
    for (const row of rows) expect(row).toMatch(/\s(all)\s+pass$/);
  });

  it('checks a sample of rows above the full-check limit and says so', async () => {
    const io = memoryIO();
    const code = await main(
      ['demo', '--backend', 'reference', '--sizes', '1100', '--causal', 'on', '--runs', '1', '--warmup', '0'],
      io,
    );
    expect(code).toBe(0);
    expect(io.out()).toMatch(/1100\s+yes\s.*\s64 of 1100\s+pass/);
    expect(io.out()).toContain('sampled');
  });

  it('fails, exit 1, when a backend is wrong, and says which backends it skipped', async () => {
    const wrongBackend = async (): Promise<FastmaxBackend> => {
      const inner = referenceBackend();
      return {
        ...inner,
        name: 'off-by-a-bit',
        async forward(request) {
          const result = await inner.forward(request);
          const output = await toHost(result.output);
          const data = Float32Array.from(output.data);
          data[data.length - 1]! *= 1.001;
          return { ...result, output: { shape: output.shape, data } };
        },
      };
    };
    const unavailable = async (): Promise<FastmaxBackend> => ({
      ...referenceBackend(),
      name: 'absent',
      isAvailable: async () => ({ available: false, reason: 'no such device here' }),
    });
    const backends: BackendFactory[] = [
      { name: 'absent', summary: 'never available', tolerance: 1e-6, create: unavailable },
      {
        name: 'broken',
        summary: 'fails to load',
        tolerance: 1e-6,
        create: () => Promise.reject(new Error('boom')),
      },
      { name: 'off-by-a-bit', summary: 'scales one output value', tolerance: 1e-6, create: wrongBackend },
    ];
    const io = memoryIO();
    const code = await runDemo(['--sizes', '16', '--causal', 'on', '--runs', '1'], io, { backends });
    expect(code).toBe(1);
    expect(io.out()).toContain('Backend: off-by-a-bit');
    expect(io.out()).toContain('skipped absent: no such device here');
    expect(io.out()).toContain('skipped broken: could not load: boom');
    expect(io.out()).toMatch(/16\s+yes\s.*\sFAIL$/m);
    expect(io.out()).toContain('1 of 1 checks FAILED.');
  });
});
