import { degreeFeatureCount, FastmaxError, type Order } from '@fastmax/core';

/**
 * The packed feature table the kernels read: for every multiset m (i1 <= … <= il) of every degree
 * l <= p, in degree order, three u32s: the indices (8 bits each, lowest first), l, and the bits of
 * the f32 multinomial l!/Π multiplicity!. 8-bit indices are why maxHeadDim is 256.
 */
export function featureTable(headDim: number, order: Order): Uint32Array {
  if (headDim > 256) {
    throw new FastmaxError('UNSUPPORTED_CAPABILITY', 'the WebGPU feature table packs head dims up to 256', {
      argument: 'q.shape[3]',
      expected: '<= 256',
      actual: String(headDim),
    });
  }
  let total = 0;
  for (let l = 0; l <= order; l++) total += degreeFeatureCount(headDim, l);
  const table = new Uint32Array(3 * total);
  const weightView = new Float32Array(table.buffer);
  let f = 0;
  const indices: number[] = [];
  const emit = (): void => {
    let packed = 0;
    indices.forEach((index, t) => {
      packed |= index << (8 * t);
    });
    let weight = 1;
    for (let n = 2; n <= indices.length; n++) weight *= n;
    let run = 1;
    for (let t = 1; t <= indices.length; t++) {
      if (t < indices.length && indices[t] === indices[t - 1]) run++;
      else {
        for (let n = 2; n <= run; n++) weight /= n;
        run = 1;
      }
    }
    table[3 * f] = packed >>> 0;
    table[3 * f + 1] = indices.length;
    weightView[3 * f + 2] = weight;
    f++;
  };
  const walk = (degree: number, from: number): void => {
    if (indices.length === degree) {
      emit();
      return;
    }
    for (let index = from; index < headDim; index++) {
      indices.push(index);
      walk(degree, index);
      indices.pop();
    }
  };
  for (let l = 0; l <= order; l++) walk(l, 0);
  return table;
}
