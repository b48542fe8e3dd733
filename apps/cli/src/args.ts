import { type ParseArgsConfig, parseArgs } from 'node:util';

/** The `options` of node:util `parseArgs` (its own type name is not exported by @types/node 20). */
export type FlagConfig = NonNullable<ParseArgsConfig['options']>;

/** A mistake on the command line: printed with a pointer to `--help`, exit code 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

/** Exit codes: 0 success, 1 a check failed, 2 the command line was wrong or the thing asked for is missing. */
export const EXIT_OK = 0;
export const EXIT_CHECK_FAILED = 1;
export const EXIT_USAGE = 2;

export type FlagValues = Record<string, string | boolean | (string | boolean)[] | undefined>;

/**
 * `parseArgs` in strict mode, so an unknown or misspelled flag is an error rather than ignored,
 * and its TypeError turned into a `UsageError` naming the flag.
 */
export function parseFlags(args: readonly string[], options: FlagConfig): FlagValues {
  try {
    return parseArgs({ args: [...args], options, strict: true, allowPositionals: false })
      .values as FlagValues;
  } catch (error) {
    if (error instanceof TypeError && 'code' in error && String(error.code).startsWith('ERR_PARSE_ARGS')) {
      throw new UsageError(error.message);
    }
    throw error;
  }
}

export function stringFlag(values: FlagValues, name: string): string | undefined {
  const value = values[name];
  return typeof value === 'string' ? value : undefined;
}

export function parseInteger(text: string, flag: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const value = /^\d+$/.test(text.trim()) ? Number(text.trim()) : Number.NaN;
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `in ${min}..${max}`;
    throw new UsageError(`${flag} expects an integer ${range}, got '${text}'`);
  }
  return value;
}

/** `--sizes 256,1024,4096`: sequence lengths, each >= 1, kept in the order given. */
export function parseSizes(text: string, flag = '--sizes'): number[] {
  const parts = text.split(',').filter((part) => part.trim() !== '');
  if (parts.length === 0)
    throw new UsageError(`${flag} expects a comma-separated list of lengths, got '${text}'`);
  return parts.map((part) => parseInteger(part, flag, 1));
}

export type CausalMode = 'on' | 'off' | 'both';

/** `--causal on|off|both`: which masks to run, as the list of `causal` values. */
export function parseCausal(text: string): boolean[] {
  switch (text) {
    case 'on':
      return [true];
    case 'off':
      return [false];
    case 'both':
      return [false, true];
    default:
      throw new UsageError(`--causal expects on, off or both, got '${text}'`);
  }
}
