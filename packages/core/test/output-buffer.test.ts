import { describe, expect, it } from 'vitest';
import {
  type BackwardRequest,
  createFastmax,
  type FastmaxBackend,
  type ForwardRequest,
  type GradientBuffers,
  type HostTensor,
  hostTensor,
  isFastmaxError,
  type Shape4,
  type Tensor,
} from '../src/index.js';
import { referenceBackend } from '../src/reference/backend.js';

function filled(shape: Shape4, seed: number): HostTensor {
  const tensor = hostTensor(shape);
  let state = seed;
  for (let i = 0; i < tensor.data.length; i++) {
    state = (state * 1103515245 + 12345) >>> 0;
    tensor.data[i] = state / 2 ** 31 - 1;
  }
  return tensor;
}

const q = filled([1, 2, 5, 4], 1);
const k = filled([1, 2, 5, 4], 2);
const v = filled([1, 2, 5, 3], 3);
const outLength = 1 * 2 * 5 * 3;

/** The reference backend, declaring `writesIntoOut` and recording the requests it receives. */
function writingBackend(honest: boolean): FastmaxBackend & { readonly requests: ForwardRequest[] } {
  const inner = referenceBackend();
  const requests: ForwardRequest[] = [];
  return {
    ...inner,
    name: 'writes-into-out',
    capabilities: { ...inner.capabilities, writesIntoOut: true },
    requests,
    async forward(request) {
      requests.push(request);
      const result = await inner.forward(request);
      if (!honest || request.out === undefined) return result;
      const data = (result.output as HostTensor).data;
      request.out.set(data);
      return { ...result, output: { shape: result.output.shape, data: request.out } };
    },
  };
}

async function thrown(call: () => Promise<unknown>): Promise<unknown> {
  try {
    await call();
  } catch (error) {
    return error;
  }
  throw new Error('the call did not throw');
}

describe('options.out', () => {
  it('a backend without writesIntoOut: core copies the result into the caller array', async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const expected = (await fm.attention(q, k, v, { causal: true })).output as HostTensor;
    const out = new Float32Array(outLength).fill(Number.NaN);
    const result = await fm.attention(q, k, v, { causal: true, out });
    expect((result.output as HostTensor).data).toBe(out);
    expect(result.output.shape).toEqual([1, 2, 5, 3]);
    expect(Array.from(out)).toEqual(Array.from(expected.data));
  });

  it('a backend with writesIntoOut gets the array and its result is returned as is', async () => {
    const backend = writingBackend(true);
    const fm = await createFastmax({ backend });
    const out = new Float32Array(outLength).fill(Number.NaN);
    const result = await fm.attention(q, k, v, { out });
    expect(backend.requests.at(-1)?.out).toBe(out);
    expect((result.output as HostTensor).data).toBe(out);
    expect(out.every(Number.isFinite)).toBe(true);
    await fm.attention(q, k, v);
    expect(backend.requests.at(-1)?.out).toBeUndefined();
  });

  it('a backend that declares writesIntoOut but returns another array still fills the caller array', async () => {
    const fm = await createFastmax({ backend: writingBackend(false) });
    const out = new Float32Array(outLength).fill(Number.NaN);
    const result = await fm.attention(q, k, v, { out });
    expect((result.output as HostTensor).data).toBe(out);
    expect(out.every(Number.isFinite)).toBe(true);
  });

  it.each([
    ['a plain array', () => new Array(outLength).fill(0), 'INVALID_OPTION', 'Array'],
    ['a Float64Array', () => new Float64Array(outLength), 'INVALID_OPTION', 'Float64Array'],
    ['one value short', () => new Float32Array(outLength - 1), 'INVALID_SHAPE', '29 values'],
    ['a view of q.data', () => q.data.subarray(0, outLength), 'INVALID_OPTION', 'holds q.data'],
  ])('options.out = %s -> %s naming options.out', async (_label, make, code, actual) => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const error = await thrown(() => fm.attention(q, k, v, { out: make() as Float32Array }));
    expect(isFastmaxError(error, code as 'INVALID_OPTION')).toBe(true);
    expect((error as { argument: string }).argument).toBe('options.out');
    expect((error as { actual: string }).actual).toContain(actual);
  });

  it('refuses an array that overlaps part of v.data', async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const memory = new Float32Array(2 * outLength);
    const values = memory.subarray(0, outLength);
    values.set(v.data);
    const out = memory.subarray(outLength / 2, outLength / 2 + outLength);
    const error = await thrown(() => fm.attention(q, k, { shape: v.shape, data: values }, { out }));
    expect(isFastmaxError(error, 'INVALID_OPTION')).toBe(true);
    expect((error as { argument: string }).argument).toBe('options.out');
    expect((error as { actual: string }).actual).toContain('v.data');
  });

  it("refuses options.out together with output: 'device'", async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const error = await thrown(() =>
      fm.attention(q, k, v, { out: new Float32Array(outLength), output: 'device' }),
    );
    expect(isFastmaxError(error, 'INVALID_OPTION')).toBe(true);
    expect((error as { argument: string }).argument).toBe('options.out');
  });

  it('accepts a view of a larger buffer that does not overlap the inputs', async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const shared = new Float32Array(outLength + 8);
    const out = shared.subarray(4, 4 + outLength);
    const result = await fm.attention(q, k, v, { out });
    expect((result.output as HostTensor).data).toBe(out);
    expect(shared[0]).toBe(0);
    expect(shared[outLength + 4]).toBe(0);
  });
});

describe('options.gradientsOut', () => {
  // GQA (2 query heads on 1 kv head) so that dk and dv differ in size from dq.
  const gq = filled([1, 2, 5, 4], 11);
  const gk = filled([1, 1, 6, 4], 12);
  const gv = filled([1, 1, 6, 3], 13);
  const dOut = filled([1, 2, 5, 3], 14);
  const sizes = { dq: 2 * 5 * 4, dk: 6 * 4, dv: 6 * 3 };
  const fresh = () => ({
    dq: new Float32Array(sizes.dq).fill(Number.NaN),
    dk: new Float32Array(sizes.dk).fill(Number.NaN),
    dv: new Float32Array(sizes.dv).fill(Number.NaN),
  });

  /** The reference backend declaring `writesGradientsIntoOut`, writing the arrays when `honest`. */
  function writingGradients(honest: boolean) {
    const inner = referenceBackend();
    const requests: BackwardRequest[] = [];
    const backend: FastmaxBackend = {
      ...inner,
      name: 'writes-gradients-into-out',
      capabilities: { ...inner.capabilities, writesGradientsIntoOut: true },
      async backward(request) {
        requests.push(request);
        const result = await inner.backward(request);
        if (!honest || request.out === undefined) return result;
        const into = (tensor: Tensor, array: Float32Array): HostTensor => {
          array.set((tensor as HostTensor).data);
          return { shape: tensor.shape, data: array };
        };
        return {
          dq: into(result.dq, request.out.dq),
          dk: into(result.dk, request.out.dk),
          dv: into(result.dv, request.out.dv),
        };
      },
    };
    return { backend, requests };
  }

  it('a backend without writesGradientsIntoOut: core copies the gradients into the caller arrays', async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const expected = await fm.backward(gq, gk, gv, dOut, { causal: true });
    const out = fresh();
    const result = await fm.backward(gq, gk, gv, dOut, { causal: true, gradientsOut: out });
    for (const name of ['dq', 'dk', 'dv'] as const) {
      expect((result[name] as HostTensor).data).toBe(out[name]);
      expect(result[name].shape).toEqual(expected[name].shape);
      expect(Array.from(out[name])).toEqual(Array.from((expected[name] as HostTensor).data));
    }
  });

  it.each([true, false])(
    'a backend with writesGradientsIntoOut gets the arrays; the caller gets them filled (writes them: %s)',
    async (honest) => {
      const { backend, requests } = writingGradients(honest);
      const fm = await createFastmax({ backend });
      const out = fresh();
      const result = await fm.backward(gq, gk, gv, dOut, { gradientsOut: out });
      expect(requests.at(-1)?.out).toEqual(out);
      for (const name of ['dq', 'dk', 'dv'] as const) {
        expect((result[name] as HostTensor).data).toBe(out[name]);
        expect(out[name].every(Number.isFinite)).toBe(true);
      }
      await fm.backward(gq, gk, gv, dOut);
      expect(requests.at(-1)?.out).toBeUndefined();
    },
  );

  const memory = new Float32Array(sizes.dq + sizes.dk);
  it.each([
    ['not an object', () => 7, 'options.gradientsOut', 'INVALID_OPTION', '7'],
    [
      'dq missing',
      () => ({ ...fresh(), dq: undefined }),
      'options.gradientsOut.dq',
      'INVALID_OPTION',
      'undefined',
    ],
    [
      'dk a Float64Array',
      () => ({ ...fresh(), dk: new Float64Array(sizes.dk) }),
      'options.gradientsOut.dk',
      'INVALID_OPTION',
      'Float64Array',
    ],
    [
      'dv one value short',
      () => ({ ...fresh(), dv: new Float32Array(sizes.dv - 1) }),
      'options.gradientsOut.dv',
      'INVALID_SHAPE',
      '17 values',
    ],
    [
      'dq sized like dk',
      () => ({ ...fresh(), dq: new Float32Array(sizes.dk) }),
      'options.gradientsOut.dq',
      'INVALID_SHAPE',
      '24 values',
    ],
    [
      'dk a view of dOut.data',
      () => ({ ...fresh(), dk: dOut.data.subarray(0, sizes.dk) }),
      'options.gradientsOut.dk',
      'INVALID_OPTION',
      'dOut.data',
    ],
    [
      'dk overlapping dq',
      () => ({
        ...fresh(),
        dq: memory.subarray(0, sizes.dq),
        dk: memory.subarray(sizes.dq - 1, sizes.dq - 1 + sizes.dk),
      }),
      'options.gradientsOut.dk',
      'INVALID_OPTION',
      'options.gradientsOut.dq',
    ],
  ])('gradientsOut with %s -> an error naming %s', async (_label, make, argument, code, actual) => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const error = await thrown(() =>
      fm.backward(gq, gk, gv, dOut, { gradientsOut: make() as unknown as GradientBuffers }),
    );
    expect(isFastmaxError(error, code as 'INVALID_OPTION')).toBe(true);
    expect((error as { argument: string }).argument).toBe(argument);
    expect((error as { actual: string }).actual).toContain(actual);
  });

  it("refuses gradientsOut together with output: 'device'", async () => {
    const fm = await createFastmax({ backend: referenceBackend() });
    const error = await thrown(() =>
      fm.backward(gq, gk, gv, dOut, { gradientsOut: fresh(), output: 'device' }),
    );
    expect(isFastmaxError(error, 'INVALID_OPTION')).toBe(true);
    expect((error as { argument: string }).argument).toBe('options.gradientsOut');
  });
});
