import type { AttentionPath, NormalizationKind, Order, ResolvedOptions } from './options.js';
import type { AttentionPlan } from './planner.js';
import type { Tensor } from './tensor.js';
import type { AttentionShape } from './validate.js';

/**
 * The backend contract, version 1. A backend is a plain object; nothing registers it anywhere.
 * `createFastmax` validates every input and resolves every option before a backend sees a call,
 * so backends receive well-formed shapes, resolved options and a plan.
 */
export const SPEC_VERSION = 1 as const;
export type SpecVersion = typeof SPEC_VERSION;

export type DType = 'float32' | 'float16';

export interface BackendCapabilities {
  readonly orders: readonly Order[];
  readonly normalizations: readonly NormalizationKind[];
  /** Largest head dim D (and Dv) the backend accepts. */
  readonly maxHeadDim: number;
  readonly causal: boolean;
  readonly keyPadding: boolean;
  /** Grouped-query / multi-query attention (Hkv < H). */
  readonly groupedQuery: boolean;
  /** N != M. */
  readonly crossAttention: boolean;
  readonly backward: boolean;
  /** Recurrent decoding with `createState`. */
  readonly state: boolean;
  /** Storage types it can compute with; float32 host tensors are always accepted. */
  readonly dtypes: readonly DType[];
  /** Which exact paths it implements; the planner only picks among these. */
  readonly paths: readonly AttentionPath[];
  /** Accepts and returns `DeviceTensor`s of its own. */
  readonly deviceTensors: boolean;
  /**
   * `forward` checks q, k and v for NaN and ±Infinity itself when `request.options.checkFinite`
   * is true and throws core's error (core's `checkFinite` on q, k, v in that order, at least when
   * one holds such a value), and core skips its own scan before the call. This lets a backend fold
   * the check into work it does anyway (the CPU kernels flag the rows they load) instead of paying
   * for a scan before the compute starts. Default false: core scans. `backward`'s inputs are
   * covered by `checksFiniteBackwardInputs`; decoding inputs are always scanned by core.
   */
  readonly checksFiniteInputs?: boolean;
  /**
   * The same for `backward`: it checks q, k, v and dOut itself when `request.options.checkFinite`
   * is true and throws core's error (core's `checkFinite` on q, k, v, dOut in that order, at least
   * when one holds such a value), and core skips its own scan of them. Default false: core scans.
   */
  readonly checksFiniteBackwardInputs?: boolean;
  /**
   * `forward` writes the output into `request.out` when the caller gave one (every element of it)
   * and returns that array as `output.data`, so a caller that reuses one array across calls
   * allocates nothing per call. Default false: core copies the backend's result into the caller's
   * array instead, so `options.out` works on every backend.
   */
  readonly writesIntoOut?: boolean;
  /**
   * `backward` writes the gradients into `request.out` when the caller gave arrays for them
   * (every element of each) and returns those arrays as `dq.data`, `dk.data` and `dv.data`.
   * Default false: core copies the backend's gradients into the caller's arrays instead, so
   * `options.gradientsOut` works on every backend.
   */
  readonly writesGradientsIntoOut?: boolean;
}

export type Availability =
  | { readonly available: true }
  | { readonly available: false; readonly reason: string };

export interface ForwardRequest {
  readonly q: Tensor;
  readonly k: Tensor;
  readonly v: Tensor;
  readonly shape: AttentionShape;
  readonly options: ResolvedOptions;
  readonly plan: AttentionPlan;
  /** Return the output as a device tensor when the backend has them. */
  readonly keepOnDevice: boolean;
  /**
   * The caller's output array (B·H·N·Dv floats, validated by core: it shares no memory with q, k or
   * v, and `keepOnDevice` is false), only for backends that declare `writesIntoOut`. Its contents
   * on entry are arbitrary.
   */
  readonly out?: Float32Array;
}

export interface ForwardResult {
  /** B×H×N×Dv. */
  readonly output: Tensor;
  /** Rows whose denominator was <= 0 and were set to zero (see docs/math.md). */
  readonly degenerateRows: number;
}

export interface BackwardRequest extends Omit<ForwardRequest, 'keepOnDevice' | 'out'> {
  /** Gradient of the loss with respect to the output, B×H×N×Dv. */
  readonly dOut: Tensor;
  readonly keepOnDevice: boolean;
  /**
   * The caller's gradient arrays (validated by core: sizes B·H·N·D, B·Hkv·M·D and B·Hkv·M·Dv, no
   * memory shared with q, k, v, dOut or one another, and `keepOnDevice` is false), only for
   * backends that declare `writesGradientsIntoOut`. Their contents on entry are arbitrary.
   */
  readonly out?: GradientBuffers;
}

/** Arrays a caller reuses for the gradients of `backward` (`options.gradientsOut`). */
export interface GradientBuffers {
  /** B·H·N·D floats. */
  readonly dq: Float32Array;
  /** B·Hkv·M·D floats. */
  readonly dk: Float32Array;
  /** B·Hkv·M·Dv floats. */
  readonly dv: Float32Array;
}

export interface BackwardResult {
  readonly dq: Tensor;
  readonly dk: Tensor;
  readonly dv: Tensor;
}

/** What decoding needs to know up front; the state is sized from it. */
export interface StateOptions {
  readonly batch: number;
  readonly heads: number;
  /** Default: `heads`. */
  readonly kvHeads?: number;
  readonly headDim: number;
  /** Default: `headDim`. */
  readonly valueDim?: number;
  readonly order?: Order;
  readonly coefficients?: readonly number[];
  /** `'prefix-max-norm'` (default) or `{ scale }`: the normalizations that need no future tokens. */
  readonly normalization?: 'prefix-max-norm' | { readonly scale: number };
  readonly temperature?: number;
  readonly onDegenerateRow?: 'zero' | 'throw';
  readonly checkFinite?: boolean;
}

/** Resolved decoding options, as backends receive them. */
export interface ResolvedStateOptions {
  readonly batch: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly valueDim: number;
  /** Attention options with `causal: true`, no key padding and a decoding normalization. */
  readonly options: ResolvedOptions;
}

export interface StepResult {
  /** B×H×T×Dv for the T tokens of the step. */
  readonly output: Tensor;
  readonly degenerateRows: number;
}

/**
 * A recurrent decoding state: O(F·Dv) memory per head whatever the number of tokens seen. `step`
 * appends T tokens (q: B×H×T×D, k: B×Hkv×T×D, v: B×Hkv×T×Dv) and returns their causal outputs,
 * equal to the parallel causal attention over everything seen so far.
 */
export interface BackendState {
  readonly tokens: number;
  step(q: Tensor, k: Tensor, v: Tensor): Promise<StepResult>;
  reset(): void;
  dispose(): void;
}

export interface FastmaxBackend {
  readonly name: string;
  readonly specVersion: SpecVersion;
  readonly capabilities: BackendCapabilities;
  /** Never throws: says why not (no WebGPU adapter, no SharedArrayBuffer, ...). */
  isAvailable(): Promise<Availability>;
  forward(request: ForwardRequest): Promise<ForwardResult>;
  backward(request: BackwardRequest): Promise<BackwardResult>;
  createState?(options: ResolvedStateOptions): BackendState | Promise<BackendState>;
  dispose(): void | Promise<void>;
}
