import { cpuBackend } from '@fastmax/backend-cpu';
import {
  createFastmax,
  type Fastmax,
  type FastmaxOptions,
  type HostTensor,
  planAttention,
  resolveOptions,
  type Shape4,
  validateAttentionInputs,
} from '@fastmax/core';
import { referenceBackend } from '@fastmax/core/reference';
import { EXIT_OK } from '../args.js';
import type { BenchContext } from '../commands/bench.js';
import { println } from '../io.js';
import {
  type BenchRow,
  collectGarbage,
  createProgressBar,
  formatBenchTable,
  formatDuration,
  type Measurement,
  measure,
  measureInterleaved,
  median,
  writeJsonResult,
} from '../report.js';
import { randomTensor } from '../workload.js';

export const description = `Fastmax on the CPU backend (WebAssembly SIMD kernels on worker threads) against onnxruntime-node's
softmax attention (the faster, at each point, of the fused com.microsoft.MultiHeadAttention op and the
plain MatMul-Mul-Softmax-MatMul graph with an additive causal mask), core's float64 reference backend,
and tfjs-backend-wasm's 1024³ matMul as the WebAssembly SIMD throughput yardstick. B = H = 1,
D = Dv = 64 unless a row says otherwise. Each time is the median of --runs timed calls after
--warmup untimed ones (at least 10 for fastmax: each worker JIT-compiles on its first calls), all in
one process. Calls compared with each other are timed interleaved, call by call, and each
onnxruntime point is timed right before the fastmax calls compared with it (its sessions released
first), so that a host whose speed drifts during the run affects both sides alike. GFLOP/s counts 2 flops per multiply-add of the
planner's cost estimate for the path that ran (plan.cost). The --sizes, --causal and --order
flags are ignored: the rows are the fixed set of targets in docs/benchmarks.md.`;

export const flags = {
  threads: { type: 'string' },
  quick: { type: 'boolean' },
} as const;

export const flagHelp = `  --threads <n>        CPU backend threads for the multi-threaded rows (default: available cores)
  --quick              smaller sizes (N / 16) for a smoke run; the targets are not checked`;

const HEAD_DIM = 64;
const SETTLE_AFTER_RELEASE_MS = 10_000;
/** The plain graph materializes N×N scores, weights and (causal) mask: at most 4 GiB of them. */
const PLAIN_GRAPH_MAX_ELEMENTS = 2 ** 30;

const WIRE_VARINT = 0;
const WIRE_FIXED32 = 5;
const WIRE_BYTES = 2;

const FLOAT = 1;

class Writer {
  private readonly bytes: number[] = [];

  private varint(value: number): void {
    let v = value;
    while (v >= 0x80) {
      this.bytes.push((v % 0x80) | 0x80);
      v = Math.floor(v / 0x80);
    }
    this.bytes.push(v);
  }

  private tag(field: number, wire: number): void {
    this.varint(field * 8 + wire);
  }

  int(field: number, value: number): this {
    this.tag(field, WIRE_VARINT);
    this.varint(value);
    return this;
  }

  float(field: number, value: number): this {
    this.tag(field, WIRE_FIXED32);
    const buffer = new DataView(new ArrayBuffer(4));
    buffer.setFloat32(0, value, true);
    for (let i = 0; i < 4; i++) this.bytes.push(buffer.getUint8(i));
    return this;
  }

  string(field: number, value: string): this {
    return this.message(field, new TextEncoder().encode(value));
  }

  message(field: number, value: Uint8Array | Writer): this {
    const data = value instanceof Writer ? value.finish() : value;
    this.tag(field, WIRE_BYTES);
    this.varint(data.length);
    for (const byte of data) this.bytes.push(byte);
    return this;
  }

  finish(): Uint8Array {
    return Uint8Array.from(this.bytes);
  }
}

function valueInfo(name: string, dims: readonly number[]): Writer {
  const shape = new Writer();
  for (const dim of dims) shape.message(1, new Writer().int(1, dim));
  const tensorType = new Writer().int(1, FLOAT).message(2, shape);
  return new Writer().string(1, name).message(2, new Writer().message(1, tensorType));
}

interface NodeSpec {
  readonly op: string;
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
  readonly domain?: string;
  readonly ints?: Readonly<Record<string, number>>;
  readonly floats?: Readonly<Record<string, number>>;
}

function node(spec: NodeSpec): Writer {
  const w = new Writer();
  for (const input of spec.inputs) w.string(1, input);
  for (const output of spec.outputs) w.string(2, output);
  w.string(4, spec.op);
  if (spec.domain !== undefined) w.string(7, spec.domain);
  for (const [name, value] of Object.entries(spec.ints ?? {})) {
    w.message(5, new Writer().string(1, name).int(3, value).int(20, 2));
  }
  for (const [name, value] of Object.entries(spec.floats ?? {})) {
    w.message(5, new Writer().string(1, name).float(2, value).int(20, 1));
  }
  return w;
}

function scalarInitializer(name: string, value: number): Writer {
  return new Writer().int(2, FLOAT).float(4, value).string(8, name);
}

function model(
  nodes: readonly Writer[],
  inputs: readonly Writer[],
  outputs: readonly Writer[],
  initializers: readonly Writer[],
  microsoft: boolean,
): Uint8Array {
  const graph = new Writer();
  for (const n of nodes) graph.message(1, n);
  graph.string(2, 'attention');
  for (const init of initializers) graph.message(5, init);
  for (const input of inputs) graph.message(11, input);
  for (const output of outputs) graph.message(12, output);
  const w = new Writer().int(1, 8).string(2, 'fastmax-bench');
  w.message(8, new Writer().string(1, '').int(2, 17));
  if (microsoft) w.message(8, new Writer().string(1, 'com.microsoft').int(2, 1));
  return w.message(7, graph).finish();
}

/** q, k, v: [1, N, H·D]; output [1, N, H·Dv]; scale 1/sqrt(D). */
export function multiHeadAttentionModel(
  queryLength: number,
  keyLength: number,
  heads: number,
  headDim: number,
  causal: boolean,
): Uint8Array {
  const hidden = heads * headDim;
  return model(
    [
      node({
        op: 'MultiHeadAttention',
        domain: 'com.microsoft',
        inputs: ['q', 'k', 'v'],
        outputs: ['o'],
        ints: { num_heads: heads, unidirectional: causal ? 1 : 0 },
        floats: { scale: 1 / Math.sqrt(headDim) },
      }),
    ],
    [
      valueInfo('q', [1, queryLength, hidden]),
      valueInfo('k', [1, keyLength, hidden]),
      valueInfo('v', [1, keyLength, hidden]),
    ],
    [valueInfo('o', [1, queryLength, hidden])],
    [],
    true,
  );
}

/** q: [N, D], kT: [D, N], v: [N, Dv], mask (causal only): [N, N] additive; output [N, Dv]. */
export function plainAttentionModel(length: number, headDim: number, causal: boolean): Uint8Array {
  const nodes = [
    node({ op: 'MatMul', inputs: ['q', 'kT'], outputs: ['scores'] }),
    node({ op: 'Mul', inputs: ['scores', 'scale'], outputs: ['scaled'] }),
  ];
  let logits = 'scaled';
  if (causal) {
    nodes.push(node({ op: 'Add', inputs: ['scaled', 'mask'], outputs: ['masked'] }));
    logits = 'masked';
  }
  nodes.push(node({ op: 'Softmax', inputs: [logits], outputs: ['weights'], ints: { axis: 1 } }));
  nodes.push(node({ op: 'MatMul', inputs: ['weights', 'v'], outputs: ['o'] }));
  const inputs = [
    valueInfo('q', [length, headDim]),
    valueInfo('kT', [headDim, length]),
    valueInfo('v', [length, headDim]),
  ];
  if (causal) inputs.push(valueInfo('mask', [length, length]));
  return model(
    nodes,
    inputs,
    [valueInfo('o', [length, headDim])],
    [scalarInitializer('scale', 1 / Math.sqrt(headDim))],
    false,
  );
}

type Ort = typeof import('onnxruntime-node');

interface SoftmaxTiming {
  readonly ms: number;
  readonly kind: 'MultiHeadAttention' | 'plain graph';
  /** Written into a preallocated output tensor (`run(feeds, fetches)`) rather than a new one. */
  readonly preallocated: boolean;
  readonly all: Readonly<Record<string, number>>;
}

function transpose(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = data[r * cols + c]!;
  return out;
}

interface SoftmaxSession {
  readonly kind: SoftmaxTiming['kind'];
  readonly preallocated: boolean;
  run(): Promise<unknown>;
  release(): Promise<void>;
}

const kindLabel = (timing: { kind: string; preallocated: boolean }): string =>
  timing.preallocated ? `${timing.kind}, preallocated output` : timing.kind;

/**
 * onnxruntime-node's softmax attention for B = H = 1 at this N: the fused op and, where it fits,
 * the plain graph; with `preallocated`, each also writing into one output tensor reused across
 * calls (onnxruntime's fetches), the counterpart of fastmax's `options.out`.
 */
async function softmaxSessions(
  ort: Ort,
  inputs: { q: HostTensor; k: HostTensor; v: HostTensor },
  causal: boolean,
  threads: number,
  preallocated: boolean,
): Promise<SoftmaxSession[]> {
  const N = inputs.q.shape[2];
  const options = {
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all' as const,
  };
  const dims = [1, N, HEAD_DIM];
  const mha = await ort.InferenceSession.create(multiHeadAttentionModel(N, N, 1, HEAD_DIM, causal), options);
  const mhaFeeds = {
    q: new ort.Tensor('float32', inputs.q.data, dims),
    k: new ort.Tensor('float32', inputs.k.data, dims),
    v: new ort.Tensor('float32', inputs.v.data, dims),
  };
  // One reused output array, viewed with each graph's output shape.
  const outputData = preallocated ? new Float32Array(N * HEAD_DIM) : null;
  const sessions: SoftmaxSession[] = [
    {
      kind: 'MultiHeadAttention',
      preallocated: false,
      run: () => mha.run(mhaFeeds),
      release: () => mha.release(),
    },
  ];
  const released = async (): Promise<void> => {};
  if (outputData !== null) {
    const output = new ort.Tensor('float32', outputData, dims);
    sessions.push({
      kind: 'MultiHeadAttention',
      preallocated: true,
      run: () => mha.run(mhaFeeds, { o: output }),
      release: released,
    });
  }
  if (N * N * (causal ? 3 : 2) <= PLAIN_GRAPH_MAX_ELEMENTS) {
    const plain = await ort.InferenceSession.create(plainAttentionModel(N, HEAD_DIM, causal), options);
    const feeds: Record<string, InstanceType<Ort['Tensor']>> = {
      q: new ort.Tensor('float32', inputs.q.data, [N, HEAD_DIM]),
      kT: new ort.Tensor('float32', transpose(inputs.k.data, N, HEAD_DIM), [HEAD_DIM, N]),
      v: new ort.Tensor('float32', inputs.v.data, [N, HEAD_DIM]),
    };
    if (causal) {
      const mask = new Float32Array(N * N);
      for (let i = 0; i < N; i++) mask.fill(-1e30, i * N + i + 1, (i + 1) * N);
      feeds.mask = new ort.Tensor('float32', mask, [N, N]);
    }
    sessions.push({
      kind: 'plain graph',
      preallocated: false,
      run: () => plain.run(feeds),
      release: () => plain.release(),
    });
    if (outputData !== null) {
      const matrixOutput = new ort.Tensor('float32', outputData, [N, HEAD_DIM]);
      sessions.push({
        kind: 'plain graph',
        preallocated: true,
        run: () => plain.run(feeds, { o: matrixOutput }),
        release: released,
      });
    }
  }
  return sessions;
}

/**
 * onnxruntime's softmax sessions (timed interleaved with each other, after `context.warmup` calls
 * each), released, then at once the given fastmax calls (interleaved with each other, after
 * `fastmaxWarmup` calls each; `laterCalls` the same way right after them): both sides within
 * seconds of each other, so that a host whose speed drifts on a scale of minutes affects them
 * alike. They are not interleaved with each other: with the plain graph's session alive (about 5 GB
 * at N = 16384) the same fastmax call ran 10 to 15% slower on this virtual machine, measured, and no
 * application holds both. Returns onnxruntime's best (the faster session at this point, among those
 * allocating their output and among those writing into a preallocated one) and the fastmax medians,
 * in the order given.
 */
async function timeBesideSoftmax(
  ort: Ort,
  inputs: { q: HostTensor; k: HostTensor; v: HostTensor },
  causal: boolean,
  threads: number,
  context: BenchContext,
  fastmaxCalls: readonly (() => Promise<unknown>)[],
  fastmaxWarmup: number,
  laterCalls: readonly (() => Promise<unknown>)[] = [],
): Promise<{
  softmax: SoftmaxTiming;
  softmaxPreallocated: SoftmaxTiming | null;
  fastmax: number[];
  fastmaxRuns: (readonly number[])[];
}> {
  const sessions = await softmaxSessions(ort, inputs, causal, threads, laterCalls.length > 0);
  let softmax: { kind: SoftmaxTiming['kind']; preallocated: boolean; ms: number }[];
  try {
    const measured = await measureInterleaved(
      sessions.map((session) => () => session.run()),
      { runs: context.runs, warmup: context.warmup },
    );
    softmax = sessions.map((session, i) => ({
      kind: session.kind,
      preallocated: session.preallocated,
      ms: measured[i]!.median,
    }));
  } finally {
    for (const session of sessions) await session.release();
    sessions.length = 0;
  }
  // The plain graph's inputs (a 1 GiB causal mask) and buffers are garbage now. Left to the
  // collector, they were freed during the first fastmax calls, which then took 170 to 200 ms
  // instead of 120 at p = 2, N = 16384. Collected here, they are not; but for about 10 s after such
  // a release this virtual machine still stalls periodically (every ~2.3 s, a call of 120 ms took
  // 180 to 220), so the fastmax calls wait that out.
  collectGarbage();
  await new Promise((resolve) => setTimeout(resolve, SETTLE_AFTER_RELEASE_MS));
  const fastmax = await measureInterleaved(fastmaxCalls, { runs: context.runs, warmup: fastmaxWarmup });
  if (laterCalls.length > 0)
    fastmax.push(...(await measureInterleaved(laterCalls, { runs: context.runs, warmup: fastmaxWarmup })));
  const all = Object.fromEntries(softmax.map((t) => [kindLabel(t), t.ms]));
  const bestOf = (timings: typeof softmax): SoftmaxTiming | null =>
    timings.length === 0 ? null : { ...timings.reduce((a, b) => (b.ms < a.ms ? b : a)), all };
  return {
    softmax: bestOf(softmax.filter((t) => !t.preallocated))!,
    softmaxPreallocated: bestOf(softmax.filter((t) => t.preallocated)),
    fastmax: fastmax.map((m) => m.median),
    fastmaxRuns: fastmax.map((m) => m.runs),
  };
}

function inputsOf(N: number, seed: number, heads = 1): { q: HostTensor; k: HostTensor; v: HostTensor } {
  const shape: Shape4 = [1, heads, N, HEAD_DIM];
  return { q: randomTensor(shape, seed), k: randomTensor(shape, seed + 1), v: randomTensor(shape, seed + 2) };
}

/** 2 flops per multiply-add of the planner's estimate for the path it picks. */
function usefulFlops(
  inputs: { q: HostTensor; k: HostTensor; v: HostTensor },
  options: FastmaxOptions,
): number {
  const resolved = resolveOptions(options);
  const shape = validateAttentionInputs(inputs.q, inputs.k, inputs.v, resolved);
  const plan = planAttention(shape, resolved);
  const heads = shape.batch * shape.heads;
  return 2 * heads * (plan.path === 'factorized' ? plan.cost.factorized : plan.cost.direct);
}

/** The unit of first-touch page faults. */
const PAGE_BYTES = 4096;

/**
 * Microseconds per 4 KiB page for the first write to memory the system has just handed out: the
 * cost every new output array pays when the allocator takes it fresh from the system rather than
 * recycling freed memory (docs/benchmarks.md, "What limits"). A 64 MiB buffer is above glibc's
 * largest mmap threshold (32 MiB), so it is always a fresh mapping; median of three.
 */
function firstTouchMicrosPerPage(): number {
  const bytes = 64 * 2 ** 20;
  const times: number[] = [];
  for (let round = 0; round < 3; round++) {
    const memory = new Uint8Array(bytes);
    const start = performance.now();
    for (let offset = 0; offset < bytes; offset += PAGE_BYTES) memory[offset] = 1;
    times.push(((performance.now() - start) * 1000) / (bytes / PAGE_BYTES));
  }
  return median(times);
}

async function tfjsMatMulGflops(context: BenchContext): Promise<number> {
  const tf = await import('@tensorflow/tfjs-core');
  await import('@tensorflow/tfjs-backend-wasm');
  await tf.setBackend('wasm');
  await tf.ready();
  const size = 1024;
  const a = tf.randomNormal([size, size]);
  const b = tf.randomNormal([size, size]);
  const time = await measure(
    async () => {
      const c = tf.matMul(a, b);
      await c.data();
      c.dispose();
    },
    { runs: Math.max(context.runs, 9), warmup: Math.max(context.warmup, 2) },
  );
  a.dispose();
  b.dispose();
  return (2 * size ** 3) / (time.median * 1e6);
}

export async function run(context: BenchContext): Promise<number> {
  const { io } = context;
  const quick = context.flags.quick === true;
  const scale = quick ? 16 : 1;
  const threadsFlag = typeof context.flags.threads === 'string' ? Number(context.flags.threads) : undefined;
  const many = cpuBackend(threadsFlag === undefined ? {} : { threads: threadsFlag });
  const one = cpuBackend({ threads: 1 });
  const fm = await createFastmax({ backend: many });
  const fm1 = await createFastmax({ backend: one });
  const threads = await many.threadCount();
  const ort = (await import('onnxruntime-node')) as Ort;
  // Each worker compiles the engine's JavaScript, and V8 tiers the WebAssembly up in the background,
  // during the first calls: from a fresh pool, p = 2 causal at N = 16384 took 340, 196, 166, 138 and
  // 136 ms on its first five calls, then 125 to 135. fastmax gets at least 10 untimed calls, the
  // baselines --warmup.
  const timing = { runs: context.runs, warmup: Math.max(context.warmup, 10) };
  const rows: BenchRow[] = [];
  const details: Record<string, unknown> = {};
  const progress = createProgressBar(12, { stream: io.stderr });
  const n16 = 16384 / scale;
  const n64 = 65536 / scale;
  const check = (ok: boolean): boolean | null => (quick ? null : ok);

  // A row against onnxruntime's best softmax time: the target is fastmax at most 1/`share` of it,
  // or strictly faster.
  const versusOnnxruntime = (
    label: string,
    inputs: ReturnType<typeof inputsOf>,
    options: FastmaxOptions,
    ms: number,
    softmax: SoftmaxTiming,
    share: number | 'faster',
  ): BenchRow => ({
    case: label,
    N: inputs.q.shape[2],
    fastmaxMs: ms,
    baselineMs: softmax.ms,
    baseline: `onnxruntime ${kindLabel(softmax)}`,
    gflops: usefulFlops(inputs, options) / (ms * 1e6),
    target: share === 'faster' ? 'faster than onnxruntime' : `<= 1/${share} of onnxruntime`,
    met: check(share === 'faster' ? ms < softmax.ms : ms * share <= softmax.ms),
  });

  const time = async (instance: Fastmax, inputs: ReturnType<typeof inputsOf>, options: FastmaxOptions) =>
    (await measure(() => instance.attention(inputs.q, inputs.k, inputs.v, options), timing)).median;

  progress.update('tfjs-wasm matMul 1024³');
  const tfjsGflops = await tfjsMatMulGflops(context);
  details.tfjsMatMulGflops = tfjsGflops;
  const pageMicros = firstTouchMicrosPerPage();
  const outputPages16 = (n16 * HEAD_DIM * 4) / PAGE_BYTES;
  details.firstTouchMicrosPerPage = pageMicros;
  progress.tick();

  const attend = (instance: Fastmax, inputs: ReturnType<typeof inputsOf>, options: FastmaxOptions) => () =>
    instance.attention(inputs.q, inputs.k, inputs.v, options);
  const causal2 = { order: 2, causal: true } as const;
  const plain2 = { order: 2, causal: false } as const;
  const causal1 = { order: 1, causal: true } as const;

  // p = 2 and p = 1 causal at N = 16384 share onnxruntime's causal time (it does not depend on p).
  const in16 = inputsOf(n16, context.seed);
  progress.update(`onnxruntime and fastmax causal N = ${n16}`);
  // Each side twice: allocating a new output per call, and writing into one reused across calls
  // (fastmax's options.out, onnxruntime's preallocated fetches): on this virtual machine a new
  // output's pages cost a page fault each on first touch, 12 to 13 ms per 4 MiB, as much as a
  // whole p = 1 call. The reusing calls run after the allocating ones, not between them, where the
  // collections of the others' dropped outputs would slow them too.
  const reused2 = { ...causal2, out: new Float32Array(n16 * HEAD_DIM) };
  const reused1 = { ...causal1, out: new Float32Array(n16 * HEAD_DIM) };
  const {
    softmax: ortCausal16,
    softmaxPreallocated: ortCausal16Into,
    fastmax: [causal16, p1, causal16Into, p1Into],
    fastmaxRuns: causalRuns16,
  } = await timeBesideSoftmax(
    ort,
    in16,
    true,
    threads,
    context,
    [attend(fm, in16, causal2), attend(fm, in16, causal1)],
    timing.warmup,
    [attend(fm, in16, reused2), attend(fm, in16, reused1)],
  );
  progress.tick();
  progress.update(`onnxruntime and fastmax non-causal N = ${n16}`);
  const {
    softmax: ortPlain16,
    fastmax: [plain16],
  } = await timeBesideSoftmax(ort, in16, false, threads, context, [attend(fm, in16, plain2)], timing.warmup);
  progress.tick();
  details.onnxruntime = { [`causal N=${n16}`]: ortCausal16.all, [`non-causal N=${n16}`]: ortPlain16.all };
  // Every timed call of the causal pair, in order: the medians hide how a call's time depends on
  // whether its output's pages come fresh from the system (docs/benchmarks.md).
  details.causalRuns = {
    [`p=2 N=${n16}`]: causalRuns16[0],
    [`p=1 N=${n16}`]: causalRuns16[1],
    [`p=2 N=${n16} into options.out`]: causalRuns16[2],
    [`p=1 N=${n16} into options.out`]: causalRuns16[3],
  };
  rows.push(versusOnnxruntime('p=2 causal forward', in16, causal2, causal16!, ortCausal16, 3));
  rows.push(versusOnnxruntime('p=2 non-causal forward', in16, plain2, plain16!, ortPlain16, 'faster'));
  rows.push(versusOnnxruntime('p=1 causal forward', in16, causal1, p1!, ortCausal16, 30));
  rows.push(
    versusOnnxruntime('p=2 causal forward, into out', in16, causal2, causal16Into!, ortCausal16Into!, 3),
  );
  rows.push(versusOnnxruntime('p=1 causal forward, into out', in16, causal1, p1Into!, ortCausal16Into!, 30));
  progress.tick();

  progress.update('fastmax backward N = 16384');
  // Ratios between fastmax calls are timed interleaved (measureInterleaved), call by call, so that
  // a machine whose speed drifts during the run (shared cores) affects both sides alike.
  const dOut = randomTensor([1, 1, n16, HEAD_DIM], context.seed + 7);
  const [forwardBeside, backward16, backward16One] = await measureInterleaved(
    [
      () => fm.attention(in16.q, in16.k, in16.v, causal2),
      () => fm.backward(in16.q, in16.k, in16.v, dOut, causal2),
      () => fm1.backward(in16.q, in16.k, in16.v, dOut, causal2),
    ],
    timing,
  );
  rows.push({
    case: 'p=2 causal backward',
    N: n16,
    fastmaxMs: backward16!.median,
    baselineMs: forwardBeside!.median,
    baseline: 'fastmax forward',
    target: '<= 3x the forward',
    met: check(backward16!.median <= 3 * forwardBeside!.median),
  });
  rows.push({
    case: `p=2 causal backward, ${threads} threads vs 1`,
    N: n16,
    fastmaxMs: backward16!.median,
    baselineMs: backward16One!.median,
    baseline: 'fastmax backward, 1 thread',
    target: '(context)',
    met: null,
  });

  // The p = 1 backward, causal (split by queries) and non-causal (split by sequence), and into
  // reused gradient arrays (options.gradientsOut), each beside its own forward.
  progress.update('fastmax p = 1 backward N = 16384');
  const plain1 = { order: 1, causal: false } as const;
  const gradientsOut = {
    dq: new Float32Array(n16 * HEAD_DIM),
    dk: new Float32Array(n16 * HEAD_DIM),
    dv: new Float32Array(n16 * HEAD_DIM),
  };
  const [p1Forward, p1Backward, p1BackwardInto, p1PlainForward, p1PlainBackward] = await measureInterleaved(
    [
      () => fm.attention(in16.q, in16.k, in16.v, causal1),
      () => fm.backward(in16.q, in16.k, in16.v, dOut, causal1),
      () => fm.backward(in16.q, in16.k, in16.v, dOut, { ...causal1, gradientsOut }),
      () => fm.attention(in16.q, in16.k, in16.v, plain1),
      () => fm.backward(in16.q, in16.k, in16.v, dOut, plain1),
    ],
    timing,
  );
  const besideForward = (label: string, backward: Measurement, forward: Measurement, baseline: string) =>
    rows.push({
      case: label,
      N: n16,
      fastmaxMs: backward.median,
      baselineMs: forward.median,
      baseline,
      target: '(context)',
      met: null,
    });
  besideForward('p=1 causal backward', p1Backward!, p1Forward!, 'fastmax forward');
  besideForward(
    'p=1 causal backward, into gradientsOut',
    p1BackwardInto!,
    p1Backward!,
    'fastmax backward, new arrays',
  );
  besideForward('p=1 non-causal backward', p1PlainBackward!, p1PlainForward!, 'fastmax forward');
  progress.tick();

  const in64 = inputsOf(n64, context.seed + 3);
  progress.update(`onnxruntime and fastmax non-causal N = ${n64}, ${threads} threads and 1`);
  const {
    softmax: ortPlain64,
    fastmax: [plain64, plain64One],
  } = await timeBesideSoftmax(
    ort,
    in64,
    false,
    threads,
    context,
    [attend(fm, in64, plain2), attend(fm1, in64, plain2)],
    timing.warmup,
  );
  details.onnxruntime = { ...(details.onnxruntime as object), [`non-causal N=${n64}`]: ortPlain64.all };
  progress.tick();
  progress.update(`fastmax causal N = ${n64}, ${threads} threads and 1`);
  const [causal64, causal64One, causal16Beside] = (
    await measureInterleaved(
      [attend(fm, in64, causal2), attend(fm1, in64, causal2), attend(fm, in16, causal2)],
      timing,
    )
  ).map((m) => m.median) as [number, number, number];
  const plainFlops64 = usefulFlops(in64, plain2);
  rows.push(versusOnnxruntime('p=2 non-causal forward', in64, plain2, plain64!, ortPlain64, 4));
  const causalFlops64 = usefulFlops(in64, causal2);
  rows.push({
    case: 'p=2 causal forward',
    N: n64,
    fastmaxMs: causal64,
    baselineMs: causal16Beside,
    baseline: `fastmax at N = ${n16}`,
    gflops: causalFlops64 / (causal64 * 1e6),
    target: 't(4N)/t(N) <= 4.5',
    met: check(causal64 / causal16Beside <= 4.5),
  });
  progress.tick();

  for (const [label, ms, flops, multi] of [
    ['p=2 non-causal forward, 1 thread', plain64One!, plainFlops64, plain64!],
    ['p=2 causal forward, 1 thread', causal64One, causalFlops64, causal64],
  ] as const) {
    const gflops = flops / (ms * 1e6);
    rows.push({
      case: label,
      N: n64,
      fastmaxMs: ms,
      baseline: `tfjs-wasm matMul ${tfjsGflops.toFixed(1)} GFLOP/s`,
      gflops,
      target: '>= 60% of tfjs-wasm GFLOP/s',
      met: check(gflops >= 0.6 * tfjsGflops),
    });
    rows.push({
      case: label.replace('1 thread', `${threads} threads vs 1`),
      N: n64,
      fastmaxMs: multi,
      baselineMs: ms,
      baseline: 'fastmax, 1 thread',
      gflops: flops / (multi * 1e6),
      target: threads >= 2 ? '>= 1.7x one thread' : '(one core: not checked)',
      met: threads >= 2 ? check(ms / multi >= 1.7) : null,
    });
  }
  progress.tick();

  progress.update('reference backend');
  const reference = await createFastmax({ backend: referenceBackend() });
  const nRef = 2048 / (quick ? 4 : 1);
  const inRef = inputsOf(nRef, context.seed + 5);
  for (const options of [causal2, plain2]) {
    const refMs = (
      await measure(() => reference.attention(inRef.q, inRef.k, inRef.v, options), {
        runs: context.runs,
        warmup: Math.min(context.warmup, 1),
      })
    ).median;
    const cpuMs = await time(fm, inRef, options);
    rows.push({
      case: `p=2 ${options.causal ? 'causal' : 'non-causal'} forward`,
      N: nRef,
      fastmaxMs: cpuMs,
      baselineMs: refMs,
      baseline: 'reference backend (float64 JS)',
      gflops: usefulFlops(inRef, options) / (cpuMs * 1e6),
      target: '(context)',
      met: null,
    });
  }
  await reference.dispose();
  progress.tick();

  progress.update('decoding');
  const decodeHeads = 8;
  const state = await fm.createState({ batch: 1, heads: decodeHeads, headDim: HEAD_DIM, order: 2 });
  const decodeRows: { context: number; ms: number }[] = [];
  const fill = 4096;
  for (const target of quick ? [1000, 4000] : [1000, 10000, 100000]) {
    while (state.tokens < target) {
      const T = Math.min(fill, target - state.tokens);
      const x = randomTensor([1, decodeHeads, T, HEAD_DIM], state.tokens + 11);
      await state.step(x, x, x);
    }
    const token = inputsOf(1, target, decodeHeads);
    // Each timed step appends a token; a few dozen out of 10^3..10^5 do not change the context.
    const ms = (await measure(() => state.step(token.q, token.k, token.v), { runs: 21, warmup: 20 })).median;
    decodeRows.push({ context: target, ms });
  }
  state.dispose();
  // Flat: the step at the longest context costs at most 1.5x the step at the shortest.
  const shortest = decodeRows[0]!.ms;
  for (const r of decodeRows) {
    rows.push({
      case: `decode step, H = ${decodeHeads}, p=2`,
      N: r.context,
      fastmaxMs: r.ms,
      baselineMs: shortest,
      baseline: `step at ${decodeRows[0]!.context} tokens`,
      target: '<= 2 ms, flat in context',
      met: check(r.ms <= 2 && r.ms <= 1.5 * shortest),
    });
  }
  progress.tick();
  progress.done();

  await fm.dispose();
  await fm1.dispose();

  println(
    io.stdout,
    `CPU backend: ${threads} thread${threads === 1 ? '' : 's'}; onnxruntime-node intra-op threads: ${threads}; ` +
      `tfjs-wasm matMul 1024³: ${tfjsGflops.toFixed(1)} GFLOP/s; first touch of new memory: ` +
      `${pageMicros.toFixed(1)} µs per 4 KiB page (${formatDuration((pageMicros * outputPages16) / 1000)} ` +
      `for an N = ${n16} output); D = Dv = ${HEAD_DIM}, B = H = 1 unless stated`,
  );
  println(io.stdout, formatBenchTable(rows));
  if (context.json) {
    const path = await writeJsonResult('cpu', { threads, quick, rows, details, decode: decodeRows });
    println(io.stdout, `wrote ${path}`);
  }
  return EXIT_OK;
}
