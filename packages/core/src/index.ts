export { binomial, degreeFeatureCount, featureCount, kernelDerivative, kernelValue } from './algebra.js';
export { chunkRanges, type QueryChunk, querySchedule } from './chunked.js';
export {
  type Availability,
  type BackendCapabilities,
  type BackendState,
  type BackwardRequest,
  type BackwardResult,
  type DType,
  type FastmaxBackend,
  type ForwardRequest,
  type ForwardResult,
  type GradientBuffers,
  type ResolvedStateOptions,
  SPEC_VERSION,
  type SpecVersion,
  type StateOptions,
  type StepResult,
} from './contract.js';
export {
  describeValue,
  FastmaxError,
  type FastmaxErrorCode,
  type FastmaxErrorDetails,
  isFastmaxError,
} from './errors.js';
export {
  type AttentionResult,
  type CallOptions,
  type CreateFastmaxOptions,
  checkCapabilities,
  createFastmax,
  type Fastmax,
  type FastmaxState,
  type SkippedBackend,
} from './fastmax.js';
export {
  type FeatureLayout,
  featureCoefficients,
  featureLayout,
  keyFeatures,
  keyFeaturesBackward,
  MAX_LAYOUT_FEATURES,
  monomialTable,
  multinomialWeights,
  queryFeatures,
} from './features.js';
export {
  type AttentionPath,
  type DegenerateRowPolicy,
  defaultCoefficients,
  type FastmaxOptions,
  NORMALIZATION_KINDS,
  type Normalization,
  type NormalizationKind,
  type NormalizationMode,
  type Order,
  type ResolvedNormalization,
  type ResolvedOptions,
  resolveOptions,
  SUPPORTED_ORDERS,
} from './options.js';
export {
  type AttentionPlan,
  chooseChunkSize,
  estimateCosts,
  MAX_MOMENT_VALUES,
  planAttention,
} from './planner.js';
export {
  dividedSides,
  nonZeroDivisor,
  type PreparationArrays,
  type PreparationTrace,
  type PreparedScores,
  type PrepareScratch,
  preparationArrays,
  prepareDivisors,
  preparedScores,
  prepareScores,
  prepareScoresBackward,
  prepareToken,
  sumNormGradients,
} from './prepare.js';
export {
  centerDivideRowRange,
  divideRowRangeBackward,
  hasNonFinite,
  normAndCenterRowRangeBackward,
  rowStatsRange,
} from './prepare-rows.js';
export { resolveStateOptions, validateStepInputs } from './state.js';
export {
  type DeviceTensor,
  type HostTensor,
  hostTensor,
  isDeviceTensor,
  isHostTensor,
  type Shape4,
  shapeSize,
  type Tensor,
  toHost,
} from './tensor.js';
export {
  type AttentionShape,
  checkFinite,
  keyLimit,
  kvHeadOf,
  validateAttentionInputs,
  validateGradientBuffers,
  validateOutputBuffer,
  validateOutputGradient,
  validKeyCount,
} from './validate.js';
