"""Adjacent-layer sharing (SHARP) vs dropping layers (ShortGPT), SmolLM2-135M on WikiText-2.

    .venv/bin/python bench/share.py                  # the defaults below
    .venv/bin/python bench/share.py --device cuda    # the same on a GPU
    .venv/bin/python bench/share.py --device cuda --plans 40 --warmup-sequences 900 --warmup-steps 2000 \
        --batch-size 16 --finetune-steps 300 --lr 1e-3 --eval-every 50   # the H100 run in the README
    .venv/bin/python bench/share.py --quick          # a smoke run: the 40% plan, 2 steps per stage

1. Two plans replace the MLPs of SmolLM2's 30 layers, next-interval, rank-32 low-rank recovery,
   keeping the last layer's own (its MLP is far from its predecessor's: in a smoke run direct
   sharing of layer 29 erred 38x its own update, the other layers about 1x):
   40%: layers 6, 8, ..., 28 read their predecessor's MLP (12 of 30; start 5, group 2);
   60%: two of every three layers from 2 to 28 read the group's first (18; start 2, group 3).
2. SHARP: perplexity with direct sharing (no recovery), after stage 1 (the single-layer
   warm-up) and after stage 2 (end-to-end fine-tuning of the recovery, `anyshape train`'s loop).
3. ShortGPT: the same layers dropped, and, at equal stored parameters, the k layers of lowest
   Block Influence (k: the replaced MLPs' parameters less SHARP's recovery, in whole layers);
   zero-shot and after fine-tuning with the same tokens (LoRA of the same rank on every
   projection, the same steps, batch, sequence length and learning rate as stage 2). With
   --finetune-weights every fine-tuning trains every stored weight instead: stage 2 the shared
   weights beside the recovery, ShortGPT in full.
4. Stored MB (model.safetensors, float32); weights read per decoded token, counting a shared
   weight at every read and once ("distinct": what a cache that keeps it between the two layers
   reads); decode tokens/s of the anyshape runtime (KV cache, batch 1) on this machine.
Training text: wiki.valid.tokens (the shared data has no training split; 5% held out, on which
stage 2 and the fine-tunings log perplexity every --eval-every steps); test: the WikiText-2
perplexity protocol on wiki.test.raw (first --test-tokens tokens).
Goal: SHARP after stage 2 beats ShortGPT at equal stored parameters.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import anyshape
from anyshape import Shape
from anyshape.data.calibration import calibration_ids
from anyshape.data.text import read_text, wikitext_text
from anyshape.deploy.speed import SpeedSettings, benchmark
from anyshape.evaluate.perplexity import MAX_TOKENS, perplexity, tokenize
from anyshape.importance.layers import block_importance
from anyshape.model.llama import ElasticLinear, ElasticLlama
from anyshape.share.pipeline import ShareSettings, share
from anyshape.share.plan import build_plan
from anyshape.share.storage import WEIGHTS
from anyshape.share.tie import share_weights
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
PLANS = {"40%": (5, 2, 12), "60%": (2, 3, 18)}  # next-interval start, group, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/share"), help="work folder")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--warmup-sequences", type=int, default=64)
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--finetune-weights", action="store_true",
        help="every fine-tuning trains every stored weight: SHARP's stage 2 the shared weights too, ShortGPT in full "
        "(instead of LoRA)",
    )  # fmt: skip
    parser.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: the last)")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="WikiText-2: wiki.test.raw and wiki.valid.tokens")
    parser.add_argument("--test-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--device", default="cpu", help="for perplexity (training takes CUDA when it is there)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plans", default="40,60", help="which plans to run, by percent (default: 40,60)")
    parser.add_argument("--quick", action="store_true", help="the 40%% plan, 2 steps per stage, 1,024 test tokens")
    args = parser.parse_args(argv)
    chosen = {f"{name}%" for name in args.plans.split(",")}
    if chosen - set(PLANS):
        parser.error(f"--plans: no plan {', '.join(sorted(chosen - set(PLANS)))}; the plans are {', '.join(PLANS)}")
    plans = {name: plan for name, plan in PLANS.items() if name in chosen}
    if args.quick:
        args.warmup_steps, args.warmup_sequences, args.finetune_steps = 2, 4, 2
        args.seq_len, args.batch_size, args.test_tokens = 64, 2, 1024
        plans = {"40%": PLANS["40%"]}
    speed = SpeedSettings(prompt_tokens=16, gen_tokens=8, repeats=1) if args.quick else SpeedSettings(128, 64, 3)
    started = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True  # stage 1 and recording run in float32 on a GPU

    parent_folder = args.out / "parent"
    if not (parent_folder / "config.json").is_file():
        model = anyshape.load("smollm2-135m")
        anyshape.export_hf(model, model.full_shape, parent_folder, anyshape.load_tokenizer("smollm2-135m"))
    parent = anyshape.load(parent_folder)
    tokenizer = anyshape.load_tokenizer(parent_folder)
    test_ids = tokenize(tokenizer, wikitext_text(args.data_dir / "wiki.test.raw"), min(args.test_tokens, MAX_TOKENS))
    train_text = args.data_dir / "wiki.valid.tokens"
    influence = block_importance(
        parent, calibration_ids(tokenizer, read_text(train_text), 8, args.seq_len), tuple(range(30))
    )

    def ppl(model: ElasticLlama, shape: Shape | None = None) -> float:
        value = perplexity(model.to(args.device), test_ids, shape, progress=True).perplexity
        model.cpu()
        return value

    def decode(folder: Path) -> float:
        return benchmark(str(folder), settings=speed, runtimes=("anyshape",))[0][0].decode.median

    layer_params = sum(p.numel() for p in parent.model.layers[0].parameters())
    mlp_params = sum(p.numel() for p in parent.model.layers[0].mlp.parameters())
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "plans": {}}
    results["tokens"] = {
        "stage1": args.warmup_sequences * args.seq_len,
        "finetune": args.finetune_steps * args.batch_size * args.seq_len,
    }

    def save() -> None:  # after every plan, so an interrupted run keeps the finished ones
        results["seconds"] = round(time.perf_counter() - started)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    results["parent"] = row(parent_folder / WEIGHTS, parent, ppl(parent), decode(parent_folder))
    for name, (start, group, count) in plans.items():
        folder = args.out / name.rstrip("%")
        plan = build_plan("next-interval", 30, start=start, count=count, group=group, rank=args.rank)
        settings = ShareSettings(
            model=str(parent_folder), plan=plan, out=str(folder / "stage1"), data=str(train_text),
            seq_len=args.seq_len, warmup_steps=args.warmup_steps, warmup_sequences=args.warmup_sequences,
            finetune_steps=0, finetune_weights=args.finetune_weights, batch_size=args.batch_size, lr=args.lr,
            save_every=max(1, args.finetune_steps),
        )  # fmt: skip
        rows = {}
        direct = anyshape.load(parent_folder)
        share_weights(direct, replace(plan, rank=0))
        rows["SHARP direct sharing"] = row(None, direct, ppl(direct), None)
        del direct
        share(settings, overwrite=True, progress=True, log=print)
        compact = Path(settings.out)
        stage1, compact_decode = anyshape.load(compact), decode(compact)
        rows["SHARP stage 1"] = row(compact / WEIGHTS, stage1, ppl(stage1), compact_decode)
        finetune = replace(
            replace(settings, finetune_steps=args.finetune_steps).finetune_settings(),
            model=str(compact), out=str(folder / "run"), eval_every=args.eval_every or args.finetune_steps,
        )  # fmt: skip
        train(finetune, overwrite=True, progress=True, log=print)
        stage2 = anyshape.load(finetune.out)  # the same tensors as stage 1's compact folder, recovery trained
        rows["SHARP stage 2"] = row(compact / WEIGHTS, stage2, ppl(stage2), compact_decode) | curve(finetune.out)
        recovery = sum(p.numel() for name, p in stage1.named_parameters() if ".adapter." in name)
        equal = round((len(plan.replaced) * mlp_params - recovery) / layer_params)
        dropped = {
            "same": ("ShortGPT same layers", plan.replaced),
            "equal": ("ShortGPT equal stored", tuple(sorted(sorted(influence, key=influence.get)[:equal]))),
        }
        for key, (label, layers) in dropped.items():
            shape = replace(parent.full_shape, layers=tuple(i for i in range(30) if i not in layers))
            model_folder = folder / key / "model"
            anyshape.export_hf(parent, shape, model_folder, tokenizer=tokenizer, overwrite=True)
            rows[f"{label} ({len(layers)} layers), zero-shot"] = row(
                model_folder / WEIGHTS, parent, ppl(parent, shape), None, shape
            )
            tuned = replace(
                finetune, model=str(model_folder), out=str(model_folder.parent / "run"), all_weights=False,
                adapter="full" if args.finetune_weights else "lora", lora_rank=args.rank,
            )  # fmt: skip
            train(tuned, overwrite=True, progress=True, log=print)
            trained = anyshape.load(tuned.out)
            rows[f"{label} ({len(layers)} layers), fine-tuned"] = row(
                model_folder / WEIGHTS, trained, ppl(trained), decode(model_folder)
            ) | curve(tuned.out)
        mlp_stored = 1 - (len(plan.replaced) * mlp_params - recovery) / (30 * mlp_params)
        results["plans"][name] = {"replaced": list(plan.replaced), "mlp_stored_fraction": mlp_stored, "rows": rows}
        save()
    print(markdown(results))
    return 0


def row(weights: Path | None, model: ElasticLlama, ppl: float, decode: float | None, shape: Shape | None = None):
    """One table row: stored MB, weights read per token (all reads, distinct), decode tok/s, ppl."""
    read, distinct = weights_read_per_token(model, shape or model.full_shape)
    stored = None if weights is None else weights.stat().st_size / 2**20
    return {"stored_mb": stored, "read_mb": read / 2**20, "distinct_mb": distinct / 2**20, "decode": decode, "ppl": ppl}


def curve(run: str) -> dict:
    """The held-out perplexity a fine-tuning run logged: {"val_curve": [[step, perplexity], ...]}."""
    return {"val_curve": [[m["step"], m["val_ppl"]["largest"]] for m in iterate_metrics(Path(run)) if "val_ppl" in m]}


def weights_read_per_token(model: ElasticLlama, shape: Shape) -> tuple[int, int]:
    """Bytes of weights one decoded token reads at `shape`: every projection it runs (with its
    recovery), the norms, the LM head and one embedding row; all reads, and distinct tensors."""
    reads: list[torch.Tensor] = []

    def record(module: ElasticLinear, args: tuple) -> None:
        reads.append(module.weight)
        if module.adapter is not None:
            reads.extend(module.adapter.parameters())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, ElasticLinear)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device=model.inv_freq.device), shape)
    finally:
        for hook in hooks:
            hook.remove()
    for i in shape.layers:
        reads += [model.model.layers[i].input_layernorm.weight, model.model.layers[i].post_attention_layernorm.weight]
    reads += [model.model.norm.weight, model.lm_head.weight]
    row_bytes = model.model.embed_tokens.weight[0].numel() * model.model.embed_tokens.weight.element_size()
    distinct = {id(t): t.numel() * t.element_size() for t in reads}
    return sum(t.numel() * t.element_size() for t in reads) + row_bytes, sum(distinct.values()) + row_bytes


def markdown(results: dict) -> str:
    def number(value, digits):
        return "-" if value is None else f"{value:,.{digits}f}"

    tokens = results["tokens"]
    lines = [
        f"Stage 1: {tokens['stage1']:,} recorded tokens; fine-tuning: {tokens['finetune']:,} tokens per model.",
        "",
    ]
    header = "| model | stored MB | read MB/token | distinct MB/token | decode tok/s | perplexity |"
    rule = "|---|---:|---:|---:|---:|---:|"

    def line(label, r):
        return (
            f"| {label} | {number(r['stored_mb'], 1)} | {number(r['read_mb'], 1)} | {number(r['distinct_mb'], 1)} | "
            f"{number(r['decode'], 1)} | {number(r['ppl'], 2)} |"
        )

    lines += [header, rule, line("SmolLM2-135M (dense)", results["parent"])]
    verdicts = []
    for name, plan in results["plans"].items():
        lines.append(f"| **{name} MLP storage** (MLP stored: {plan['mlp_stored_fraction']:.2f}) | | | | | |")
        lines += [line(label, r) for label, r in plan["rows"].items()]
        sharp = plan["rows"]["SHARP stage 2"]["ppl"]
        drop = next(r["ppl"] for label, r in plan["rows"].items() if "equal stored" in label and "fine-tuned" in label)
        verdicts.append(f"{name}: SHARP {sharp:.2f} vs ShortGPT {drop:.2f} ({'met' if sharp < drop else 'missed'})")
    lines += ["", "Goal: SHARP after stage 2 beats ShortGPT at equal stored parameters: " + "; ".join(verdicts) + ".",
              f"total {results['seconds']} s"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
