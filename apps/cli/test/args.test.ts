import { describe, expect, it } from 'vitest';
import { parseCausal, parseFlags, parseInteger, parseSizes, UsageError } from '../src/args.js';

describe('argument parsing', () => {
  it('reads comma-separated sizes in the order given', () => {
    expect(parseSizes('256,1024, 64')).toEqual([256, 1024, 64]);
  });

  it.each(['', ',', '0', '-5', '1.5', '12abc', '1e3'])('refuses the size list %j', (text) => {
    expect(() => parseSizes(text)).toThrow(UsageError);
  });

  it('names the flag and the range in integer errors', () => {
    expect(() => parseInteger('5', '--order', 1, 4)).toThrow("--order expects an integer in 1..4, got '5'");
    expect(parseInteger('4', '--order', 1, 4)).toBe(4);
  });

  it('maps --causal modes to the causal values to run', () => {
    expect(parseCausal('on')).toEqual([true]);
    expect(parseCausal('off')).toEqual([false]);
    expect(parseCausal('both')).toEqual([false, true]);
    expect(() => parseCausal('yes')).toThrow(UsageError);
  });

  it('turns unknown flags and positionals into usage errors', () => {
    const options = { json: { type: 'boolean' }, sizes: { type: 'string' } } as const;
    expect(parseFlags(['--json', '--sizes', '8'], options)).toMatchObject({ json: true, sizes: '8' });
    expect(() => parseFlags(['--jsn'], options)).toThrow(UsageError);
    expect(() => parseFlags(['extra'], options)).toThrow(UsageError);
    expect(() => parseFlags(['--sizes'], options)).toThrow(UsageError);
  });
});
