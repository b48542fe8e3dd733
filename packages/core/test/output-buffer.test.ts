import { describe, expect, it } from 'vitest';
import {
  createFastmax,
  type FastmaxBackend,
  type ForwardRequest,
  type HostTensor,
  hostTensor,
  isFastmaxError,
  type Shape4,
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
