"""Model code that every role shares: loading, padding and token-budget batching, the
log-prob kernels (chunked, packed, the kept-logits head), layer compilation. The learner, the
teacher and the rollout import from here, never from each other."""
