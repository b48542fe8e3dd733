import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';

// src/generated/kernels.ts is committed so the package typechecks and tests right after a clone;
// this fails when asm/kernels.ts, src/engine.ts or the build script changed without a rebuild.
it('the embedded WebAssembly and worker source match their sources', () => {
  const script = fileURLToPath(new URL('../scripts/build-kernels.mjs', import.meta.url));
  expect(() => execFileSync(process.execPath, [script, '--check'], { stdio: 'pipe' })).not.toThrow();
});
