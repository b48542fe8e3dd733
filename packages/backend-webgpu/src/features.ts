import { FastmaxError, featureLayout, type Order } from '@fastmax/core';

/**
 * Core's feature layout (`featureLayout`: degree by degree, index tuples in lexicographic order)
 * packed for the kernels: per feature three u32s, the indices (8 bits each, lowest first), the
 * degree l, and the bits of the f32 multinomial weight l!/Π multiplicity!. 8-bit indices are why
 * maxHeadDim is 256.
 */
export function featureTable(headDim: number, order: Order): Uint32Array {
  if (headDim > 256) {
    throw new FastmaxError('UNSUPPORTED_CAPABILITY', 'the WebGPU feature table packs head dims up to 256', {
      argument: 'q.shape[3]',
      expected: '<= 256',
      actual: String(headDim),
    });
  }
  const layout = featureLayout(headDim, order);
  const table = new Uint32Array(3 * layout.featureCount);
  const weights = new Float32Array(table.buffer);
  for (let f = 0; f < layout.featureCount; f++) {
    const degree = layout.degreeOf[f]!;
    const row = f - layout.degreeOffsets[degree]!;
    let packed = 0;
    for (let t = 0; t < degree; t++) packed |= layout.tables[degree]![row * degree + t]! << (8 * t);
    table[3 * f] = packed >>> 0;
    table[3 * f + 1] = degree;
    weights[3 * f + 2] = layout.weights[f]!;
  }
  return table;
}
