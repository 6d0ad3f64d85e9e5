"""Serve four sizes of SmolLM2-135M from one copy of the weights, against each size alone.

    .venv/bin/python bench/serve.py              # everything, on this machine (about 10 min on 2 CPU cores)
    .venv/bin/python bench/serve.py --quick      # a smoke run: few requests, few tokens

1. sizes: the parent and Shapes at about 75/50/25% of its parameters (every layer kept, the
   hidden and MLP widths cut; weights as sorted by `anyshape sort` are not needed to time them),
   written as a family's elastic/ folder (the four sizes by name) and as four extracted models.
2. one server: `anyshape serve` of the elastic/ folder under a bounded load (`--requests`, mixed
   sizes in turn, `--concurrency` at a time, each streamed): per size, requests/s, p50/p95 time to
   first token and inter-token latency; then, one request at a time, each size's decode tokens/s.
3. each size alone: `anyshape serve` of its extracted model, one request at a time: decode tokens/s
   and peak resident memory; and one plain `transformers` process per size (greedy `generate`,
   batch 1): decode tokens/s and peak resident memory.
Goals: the four sizes served together in at most 1.1x the peak memory of the largest served alone;
each size's decode tokens/s within 20% of its extracted model served alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

import anyshape
from anyshape import Shape
from anyshape.compress.elastic import ELASTIC
from anyshape.data.text import load_text
from anyshape.export.hf import export_hf

FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # of the hidden and MLP widths, before alignment
ALIGN = 32
MEMORY_GOAL, SPEED_GOAL = 1.1, 0.2
TRANSFORMERS_RUN = """
import json, statistics, sys, time, torch
from transformers import AutoModelForCausalLM
folder, prompts, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder).eval()
rates = []
with torch.inference_mode():
    for prompt in prompts:
        ids = torch.tensor([prompt])
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        rates.append((tokens - 1) / (time.perf_counter() - started - first))
peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]
print(json.dumps({"decode_tps": statistics.median(rates), "peak_mib": int(peak) / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the parent (a name, .gguf or HF folder)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve"), help="working and results folder")
    parser.add_argument("--requests", type=int, default=200, help="requests of the bounded load")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at a time")
    parser.add_argument("--max-tokens", type=int, default=32, help="most tokens each load request generates")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens of each timed single request")
    parser.add_argument("--repeats", type=int, default=3, help="timed single requests per size (median)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks that the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.decode_tokens, args.repeats = 16, 8, 16, 1
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sizes, tokenizer = write_sizes(args.model, args.out)
    prompts = [tokenizer(text)["input_ids"][:32] for text in load_text(None).split("\n\n") if len(text) > 200]
    names = list(sizes)

    print("[together] the elastic/ folder, every size in one server", flush=True)
    with Served(args.out / ELASTIC) as server:
        load = bounded_load(server, names, prompts, args)
        together = {name: single_requests(server, name, prompts, args) for name in names}
        together_peak = server.peak_mib()
    rows = []
    for name, folder in sizes.items():
        print(f"[alone] {name}", flush=True)
        with Served(folder) as server:
            alone = single_requests(server, "anyshape", prompts, args)
            alone_peak = server.peak_mib()
        plain = transformers_alone(folder, prompts[: args.repeats], args.decode_tokens)
        rows.append({"size": name, **load[name], "decode_tps": together[name], "alone_decode_tps": alone,
                     "alone_peak_mib": alone_peak, "transformers_decode_tps": plain["decode_tps"],
                     "transformers_peak_mib": plain["peak_mib"]})  # fmt: skip
    results = {
        "rows": rows, "together_peak_mib": together_peak, "seconds": round(time.perf_counter() - started),
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "parameters": {name: shape_parameters(args.out / ELASTIC, name) for name in names},
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


def write_sizes(model_ref: str, out: Path) -> tuple[dict[str, Path], Any]:
    """The elastic/ folder with its summary.json (the sizes by name) and each size extracted:
    name -> extracted folder, and the tokenizer."""
    model, tokenizer = anyshape.load(model_ref), anyshape.load_tokenizer(model_ref)
    config = model.config
    shapes = {}
    for fraction in FRACTIONS:
        widths = {
            "hidden_size": max(ALIGN, round(config.hidden_size * fraction / ALIGN) * ALIGN),
            "intermediate_size": max(ALIGN, round(config.intermediate_size * fraction / ALIGN) * ALIGN),
        }
        shape = Shape.from_dict(widths, config)
        budget = round(shape.num_parameters(config) / Shape.full(config).num_parameters(config), 2)
        shapes[f"anyshape@{budget:g}"] = (budget, shape)
    elastic = out / ELASTIC
    if not (elastic / "config.json").is_file():
        record = {"train_tokens": 0, "fractions": [1.0], "align": ALIGN, "budget_basis": "total", "band": 0.1,
                  "algorithm": "random", "trials": 1}  # fmt: skip
        export_hf(model, Shape.full(config), elastic, tokenizer=tokenizer, parent=model_ref, overwrite=True,
                  extra={ELASTIC: record})  # fmt: skip
    members = [{"budget": budget, "shape": shape.to_dict(), "folder": name} for name, (budget, shape) in shapes.items()]
    (out / "summary.json").write_text(json.dumps({"members": members[1:]}))
    folders = {}
    for name, (_, shape) in shapes.items():
        folders[name] = out / name
        if not (folders[name] / "config.json").is_file():
            export_hf(model, shape, folders[name], tokenizer=tokenizer, parent=model_ref, overwrite=True)
    return folders, tokenizer


def shape_parameters(elastic: Path, name: str) -> int:
    config = anyshape.load_config(elastic)
    summary = json.loads((elastic.parent / "summary.json").read_text())["members"]
    shapes = {m["folder"]: Shape.from_dict(m["shape"], config) for m in summary}
    return shapes.get(name, Shape.full(config)).num_parameters(config)


class Served:
    """`anyshape serve FOLDER` in a subprocess on a free port, until the block ends (Ctrl-C)."""

    def __init__(self, folder: Path):
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Served:
        command = [sys.executable, "-m", "anyshape", "serve", str(self.folder), "--port", str(self.port),
                   "--max-batch", "8", "--max-waiting", "256"]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.address}/health", timeout=5):
                    break
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"anyshape serve {self.folder} exited with {self.process.returncode}") from None
                time.sleep(0.5)
        self.client = openai.OpenAI(base_url=f"{self.address}/v1", api_key="unused", max_retries=0, timeout=600)
        return self

    def peak_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(120)


def streamed(server: Served, name: str, prompt: list[int], max_tokens: int) -> dict[str, float]:
    """One greedy streamed request: seconds to the first token, per later token, and tokens."""
    started = time.perf_counter()
    times, tokens = [], 0
    stream = server.client.completions.create(
        model=name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    first = times[0] - started if times else float("nan")
    per_token = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 and len(times) > 1 else float("nan")
    return {"ttft": first, "itl": per_token, "tokens": tokens, "end": time.perf_counter()}


def bounded_load(server: Served, names: list[str], prompts: list[list[int]], args) -> dict[str, dict[str, float]]:
    """`args.requests` streamed requests, the sizes in turn, `args.concurrency` at a time: per
    size, requests/s over the whole load, p50/p95 time to first token and inter-token latency."""
    jobs = [(names[i % len(names)], prompts[i % len(prompts)]) for i in range(args.requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(lambda job: (job[0], streamed(server, *job, args.max_tokens)), jobs))
    seconds = time.perf_counter() - started
    assert all(answer["tokens"] >= 1 for _, answer in answers), "a request was not answered"
    load = {}
    for name in names:
        mine = [answer for size, answer in answers if size == name]
        load[name] = {
            "requests_per_s": len(mine) / seconds,
            "ttft_p50_ms": 1000 * percentile([a["ttft"] for a in mine], 50),
            "ttft_p95_ms": 1000 * percentile([a["ttft"] for a in mine], 95),
            "itl_p50_ms": 1000 * percentile([a["itl"] for a in mine], 50),
            "itl_p95_ms": 1000 * percentile([a["itl"] for a in mine], 95),
            "load_tokens_per_s": sum(a["tokens"] for a in mine) / seconds,
        }
    return load


def single_requests(server: Served, name: str, prompts: list[list[int]], args) -> float:
    """Median decode tokens/s of `args.repeats` requests of `name`, one at a time."""
    streamed(server, name, prompts[0], 4)  # warm-up
    return statistics.median(1 / streamed(server, name, p, args.decode_tokens)["itl"] for p in prompts[: args.repeats])


def transformers_alone(folder: Path, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """Decode tokens/s (median, batch 1, greedy) and peak memory of a plain transformers process."""
    command = [sys.executable, "-c", TRANSFORMERS_RUN, str(folder), json.dumps(prompts), str(tokens)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(output.stdout.strip().splitlines()[-1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(results: dict[str, Any]) -> str:
    rows, params = results["rows"], results["parameters"]
    lines = [
        f"Bounded load: {results['requests']} streamed requests, {results['concurrency']} at a time, "
        f"at most {results['max_tokens']} tokens each (fewer where the model ends its text), the sizes in turn; "
        "single requests: greedy, one at a time.",
        "",
        "| size | params | req/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | decode tok/s together | alone | ratio "
        "| transformers alone tok/s | peak MiB alone | transformers peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["decode_tps"] / row["alone_decode_tps"]
        cells = [
            row["size"], f"{params[row['size']] / 1e6:.1f}M", f"{row['requests_per_s']:.2f}",
            f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f}",
            f"{row['itl_p50_ms']:.0f} / {row['itl_p95_ms']:.0f}",
            f"{row['decode_tps']:.1f}", f"{row['alone_decode_tps']:.1f}", f"{ratio:.2f}x",
            f"{row['transformers_decode_tps']:.1f}", f"{row['alone_peak_mib']:.0f}",
            f"{row['transformers_peak_mib']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    largest = rows[0]["alone_peak_mib"]
    together = results["together_peak_mib"]
    separate = sum(row["alone_peak_mib"] for row in rows)
    plain = sum(row["transformers_peak_mib"] for row in rows)
    memory_ratio = together / largest
    lines += [
        "",
        f"Peak memory: every size in one server {together:.0f} MiB; the largest alone {largest:.0f} MiB "
        f"({memory_ratio:.2f}x, goal at most {MEMORY_GOAL}x: {'met' if memory_ratio <= MEMORY_GOAL else 'MISSED'}); "
        f"one anyshape server per size {separate:.0f} MiB in all; one transformers process per size {plain:.0f} MiB.",
    ]
    for row in rows:
        ratio = row["decode_tps"] / row["alone_decode_tps"]
        verdict = "met" if abs(ratio - 1) <= SPEED_GOAL else "MISSED"
        lines.append(
            f"{row['size']}: decode {ratio:.2f}x its extracted model served alone (goal within 20%: {verdict})"
        )
    lines.append(f"\ntotal {results['seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
