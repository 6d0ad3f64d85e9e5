"""anyshape's training step against a plain transformers training loop, in one process.

    PYTHONPATH=. python bench/train_speed.py --configs tiny --steps 6 --warmup 2    # a quick check on the CPU
    PYTHONPATH=. python bench/train_speed.py --configs smollm2-135m,smollm2-1.7b --sandwich 4   # a GPU
    PYTHONPATH=. bash bench/gpu_check.sh                                             # the H200 check

Each config is a real Llama-family config with random weights (built offline, on the device),
saved as safetensors beside a byte-level tokenizer (token ids < 256; the logits still cover the
whole vocabulary), with a random printable training text. Both loops train it on the same token
batches (batch x seq_len: anyshape's own batches of the text), in float32 weights with bf16
autocast (--precision bf16, the default on CUDA) or without (fp32, the default on the CPU):

  plain     `AutoModelForCausalLM.from_pretrained` on the device, labels = input ids, AdamW
            (lr 1e-4, fused), gradient clipping at 1.0;
  anyshape  `anyshape.train.loop.train` with sampling largest, kd none, one micro-batch; its
            seconds per step are RUN/metrics.jsonl's (the whole optimizer step);
  anyshape --compile  (--compile) the same with its decoder layers compiled (torch.compile);
  sandwich  (--sandwich N) the same with sampling sandwich: the largest, the smallest and N - 2
            random Shapes per step; with --compile also compiled, where new widths every step
            would show as graphs compiled in the measured steps (printed below the table).

s/step is the median over the steps after --warmup. Peak memory: torch.cuda.max_memory_allocated
(the peak reset before each loop), or on the CPU the peak resident memory over what the process
held before the loop (/proc/self/status VmHWM after resetting it, else a sampling thread). MFU
(CUDA only): model FLOPs per step, 3 x `Shape.flops_per_token` (6N + 12 L Q d S per token, N the
matrix parameters including the LM head) summed over the Shapes a step trains, over the seconds
and --peak-tflops. "estimate / measured": the peak anyshape's memory guard plans for the step,
less its runtime part (what the process held besides tensors), over the measured peak.
anyshape's run stops after its last measured step, so it writes no final checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import random
import statistics
import string
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        intermediate_size=128, vocab_size=512, rope_theta=10000.0,
    ),
    "smollm2-135m": dict(
        num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
    ),
    "smollm2-1.7b": dict(
        num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, num_key_value_heads=32, head_dim=64,
        intermediate_size=8192, vocab_size=49152, rope_theta=130000.0,
    ),
}  # fmt: skip
COMMON = dict(tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu")
LR = 1e-4
MAX_GRAD_NORM = 1.0
NEVER = 10**9  # save_every / eval_every: not within the run
NO_LIMIT = "1024TiB"  # max_memory: the guard never refuses, its estimate is only recorded
GiB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="smollm2-135m", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (1024 on CUDA, 128 on the CPU)")
    parser.add_argument("--batch", type=int, help="sequences per step (16 on CUDA, 2 on the CPU)")
    parser.add_argument("--steps", type=int, help="steps per loop (25 on CUDA, 6 on the CPU)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the median (8 on CUDA, 2 on the CPU)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="bf16 autocast (CUDA default) or fp32 (CPU)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (H100/H200)")
    parser.add_argument("--sandwich", type=int, default=0, help="also anyshape's sandwich of N Shapes per step (N>=2)")
    parser.add_argument("--compile", action="store_true", help="also anyshape with --compile (its layers compiled)")
    parser.add_argument("--kd", default="none", help="anyshape's loss for the smaller Shapes (sandwich)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: its own choice)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_speed.json"), help="the JSON results")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # anyshape trains on CUDA whenever it sees one
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        parser.error("--device cuda: no CUDA device here")
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seq_len = args.seq_len or (1024 if cuda else 128)
    args.batch = args.batch or (16 if cuda else 2)
    args.steps = args.steps or (25 if cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else (8 if cuda else 2)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must leave at least one of the {args.steps} steps")
    if args.sandwich == 1 or args.sandwich < 0:
        parser.error("--sandwich N trains the largest, the smallest and N - 2 random Shapes: N >= 2 (0: off)")

    import transformers

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": [],
    }  # fmt: skip
    for name in configs:
        with tempfile.TemporaryDirectory(prefix="anyshape-train-speed-") as work:
            results["rows"] += bench_config(name, Path(work), device, args)
        print(table(results["rows"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nspeed vs plain: plain s/step over this row's; estimate / measured: anyshape's memory plan of the "
          f"step (less its runtime part) over the measured peak. Results in {args.out}")  # fmt: skip
    return 0


# ---------------------------------------------------------------- one config


def bench_config(name: str, work: Path, device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of one config: plain, anyshape, and with --sandwich anyshape's sandwich."""
    os.environ["ANYSHAPE_CACHE"] = str(work / "cache")  # the token cache: gone with the folder
    started = time.perf_counter()
    folder = build_model(name, work / "model", device)
    text = work / "train.txt"
    # every step's batch, held-out sequences for anyshape's step-0 check, and a spare epoch's worth
    write_text(text, int((args.steps + 2) * args.batch * args.seq_len * 1.2) + 64 * args.seq_len)
    print(f"{name}: random model and text ready in {time.perf_counter() - started:.0f} s", flush=True)

    from anyshape.train.settings import TrainSettings

    settings = TrainSettings(
        model=str(folder), data=str(text), out=str(work / "run"), sampling="largest", random_shapes=0,
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch, grad_accum=1, kd="none", lr=LR,
        warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, precision=args.precision, save_every=NEVER,
        eval_every=NEVER, log_every=1, val_batches=1, max_memory=NO_LIMIT,
    )  # fmt: skip
    rows = [run_plain(name, settings, device, args)]
    rows.append(run_anyshape(name, "anyshape", settings, device, args))
    if args.compile:
        compiled = replace(settings, compile=True, out=str(work / "compiled"))
        rows.append(run_anyshape(name, "anyshape --compile", compiled, device, args))
    if args.sandwich:
        sandwich = replace(settings, sampling="sandwich", random_shapes=args.sandwich - 2, kd=args.kd,
                           out=str(work / "sandwich"))  # fmt: skip
        rows.append(run_anyshape(name, f"sandwich-{args.sandwich}", sandwich, device, args))
        if args.compile:  # new random widths every step: where recompiling each step would show
            compiled = replace(sandwich, compile=True, out=str(work / "sandwich-compiled"))
            rows.append(run_anyshape(name, f"sandwich-{args.sandwich} --compile", compiled, device, args))
    for row in rows:
        row["speed_vs_plain"] = rows[0]["seconds_per_step"] / row["seconds_per_step"]
    return rows


def build_model(name: str, folder: Path, device: torch.device) -> Path:
    """A random model of CONFIGS[name], made on `device` and saved with a byte tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**CONFIGS[name], **COMMON)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    del model
    free(device)
    return folder


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (one per byte), made in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def write_text(path: Path, characters: int) -> None:
    """Random printable ASCII (one token per character with the byte tokenizer), in lines."""
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " " * 12
    lines = ("".join(rng.choices(alphabet, k=79)) for _ in range(characters // 80 + 1))
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------- the two loops


def run_plain(name: str, settings, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """The plain transformers loop on anyshape's batches of the same text."""
    from transformers import AutoModelForCausalLM

    from anyshape.checkpoints import load_config
    from anyshape.shape import Shape
    from anyshape.train.data import Batches
    from anyshape.train.inputs import training_data

    config = load_config(settings.model)
    batches = Batches(
        training_data(settings, config.hf.max_position_embeddings).train, settings.batch_size, settings.seed
    )
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if settings.precision == "bf16"
        else contextlib.nullcontext
    )
    seconds, losses = [], []
    started = time.perf_counter()
    with PeakMemory(device) as peak:
        model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).to(device)
        model.train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=LR, fused=True)
        for step in range(settings.steps):
            begun = time.perf_counter()
            ids = batches.batch(step).to(device)
            with autocast():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            seconds.append(time.perf_counter() - begun)
            losses.append(loss.item())  # after the clock: anyshape's loop reads its losses within the step
        del model, optimizer, parameters, loss
    flops = [training_flops(config, [Shape.full(config)], settings)] * settings.steps
    return row(name, "plain", seconds, flops, peak.bytes, None, losses, time.perf_counter() - started, device, args)


class _Measured(Exception):
    """Stops anyshape's run after its last measured step (no final checkpoint or evaluation)."""


def run_anyshape(name: str, mode: str, settings, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """`anyshape.train.loop.train` on the same text; its own per-step seconds and the memory
    estimate its guard checks."""
    from torch._dynamo.utils import counters

    import anyshape.train.loop as loop
    from anyshape.checkpoints import load_config
    from anyshape.train.run import iterate_metrics
    from anyshape.train.sampling import ShapeSampler

    estimates = []
    original = loop.check_memory
    graphs = {"start": counters["stats"]["unique_graphs"]}  # graphs torch.compile has made in this process

    def keep(estimate, *rest):
        estimates.append(estimate)
        original(estimate, *rest)

    def stop(step: int) -> None:
        if step == args.warmup:
            graphs["warm"] = counters["stats"]["unique_graphs"]
        if step == settings.steps:
            raise _Measured

    loop.check_memory = keep
    started = time.perf_counter()
    try:
        with PeakMemory(device) as peak:
            try:  # one step more than measured, stopped after the last measured one
                loop.train(replace(settings, steps=settings.steps + 1), overwrite=True, on_step=stop)
            except _Measured:
                pass
    finally:
        loop.check_memory = original
    wall = time.perf_counter() - started
    records = sorted((m for m in iterate_metrics(Path(settings.out)) if "seconds" in m), key=lambda m: m["step"])
    if len(records) != settings.steps:
        raise RuntimeError(f"{settings.out}: {len(records)} steps logged, not {settings.steps}")
    config = load_config(settings.model)
    sampler = ShapeSampler(
        loop.training_space(settings, config), settings.sampling, settings.random_shapes, (), settings.seed
    )
    flops = [training_flops(config, [s for _, s in sampler.shapes(m["step"] - 1)], settings) for m in records]
    result = row(
        name, mode, [m["seconds"] for m in records], flops, peak.bytes, estimates[0],
        [m["loss"]["largest"] for m in records], wall, device, args,
    )  # fmt: skip
    made = counters["stats"]["unique_graphs"]
    result["graphs_compiled"] = made - graphs["start"]
    result["graphs_compiled_in_measured_steps"] = made - graphs.get("warm", graphs["start"])
    measured = records[args.warmup :]
    result["tokens_per_s_by_slot"] = {
        slot: statistics.median(m["tokens_per_s"][slot] for m in measured if slot in m["tokens_per_s"])
        for slot in measured[0]["tokens_per_s"]
    }
    return result


def training_flops(config, shapes: list, settings) -> float:
    """Model FLOPs of one optimizer step training `shapes`: forward and backward, 3 x the forward's."""
    tokens = settings.batch_size * settings.seq_len
    return sum(3 * shape.flops_per_token(config, context=settings.seq_len) * tokens for shape in shapes)


def row(
    name: str, mode: str, seconds: list[float], flops: list[float], peak: int, estimate, losses: list[float],
    wall: float, device: torch.device, args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    measured = seconds[args.warmup :]
    per_step = statistics.median(measured)
    tokens = args.batch * args.seq_len
    mfu = (
        statistics.median(f / s for f, s in zip(flops[args.warmup :], measured, strict=True))
        / (args.peak_tflops * 1e12)
        if device.type == "cuda"
        else None
    )
    result = {
        "config": name, "mode": mode, "seconds_per_step": per_step, "tokens_per_s": tokens / per_step, "mfu": mfu,
        "peak_bytes": peak, "step_seconds": seconds, "first_loss": losses[0], "last_loss": losses[-1],
        "wall_seconds": wall, "estimate": None, "estimate_vs_measured": None,
    }  # fmt: skip
    if estimate is not None:
        parts = {k: getattr(estimate, k) for k in ("weights", "optimizer", "activations", "logits", "runtime")}
        result["estimate"] = parts | {"total": estimate.total}
        result["estimate_vs_measured"] = (estimate.total - estimate.runtime) / peak if peak > 0 else None
    return result


# ---------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Returns what the last phase freed: Python's garbage, CUDA's cache, glibc's heap."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PeakMemory:
    """`bytes`: the peak over the block of CUDA memory allocated, or of the CPU process's resident
    memory over what it held when the block began."""

    device: torch.device
    bytes: int = 0
    _base: int = 0
    _hwm: bool = False
    _samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        free(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = psutil.Process().memory_info().rss
        self._hwm = _reset_high_water_mark()
        if not self._hwm:  # no resettable VmHWM: sample the resident memory
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._hwm:
            self.bytes = _high_water_mark() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(self._samples, default=self._base) - self._base
        free(self.device)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.005):
            self._samples.append(process.memory_info().rss)


def _reset_high_water_mark() -> bool:
    """Resets the kernel's peak resident memory of this process (Linux 4.0 on); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _high_water_mark() <= psutil.Process().memory_info().rss + 2**20
    except (OSError, ValueError):
        return False


def _high_water_mark() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM in /proc/self/status")


# ---------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "",
        "| config | mode | s/step | tokens/s | MFU | peak GiB | speed vs plain | estimate / measured |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        estimate = f"{r['estimate_vs_measured']:.2f}" if r["estimate_vs_measured"] is not None else "-"
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['seconds_per_step']:.4f} | {r['tokens_per_s']:,.0f} | {mfu} | "
            f"{r['peak_bytes'] / GiB:.2f} | {r['speed_vs_plain']:.3f} | {estimate} |"
        )
    lines += [
        f"{r['config']} {r['mode']}: {r['graphs_compiled']} graphs compiled, "
        f"{r['graphs_compiled_in_measured_steps']} of them in the measured steps"
        for r in rows
        if r["mode"].endswith("--compile")
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
