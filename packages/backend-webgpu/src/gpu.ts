/**
 * Finding a GPUDevice: the user's, the browser's `navigator.gpu`, or dawn.node through the optional
 * `webgpu` package. Flag values are spelled out because Node has no `GPUBufferUsage` global unless
 * someone installs dawn's globals, and installing them would be a side effect.
 */
export const BufferUsage = {
  MAP_READ: 0x1,
  COPY_SRC: 0x4,
  COPY_DST: 0x8,
  UNIFORM: 0x40,
  STORAGE: 0x80,
} as const;
export const MapMode = { READ: 0x1 } as const;

/**
 * dawn.node's GPU object must stay referenced for the life of the process: collecting it crashes
 * the process. A module variable is not enough where modules are re-evaluated (test isolation), so
 * the holder lives on globalThis, set on first use only.
 */
const DAWN_HOLDER = Symbol.for('@fastmax/backend-webgpu:dawn-gpu');

async function dawnNode(): Promise<GPU | string> {
  const holder = globalThis as { [DAWN_HOLDER]?: GPU };
  const held = holder[DAWN_HOLDER];
  if (held !== undefined) return held;
  let module: { create(flags: string[]): GPU };
  try {
    // A variable specifier keeps bundlers from pulling the native module into browser builds.
    const specifier = 'webgpu';
    module = (await import(/* @vite-ignore */ specifier)) as { create(flags: string[]): GPU };
  } catch (error) {
    return `no navigator.gpu, and the optional 'webgpu' package (dawn.node) could not be loaded: ${String(error)}`;
  }
  const gpu = module.create([]);
  holder[DAWN_HOLDER] = gpu;
  return gpu;
}

/** The WebGPU entry point of this environment, or why there is none. */
export async function findGpu(): Promise<GPU | string> {
  const nav = (globalThis as { navigator?: { gpu?: GPU } }).navigator;
  if (nav?.gpu !== undefined) return nav.gpu;
  return dawnNode();
}

export interface AcquiredDevice {
  readonly device: GPUDevice;
  readonly adapterDescription: string;
}

/** Requests an adapter and a device with the adapter's full limits; returns the reason on failure. */
export async function acquireDevice(
  powerPreference: GPUPowerPreference | undefined,
  fallbackAdapter: 'allow' | 'reject' = 'allow',
): Promise<AcquiredDevice | string> {
  const gpu = await findGpu();
  if (typeof gpu === 'string') return gpu;
  let adapter: GPUAdapter | null;
  try {
    adapter = await gpu.requestAdapter(powerPreference === undefined ? {} : { powerPreference });
  } catch (error) {
    return `requestAdapter() failed: ${String(error)}`;
  }
  if (adapter === null) {
    return 'requestAdapter() returned null: no WebGPU adapter (install a GPU driver or Mesa lavapipe >= 23 with a Vulkan loader)';
  }
  // `isFallbackAdapter` moved from the adapter to adapter.info in the spec; read both.
  const fallback =
    (adapter.info as { isFallbackAdapter?: boolean } | undefined)?.isFallbackAdapter ??
    (adapter as { isFallbackAdapter?: boolean }).isFallbackAdapter ??
    false;
  if (fallback && fallbackAdapter === 'reject') {
    return `only a software (fallback) adapter is available (${adapter.info?.description || 'unknown'}), and fallbackAdapter is 'reject'`;
  }
  const wanted: (keyof GPUSupportedLimits)[] = [
    'maxStorageBufferBindingSize',
    'maxBufferSize',
    'maxComputeWorkgroupStorageSize',
    'maxComputeInvocationsPerWorkgroup',
    'maxComputeWorkgroupsPerDimension',
    'maxStorageBuffersPerShaderStage',
  ];
  const requiredLimits: Record<string, number> = {};
  for (const name of wanted) {
    const value = adapter.limits[name];
    if (typeof value === 'number') requiredLimits[name] = value;
  }
  try {
    // float16 storage needs shader-f16; compute stays float32 either way.
    const requiredFeatures: GPUFeatureName[] = adapter.features.has('shader-f16') ? ['shader-f16'] : [];
    const device = await adapter.requestDevice({ requiredLimits, requiredFeatures });
    const info = adapter.info;
    const description = [info?.vendor, info?.architecture, info?.device, info?.description]
      .filter((part) => typeof part === 'string' && part.length > 0)
      .join(' ');
    return { device, adapterDescription: description || 'unknown adapter' };
  } catch (error) {
    return `requestDevice() failed: ${String(error)}`;
  }
}
