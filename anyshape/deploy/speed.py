"""Generation speed on the CPU: prefill and decode tokens per second, and peak memory, of a model
(or a Shape of it) in three runtimes.

    anyshape      the elastic model at the Shape, with its KV cache (`runtime.generate.Decoder`)
    transformers  AutoModelForCausalLM on the Shape exported as a Hugging Face folder, DynamicCache
    llama.cpp     llama-cpp-python on the Shape exported as GGUF (q8_0 by default); only when the
                  optional package `llama_cpp` imports

Protocol, at batch 1 and the same for every runtime: `prompt_tokens` random token ids (seed 0)
run in one forward (prefill, from an empty cache), then `gen_tokens` ids fed one at a time
through the cache (decode). The decode ids are fixed in advance, so every runtime does the same
work and no sampling is timed; each step computes the last position's logits only. A repeat is
one prefill and its decode; `warmup` untimed repeats come first. Rates are tokens / seconds:
the median, min and max over `repeats`. The torch runtimes compute in float32.

Memory (Linux): the growth of the process's resident set while the runtime loads and runs, i.e.
its peak (VmHWM of /proc/self/status, reset through /proc/self/clear_refs) minus its resident
set just before loading (VmRSS), after freed memory went back to the system; None elsewhere.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import gc
import inspect
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, DynamicCache

from anyshape.checkpoints import load, load_config, load_tokenizer, resolve
from anyshape.errors import AnyshapeError, CheckpointError
from anyshape.export.hf import export_hf
from anyshape.extras import install_hint, require
from anyshape.runtime.generate import Decoder
from anyshape.shape import Shape

RUNTIMES = ("anyshape", "transformers", "llama.cpp")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # export.gguf.OUTTYPES, named without importing gguf
FAMILY_SUMMARY = "summary.json"  # what `anyshape compress` writes beside the member folders


@dataclass(frozen=True)
class SpeedSettings:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    repeats: int = 5
    warmup: int = 1
    threads: int = field(default_factory=torch.get_num_threads)  # torch's default: one per core
    gguf_type: str = "q8_0"  # the llama.cpp runtime's weights

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "gen_tokens", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise AnyshapeError(f"{name}={getattr(self, name)} must be at least 1")
        if self.warmup < 0:
            raise AnyshapeError(f"warmup={self.warmup} must be 0 or more")
        if self.gguf_type not in GGUF_TYPES:
            raise AnyshapeError(f"gguf_type {self.gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")


@dataclass(frozen=True)
class Rate:
    """Tokens per second over the timed repeats."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, tokens: int, seconds: list[float]) -> Rate:
        rates = [tokens / s for s in seconds]
        return cls(statistics.median(rates), min(rates), max(rates))


@dataclass(frozen=True)
class SpeedResult:
    model: str  # the model reference, or the member's folder name in a family
    runtime: str
    prefill: Rate
    decode: Rate
    peak_rss_mib: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Skipped:
    model: str
    runtime: str
    reason: str


class Unavailable(Exception):
    """A runtime that cannot load this model; the benchmark skips it with the message."""


class Runtime(Protocol):
    """A model loaded in one runtime. Both methods return the last token's logits (V,), which
    the benchmark discards and tests compare with the model's."""

    def prefill(self, prompt: list[int]) -> Tensor:
        """Runs the prompt from an empty cache."""

    def decode(self, token: int) -> Tensor:
        """Runs one more token through the cache."""


class AnyshapeRuntime:
    def __init__(self, model_ref: str, shape: Shape | None):
        self.model = load(model_ref)
        self.shape = shape

    def prefill(self, prompt: list[int]) -> Tensor:
        self.decoder = Decoder(self.model, self.shape)
        return self.decoder.run(prompt)

    def decode(self, token: int) -> Tensor:
        return self.decoder.run([token])


class TransformersRuntime:
    def __init__(self, folder: Path):
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
        # transformers 5 renames forward's `past_key_values` to `cache`; use the name it takes
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_keyword = "cache" if "cache" in parameters else "past_key_values"

    def prefill(self, prompt: list[int]) -> Tensor:
        self.cache = DynamicCache(config=self.model.config)  # filled in place by every forward
        return self._run(prompt)

    def decode(self, token: int) -> Tensor:
        return self._run([token])

    @torch.inference_mode()
    def _run(self, tokens: list[int]) -> Tensor:
        inputs = {"use_cache": True, "logits_to_keep": 1, self.cache_keyword: self.cache}
        return self.model(torch.tensor([tokens]), **inputs).logits[0, -1]


class LlamaCppRuntime:
    def __init__(self, gguf_file: Path, settings: SpeedSettings):
        import llama_cpp

        self.llama_cpp = llama_cpp
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(gguf_file),
                n_ctx=settings.prompt_tokens + settings.gen_tokens,
                n_batch=settings.prompt_tokens,  # the prompt in one forward, as in the other runtimes
                n_ubatch=settings.prompt_tokens,
                n_threads=settings.threads,
                n_threads_batch=settings.threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as error:
            raise Unavailable(f"llama.cpp cannot load the exported GGUF ({error})") from None

    def prefill(self, prompt: list[int]) -> Tensor:
        self.llm.reset()  # the next eval overwrites the cache from position 0
        return self._run(prompt)

    def decode(self, token: int) -> Tensor:
        return self._run([token])

    def _run(self, tokens: list[int]) -> Tensor:
        self.llm.eval(tokens)
        row = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # float* to the last token's logits
        return torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)))  # valid until the next eval


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp runtime cannot run here, or None if it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        return f"llama-cpp-python is not installed ({error}); {install_hint('llama_cpp')}"
    return None


def benchmark(
    model_ref: str,
    shape: Shape | None = None,
    settings: SpeedSettings = SpeedSettings(),  # noqa: B008  (frozen, so never mutated)
    runtimes: tuple[str, ...] = RUNTIMES,
    label: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[list[SpeedResult], list[Skipped]]:
    """Measures `model_ref` at `shape` (None: the whole model) in each of `runtimes`; a runtime
    that cannot run is skipped with the reason. Results are labelled `label` (default: model_ref)."""
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise AnyshapeError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNTIMES)}")
    label = label or model_ref
    path = resolve(model_ref)
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="anyshape-bench-") as tmp:
        folders = _exports(model_ref, path, shape, settings, runtimes, Path(tmp), label, skipped)
        vocab_size, count = load_config(model_ref).vocab_size, settings.prompt_tokens + settings.gen_tokens
        ids = torch.randint(0, vocab_size, (count,), generator=torch.Generator().manual_seed(0)).tolist()
        prompt, continuation = ids[: settings.prompt_tokens], ids[settings.prompt_tokens :]
        openers: dict[str, Callable[[], Runtime]] = {
            "anyshape": lambda: AnyshapeRuntime(model_ref, shape),
            "transformers": lambda: TransformersRuntime(folders["transformers"]),
            "llama.cpp": lambda: LlamaCppRuntime(folders["llama.cpp"], settings),
        }
        for name in runtimes:
            if name != "anyshape" and name not in folders:
                continue
            log(f"{label}: {name}")
            try:
                results.append(_measure(label, name, openers[name], prompt, continuation, settings))
            except Unavailable as reason:
                skipped.append(Skipped(label, name, str(reason)))
    return results, skipped


def family_members(folder: str | Path) -> list[tuple[str, Path]]:
    """(name, folder) of each member of a family folder written by `anyshape compress`, in the
    order of its summary.json."""
    folder = Path(folder)
    summary_path = folder / FAMILY_SUMMARY
    try:
        members = json.loads(summary_path.read_text())["members"]
        names = [member["folder"] for member in members]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{summary_path} does not list the family's members ({type(error).__name__}: {error}); "
            "pass a folder written by `anyshape compress`, or one model folder"
        ) from None
    missing = [name for name in names if not (folder / name / "config.json").is_file()]
    if missing or not names:
        raise CheckpointError(
            f"{folder} is not a complete family: summary.json lists {names}, but "
            f"{missing or 'no members'} have no config.json there; re-run `anyshape compress`"
        )
    return [(name, folder / name) for name in names]


def is_family(ref: str | Path) -> bool:
    """Whether `ref` is a family folder (a summary.json beside member folders, no config.json)."""
    path = Path(ref)
    return path.is_dir() and (path / FAMILY_SUMMARY).is_file() and not (path / "config.json").is_file()


def write_csv(results: list[SpeedResult], settings: SpeedSettings, path: str | Path) -> None:
    """One row per model and runtime: the rates' median/min/max, peak memory, the settings."""
    columns = ["model", "runtime"]
    columns += [f"{phase}_tok_s_{stat}" for phase in ("prefill", "decode") for stat in ("median", "min", "max")]
    columns += ["peak_rss_mib", "prompt_tokens", "gen_tokens", "repeats", "threads"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for r in results:
            writer.writerow(
                [r.model, r.runtime]
                + [
                    getattr(getattr(r, phase), stat)
                    for phase in ("prefill", "decode")
                    for stat in ("median", "min", "max")
                ]
                + [r.peak_rss_mib, settings.prompt_tokens, settings.gen_tokens, settings.repeats, settings.threads]
            )


def plot_speeds(results: list[SpeedResult], path: str | Path) -> None:
    """Two panels, prefill and decode tokens/s: one bar per model and runtime (the median, with
    min-max whiskers). Writes a PNG to `path`."""
    matplotlib = require("matplotlib", "the speed plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    runtimes = list(dict.fromkeys(r.runtime for r in results))
    width = 0.8 / len(runtimes)
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(models) + 3), 4))
    for axis, phase in zip(axes, ("prefill", "decode"), strict=True):
        for k, runtime in enumerate(runtimes):
            rows = {r.model: getattr(r, phase) for r in results if r.runtime == runtime}
            xs = [i + (k - (len(runtimes) - 1) / 2) * width for i, m in enumerate(models) if m in rows]
            rates = [rows[m] for m in models if m in rows]
            medians = [rate.median for rate in rates]
            whiskers = [[rate.median - rate.min for rate in rates], [rate.max - rate.median for rate in rates]]
            axis.bar(xs, medians, width, yerr=whiskers, capsize=3, label=runtime)
        axis.set_xticks(range(len(models)), models)
        axis.set_ylabel(f"{phase} tokens/s")
        axis.set_title(phase)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _exports(
    model_ref: str,
    path: Path,
    shape: Shape | None,
    settings: SpeedSettings,
    runtimes: tuple[str, ...],
    tmp: Path,
    label: str,
    skipped: list[Skipped],
) -> dict[str, Path]:
    """The Hugging Face folder and the GGUF file the other runtimes load: the model's own folder
    where it is one (and no Shape is asked), else exports to `tmp`."""
    folders: dict[str, Path] = {}
    if "llama.cpp" in runtimes and (reason := llama_cpp_missing()) is not None:
        skipped.append(Skipped(label, "llama.cpp", reason))
        runtimes = tuple(r for r in runtimes if r != "llama.cpp")
    if "transformers" in runtimes and path.is_dir() and shape is None:
        folders["transformers"] = path
    needs_export = ("transformers" in runtimes and "transformers" not in folders) or "llama.cpp" in runtimes
    if not needs_export:
        return folders
    model = load(model_ref)
    chosen = shape or model.full_shape
    if "transformers" in runtimes and "transformers" not in folders:
        folders["transformers"] = export_hf(model, chosen, tmp / "hf")
    if "llama.cpp" in runtimes:
        from anyshape.export.gguf import export_gguf

        try:
            gguf = export_gguf(model, chosen, tmp / "model.gguf", load_tokenizer(model_ref), settings.gguf_type)
            folders["llama.cpp"] = gguf
        except AnyshapeError as error:
            skipped.append(Skipped(label, "llama.cpp", f"cannot export this model as GGUF ({error})"))
    del model
    return folders


def _measure(
    label: str,
    name: str,
    open_runtime: Callable[[], Runtime],
    prompt: list[int],
    continuation: list[int],
    settings: SpeedSettings,
) -> SpeedResult:
    """Loads the runtime and times `warmup` + `repeats` prefills and decodes; see the module."""
    with _threads(settings.threads), _peak_memory() as peak:
        runtime = open_runtime()
        prefill_s, decode_s = [], []
        for repeat in range(settings.warmup + settings.repeats):
            start = time.perf_counter()
            runtime.prefill(prompt)
            prefilled = time.perf_counter()
            for token in continuation:
                runtime.decode(token)
            done = time.perf_counter()
            if repeat >= settings.warmup:
                prefill_s.append(prefilled - start)
                decode_s.append(done - prefilled)
        del runtime
    return SpeedResult(
        label,
        name,
        Rate.of(settings.prompt_tokens, prefill_s),
        Rate.of(settings.gen_tokens, decode_s),
        peak.get("mib"),
    )


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _peak_memory() -> Iterator[dict[str, float]]:
    """Yields a dict that gets 'mib': the resident-set growth (MiB) of what ran inside, at its
    peak; see the module docstring. Left empty where /proc cannot tell."""
    record: dict[str, float] = {}
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap back to the system
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak := current resident set
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    yield record
    if before is not None:
        record["mib"] = (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    """A `field:  N kB` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")
