"""Evaluation metrics: perplexity by the standard protocol and zero-shot task accuracy (lm-eval)."""
