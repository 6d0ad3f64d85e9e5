"""Running a model: token generation with a KV cache, text streaming, and conversations."""
