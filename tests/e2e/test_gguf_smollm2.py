"""GGUF export of the embedded SmolLM2-135M (slow: exports and reloads the real model)."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import anyshape
from anyshape import Shape
from anyshape.data.text import default_text
from anyshape.export.gguf import export_gguf
from tests.unit.test_cli import run

pytestmark = pytest.mark.slow

SHAPES = {  # SmolLM2: 30 layers, hidden 576, 9 query heads of head_dim 64 in 3 KV groups, MLP 1536
    "depth-only": {"layers": [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29]},
    "width-only": {"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1024},
    "mixed": {
        "layers": list(range(0, 30, 2)),
        "hidden_size": 384,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "intermediate_size": 1024,
    },
}
PROMPT = "Structured pruning keeps the most important units."


@pytest.fixture(scope="module")
def exported(smollm2, smollm2_tokenizer, tmp_path_factory):
    """exported(case, outtype) -> the GGUF file of SHAPES[case] ("full": the whole model), written once per module."""
    folder = tmp_path_factory.mktemp("gguf")
    files = {}

    def make(case: str, outtype: str = "f32"):
        if (case, outtype) not in files:
            out = folder / f"{case}-{outtype}.gguf"
            shape = smollm2.full_shape if case == "full" else Shape.from_dict(SHAPES[case], smollm2.config)
            export_gguf(smollm2, shape, out, smollm2_tokenizer, outtype=outtype, parent="smollm2-135m")
            files[case, outtype] = out
        return files[case, outtype]

    return make


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer):
    return smollm2_tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_reloaded_gguf_gives_the_elastic_logits(smollm2, exported, prompt_ids, case):
    path = exported(case)
    shape = Shape.from_dict(SHAPES[case], smollm2.config)
    with torch.no_grad():
        expected = smollm2(prompt_ids, shape)
        reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
        torch.testing.assert_close(reloaded(prompt_ids).logits, expected, atol=1e-4, rtol=0)
        if case == "mixed":  # anyshape.load reads GGUF through the same reader; once is enough
            torch.testing.assert_close(anyshape.load(path)(prompt_ids), expected, atol=1e-4, rtol=0)


def test_tokenizer_round_trips(smollm2_tokenizer, exported):
    path = exported("mixed")
    reloaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in [PROMPT, "Numbers like 2024 and 3.14, emoji 🦙, and <|im_start|>user\nHi<|im_end|>"]:
        assert reloaded(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    assert (reloaded.bos_token, reloaded.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert reloaded.chat_template == smollm2_tokenizer.chat_template


def test_q8_0_is_smaller_and_close(capsys, smollm2, exported, prompt_ids, tmp_path):
    out = tmp_path / "mixed-q8_0.gguf"
    args = ["export", "smollm2-135m", "--shape", json.dumps(SHAPES["mixed"]), "--outtype", "q8_0", "--out", out]
    status, stdout, err = run(capsys, *args, "--json")
    assert status == 0, err
    record = json.loads(stdout)
    assert record["tensor_types"] == {"f32": 2 * 15 + 1, "q8_0": 7 * 15 + 1}  # norms; matrices, tied embedding
    sizes = {"q8_0": out.stat().st_size, "f16": exported("mixed", "f16").stat().st_size}
    sizes["f32"] = exported("mixed").stat().st_size
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    shape = Shape.from_dict(SHAPES["mixed"], smollm2.config)
    with torch.no_grad():
        expected = smollm2(prompt_ids, shape)
        logits = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name)(prompt_ids).logits
    torch.testing.assert_close(logits, expected, atol=2.0, rtol=0)  # 8-bit weights: loose
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def greedy(model, shape: Shape, prompt: list[int], steps: int) -> list[int]:
    """The elastic model's greedy continuation of `prompt`, `steps` tokens long."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]), shape)[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_llama_cpp_continues_like_the_elastic_model(smollm2, exported, prompt_ids, case):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    shape = Shape.from_dict(SHAPES[case], smollm2.config)
    prompt = prompt_ids[0].tolist()
    llm = llama_cpp.Llama(model_path=str(exported(case)), n_ctx=128, verbose=False)
    continuation = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        continuation.append(token)
        if len(continuation) == 16:
            break
    assert continuation == greedy(smollm2, shape, prompt, 16)


def llama_cpp_perplexity(llama_cpp, path, token_ids: list[int]) -> float:
    """Perplexity that llama.cpp gives `token_ids` (one window, every token after the first scored)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(token_ids), logits_all=True, verbose=False)
    llm.eval(token_ids)
    logits = torch.from_numpy(np.array(llm.scores[: len(token_ids) - 1]))
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(token_ids[1:])).item())


def test_llama_cpp_q8_0_perplexity_is_within_3_percent_of_f32(smollm2_tokenizer, exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    token_ids = smollm2_tokenizer(default_text()[:4000])["input_ids"][:256]
    # on the whole model: an unsorted slice's perplexity is in the millions, where 8-bit noise is no measure
    f32, q8_0 = (llama_cpp_perplexity(llama_cpp, exported("full", outtype), token_ids) for outtype in ("f32", "q8_0"))
    assert abs(q8_0 / f32 - 1) <= 0.03, (f32, q8_0)
