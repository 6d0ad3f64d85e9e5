"""Evaluation metrics: perplexity by the standard protocol and zero-shot task accuracy (lm-eval)."""

BATCH_SIZE = 16  # lm-eval requests per forward pass (here, so that naming it does not import lm-eval)
