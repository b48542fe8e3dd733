/**
 * A small WGSL builder in the style of onnxruntime-web's WebGPU ops: each program declares its
 * uniforms (one struct, shapes as values so one pipeline serves every size), its storage bindings
 * and its workgroup size, and gets the declarations and index helpers generated here. The program
 * key names everything that changes the WGSL text; pipelines are cached under it.
 */
export type ScalarType = 'u32' | 'f32' | 'i32';

export interface UniformField {
  readonly name: string;
  readonly type: ScalarType;
}

export interface StorageBinding {
  readonly name: string;
  readonly access: 'read' | 'read_write';
  /** Element type; `atomic<u32>` for counters, `f16` only in programs that enable it. */
  readonly element: 'f32' | 'f16' | 'u32' | 'atomic<u32>';
}

export interface ProgramInfo {
  /** Unique per distinct WGSL text: the kernel name and every compile-time constant. */
  readonly key: string;
  readonly uniforms: readonly UniformField[];
  readonly bindings: readonly StorageBinding[];
  readonly workgroupSize: readonly [number, number, number];
  /** WGSL extensions, e.g. `f16` (the device must have the matching feature). */
  readonly enables?: readonly string[];
  /** Module-scope declarations (workgroup arrays, helper functions). */
  readonly declarations?: string;
  /** Body of `main`; sees `lid`, `wid` (with the split offsets added as `group`) and `u`. */
  readonly body: string;
}

/**
 * Every dispatch may be split along x, y and z when it exceeds maxComputeWorkgroupsPerDimension, so
 * every program receives the offsets of its slice and the full grid width.
 */
export const DISPATCH_FIELDS: readonly UniformField[] = [
  { name: 'offsetX', type: 'u32' },
  { name: 'offsetY', type: 'u32' },
  { name: 'offsetZ', type: 'u32' },
  { name: 'gridX', type: 'u32' },
];

export function uniformFields(program: ProgramInfo): UniformField[] {
  return [...DISPATCH_FIELDS, ...program.uniforms];
}

export function buildShader(program: ProgramInfo): string {
  const fields = uniformFields(program);
  const struct = `struct Params {\n${fields.map((f) => `  ${f.name}: ${f.type},`).join('\n')}\n};`;
  const uniforms = `@group(0) @binding(0) var<uniform> u: Params;`;
  const storage = program.bindings
    .map((b, i) => `@group(0) @binding(${i + 1}) var<storage, ${b.access}> ${b.name}: array<${b.element}>;`)
    .join('\n');
  const [x, y, z] = program.workgroupSize;
  const enables = (program.enables ?? []).map((name) => `enable ${name};\n`).join('');
  return `${enables}${struct}
${uniforms}
${storage}
${program.declarations ?? ''}
@compute @workgroup_size(${x}, ${y}, ${z})
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let group = vec3<u32>(wid.x + u.offsetX, wid.y + u.offsetY, wid.z + u.offsetZ);
${program.body}
}
`;
}

/** Packs uniform values in declaration order (every field is 4 bytes; the struct is 16-byte padded). */
export function packUniforms(
  fields: readonly UniformField[],
  values: Readonly<Record<string, number>>,
): ArrayBuffer {
  const bytes = Math.max(16, Math.ceil((fields.length * 4) / 16) * 16);
  const buffer = new ArrayBuffer(bytes);
  const view = new DataView(buffer);
  fields.forEach((field, index) => {
    const value = values[field.name];
    if (value === undefined) throw new Error(`uniform ${field.name} has no value`);
    if (field.type === 'f32') view.setFloat32(index * 4, value, true);
    else if (field.type === 'i32') view.setInt32(index * 4, value, true);
    else view.setUint32(index * 4, value, true);
  });
  return buffer;
}

/** Linear invocation index of a 1-D problem laid over a 2-D grid (x wraps at gridX workgroups). */
export function linearIndex(threadsPerGroup: number): string {
  return `(group.y * u.gridX + group.x) * ${threadsPerGroup}u + lid.x`;
}

/** f(s) = Σ a_l s^l by Horner, and its derivative; coefficients a0..a4 are uniforms. */
export const POLYNOMIAL_UNIFORMS: readonly UniformField[] = [0, 1, 2, 3, 4].map((l) => ({
  name: `a${l}`,
  type: 'f32' as const,
}));

export function polynomialHelpers(order: number): string {
  let value = `u.a${order}`;
  for (let l = order - 1; l >= 0; l--) value = `(${value} * s + u.a${l})`;
  let slope = order >= 1 ? `${order}.0 * u.a${order}` : '0.0';
  for (let l = order - 1; l >= 1; l--) slope = `(${slope} * s + ${l}.0 * u.a${l})`;
  const powers = Array.from({ length: order + 1 }, (_, l) => `u.a${l}`).join(', ');
  return `
fn poly(s: f32) -> f32 { return ${value}; }
fn polySlope(s: f32) -> f32 { return ${slope}; }
fn coefficient(l: u32) -> f32 { var a = array<f32, ${order + 1}>(${powers}); return a[l]; }
`;
}

/**
 * keyLimit of core's validate.ts: one past the last key query i may see. `causal`, N and M are
 * uniforms; `valid` is the unit's count of non-padded keys.
 */
export const KEY_LIMIT_UNIFORMS: readonly UniformField[] = [
  { name: 'N', type: 'u32' },
  { name: 'M', type: 'u32' },
  { name: 'causal', type: 'u32' },
];

export const KEY_LIMIT_HELPER = `
fn keyLimit(i: u32, valid: u32) -> u32 {
  if (u.causal == 0u) { return valid; }
  let reach = i32(i) + i32(u.M) - i32(u.N) + 1;
  return u32(clamp(reach, 0, i32(valid)));
}
`;

/**
 * A monomial feature x^m of a packed multiset m (up to four 8-bit indices, lowest byte first), read
 * from `source` at `base`; `degree` factors. Generated inline: WGSL cannot pass storage pointers.
 */
export function monomial(
  source: string,
  base: string,
  packed: string,
  degree: string,
  result: string,
): string {
  return `var ${result} = 1.0;
    for (var t = 0u; t < ${degree}; t++) { ${result} *= ${source}[${base} + ((${packed} >> (8u * t)) & 0xffu)]; }`;
}
