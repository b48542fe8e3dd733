import { type WebGpuBackend, type WebGpuTensor, webgpuBackend } from '@fastmax/backend-webgpu';
import { createFastmax, type HostTensor, type Order, type Shape4 } from '@fastmax/core';
import { referenceAttention } from '@fastmax/core/reference';
import { EXIT_CHECK_FAILED, EXIT_OK, parseInteger, stringFlag } from '../args.js';
import type { BenchContext } from '../commands/bench.js';
import { println } from '../io.js';
import {
  type BenchRow,
  createProgressBar,
  formatBenchTable,
  formatError,
  formatGflops,
  measure,
  writeJsonResult,
} from '../report.js';
import { randomTensor } from '../workload.js';

export const description = `Fastmax on WebGPU against a tiled, flash-style WebGPU softmax attention kernel (online
softmax, keys streamed through workgroup memory), both with inputs and outputs resident on the GPU.
D = Dv = 64. GFLOP/s counts 2 flops per multiply-add of the path that ran (the planner's cost) and
4·D flops per visible (query, key) pair for softmax. On a software adapter (lavapipe, SwiftShader)
the default sizes are small and only the ratios mean anything.`;

export const flags = {
  heads: { type: 'string' },
} as const;

export const flagHelp = `  --heads <n>          B·H, the number of (batch, head) pairs (default 16, 1 on a software adapter)`;

const HEAD_DIM = 64;
const GPU_SIZES = [1024, 2048, 4096, 8192, 16384, 32768, 65536];
const SOFTWARE_SIZES = [256, 512, 1024];
const KEY_TILE = 16;

type Device = Awaited<ReturnType<WebGpuBackend['device']>>;

/**
 * The baseline: one invocation per query row, 64 rows per workgroup, K and V tiles of 16 keys in
 * workgroup memory, online softmax (running max and sum, rescaled accumulator), scale 1/sqrt(D).
 */
const SOFTMAX_WGSL = `
struct Params { N: u32, causal: u32, scale: f32, pad: u32 };
@group(0) @binding(0) var<uniform> u: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
const D = ${HEAD_DIM}u;
const KT = ${KEY_TILE}u;
var<workgroup> keyTile: array<f32, ${KEY_TILE * HEAD_DIM}>;
var<workgroup> valueTile: array<f32, ${KEY_TILE * HEAD_DIM}>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let head = wid.y;
  let i = wid.x * 64u + lid.x;
  let rowActive = i < u.N;
  let lastRow = min(wid.x * 64u + 63u, u.N - 1u);
  var high = u.N;
  if (u.causal == 1u) { high = lastRow + 1u; }
  var limit = u.N;
  if (u.causal == 1u) { limit = i + 1u; }
  var qi: array<f32, ${HEAD_DIM}>;
  var acc: array<f32, ${HEAD_DIM}>;
  if (rowActive) { for (var d = 0u; d < D; d++) { qi[d] = q[(head * u.N + i) * D + d] * u.scale; } }
  var running = -3.0e38;
  var total = 0.0;
  for (var start = 0u; start < high; start += KT) {
    for (var e = lid.x; e < KT * D; e += 64u) {
      let j = start + e / D;
      var kv = 0.0;
      var vv = 0.0;
      if (j < u.N) { kv = k[(head * u.N + j) * D + e % D]; vv = v[(head * u.N + j) * D + e % D]; }
      keyTile[e] = kv;
      valueTile[e] = vv;
    }
    workgroupBarrier();
    for (var t = 0u; t < KT; t++) {
      let j = start + t;
      if (rowActive && j < limit) {
        var s = 0.0;
        for (var d = 0u; d < D; d++) { s += qi[d] * keyTile[t * D + d]; }
        let next = max(running, s);
        let correction = exp(running - next);
        let w = exp(s - next);
        total = total * correction + w;
        for (var d = 0u; d < D; d++) { acc[d] = acc[d] * correction + w * valueTile[t * D + d]; }
        running = next;
      }
    }
    workgroupBarrier();
  }
  if (rowActive) { for (var d = 0u; d < D; d++) { o[(head * u.N + i) * D + d] = acc[d] / total; } }
}`;

interface SoftmaxRunner {
  run(): Promise<void>;
  dispose(): void;
}

function softmaxRunner(
  device: Device,
  q: WebGpuTensor,
  k: WebGpuTensor,
  v: WebGpuTensor,
  causal: boolean,
): SoftmaxRunner {
  const [, heads, N] = q.shape;
  const batchHeads = q.shape[0] * heads;
  const module = device.createShaderModule({ code: SOFTMAX_WGSL });
  const pipeline = device.createComputePipeline({ layout: 'auto', compute: { module, entryPoint: 'main' } });
  const uniforms = device.createBuffer({ size: 16, usage: 0x40 | 0x8 });
  const params = new ArrayBuffer(16);
  new Uint32Array(params, 0, 2).set([N, causal ? 1 : 0]);
  new Float32Array(params, 8, 1).set([1 / Math.sqrt(HEAD_DIM)]);
  device.queue.writeBuffer(uniforms, 0, params);
  const output = device.createBuffer({ size: q.byteLength, usage: 0x80 });
  const bindGroup = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [uniforms, q.buffer, k.buffer, v.buffer, output].map((buffer, binding) => ({
      binding,
      resource: { buffer },
    })),
  });
  return {
    async run() {
      const encoder = device.createCommandEncoder();
      const pass = encoder.beginComputePass();
      pass.setPipeline(pipeline);
      pass.setBindGroup(0, bindGroup);
      pass.dispatchWorkgroups(Math.ceil(N / 64), batchHeads);
      pass.end();
      device.queue.submit([encoder.finish()]);
      await device.queue.onSubmittedWorkDone();
    },
    dispose() {
      uniforms.destroy();
      output.destroy();
    },
  };
}

/** The GPU targets of the WebGPU backend (docs/benchmarks.md, WebGPU section). */
function targetOf(
  N: number,
  order: Order,
  causal: boolean,
  batchHeads: number,
): { text: string; limitMs?: number } {
  if (order === 2 && causal && N === 65536 && batchHeads === 16) {
    return { text: '< 100 ms, faster than softmax', limitMs: 100 };
  }
  if (N >= 4096) return { text: 'faster than softmax' };
  return { text: '-' };
}

export async function run(context: BenchContext): Promise<number> {
  const { io } = context;
  // On a machine with both a GPU and lavapipe, ask for the GPU.
  const backend = webgpuBackend({ powerPreference: 'high-performance' });
  const availability = await backend.isAvailable();
  if (!availability.available) {
    println(io.stderr, `fastmax bench --backend webgpu: no WebGPU adapter: ${availability.reason}`);
    return EXIT_CHECK_FAILED;
  }
  const device = await backend.device();
  const adapterName = await backend.adapterDescription();
  const software = /llvmpipe|lavapipe|swiftshader|cpu/i.test(adapterName);
  const headsFlag = stringFlag(context.flags, 'heads');
  const batchHeads =
    headsFlag === undefined ? (software ? 1 : 16) : parseInteger(headsFlag, '--heads', 1, 4096);
  const sizes = context.sizes ?? (software ? SOFTWARE_SIZES : GPU_SIZES);
  const causalModes = context.causal ?? [false, true];
  const orders: Order[] = context.order === undefined ? [1, 2] : [context.order];
  const fm = await createFastmax({ backend });
  const rows: BenchRow[] = [];
  let failed = false;
  const progress = createProgressBar(sizes.length * causalModes.length * orders.length, {
    stream: io.stderr,
    env: io.env,
  });
  println(io.stdout, `WebGPU adapter: ${adapterName}; B·H = ${batchHeads}, D = Dv = ${HEAD_DIM}`);
  for (const N of sizes) {
    const shape: Shape4 = [1, batchHeads, N, HEAD_DIM];
    const hostQ = randomTensor(shape, context.seed);
    const hostK = randomTensor(shape, context.seed + 1);
    const hostV = randomTensor(shape, context.seed + 2);
    const [q, k, v] = [
      await backend.toDevice(hostQ),
      await backend.toDevice(hostK),
      await backend.toDevice(hostV),
    ];
    for (const causal of causalModes) {
      const softmax = softmaxRunner(device, q, k, v, causal);
      const softmaxTime = await measure(() => softmax.run(), { runs: context.runs, warmup: context.warmup });
      softmax.dispose();
      const pairs = causal ? (N * (N + 1)) / 2 : N * N;
      const softmaxFlops = batchHeads * pairs * 4 * HEAD_DIM;
      for (const order of orders) {
        progress.update(`N=${N} causal=${causal} p=${order}`);
        const options = { order, causal };
        const plan = fm.plan(q, k, v, options);
        const time = await measure(
          async () => {
            const result = await fm.attention(q, k, v, { ...options, output: 'device' });
            (result.output as WebGpuTensor).dispose();
          },
          { runs: context.runs, warmup: context.warmup },
        );
        if (N === sizes[0] && N <= 2048)
          failed = !(await checkAgainstOracle(fm, hostQ, hostK, hostV, options, io)) || failed;
        const flops = 2 * batchHeads * plan.cost[plan.path];
        const target = targetOf(N, order, causal, batchHeads);
        const faster = time.median < softmaxTime.median;
        rows.push({
          case: `p=${order}${causal ? ' causal' : ''}, ${plan.path}`,
          N,
          fastmaxMs: time.median,
          gflops: flops / time.median / 1e6,
          baseline: `softmax WGSL (${formatGflops(softmaxFlops / softmaxTime.median / 1e6)} GFLOP/s)`,
          baselineMs: softmaxTime.median,
          target: target.text,
          met:
            software || target.text === '-'
              ? null
              : faster && (target.limitMs === undefined || time.median < target.limitMs),
        });
        progress.tick();
      }
    }
    for (const tensor of [q, k, v]) tensor.dispose();
  }
  progress.done();
  println(io.stdout, formatBenchTable(rows));
  println(io.stdout, 'ratio: Fastmax time / softmax time (below 1: Fastmax is faster).');
  if (software)
    println(io.stdout, 'Software adapter: absolute times say nothing about a GPU; compare ratios only.');
  if (context.json) {
    const path = await writeJsonResult(context.backend, {
      adapter: adapterName,
      batchHeads,
      headDim: HEAD_DIM,
      rows,
    });
    println(io.stdout, `wrote ${path}`);
  }
  await fm.dispose();
  return failed ? EXIT_CHECK_FAILED : EXIT_OK;
}

/** The first size's first head against the float64 oracle, so a fast wrong kernel cannot pass. */
async function checkAgainstOracle(
  fm: Awaited<ReturnType<typeof createFastmax>>,
  q: HostTensor,
  k: HostTensor,
  v: HostTensor,
  options: { order: Order; causal: boolean },
  io: BenchContext['io'],
): Promise<boolean> {
  const [, , N, D] = q.shape;
  const head = (t: HostTensor): HostTensor => ({ shape: [1, 1, N, D], data: t.data.subarray(0, N * D) });
  const [hq, hk, hv] = [head(q), head(k), head(v)];
  const result = await fm.attention(hq, hk, hv, options);
  const want = referenceAttention(hq, hk, hv, options).output;
  const got = (result.output as HostTensor).data;
  let scale = 0;
  let worst = 0;
  for (let i = 0; i < want.length; i++) {
    scale = Math.max(scale, Math.abs(want[i]!));
    worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
  }
  const error = worst / Math.max(scale, 1e-30);
  // FORWARD_TOLERANCE of the conformance suite, for float32 kernels.
  if (error > 1e-4) {
    println(
      io.stderr,
      `check failed: N=${N} p=${options.order} causal=${options.causal}: relative error ${formatError(error)}`,
    );
    return false;
  }
  return true;
}
