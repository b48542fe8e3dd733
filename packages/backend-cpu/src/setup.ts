import {
  type AttentionShape,
  featureCoefficients,
  featureLayout,
  keyLimit,
  type Order,
  type QueryChunk,
  type ResolvedOptions,
} from '@fastmax/core';
import type { KernelSetup } from './engine.js';

/**
 * The kernel's tables for (D, p, a): core's feature layout (order and multinomial weights) packed
 * for the WebAssembly feature generator, one i32 pair per feature (degree, coordinates one per
 * byte), padded to a multiple of 4 features with zero-weight constants. The direct path needs no
 * features, so it gets an empty table whatever F would be.
 */
export function kernelSetup(
  headDim: number,
  order: Order,
  coefficients: ArrayLike<number>,
  withFeatures: boolean,
): KernelSetup {
  const coefficientsF32 = Float32Array.from(coefficients as ArrayLike<number>);
  if (!withFeatures) {
    return {
      headDim,
      order,
      paddedFeatures: 0,
      table: new Int32Array(0),
      weights: new Float32Array(0),
      coefficients: coefficientsF32,
    };
  }
  const layout = featureLayout(headDim, order);
  const F = layout.featureCount;
  const padded = Math.ceil(F / 4) * 4;
  const table = new Int32Array(padded * 2);
  const weights = new Float32Array(padded);
  const featureWeights = featureCoefficients(layout, coefficients);
  for (let l = 0; l <= order; l++) {
    const first = layout.degreeOffsets[l]!;
    const tuples = layout.tables[l]!;
    for (let row = 0; row < layout.degreeOffsets[l + 1]! - first; row++) {
      let packed = 0;
      for (let t = 0; t < l; t++) packed |= tuples[row * l + t]! << (8 * t);
      table[2 * (first + row)] = l;
      table[2 * (first + row) + 1] = packed;
    }
  }
  for (let f = 0; f < F; f++) weights[f] = featureWeights[f]!;
  return { headDim, order, paddedFeatures: padded, table, weights, coefficients: coefficientsF32 };
}

/**
 * Core's chunk schedule as the engine reads it: four numbers per chunk (queryStart, queryEnd,
 * stateKeyEnd, directKeyEnd), written in one pass (a schedule has N / C chunks: 512 at p = 1 and
 * N = 16384, where building small arrays per chunk took 0.17 ms of each call).
 */
export function packedSchedule(chunks: readonly QueryChunk[]): Int32Array {
  const packed = new Int32Array(chunks.length * 4);
  for (let i = 0; i < chunks.length; i++) {
    const chunk = chunks[i]!;
    packed[4 * i] = chunk.queryStart;
    packed[4 * i + 1] = chunk.queryEnd;
    packed[4 * i + 2] = chunk.stateKeyEnd;
    packed[4 * i + 3] = chunk.directKeyEnd;
  }
  return packed;
}

/**
 * The direct path's schedule for batch `batch` cut into chunks of `rows` queries (core's is one
 * chunk): the direct path keeps no state, so a head splits by queries at any chunk, each share
 * reading only the keys its rows see.
 */
export function directSchedule(
  batch: number,
  shape: AttentionShape,
  options: ResolvedOptions,
  rows: number,
): Int32Array {
  const chunks: QueryChunk[] = [];
  for (let start = 0; start < shape.queryLength; start += rows) {
    const end = Math.min(shape.queryLength, start + rows);
    chunks.push({
      queryStart: start,
      queryEnd: end,
      stateKeyEnd: 0,
      directKeyEnd: keyLimit(batch, end - 1, shape, options),
    });
  }
  return packedSchedule(chunks);
}
