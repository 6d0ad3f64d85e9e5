"""Forward-pass speed of anyshape's ElasticLlama on the embedded SmolLM2-135M.

    .venv/bin/python bench/forward.py            # full run (several minutes on 2 cores)
    .venv/bin/python bench/forward.py --quick    # fewer repeats

Two benchmarks, both reporting ratios measured in this run (no stored baselines):

1. parity   full-Shape ElasticLlama vs the same weights in `transformers`' LlamaForCausalLM.
            Goal: time(anyshape) / time(transformers) <= 1.05.
2. scaling  Shapes at about 75%, 50%, 25% of the non-embedding parameters vs the full Shape.
            Goal: time fraction within 15% of the parameter fraction. The LM head (vocab x H')
            is not a non-embedding parameter but costs time, so the fraction of matmul FLOPs
            is printed too.

Timing: inputs are B x T random token ids; every forward runs under torch.inference_mode().
The contenders are interleaved round-robin (A B, B A, ... with the order rotated each round so
slow drift in background load hits all of them alike), after warm-up forwards. Each round
gives one time per contender; ratios are the median over rounds of the per-round ratio (the
two forwards of a round run back to back, so they see the same machine), and the ratio of the
median times is printed beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

PARITY_GOAL = 1.05  # time(anyshape) / time(transformers), full Shape
SCALING_GOAL = 0.15  # |time fraction / parameter fraction - 1|
TARGETS = (0.75, 0.50, 0.25)  # fractions of non-embedding parameters


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------- timing


@dataclass
class Timing:
    times: dict[str, list[float]]  # name -> seconds per round

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def spread(self, name: str) -> float:
        """Interquartile range relative to the median (noise indicator)."""
        values = self.times[name]
        if len(values) < 4:
            return (max(values) - min(values)) / self.median(name)
        q1, _, q3 = statistics.quantiles(values, n=4)
        return (q3 - q1) / self.median(name)

    def paired_ratios(self, name: str, reference: str) -> list[float]:
        return [a / b for a, b in zip(self.times[name], self.times[reference], strict=True)]

    def ratio(self, name: str, reference: str) -> float:
        """Median over rounds of time(name) / time(reference) in the same round."""
        return statistics.median(self.paired_ratios(name, reference))

    def ratio_of_medians(self, name: str, reference: str) -> float:
        return self.median(name) / self.median(reference)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, label: str) -> Timing:
    """Runs every fn `warmup` times, then `repeats` rounds of one run each, order rotated per round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        done = "  ".join(f"{n} {times[n][-1]:.3f}s" for n in names)
        print(f"  [{label}] round {r + 1}/{repeats}: {done}", flush=True)
    return Timing(times)


def forward_fn(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(input_ids, **kwargs)

    return run


# ---------------------------------------------------------------------------- models


def load_models(with_hf: bool):
    """anyshape's model, and (with_hf) the same weights as a transformers model."""
    import anyshape

    model = anyshape.load("smollm2-135m").eval()
    if not with_hf:
        return model, None
    from transformers import AutoModelForCausalLM

    from anyshape.export.extract import extract_state_dict, sub_config

    shape = model.full_shape
    config = sub_config(model, shape)
    state_dict = extract_state_dict(model, shape)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.tie_word_embeddings:
        # The tied head is omitted from the state dict, as in HF checkpoints; give it the
        # embedding so strict loading checks every key, then tie the two.
        state_dict.setdefault("lm_head.weight", state_dict["model.embed_tokens.weight"])
    hf.load_state_dict(state_dict, strict=True)
    hf.tie_weights()
    if config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "head not tied"
    hf.eval()
    return model, hf


def check_same_function(model, hf) -> float:
    """Max |logit difference| on a short input: the two models must compute the same thing."""
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return (model(ids) - hf(ids).logits).abs().max().item()


# ---------------------------------------------------------------------------- Shapes


def head_options(config) -> list[tuple[int, int]]:
    """Valid (num_key_value_heads, num_attention_heads) pairs: Q' = G' q', q' <= q."""
    return [
        (g, g * q) for g in range(1, config.num_key_value_heads + 1) for q in range(1, config.queries_per_group + 1)
    ]


def uniform_shape(config, target: float, hidden_step: int = 32, ffn_step: int = 64):
    """The Shape closest to `target` x the non-embedding parameters with every dimension
    (depth, hidden, MLP, query heads) scaled by about the same factor, layers = the first n.

    Parameters scale as depth x width^2, so the common factor starts at target^(1/3); a small
    grid around it (depth and widths within +-0.12 of the factor, query heads, which come in
    coarse steps, within +-0.25) is searched, scored by the distance to the target plus the
    spread of the per-dimension factors."""
    from anyshape import Shape

    full = Shape.full(config).num_parameters(config, embeddings=False)
    s0 = target ** (1 / 3)

    def near(limit: int, step: int) -> list[int]:
        values = {min(limit, max(step, step * round(limit * s / step))) for s in _frange(s0 - 0.12, s0 + 0.12)}
        return sorted(values)

    layers = sorted({max(1, round(config.num_hidden_layers * s)) for s in _frange(s0 - 0.12, s0 + 0.12)})
    layers = [n for n in layers if n <= config.num_hidden_layers]
    best = None
    for n in layers:
        for hidden in near(config.hidden_size, hidden_step):
            for ffn in near(config.intermediate_size, ffn_step):
                for kv, heads in head_options(config):
                    factors = [
                        n / config.num_hidden_layers,
                        hidden / config.hidden_size,
                        ffn / config.intermediate_size,
                        heads / config.num_attention_heads,
                    ]
                    if max(abs(f - s0) for f in factors[:3]) > 0.12 + 1e-9 or abs(factors[3] - s0) > 0.25:
                        continue  # query heads come in coarse steps (9, 6, 4, 3, ...)
                    shape = Shape(tuple(range(n)), hidden, heads, kv, ffn)
                    fraction = shape.num_parameters(config, embeddings=False) / full
                    # prefer keeping KV heads (G' close to its share) among equal query counts
                    kv_dev = abs(kv / config.num_key_value_heads - heads / config.num_attention_heads)
                    score = abs(math.log(fraction / target)) + 0.05 * (max(factors) - min(factors)) + 0.01 * kv_dev
                    if best is None or score < best[0]:
                        best = (score, shape)
    assert best is not None, f"no Shape near {target}"
    return best[1].validate(config)


def _frange(lo: float, hi: float, step: float = 0.01) -> list[float]:
    return [lo + i * step for i in range(int(round((hi - lo) / step)) + 1)]


def describe(shape) -> str:
    return (
        f"L{shape.num_hidden_layers} H{shape.hidden_size} F{shape.intermediate_size} "
        f"Q{shape.num_attention_heads}/G{shape.num_key_value_heads}"
    )


# ---------------------------------------------------------------------------- benchmarks


def bench_parity(model, hf, batches, tokens, plan) -> list[dict]:
    rows = []
    for batch in batches:
        warmup, repeats = plan[batch]
        ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
        print(f"\nparity: batch {batch} x {tokens} tokens, {warmup} warm-up + {repeats} rounds", flush=True)
        timing = interleaved(
            {"anyshape": forward_fn(model, ids), "transformers": forward_fn(hf, ids)},
            repeats,
            warmup,
            f"B{batch}",
        )
        ratio = timing.ratio("anyshape", "transformers")
        row = {
            "batch": batch,
            "tokens": tokens,
            "rounds": repeats,
            "anyshape_s": timing.median("anyshape"),
            "transformers_s": timing.median("transformers"),
            "anyshape_spread": timing.spread("anyshape"),
            "transformers_spread": timing.spread("transformers"),
            "ratio": ratio,
            "ratio_of_medians": timing.ratio_of_medians("anyshape", "transformers"),
            "ratio_min": min(timing.paired_ratios("anyshape", "transformers")),
            "ratio_max": max(timing.paired_ratios("anyshape", "transformers")),
            "goal_met": ratio <= PARITY_GOAL,
            "times": timing.times,
        }
        print(
            f"  anyshape {row['anyshape_s']:.3f}s (IQR {row['anyshape_spread']:.0%})  "
            f"transformers {row['transformers_s']:.3f}s (IQR {row['transformers_spread']:.0%})  "
            f"ratio {ratio:.3f} (median of rounds; ratio of medians {row['ratio_of_medians']:.3f}; "
            f"rounds {row['ratio_min']:.3f}..{row['ratio_max']:.3f})  "
            f"goal <= {PARITY_GOAL}: {'met' if row['goal_met'] else 'MISSED'}",
            flush=True,
        )
        rows.append(row)
    return rows


def bench_scaling(model, batches, tokens, plan) -> list[dict]:
    config = model.config
    full = model.full_shape
    full_params = full.num_parameters(config, embeddings=False)
    context = (tokens + 1) // 2  # mean number of keys a causal query attends to
    full_flops = full.flops_per_token(config, context=context)
    shapes = {"100%": full} | {f"{round(t * 100)}%": uniform_shape(config, t) for t in TARGETS}
    print("\nscaling: Shapes (first n layers, widths scaled alike)")
    for label, shape in shapes.items():
        print(
            f"  {label:>4}: {describe(shape):28s} "
            f"params {shape.num_parameters(config, embeddings=False) / full_params:.3f}"
            f"  FLOPs {shape.flops_per_token(config, context=context) / full_flops:.3f}  {shape.to_json()}"
        )
    rows = []
    for batch in batches:
        warmup, repeats = plan[batch]
        ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
        print(f"\nscaling: batch {batch} x {tokens} tokens, {warmup} warm-up + {repeats} rounds", flush=True)
        timing = interleaved(
            {label: forward_fn(model, ids, shape=shape) for label, shape in shapes.items()},
            repeats,
            warmup,
            f"B{batch}",
        )
        for label, shape in shapes.items():
            if label == "100%":
                continue
            params = shape.num_parameters(config, embeddings=False) / full_params
            flops = shape.flops_per_token(config, context=context) / full_flops
            lm_head = config.vocab_size * shape.hidden_size / (shape.flops_per_token(config, context=context) / 2)
            t = timing.ratio(label, "100%")
            row = {
                "batch": batch,
                "tokens": tokens,
                "rounds": repeats,
                "target": label,
                "shape": shape.to_dict(),
                "param_fraction": params,
                "flop_fraction": flops,
                "lm_head_flop_share": lm_head,
                "full_s": timing.median("100%"),
                "shape_s": timing.median(label),
                "time_fraction": t,
                "time_fraction_of_medians": timing.ratio_of_medians(label, "100%"),
                "time_over_params": t / params,
                "time_over_flops": t / flops,
                "goal_met": abs(t / params - 1) <= SCALING_GOAL,
                "times": timing.times[label],
            }
            print(
                f"  {label:>4} {describe(shape):28s} params {params:.3f}  FLOPs {flops:.3f}  "
                f"time {t:.3f} (of medians {row['time_fraction_of_medians']:.3f})  "
                f"time/params {t / params:.2f}  time/FLOPs {t / flops:.2f}  "
                f"goal |time/params - 1| <= {SCALING_GOAL}: {'met' if row['goal_met'] else 'MISSED'}",
                flush=True,
            )
            rows.append(row)
        print(f"  100% {describe(full):28s} {timing.median('100%'):.3f}s (IQR {timing.spread('100%'):.0%})")
    return rows


def markdown(parity: list[dict], scaling: list[dict]) -> str:
    lines = []
    if parity:
        lines += [
            "### Full Shape: anyshape vs transformers",
            "",
            "| batch x tokens | anyshape (s) | transformers (s) | ratio | ratio of medians | rounds | goal <= 1.05 |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in parity:
            lines.append(
                f"| {r['batch']} x {r['tokens']} | {r['anyshape_s']:.3f} | {r['transformers_s']:.3f} | "
                f"{r['ratio']:.3f} | {r['ratio_of_medians']:.3f} | {r['rounds']} | "
                f"{'met' if r['goal_met'] else 'missed'} |"
            )
        lines.append("")
    if scaling:
        lines += [
            "### Smaller Shapes vs the full Shape (anyshape)",
            "",
            "| batch x tokens | target | Shape | param fraction | FLOP fraction | LM-head share of FLOPs "
            "| time fraction | time / params | time / FLOPs | goal within 15% |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in scaling:
            shape = r["shape"]
            text = (
                f"L{len(shape['layers'])} H{shape['hidden_size']} F{shape['intermediate_size']} "
                f"Q{shape['num_attention_heads']}/G{shape['num_key_value_heads']}"
            )
            lines.append(
                f"| {r['batch']} x {r['tokens']} | {r['target']} | {text} | {r['param_fraction']:.3f} | "
                f"{r['flop_fraction']:.3f} | {r['lm_head_flop_share']:.0%} | {r['time_fraction']:.3f} | "
                f"{r['time_over_params']:.2f} | {r['time_over_flops']:.2f} | "
                f"{'met' if r['goal_met'] else 'missed'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer warm-ups and rounds")
    parser.add_argument("--part", choices=("all", "parity", "scaling"), default="all")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, help="rounds per batch size (overrides the defaults)")
    parser.add_argument("--threads", type=int, default=cores(), help="torch threads (default: the cores)")
    parser.add_argument("--json", type=Path, help="also write the results here (e.g. bench/results/forward.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    # (warm-up forwards, rounds) per batch size; batch >= 8 forwards take ~8x longer
    if args.quick:
        plan = {b: (1, 3 if b < 8 else 2) for b in batches}
    else:
        plan = {b: (2, 9) if b < 8 else (1, 5) for b in batches}
    if args.rounds:
        plan = {b: (plan[b][0], args.rounds) for b in batches}

    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, {cores()} cores, torch threads {torch.get_num_threads()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    model, hf = load_models(with_hf=args.part in ("all", "parity"))
    print(f"loaded in {time.perf_counter() - started:.0f}s", flush=True)

    parity, scaling = [], []
    if hf is not None:
        diff = check_same_function(model, hf)
        print(f"max |logits anyshape - transformers| on 1 x 64 tokens: {diff:.2e}", flush=True)
        if diff > 1e-3:
            print("the two models disagree; the parity comparison would be meaningless", file=sys.stderr)
            return 1
        parity = bench_parity(model, hf, batches, args.tokens, plan)
        del hf
        gc.collect()
    if args.part in ("all", "scaling"):
        scaling = bench_scaling(model, batches, args.tokens, plan)

    print(
        f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
        f"total {time.perf_counter() - started:.0f}s\n"
    )
    print(markdown(parity, scaling))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"parity": parity, "scaling": scaling, "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
