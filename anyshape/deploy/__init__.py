"""Deployment tools: speed across runtimes (anyshape itself, transformers, llama.cpp) and the family report."""
