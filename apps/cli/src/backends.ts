import type { FastmaxBackend, SkippedBackend } from '@fastmax/core';
import { UsageError } from './args.js';

/** How a backend was picked: by name (`--backend`), or as one candidate of the automatic list. */
export interface BackendSelection {
  readonly named: boolean;
}

/** One backend the CLI knows how to build. */
export interface BackendFactory {
  /** What `--backend <name>` matches. */
  readonly name: string;
  /** One line for `--help`. */
  readonly summary: string;
  /**
   * Largest per-row relative error `fastmax demo` accepts against the float64 oracle: the backend's
   * documented accuracy on the demo workload (see docs/math.md), not a number tuned until it passes.
   */
  readonly tolerance: number;
  /**
   * Builds the backend. The package is imported here, not at the top of the file, so a backend
   * whose module cannot load on this machine (a missing native binary) is skipped with the reason
   * instead of taking the whole CLI down.
   */
  create(selection: BackendSelection): Promise<FastmaxBackend>;
}

/**
 * Every backend, fastest first: `createFastmax` takes the first available one. Adding a backend is
 * one entry here, with its package imported inside `create`.
 */
const BACKENDS: readonly BackendFactory[] = [
  {
    name: 'webgpu',
    summary:
      'WGSL kernels on WebGPU (dawn.node in Node through the optional webgpu package; GPU or lavapipe)',
    // float32 kernels: the conformance suite's FORWARD_TOLERANCE (see packages/conformance/src/compare.ts).
    tolerance: 1e-4,
    // In the automatic list a software adapter (lavapipe, SwiftShader) does not count: the CPU
    // backend is much faster than WebGPU emulated on the CPU. `--backend webgpu` still takes one.
    create: async ({ named }) =>
      (await import('@fastmax/backend-webgpu')).webgpuBackend(named ? {} : { fallbackAdapter: 'reject' }),
  },
  {
    name: 'cpu',
    summary: 'WebAssembly SIMD kernels on worker threads (Node worker_threads or Web Workers)',
    // float32 kernels: the conformance suite's FORWARD_TOLERANCE (see packages/conformance/src/compare.ts).
    tolerance: 1e-4,
    create: async () => (await import('@fastmax/backend-cpu')).cpuBackend(),
  },
  {
    name: 'reference',
    summary: 'float64 JavaScript from @fastmax/core/reference: readable, exact, slow',
    // Accumulates in float64; the only loss is rounding the output to float32 (2^-24 relative).
    tolerance: 1e-6,
    create: async () => (await import('@fastmax/core/reference')).referenceBackend(),
  },
];

export function backendNames(): string[] {
  return BACKENDS.map((backend) => backend.name);
}

/**
 * The backend factories in order of preference; with `names`, only those, in the order given.
 * An unknown name is a usage error that lists the known ones. `from` replaces the built-in list
 * (tests use it).
 */
export function availableBackends(
  names?: readonly string[],
  from: readonly BackendFactory[] = BACKENDS,
): BackendFactory[] {
  if (names === undefined) return [...from];
  return names.map((name) => {
    const factory = from.find((backend) => backend.name === name);
    if (factory === undefined) {
      throw new UsageError(`unknown backend '${name}' (known: ${from.map((f) => f.name).join(', ')})`);
    }
    return factory;
  });
}

export interface LoadedBackend {
  readonly factory: BackendFactory;
  readonly backend: FastmaxBackend;
}

export interface LoadedBackends {
  /** In the order of the factories, ready for `createFastmax({ backend: loaded.map((l) => l.backend) })`. */
  readonly loaded: LoadedBackend[];
  /** Factories whose module failed to load, with the error. */
  readonly failed: SkippedBackend[];
}

/** Builds each backend; one that fails to load is reported, not thrown. */
export async function loadBackends(
  factories: readonly BackendFactory[],
  selection: BackendSelection = { named: false },
): Promise<LoadedBackends> {
  const loaded: LoadedBackend[] = [];
  const failed: SkippedBackend[] = [];
  for (const factory of factories) {
    try {
      loaded.push({ factory, backend: await factory.create(selection) });
    } catch (error) {
      const reason = error instanceof Error ? error.message : String(error);
      failed.push({ name: factory.name, reason: `could not load: ${reason}` });
    }
  }
  return { loaded, failed };
}
