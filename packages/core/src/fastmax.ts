import {
  type BackendState,
  type BackwardResult,
  type FastmaxBackend,
  type GradientBuffers,
  SPEC_VERSION,
  type StateOptions,
  type StepResult,
} from './contract.js';
import { describeValue, FastmaxError } from './errors.js';
import type { FastmaxOptions, ResolvedOptions } from './options.js';
import { resolveOptions } from './options.js';
import { type AttentionPlan, planAttention } from './planner.js';
import { resolveStateOptions, validateStepInputs } from './state.js';
import { isDeviceTensor, type Tensor, toHost } from './tensor.js';
import {
  type AttentionShape,
  validateAttentionInputs,
  validateGradientBuffers,
  validateOutputBuffer,
  validateOutputGradient,
} from './validate.js';

export interface CallOptions extends FastmaxOptions {
  /** Where results go: `'device'` keeps them on a backend with device tensors. Default `'host'`. */
  readonly output?: 'host' | 'device';
  /**
   * `attention` only: a Float32Array of B·H·N·Dv floats to write the output into, returned as
   * `output.data`. Reusing one across calls (layer after layer, step after step) saves allocating,
   * and on first touch page-faulting, a fresh array per call. It must share no memory with q, k or
   * v; not with `output: 'device'`. When the call fails, its contents are unspecified.
   */
  readonly out?: Float32Array;
  /**
   * `backward` only: arrays to write dq, dk and dv into, returned as their `data`. Reusing them
   * across training steps saves allocating (and page-faulting) three fresh arrays per call. They
   * must share no memory with q, k, v, dOut or one another; not with `output: 'device'`. When the
   * call fails, their contents are unspecified.
   */
  readonly gradientsOut?: GradientBuffers;
}

export interface AttentionResult {
  /** B×H×N×Dv. */
  readonly output: Tensor;
  /** Rows whose denominator was <= 0 and were set to zero. */
  readonly degenerateRows: number;
  /** The path and chunk size the planner chose, and why. */
  readonly plan: AttentionPlan;
  /** Name of the backend that ran the call. */
  readonly backend: string;
}

export interface FastmaxState {
  /** Tokens appended so far. */
  readonly tokens: number;
  step(q: Tensor, k: Tensor, v: Tensor): Promise<StepResult>;
  reset(): void;
  dispose(): void;
}

export interface SkippedBackend {
  readonly name: string;
  readonly reason: string;
}

export interface Fastmax {
  /** The backend in use (the first available one of the list). */
  readonly backend: FastmaxBackend;
  /** Backends before it in the list that were not available, with their reasons. */
  readonly skipped: readonly SkippedBackend[];
  attention(q: Tensor, k: Tensor, v: Tensor, options?: CallOptions): Promise<AttentionResult>;
  backward(q: Tensor, k: Tensor, v: Tensor, dOut: Tensor, options?: CallOptions): Promise<BackwardResult>;
  /** The plan `attention` would follow, without running it. */
  plan(q: Tensor, k: Tensor, v: Tensor, options?: FastmaxOptions): AttentionPlan;
  createState(options: StateOptions): Promise<FastmaxState>;
  dispose(): Promise<void>;
}

export interface CreateFastmaxOptions {
  /** One backend, or a list in order of preference: the first available one is used. */
  readonly backend: FastmaxBackend | readonly FastmaxBackend[];
}

function unsupported(what: string, argument: string, expected: string, actual: string): FastmaxError {
  return new FastmaxError('UNSUPPORTED_CAPABILITY', `the backend does not support ${what}`, {
    argument,
    expected,
    actual,
  });
}

/** Refuses, by name, whatever this call needs that the backend did not declare. */
export function checkCapabilities(
  backend: FastmaxBackend,
  shape: AttentionShape,
  options: ResolvedOptions,
): void {
  const caps = backend.capabilities;
  const name = backend.name;
  if (!caps.orders.includes(options.order)) {
    throw unsupported(
      `order ${options.order}`,
      'options.order',
      `one of ${caps.orders.join(', ')} (${name})`,
      String(options.order),
    );
  }
  if (!caps.normalizations.includes(options.normalization.kind)) {
    throw unsupported(
      `normalization '${options.normalization.kind}'`,
      'options.normalization',
      `one of ${caps.normalizations.join(', ')} (${name})`,
      options.normalization.kind,
    );
  }
  const dim = Math.max(shape.headDim, shape.valueDim);
  if (dim > caps.maxHeadDim) {
    throw unsupported('this head dim', 'q.shape[3]', `<= ${caps.maxHeadDim} (${name})`, String(dim));
  }
  if (options.causal && !caps.causal)
    throw unsupported('causal attention', 'options.causal', 'false', 'true');
  if (options.keyLengths !== null && !caps.keyPadding) {
    throw unsupported('key padding', 'options.keyLengths', 'undefined', 'an array');
  }
  if (shape.kvHeads !== shape.heads && !caps.groupedQuery) {
    throw unsupported('grouped-query attention', 'k.shape[1]', String(shape.heads), String(shape.kvHeads));
  }
  if (shape.keyLength !== shape.queryLength && !caps.crossAttention) {
    throw unsupported(
      'cross-attention (M != N)',
      'k.shape[2]',
      String(shape.queryLength),
      String(shape.keyLength),
    );
  }
}

async function firstAvailable(
  backends: readonly FastmaxBackend[],
): Promise<{ backend: FastmaxBackend; skipped: SkippedBackend[] }> {
  const skipped: SkippedBackend[] = [];
  for (const backend of backends) {
    if (backend.specVersion !== SPEC_VERSION) {
      skipped.push({
        name: backend.name,
        reason: `implements backend spec version ${describeValue(backend.specVersion)}, this core speaks ${SPEC_VERSION}`,
      });
      continue;
    }
    let availability: Awaited<ReturnType<FastmaxBackend['isAvailable']>>;
    try {
      availability = await backend.isAvailable();
    } catch (error) {
      availability = { available: false, reason: `isAvailable() threw: ${String(error)}` };
    }
    if (availability.available) return { backend, skipped };
    skipped.push({ name: backend.name, reason: availability.reason });
  }
  throw new FastmaxError(
    'BACKEND_UNAVAILABLE',
    `no backend is available: ${skipped.map((s) => `${s.name}: ${s.reason}`).join('; ') || 'the list is empty'}`,
    {
      argument: 'backend',
      expected: 'at least one available backend',
      actual: `${backends.length} backends`,
    },
  );
}

/** Reads device tensors that belong to another backend into host memory. */
async function adopt(tensor: Tensor, backend: FastmaxBackend): Promise<Tensor> {
  if (isDeviceTensor(tensor) && (tensor.backend !== backend.name || !backend.capabilities.deviceTensors)) {
    return toHost(tensor);
  }
  return tensor;
}

/** Caller arrays for results (`argument`) are host memory: they cannot go with `output: 'device'`. */
function refuseOnDevice(options: CallOptions | undefined, argument: string, actual: string): void {
  if (options?.output !== 'device') return;
  throw new FastmaxError('INVALID_OPTION', `${argument} holds host memory: it cannot take output: 'device'`, {
    argument,
    expected: "undefined with output: 'device'",
    actual,
  });
}

/** `result` as a host tensor over the caller's `array`, copied in unless the backend wrote it there. */
async function intoArray(result: Tensor, array: Float32Array): Promise<Tensor> {
  if (!isDeviceTensor(result) && result.data === array) return result;
  array.set((await toHost(result)).data);
  return { shape: result.shape, data: array };
}

function keepOnDevice(options: CallOptions | undefined, backend: FastmaxBackend): boolean {
  if (options?.output === undefined || options.output === 'host') return false;
  if (options.output !== 'device') {
    throw new FastmaxError('INVALID_OPTION', 'unknown output location', {
      argument: 'options.output',
      expected: "'host' | 'device'",
      actual: describeValue(options.output),
    });
  }
  return backend.capabilities.deviceTensors;
}

function assertDegenerateRowsAllowed(count: number, options: ResolvedOptions): void {
  if (count > 0 && options.onDegenerateRow === 'throw') {
    throw new FastmaxError('DEGENERATE_DENOMINATOR', `${count} query rows have a denominator <= 0`, {
      argument: 'options.onDegenerateRow',
      expected: 'every row denominator Σ_j f(s_ij) > 0',
      actual: `${count} rows <= 0`,
    });
  }
}

/**
 * Creates a Fastmax instance bound to one backend (or the first available of a list). Nothing is
 * registered globally: two instances with two backends live side by side.
 */
export async function createFastmax(config: CreateFastmaxOptions): Promise<Fastmax> {
  if (typeof config !== 'object' || config === null || config.backend === undefined) {
    throw new FastmaxError('INVALID_OPTION', 'createFastmax needs a backend', {
      argument: 'backend',
      expected: 'a FastmaxBackend or a list of them',
      actual: describeValue(config),
    });
  }
  const list = Array.isArray(config.backend) ? config.backend : [config.backend as FastmaxBackend];
  const { backend, skipped } = await firstAvailable(list);
  let disposed = false;
  const live = (): void => {
    if (disposed)
      throw new FastmaxError('DISPOSED', 'this Fastmax instance was disposed', { argument: 'this' });
  };

  const prepare = (
    q: Tensor,
    k: Tensor,
    v: Tensor,
    options: FastmaxOptions | undefined,
    backendScansValues = false,
  ) => {
    live();
    const resolved = resolveOptions(options);
    const shape = validateAttentionInputs(q, k, v, resolved, !backendScansValues);
    checkCapabilities(backend, shape, resolved);
    const plan = planAttention(shape, resolved, backend.capabilities.paths);
    return { resolved, shape, plan };
  };

  return {
    backend,
    skipped,
    plan(q, k, v, options) {
      return prepare(q, k, v, options).plan;
    },
    async attention(q, k, v, options) {
      const { resolved, shape, plan } = prepare(
        q,
        k,
        v,
        options,
        backend.capabilities.checksFiniteInputs === true,
      );
      const onDevice = keepOnDevice(options, backend);
      const out =
        options?.out === undefined ? undefined : validateOutputBuffer(options.out, shape, { q, k, v });
      if (out !== undefined) refuseOnDevice(options, 'options.out', `a Float32Array of ${out.length} values`);
      const direct = out !== undefined && backend.capabilities.writesIntoOut === true;
      const result = await backend.forward({
        q: await adopt(q, backend),
        k: await adopt(k, backend),
        v: await adopt(v, backend),
        shape,
        options: resolved,
        plan,
        keepOnDevice: onDevice,
        ...(direct ? { out } : {}),
      });
      assertDegenerateRowsAllowed(result.degenerateRows, resolved);
      const output = out === undefined ? result.output : await intoArray(result.output, out);
      return { output, degenerateRows: result.degenerateRows, plan, backend: backend.name };
    },
    async backward(q, k, v, dOut, options) {
      const scansItself = backend.capabilities.checksFiniteBackwardInputs === true;
      const { resolved, shape, plan } = prepare(q, k, v, options, scansItself);
      if (!backend.capabilities.backward) {
        throw unsupported('backward', 'backend', 'capabilities.backward = true', 'false');
      }
      validateOutputGradient(dOut, shape, resolved, !scansItself);
      const onDevice = keepOnDevice(options, backend);
      const out =
        options?.gradientsOut === undefined
          ? undefined
          : validateGradientBuffers(options.gradientsOut, shape, { q, k, v, dOut });
      if (out !== undefined) refuseOnDevice(options, 'options.gradientsOut', 'dq, dk and dv arrays');
      const direct = out !== undefined && backend.capabilities.writesGradientsIntoOut === true;
      const result = await backend.backward({
        q: await adopt(q, backend),
        k: await adopt(k, backend),
        v: await adopt(v, backend),
        dOut: await adopt(dOut, backend),
        shape,
        options: resolved,
        plan,
        keepOnDevice: onDevice,
        ...(direct ? { out } : {}),
      });
      if (out === undefined) return result;
      return {
        dq: await intoArray(result.dq, out.dq),
        dk: await intoArray(result.dk, out.dk),
        dv: await intoArray(result.dv, out.dv),
      };
    },
    async createState(options) {
      live();
      const resolved = resolveStateOptions(options);
      if (!backend.capabilities.state || backend.createState === undefined) {
        throw unsupported('recurrent state', 'backend', 'capabilities.state = true', 'false');
      }
      const probeShape: AttentionShape = {
        batch: resolved.batch,
        heads: resolved.heads,
        kvHeads: resolved.kvHeads,
        queryLength: 1,
        keyLength: 1,
        headDim: resolved.headDim,
        valueDim: resolved.valueDim,
      };
      checkCapabilities(backend, probeShape, resolved.options);
      // Capabilities are checked first so a refused state is never allocated.
      const inner: BackendState = await backend.createState(resolved);
      return {
        get tokens() {
          return inner.tokens;
        },
        async step(q, k, v) {
          live();
          validateStepInputs(q, k, v, resolved);
          const result = await inner.step(
            await adopt(q, backend),
            await adopt(k, backend),
            await adopt(v, backend),
          );
          assertDegenerateRowsAllowed(result.degenerateRows, resolved.options);
          return result;
        },
        reset: () => inner.reset(),
        dispose: () => inner.dispose(),
      };
    },
    async dispose() {
      if (disposed) return;
      disposed = true;
      await backend.dispose();
    },
  };
}
