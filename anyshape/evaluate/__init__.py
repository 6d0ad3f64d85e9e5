"""Evaluation: perplexity (and later zero-shot accuracy, latency, memory)."""
