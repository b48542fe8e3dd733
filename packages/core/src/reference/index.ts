export { referenceBackend } from './backend.js';
export { type ReferenceAttentionResult, referenceAttention, referenceBackward } from './oracle.js';
export { type SoftmaxOptions, softmaxAttention } from './softmax.js';
