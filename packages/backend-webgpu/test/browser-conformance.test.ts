import { runConformance } from '@fastmax/conformance';
import {
  type BackendState,
  type FastmaxBackend,
  FastmaxError,
  type FastmaxErrorCode,
  type HostTensor,
  type ResolvedOptions,
  SPEC_VERSION,
  type Tensor,
  toHost,
} from '@fastmax/core';
import { describe, it } from 'vitest';
import { WEBGPU_CAPABILITIES } from '../src/index.js';
import { type BrowserPage, CHROMIUM, chromiumMissing, openBrowserPage } from './browser-support.js';

/**
 * The conformance suite against the backend running in chromium (SwiftShader's WebGPU): a Node-side
 * proxy backend forwards every call to the page, where the real backend runs on navigator.gpu.
 * Device tensors stay a Node-side concern here (the proxy declares none); everything else is the
 * backend's own code on the browser's WebGPU implementation.
 */
type Plain = { shape: number[]; data: number[] };
type PageReply = { error?: { message: string; code?: string } } & Record<string, unknown>;

const plain = async (tensor: Tensor): Promise<Plain> => {
  const host = await toHost(tensor);
  return { shape: [...host.shape], data: Array.from(host.data) };
};
const host = (value: unknown): HostTensor => {
  const t = value as Plain;
  return { shape: t.shape as unknown as HostTensor['shape'], data: Float32Array.from(t.data) };
};
const plainOptions = (options: ResolvedOptions) => ({
  ...options,
  coefficients: Array.from(options.coefficients),
  keyLengths: options.keyLengths === null ? null : Array.from(options.keyLengths),
});

function proxyBackend(browser: BrowserPage): FastmaxBackend {
  const call = async (method: string, ...args: unknown[]): Promise<PageReply> => {
    const reply = (await browser.page.evaluate(
      ([name, list]) =>
        (window as unknown as { fastmax: Record<string, (...a: unknown[]) => unknown> }).fastmax[name]!(
          ...list,
        ),
      [method, args] as const,
    )) as PageReply | undefined;
    if (reply?.error !== undefined) {
      const { message, code } = reply.error;
      if (code !== undefined) throw new FastmaxError(code as FastmaxErrorCode, `(in the browser) ${message}`);
      throw new Error(`(in the browser) ${message}`);
    }
    return reply ?? {};
  };
  return {
    name: 'webgpu-chromium',
    specVersion: SPEC_VERSION,
    capabilities: { ...WEBGPU_CAPABILITIES, deviceTensors: false, dtypes: ['float32'] },
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
      });
      return { output: host(reply.output), degenerateRows: reply.degenerateRows as number };
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
      });
      return { dq: host(reply.dq), dk: host(reply.dk), dv: host(reply.dv) };
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

if (chromiumMissing) {
  describe('conformance: webgpu in chromium', () => {
    it.skip(`no chromium at ${CHROMIUM}`, () => {});
  });
} else {
  // The full suite takes about 70 s through SwiftShader on the 2-core CI machine.
  runConformance({
    name: 'webgpu in chromium (SwiftShader)',
    create: async () => proxyBackend(await openBrowserPage()),
    sizes: 'full',
  });
}
