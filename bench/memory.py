"""The training memory estimate (anyshape.memory) against the measured peak, SmolLM2-135M.

    .venv/bin/python bench/memory.py   # one Shape and sandwich steps; full fine-tuning, LoRA, checkpointing

Each case trains 2 steps in its own process (float32, on the CPU) and reports its peak resident
memory (VmHWM, Linux) beside the estimate that `anyshape train` checks before its first batch. The
sandwich steps distil (cosine) from the largest Shape's logits; the one-Shape steps (sampling
largest) learn the next token.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = (
    (2, 128, "full", "largest"), (4, 256, "full", "largest"), (4, 256, "full", "sandwich"),
    (8, 256, "full", "sandwich"), (4, 256, "lora", "sandwich"), (8, 256, "full+checkpointing", "sandwich"),
)  # fmt: skip


def measure(batch: int, seq_len: int, adapter: str, sampling: str, model: str = "smollm2-135m") -> tuple[float, float]:
    """(estimated, measured) peak GiB of a 2-step run of `model`; adapter "full+checkpointing"
    is full fine-tuning with --activation-checkpointing."""
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
    parser.add_argument("--model", default="smollm2-135m", help="the model of --case (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.case:
        batch, seq_len, adapter, sampling = args.case.split(",")
        print(*measure(int(batch), int(seq_len), adapter, sampling, args.model))
        return 0
    print("| micro-batch | adapter | Shapes | estimate GiB | measured GiB | estimate / measured |")
    print("|---|---|---|---:|---:|---:|")
    for batch, seq_len, adapter, sampling in CASES:
        case = f"{batch},{seq_len},{adapter},{sampling}"
        result = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True)
        estimate, measured = map(float, result.stdout.split()[-2:])
        ratio = estimate / measured
        print(f"| {batch} x {seq_len} | {adapter} | {sampling} | {estimate:.2f} | {measured:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
