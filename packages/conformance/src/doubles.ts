import type {
  BackendState,
  BackwardRequest,
  FastmaxBackend,
  ForwardRequest,
  HostTensor,
  ResolvedOptions,
  Shape4,
  Tensor,
} from '@fastmax/core';
import { toHost } from '@fastmax/core';

/**
 * Faults a real backend has been known to have (or could easily have). Each one is small enough
 * to pass a casual test and is caught by a specific part of the suite:
 * - `'leaks-padded-keys'`: ignores `keyLengths`, so padded keys count as valid ('key padding', 'forward').
 * - `'ignores-causal-mask'`: computes non-causal attention when asked for causal ('causality', 'forward').
 * - `'wrong-kv-head'`: query head h reads kv head h mod Hkv instead of floor(h / (H/Hkv)) (GQA rows).
 * - `'low-precision'`: rounds results to 11 significant bits (float16-like), about 5e-4 relative,
 *   to show that the 1e-4 tolerance means something.
 * - `'wrong-gradient'`: dk and dv are 1% too large ('backward', 'finite differences').
 * - `'uncounted-degenerate-rows'`: reports degenerateRows = 0 ('degenerate rows').
 * - `'forgetful-state'`: each `step` forgets the tokens of earlier steps ('state').
 * - `'hangs-on-non-finite'`: never settles when an input holds NaN/±Infinity ('non-finite propagation').
 * - `'mutates-inputs'`: writes into the caller's q ('forward').
 * - `'skips-finite-check'`: declares `checksFiniteInputs` and `checksFiniteBackwardInputs` (so core
 *   leaves the scans to it) and never scans ('invalid input', the NON_FINITE_INPUT cases).
 * - `'skips-zero-rows-of-out'`: declares `writesIntoOut` and writes `request.out` except its rows
 *   that should be 0, as if every caller array came zero-filled ('output buffer').
 * - `'ignores-gradients-out'`: declares `writesGradientsIntoOut` and returns gradients in arrays of
 *   its own, leaving `request.out` as it was ('output buffer', the backward cases).
 */
export type BackendFault =
  | 'leaks-padded-keys'
  | 'ignores-causal-mask'
  | 'wrong-kv-head'
  | 'low-precision'
  | 'wrong-gradient'
  | 'uncounted-degenerate-rows'
  | 'forgetful-state'
  | 'hangs-on-non-finite'
  | 'mutates-inputs'
  | 'skips-finite-check'
  | 'skips-zero-rows-of-out'
  | 'ignores-gradients-out';

export const BACKEND_FAULTS: readonly BackendFault[] = [
  'leaks-padded-keys',
  'ignores-causal-mask',
  'wrong-kv-head',
  'low-precision',
  'wrong-gradient',
  'uncounted-degenerate-rows',
  'forgetful-state',
  'hangs-on-non-finite',
  'mutates-inputs',
  'skips-finite-check',
  'skips-zero-rows-of-out',
  'ignores-gradients-out',
];

/** Keeps the top 11 significant bits of a float32, like a float16 intermediate would. */
function roundTo11Bits(tensor: HostTensor): HostTensor {
  const data = new Float32Array(tensor.data.length);
  for (let i = 0; i < data.length; i++) {
    const value = tensor.data[i]!;
    if (value === 0 || !Number.isFinite(value)) {
      data[i] = value;
      continue;
    }
    const exponent = Math.floor(Math.log2(Math.abs(value)));
    const step = 2 ** (exponent - 10);
    data[i] = Math.round(value / step) * step;
  }
  return { shape: tensor.shape, data };
}

function scaled(tensor: HostTensor, factor: number): HostTensor {
  return { shape: tensor.shape, data: tensor.data.map((value) => value * factor) };
}

/** Moves query head blocks so that the inner backend's floor(h/G) mapping acts as h mod Hkv. */
function headPermutation(heads: number, kvHeads: number): number[] {
  const group = heads / kvHeads;
  // Query head h must land where the inner mapping reads kv head h mod Hkv: slot (h mod Hkv)·G + floor(h/Hkv).
  return Array.from({ length: heads }, (_, h) => (h % kvHeads) * group + Math.floor(h / kvHeads));
}

function permuteHeads(tensor: HostTensor, slotOf: readonly number[], inverse: boolean): HostTensor {
  const [B, H, L, D] = tensor.shape;
  const data = new Float32Array(tensor.data.length);
  const block = L * D;
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const [from, to] = inverse ? [slotOf[h]!, h] : [h, slotOf[h]!];
      data.set(
        tensor.data.subarray((b * H + from) * block, (b * H + from + 1) * block),
        (b * H + to) * block,
      );
    }
  }
  return { shape: [B, H, L, D] as Shape4, data };
}

/** Copies the nonzero rows of `tensor` into `out`, leaving the rest as they were. */
function withoutZeroRows(tensor: HostTensor, out: Float32Array): Float32Array {
  const width = tensor.shape[3];
  for (let row = 0; row < tensor.data.length / width; row++) {
    const values = tensor.data.subarray(row * width, (row + 1) * width);
    if (values.some((value) => value !== 0)) out.set(values, row * width);
  }
  return out;
}

function hasNonFinite(tensors: readonly Tensor[]): boolean {
  return tensors.some((tensor) => 'data' in tensor && tensor.data.some((value) => !Number.isFinite(value)));
}

function withOptions(options: ResolvedOptions, fault: BackendFault): ResolvedOptions {
  if (fault === 'leaks-padded-keys') return { ...options, keyLengths: null };
  if (fault === 'ignores-causal-mask') return { ...options, causal: false };
  return options;
}

/**
 * A test double: wraps a correct backend and injects one fault, so plugin authors (and our own
 * tests) can watch the suite catch it. Capabilities are those of the wrapped backend.
 */
export function brokenBackend(inner: FastmaxBackend, fault: BackendFault): FastmaxBackend {
  const mapHeads = async <T extends ForwardRequest | BackwardRequest>(request: T): Promise<T> => {
    if (fault !== 'wrong-kv-head' || request.shape.kvHeads === request.shape.heads) return request;
    const slots = headPermutation(request.shape.heads, request.shape.kvHeads);
    const moved = { ...request, q: permuteHeads(await toHost(request.q), slots, false) };
    if ('dOut' in request) return { ...moved, dOut: permuteHeads(await toHost(request.dOut), slots, false) };
    return moved;
  };
  const unmapHeads = (tensor: HostTensor, request: ForwardRequest | BackwardRequest): HostTensor => {
    if (fault !== 'wrong-kv-head' || request.shape.kvHeads === request.shape.heads) return tensor;
    return permuteHeads(tensor, headPermutation(request.shape.heads, request.shape.kvHeads), true);
  };
  return {
    name: `${inner.name}+${fault}`,
    specVersion: inner.specVersion,
    capabilities:
      fault === 'skips-finite-check'
        ? { ...inner.capabilities, checksFiniteInputs: true, checksFiniteBackwardInputs: true }
        : fault === 'skips-zero-rows-of-out'
          ? { ...inner.capabilities, writesIntoOut: true }
          : fault === 'ignores-gradients-out'
            ? { ...inner.capabilities, writesGradientsIntoOut: true }
            : inner.capabilities,
    isAvailable: () => inner.isAvailable(),
    async forward(request) {
      if (fault === 'hangs-on-non-finite' && hasNonFinite([request.q, request.k, request.v])) {
        return new Promise(() => {});
      }
      if (fault === 'mutates-inputs' && 'data' in request.q && request.q.data.length > 0) {
        request.q.data[0] = request.q.data[0]! + 1;
      }
      const mapped = await mapHeads({ ...request, options: withOptions(request.options, fault) });
      const result = await inner.forward({ ...mapped, keepOnDevice: false });
      let output = unmapHeads(await toHost(result.output), request);
      if (fault === 'low-precision') output = roundTo11Bits(output);
      if (fault === 'skips-zero-rows-of-out' && request.out !== undefined) {
        output = { shape: output.shape, data: withoutZeroRows(output, request.out) };
      }
      return { output, degenerateRows: fault === 'uncounted-degenerate-rows' ? 0 : result.degenerateRows };
    },
    async backward(request) {
      if (fault === 'hangs-on-non-finite' && hasNonFinite([request.q, request.k, request.v, request.dOut])) {
        return new Promise(() => {});
      }
      const mapped = await mapHeads({ ...request, options: withOptions(request.options, fault) });
      const result = await inner.backward({ ...mapped, keepOnDevice: false });
      let dq = unmapHeads(await toHost(result.dq), request);
      let dk = await toHost(result.dk);
      let dv = await toHost(result.dv);
      if (fault === 'low-precision') [dq, dk, dv] = [roundTo11Bits(dq), roundTo11Bits(dk), roundTo11Bits(dv)];
      // dv too: on D <= 2 with a centering normalization dk can be exactly 0, and 1.01·0 = 0.
      if (fault === 'wrong-gradient') [dk, dv] = [scaled(dk, 1.01), scaled(dv, 1.01)];
      return { dq, dk, dv };
    },
    ...(inner.createState === undefined
      ? {}
      : {
          async createState(options) {
            const state: BackendState = await inner.createState!(options);
            if (fault !== 'forgetful-state') return state;
            return {
              get tokens() {
                return state.tokens;
              },
              step(q, k, v) {
                state.reset();
                return state.step(q, k, v);
              },
              reset: () => state.reset(),
              dispose: () => state.dispose(),
            };
          },
        }),
    dispose: () => inner.dispose(),
  };
}
