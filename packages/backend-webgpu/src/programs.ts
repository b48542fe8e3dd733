import {
  applyProgram,
  backwardKeyProgram,
  backwardQueryProgram,
  directKeyTile,
  directProgram,
  divideRowsProgram,
  momentsProgram,
  normalizeProgram,
  rowNormsProgram,
  scanKeysProgram,
  scanQueriesProgram,
} from './kernels.js';
import type { ProgramInfo } from './wgsl.js';

/**
 * Every WGSL variant the backend can build for the given head dims, orders and workgroup storage
 * (the validation test compiles all of them on Dawn, including sizes the host cannot run quickly).
 */
export function allPrograms(
  dims: readonly (readonly [number, number])[],
  workgroupStorage: number,
  orders: readonly number[] = [1, 2, 3, 4],
): ProgramInfo[] {
  const programs: ProgramInfo[] = [
    rowNormsProgram(),
    scanQueriesProgram(),
    scanKeysProgram(),
    divideRowsProgram(),
    momentsProgram(),
    normalizeProgram(),
  ];
  for (const order of orders) {
    programs.push(applyProgram(order));
    for (const [D, Dv] of dims) {
      programs.push(directProgram(order, D, Dv, directKeyTile(D, Dv, workgroupStorage)));
      programs.push(backwardQueryProgram(order, D, Dv));
      programs.push(backwardKeyProgram(order, D, Dv));
    }
  }
  return programs;
}
