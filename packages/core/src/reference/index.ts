// Filled in by the reference work: referenceAttention, referenceBackward, softmaxAttention, referenceBackend.
export {};
