import { readFileSync } from 'node:fs';
import { isFastmaxError } from '@fastmax/core';
import { EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, UsageError } from './args.js';
import { backendNames } from './backends.js';
import { runBench } from './commands/bench.js';
import { DEMO_HELP, runDemo } from './commands/demo.js';
import { type CliIO, println } from './io.js';

interface Command {
  readonly summary: string;
  run(args: readonly string[], io: CliIO): Promise<number>;
}

const COMMANDS: Readonly<Record<string, Command>> = {
  demo: {
    summary:
      'run Fastmax on generated inputs, check it against the float64 oracle and time it\n' +
      '           against softmax attention (the default command)',
    run: runDemo,
  },
  bench: { summary: 'benchmark one backend: fastmax bench --backend <cpu|webgpu>', run: runBench },
  accuracy: {
    summary: 'largest relative error against the float64 oracle over the conformance cases',
    run: runAccuracy,
  },
  help: { summary: 'show help for a command: fastmax help <command>', run: runHelp },
};

export function mainHelp(): string {
  const commands = Object.entries(COMMANDS)
    .map(([name, command]) => `  ${name.padEnd(8)} ${command.summary}`)
    .join('\n');
  return `Usage: fastmax [command] [options]

Fastmax: attention in linear time and memory, through a factorized Taylor expansion of exp.

Commands:
${commands}

Options:
  -h, --help     show help (after a command: help for that command)
  -v, --version  print the version

Backends in this build, fastest first: ${backendNames().join(', ')}.
`;
}

const HELP_HELP = `Usage: fastmax help [command]

Shows the list of commands, or the options of one command.
`;

async function runHelp(args: readonly string[], io: CliIO): Promise<number> {
  const [topic, ...rest] = args;
  if (rest.length > 0) throw new UsageError(`help takes at most one command, got ${args.length}`);
  if (topic === undefined) {
    io.stdout.write(mainHelp());
    return EXIT_OK;
  }
  if (topic === '--help' || topic === '-h' || topic === 'help') {
    io.stdout.write(HELP_HELP);
    return EXIT_OK;
  }
  if (topic === 'demo') {
    io.stdout.write(DEMO_HELP);
    return EXIT_OK;
  }
  if (topic === 'bench') return runBench(['--help'], io);
  if (topic === 'accuracy') return runAccuracy(['--help'], io);
  throw new UsageError(`unknown command '${topic}'`);
}

/**
 * Loaded on first use: it pulls in the conformance kit and the float64 oracle, which the other
 * commands do not need at start-up.
 */
async function runAccuracy(args: readonly string[], io: CliIO): Promise<number> {
  return (await import('./commands/accuracy.js')).runAccuracy(args, io);
}

function version(): string {
  // src/cli.ts and dist/cli.js both sit one level below the package root.
  const manifest = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  return manifest.version;
}

/**
 * Runs one command line (without the node and script arguments) and returns the exit code:
 * 0 success, 1 a check failed, 2 a usage error or something asked for that this build lacks.
 */
export async function main(argv: readonly string[], io: CliIO): Promise<number> {
  try {
    const [first, ...rest] = argv;
    if (first === '--help' || first === '-h') {
      io.stdout.write(mainHelp());
      return EXIT_OK;
    }
    if (first === '--version' || first === '-v') {
      println(io.stdout, version());
      return EXIT_OK;
    }
    // No command, or options straight away: the demo, which is what a first-time user wants to see.
    if (first === undefined || first.startsWith('-')) return await runDemo(argv, io);
    const command = Object.hasOwn(COMMANDS, first) ? COMMANDS[first] : undefined;
    if (command === undefined) {
      throw new UsageError(`unknown command '${first}' (commands: ${Object.keys(COMMANDS).join(', ')})`);
    }
    return await command.run(rest, io);
  } catch (error) {
    if (error instanceof UsageError) {
      println(io.stderr, `fastmax: ${error.message}`);
      println(io.stderr, `Run 'fastmax help' for usage.`);
      return EXIT_USAGE;
    }
    if (isFastmaxError(error)) {
      println(io.stderr, `fastmax: ${error.message}`);
      return EXIT_CHECK_FAILED;
    }
    throw error;
  }
}
