export { type ReferenceAttentionResult, referenceAttention, referenceBackward } from './oracle.js';
export { softmaxAttention } from './softmax.js';
export { referenceBackend } from './backend.js';
