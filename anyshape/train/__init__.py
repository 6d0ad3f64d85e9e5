"""One-for-all elastic training: the loop, its run folder, data, sampling, distillation, distributed setup."""
