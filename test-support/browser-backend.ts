// Core by relative path: the repository root has no node_modules/@fastmax. It is the same file the
// packages' tests reach through `@fastmax/core` (source condition), so classes and types are shared.
import {
  type BackendCapabilities,
  type BackendState,
  type FastmaxBackend,
  FastmaxError,
  type FastmaxErrorCode,
  type HostTensor,
  type ResolvedOptions,
  SPEC_VERSION,
  type Tensor,
  toHost,
} from '../packages/core/src/index.js';
import { type BrowserPage, packageSource, type SourceTree } from './browser.js';

/**
 * A backend running in a browser page, driven from Node: the page script below holds one backend
 * and answers forward/backward/state calls whose tensors and resolved options arrive as plain data;
 * `proxyBackend` is the Node-side `FastmaxBackend` that forwards every call to it, so the
 * conformance suite (and `createFastmax`) can run against the backend's own code in the browser.
 * Device tensors stay a Node-side concern (the proxy declares none).
 */

/** Core's sources, served under `/core/` and mapped to `@fastmax/core` by the page's import map. */
export const CORE_TREE: SourceTree = packageSource('core', 'core');

export interface BackendPageScript {
  /** Module code run first: the backend's import and whatever `create` needs. */
  readonly setup: string;
  /** A JavaScript expression that creates a fresh backend. */
  readonly create: string;
}

/**
 * The page: `window.fastmax` holds one backend (created on first use, `backend()` returns it) and
 * answers the proxy's calls; `runForward` runs a whole `createFastmax` attention in the page with a
 * backend of its own. Sets `window.ready` when loaded.
 */
export function backendPageHtml(script: BackendPageScript): string {
  return `<!doctype html>
<script type="importmap">{ "imports": { "@fastmax/core": "/core/index.js" } }</script>
<script type="module">
  import { createFastmax } from '@fastmax/core';
  ${script.setup}
  const createBackend = () => ${script.create};
  const tensor = (t) => ({ shape: t.shape, data: new Float32Array(t.data) });
  const resolved = (o) => ({
    ...o,
    coefficients: new Float64Array(o.coefficients),
    keyLengths: o.keyLengths === null ? null : new Int32Array(o.keyLengths),
  });
  const plain = (t) => ({ shape: t.shape, data: Array.from(t.data) });
  const fail = (error) => ({
    error: {
      message: String(error && error.message || error),
      code: error && error.code,
      argument: error && error.argument,
      expected: error && error.expected,
      actual: error && error.actual,
    },
  });
  let current;
  const backend = () => (current ??= createBackend());
  const states = new Map();
  let nextState = 1;
  window.fastmax = {
    backend,
    isAvailable() {
      return backend().isAvailable();
    },
    async forward(r) {
      try {
        // The caller's options.out, as the page's own array prefilled with NaN like the suite's.
        const out = r.outLength === undefined ? undefined : new Float32Array(r.outLength).fill(NaN);
        const result = await backend().forward({ ...r, q: tensor(r.q), k: tensor(r.k), v: tensor(r.v), options: resolved(r.options), keepOnDevice: false, ...(out === undefined ? {} : { out }) });
        return { output: plain(result.output), degenerateRows: result.degenerateRows, intoOut: out !== undefined && result.output.data === out };
      } catch (error) { return fail(error); }
    },
    async backward(r) {
      try {
        // The caller's options.gradientsOut, as the page's own arrays prefilled with NaN.
        const out = r.outLengths === undefined ? undefined : {
          dq: new Float32Array(r.outLengths.dq).fill(NaN),
          dk: new Float32Array(r.outLengths.dk).fill(NaN),
          dv: new Float32Array(r.outLengths.dv).fill(NaN),
        };
        const result = await backend().backward({ ...r, q: tensor(r.q), k: tensor(r.k), v: tensor(r.v), dOut: tensor(r.dOut), options: resolved(r.options), keepOnDevice: false, ...(out === undefined ? {} : { out }) });
        const intoOut = out !== undefined && ['dq', 'dk', 'dv'].every((name) => result[name].data === out[name]);
        return { dq: plain(result.dq), dk: plain(result.dk), dv: plain(result.dv), intoOut };
      } catch (error) { return fail(error); }
    },
    async createState(o) {
      try {
        const id = nextState++;
        states.set(id, await backend().createState({ ...o, options: resolved(o.options) }));
        return { id };
      } catch (error) { return fail(error); }
    },
    async step(id, q, k, v) {
      try {
        const state = states.get(id);
        const result = await state.step(tensor(q), tensor(k), tensor(v));
        return { output: plain(result.output), degenerateRows: result.degenerateRows, tokens: state.tokens };
      } catch (error) { return fail(error); }
    },
    reset(id) { states.get(id).reset(); },
    disposeState(id) { states.get(id)?.dispose(); states.delete(id); },
    async runForward(input) {
      const fm = await createFastmax({ backend: createBackend() });
      try {
        const result = await fm.attention(tensor(input.q), tensor(input.k), tensor(input.v), input.options);
        return { output: Array.from(result.output.data), path: result.plan.path, degenerateRows: result.degenerateRows };
      } catch (error) { return fail(error); }
      finally { await fm.dispose(); }
    },
  };
  window.ready = true;
</script>`;
}

/** The part of a playwright `Page` the proxy uses. */
export interface PageEvaluate {
  evaluate<R, Arg>(pageFunction: (arg: Arg) => R | Promise<R>, arg: Arg): Promise<R>;
}

/** A host tensor as plain data, the way it crosses into the page (and back). */
export type PlainTensor = { shape: number[]; data: number[] };
type PageReply = {
  error?: { message: string; code?: string; argument?: string; expected?: string; actual?: string };
} & Record<string, unknown>;

export const plainTensor = (tensor: HostTensor): PlainTensor => ({
  shape: [...tensor.shape],
  data: Array.from(tensor.data),
});
const plain = async (tensor: Tensor): Promise<PlainTensor> => plainTensor(await toHost(tensor));
const host = (value: unknown): HostTensor => {
  const t = value as PlainTensor;
  return { shape: t.shape as unknown as HostTensor['shape'], data: Float32Array.from(t.data) };
};
const plainOptions = (options: ResolvedOptions) => ({
  ...options,
  coefficients: Array.from(options.coefficients),
  keyLengths: options.keyLengths === null ? null : Array.from(options.keyLengths),
});

/**
 * The Node-side backend of a page made by `backendPageHtml`. Errors thrown in the page come back as
 * `FastmaxError`s with their code (or plain errors); `dispose` closes the browser.
 */
export function proxyBackend(
  browser: BrowserPage<PageEvaluate>,
  description: { readonly name: string; readonly capabilities: BackendCapabilities },
): FastmaxBackend {
  const call = async (method: string, ...args: unknown[]): Promise<PageReply> => {
    const reply = (await browser.page.evaluate(
      ([name, list]) =>
        (window as unknown as { fastmax: Record<string, (...a: unknown[]) => unknown> }).fastmax[name]!(
          ...list,
        ),
      [method, args] as const,
    )) as PageReply | undefined;
    if (reply?.error !== undefined) {
      const { message, code, argument, expected, actual } = reply.error;
      if (code !== undefined) {
        // The details cross too: conformance checks the argument an error names.
        const details = {
          ...(argument === undefined ? {} : { argument }),
          ...(expected === undefined ? {} : { expected }),
          ...(actual === undefined ? {} : { actual }),
        };
        throw new FastmaxError(code as FastmaxErrorCode, `(in the browser) ${message}`, details);
      }
      throw new Error(`(in the browser) ${message}`);
    }
    return reply ?? {};
  };
  return {
    name: description.name,
    specVersion: SPEC_VERSION,
    capabilities: description.capabilities,
    async isAvailable() {
      return (await call('isAvailable')) as unknown as Awaited<ReturnType<FastmaxBackend['isAvailable']>>;
    },
    async forward(request) {
      const reply = await call('forward', {
        q: await plain(request.q),
        k: await plain(request.k),
        v: await plain(request.v),
        shape: request.shape,
        plan: request.plan,
        options: plainOptions(request.options),
        ...(request.out === undefined ? {} : { outLength: request.out.length }),
      });
      const output = host(reply.output);
      // What the page's backend wrote into its own caller array comes back into the caller's, and
      // is returned as that array only when the page's backend returned its array too.
      if (request.out === undefined || reply.intoOut !== true) {
        return { output, degenerateRows: reply.degenerateRows as number };
      }
      request.out.set(output.data);
      return {
        output: { shape: output.shape, data: request.out },
        degenerateRows: reply.degenerateRows as number,
      };
    },
    async backward(request) {
      const reply = await call('backward', {
        q: await plain(request.q),
        k: await plain(request.k),
        v: await plain(request.v),
        dOut: await plain(request.dOut),
        shape: request.shape,
        plan: request.plan,
        options: plainOptions(request.options),
        ...(request.out === undefined
          ? {}
          : {
              outLengths: {
                dq: request.out.dq.length,
                dk: request.out.dk.length,
                dv: request.out.dv.length,
              },
            }),
      });
      const gradients = { dq: host(reply.dq), dk: host(reply.dk), dv: host(reply.dv) };
      // As in forward: the caller's arrays come back only when the page's backend returned its own.
      const out = request.out;
      if (out === undefined || reply.intoOut !== true) return gradients;
      const into = (tensor: HostTensor, array: Float32Array): HostTensor => {
        array.set(tensor.data);
        return { shape: tensor.shape, data: array };
      };
      return {
        dq: into(gradients.dq, out.dq),
        dk: into(gradients.dk, out.dk),
        dv: into(gradients.dv, out.dv),
      };
    },
    async createState(options) {
      const { id } = (await call('createState', { ...options, options: plainOptions(options.options) })) as {
        id: number;
      };
      let tokens = 0;
      const state: BackendState = {
        get tokens() {
          return tokens;
        },
        async step(q, k, v) {
          const reply = await call('step', id, await plain(q), await plain(k), await plain(v));
          tokens = reply.tokens as number;
          return { output: host(reply.output), degenerateRows: reply.degenerateRows as number };
        },
        reset() {
          tokens = 0;
          void call('reset', id);
        },
        dispose() {
          void call('disposeState', id);
        },
      };
      return state;
    },
    async dispose() {
      await browser.close();
    },
  };
}
