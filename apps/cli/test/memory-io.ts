import type { CliIO } from '../src/io.js';

/** A CliIO that records what a command writes; not a TTY and not CI unless asked. */
export function memoryIO(
  env: Record<string, string | undefined> = {},
): CliIO & { out(): string; err(): string } {
  let out = '';
  let err = '';
  return {
    stdout: {
      write(text: string) {
        out += text;
      },
    },
    stderr: {
      write(text: string) {
        err += text;
      },
    },
    env,
    out: () => out,
    err: () => err,
  };
}
