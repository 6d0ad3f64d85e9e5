"""The training memory plan (anyshape.memory) against the measured peak, SmolLM2-135M.

    .venv/bin/python bench/memory.py                       # one Shape and sandwich steps; full, LoRA, checkpointing
    .venv/bin/python bench/memory.py --model FOLDER        # the same cases for another model

Each case trains 2 steps in its own process (float32, on the CPU) and reports its peak resident
memory (VmHWM, Linux) beside the plan that `anyshape train` checks before its first batch. The
plan counts live tensors, so the peak it is checked against is measured with glibc's malloc
giving every block over 64 KiB back when it is freed (MALLOC_MMAP_THRESHOLD_), as a GPU's
allocated-bytes counter would; the last columns are the same run with glibc's default, which
keeps freed blocks for reuse (faster, and a larger resident peak). The sandwich steps distil
(cosine) from the largest Shape's logits; the one-Shape steps (sampling largest) learn the next
token.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = (
    (2, 128, "full", "largest"), (4, 256, "full", "largest"), (4, 256, "full", "sandwich"),
    (8, 256, "full", "sandwich"), (4, 256, "lora", "sandwich"), (8, 256, "full+checkpointing", "sandwich"),
)  # fmt: skip
LIVE_TENSORS = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: blocks over 64 KiB mapped alone, unmapped when freed


def measure(batch: int, seq_len: int, adapter: str, sampling: str, model: str = "smollm2-135m") -> tuple[float, float]:
    """(planned, measured) peak GiB of a 2-step run of `model` in this process; adapter
    "full+checkpointing" is full fine-tuning with --activation-checkpointing."""
    import anyshape.memory
    from anyshape.train.loop import train
    from anyshape.train.settings import TrainSettings

    estimates = []
    original = anyshape.memory.check_memory

    def keep(estimate, *args):
        estimates.append(estimate.total / anyshape.memory.GiB)
        original(estimate, *args)

    anyshape.train.loop.check_memory = keep
    with tempfile.TemporaryDirectory(prefix="anyshape-memory-") as work:  # the run's checkpoint: 1.6 GiB
        settings = TrainSettings(
            model=model, out=f"{work}/run", steps=2, seq_len=seq_len, batch_size=batch,
            adapter=adapter.removesuffix("+checkpointing"), activation_checkpointing=adapter.endswith("+checkpointing"),
            sampling=sampling, save_every=100, eval_every=100, precision="fp32",
        )  # fmt: skip
        train(settings, overwrite=True)
    return estimates[0], peak_resident_kib() / 2**20


def measure_apart(case: str, model: str, live_tensors: bool = True) -> tuple[float, float]:
    """`measure` of `case` ("batch,seq_len,adapter,sampling") in a process of its own, with
    freed blocks given back (`live_tensors`) or glibc's default allocator."""
    env = os.environ | LIVE_TENSORS if live_tensors else {k: v for k, v in os.environ.items() if k not in LIVE_TENSORS}
    command = [sys.executable, __file__, "--case", case, "--model", model]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{result.stderr[-2000:]}")
    planned, measured = map(float, result.stdout.split()[-2:])
    return planned, measured


def peak_resident_kib() -> int:
    """This process image's peak resident memory, KiB: VmHWM, which starts afresh at exec
    (ru_maxrss does not: it keeps the peak of the process that forked it, e.g. a large pytest run)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise ValueError("no VmHWM in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="batch,seq_len,adapter,sampling: measure one case in this process")
    parser.add_argument("--model", default="smollm2-135m", help="the model to train (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.case:
        batch, seq_len, adapter, sampling = args.case.split(",")
        print(*measure(int(batch), int(seq_len), adapter, sampling, args.model))
        return 0
    print("| micro-batch | adapter | Shapes | plan GiB | peak GiB | plan / peak | default malloc: peak | plan / peak |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for batch, seq_len, adapter, sampling in CASES:
        case = f"{batch},{seq_len},{adapter},{sampling}"
        planned, live = measure_apart(case, args.model)
        _, resident = measure_apart(case, args.model, live_tensors=False)
        print(
            f"| {batch} x {seq_len} | {adapter} | {sampling} | {planned:.2f} | {live:.2f} | {planned / live:.2f} "
            f"| {resident:.2f} | {planned / resident:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
