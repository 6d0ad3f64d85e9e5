"""Adjacent-layer weight sharing with low-rank recovery (SHARP): plan.py (which layer reads
which weights), recovery.py, tie.py (applying a plan), warmup.py (stage 1), pipeline.py (both
stages), storage.py (the compact format)."""
