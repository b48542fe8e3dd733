import { type BackwardRequest, type BackwardResult, FastmaxError } from '@fastmax/core';
import type { Engine } from './engine.js';

export async function cpuBackward(_request: BackwardRequest, _engine: Engine): Promise<BackwardResult> {
  throw new FastmaxError('UNSUPPORTED_CAPABILITY', 'backward is not implemented yet');
}
