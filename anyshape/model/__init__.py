"""The elastic Llama-family model: config, forward pass, slicing, checkpoint I/O."""
