"""One-for-all elastic training: data, sampling, distillation, adapters, the loop."""
