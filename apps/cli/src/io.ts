import type { OutputStream } from './report.js';

/** Everything a command touches outside itself, so tests can run commands in-process. */
export interface CliIO {
  readonly stdout: OutputStream;
  readonly stderr: OutputStream;
  readonly env: Readonly<Record<string, string | undefined>>;
}

export function processIO(): CliIO {
  return { stdout: process.stdout, stderr: process.stderr, env: process.env };
}

export function println(stream: OutputStream, text = ''): void {
  stream.write(`${text}\n`);
}
