import {
  addProgram,
  applyProgram,
  argmaxScanProgram,
  argmaxScatterProgram,
  backwardKeyProgram,
  backwardQueryProgram,
  backwardUpstreamProgram,
  blockKeyProgram,
  blockQueryProgram,
  chainRowsProgram,
  convertProgram,
  DIM_BUCKETS,
  directKeyTile,
  directProgram,
  divideRowsProgram,
  divisorGradientProgram,
  featureGradientProgram,
  keyDivisorsProgram,
  momentsProgram,
  normalizeProgram,
  prefixMaxProgram,
  queryScalesProgram,
  rowNormsProgram,
  scaleRowsProgram,
  sigmaGradientProgram,
  traceArgmaxProgram,
  valueRowsProgram,
} from './kernels.js';
import type { ProgramInfo } from './wgsl.js';

/**
 * Every WGSL variant the backend can build for a workgroup storage size: head dims are bucketed
 * (DIM_BUCKETS), so this list is finite. The validation test compiles all of them on Dawn,
 * including the sizes the host cannot run quickly.
 */
export function allPrograms(workgroupStorage: number, float16: boolean): ProgramInfo[] {
  const programs: ProgramInfo[] = [
    rowNormsProgram(),
    prefixMaxProgram(),
    queryScalesProgram(),
    keyDivisorsProgram(),
    divideRowsProgram(),
    momentsProgram(),
    normalizeProgram(),
    applyProgram(),
    backwardUpstreamProgram(),
    scaleRowsProgram(),
    argmaxScanProgram(),
    traceArgmaxProgram(),
    divisorGradientProgram(),
    sigmaGradientProgram(),
    argmaxScatterProgram(),
    chainRowsProgram(),
    valueRowsProgram(),
    addProgram(),
  ];
  for (const D of DIM_BUCKETS) {
    for (const Dv of DIM_BUCKETS) {
      programs.push(directProgram(D, Dv, directKeyTile(D, Dv, workgroupStorage)));
      programs.push(backwardQueryProgram(D, Dv));
      programs.push(backwardKeyProgram(D, Dv));
      programs.push(featureGradientProgram(D, Dv));
      programs.push(blockQueryProgram(D, Dv));
      programs.push(blockKeyProgram(D, Dv));
    }
  }
  if (float16) programs.push(convertProgram('f16'), convertProgram('f32'));
  return programs;
}
