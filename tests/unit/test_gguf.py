"""GGUF export is exact: the file, read back by transformers' GGUF reader (which undoes llama.cpp's
Q/K row permutation) and by anyshape.load, gives the elastic model's logits at the Shape; the
tokenizer, the metadata and the out types are what llama.cpp expects; bad inputs are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

import anyshape
from anyshape import AnyshapeError, CheckpointError, Shape, ShapeError
from anyshape.export.gguf import _pre_tokenizer_name, export_gguf, interleave_rotary_halves
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from tests.conftest import TINY, byte_tokenizer
from tests.unit.test_cli import assert_bad_input, run

# ------------------------------------------------------------------ tiny parents with a BPE tokenizer

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a")]
SENTENCE = "the winter in the north is thin"


def bpe_tokenizer(merges: list[tuple[str, str]] = MERGES) -> PreTrainedTokenizerFast:
    """Byte-level BPE of 256 tokens or fewer: 248 bytes (all but the control bytes 0-7), one token per
    merge, then <s> (added before every text) and </s>. The conftest tokenizer has no merges,
    which llama.cpp cannot read."""
    spelling = bytes_to_unicode()
    vocab = {spelling[byte]: index for index, byte in enumerate(range(8, 256))}
    for first, second in merges:
        vocab[first + second] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", len(vocab))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}</s>{% endfor %}"
    return tokenizer


DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
PARENTS = {  # name -> (tiny model, config.json changes)
    "llama-mha-tied": ("llama-mha-tied", {}),
    # transformers' GGUF reader ignores RoPE scaling, so its parity test runs llama3-gqa without it
    "llama-gqa": ("llama3-gqa", {"rope_parameters": DEFAULT_ROPE}),
    "mistral-full": ("mistral-window", {"sliding_window": None}),
    "qwen2-gqa": ("qwen2-gqa", {}),
    "llama3-gqa": ("llama3-gqa", {}),
    "llama-linear": ("llama-mha-tied", {"rope_parameters": {**DEFAULT_ROPE, "rope_type": "linear", "factor": 2.0}}),
    "llama-yarn": (
        "llama-mha-tied",
        {
            "rope_parameters": {
                **DEFAULT_ROPE,
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 16.0,
            }
        },
    ),
    "mistral-window": ("mistral-window", {}),
}
SHAPES = {  # parent -> case -> Shape fields
    "llama-mha-tied": {  # 4 heads, one per KV group
        "depth": {"layers": [0, 2, 3]},
        "width": {"hidden_size": 40, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 50},
        "mixed": {"layers": [1, 3], "hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 3},
    },
    "llama-gqa": {  # 8 query heads of head_dim 16 in 2 KV groups: q_proj is wider than hidden_size
        "depth": {"layers": [0, 2, 3]},
        "width": {"hidden_size": 40, "num_attention_heads": 4, "intermediate_size": 50},
        "mixed": {
            "layers": [1, 3],
            "hidden_size": 48,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 33,
        },
    },
    "mistral-full": {  # 4 query heads in 2 KV groups
        "depth": {"layers": [1, 2]},
        "width": {"hidden_size": 40, "num_attention_heads": 2, "intermediate_size": 50},
        "mixed": {"layers": [0, 3], "hidden_size": 32, "num_attention_heads": 1, "num_key_value_heads": 1},
    },
    "qwen2-gqa": {  # 6 query heads of head_dim 16 in 3 KV groups; llama.cpp's qwen2 needs Q' * 16 = H'
        "depth": {"layers": [0, 3], "hidden_size": 48, "num_attention_heads": 3},
        "width": {"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 50},
        "mixed": {
            "layers": [1, 3],
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 33,
        },
    },
}
INPUT_IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def parent_dir(tiny_dir, tmp_path_factory):
    """parent_dir(name) -> a copy of a tiny model's folder with PARENTS' changes and bpe_tokenizer()."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            base, changes = PARENTS[name]
            folder = tmp_path_factory.mktemp(name) / "model"
            shutil.copytree(tiny_dir(base), folder)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **changes}))
            for path in folder.glob("tokenizer*"):
                path.unlink()
            bpe_tokenizer().save_pretrained(folder)
            cache[name] = folder
        return cache[name]

    return make


@pytest.fixture(scope="module")
def parent(parent_dir):
    """parent(name) -> (ElasticLlama, tokenizer) of parent_dir(name). The tokenizer is the one saved
    there, built anew: AutoTokenizer would load it as Qwen2Tokenizer in a Qwen2 folder, which adds
    <|endoftext|> beyond the 256 embedding rows."""
    cache: dict[str, tuple] = {}

    def make(name: str) -> tuple[ElasticLlama, PreTrainedTokenizerFast]:
        if name not in cache:
            cache[name] = anyshape.load(parent_dir(name)), bpe_tokenizer()
        return cache[name]

    return make


def export(parent, name: str, fields: dict, out: Path, outtype: str = "f32") -> tuple[ElasticLlama, Shape]:
    model, tokenizer = parent(name)
    shape = Shape.from_dict(fields, model.config)
    export_gguf(model, shape, out, tokenizer, outtype=outtype, parent=name)
    return model, shape


def metadata(path: Path) -> dict:
    """Every key of a GGUF file with its value (arrays as lists)."""
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("case", ["depth", "width", "mixed"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_reloaded_file_gives_the_elastic_logits(parent, tmp_path, name, case):
    out = tmp_path / "model.gguf"
    model, shape = export(parent, name, SHAPES[name][case], out)
    with torch.no_grad():
        expected = model(INPUT_IDS, shape)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(anyshape.load(out)(INPUT_IDS), expected, atol=1e-4, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == shape.num_parameters(model.config)


def test_metadata_describes_the_shape(parent, tmp_path):
    out = tmp_path / "model.gguf"
    model, shape = export(parent, "llama-gqa", SHAPES["llama-gqa"]["mixed"], out, outtype="q8_0")
    keys = metadata(out)
    assert keys["general.architecture"] == "llama"
    assert keys["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "context_length": 256,
        "embedding_length": 48,
        "block_count": 2,
        "feed_forward_length": 33,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "attention.key_length": 16,  # head_dim, not hidden_size / heads = 24
        "attention.value_length": 16,
        "rope.dimension_count": 16,
        "vocab_size": 256,
    }
    assert {key: keys[f"llama.{key}"] for key in expected} == expected
    assert keys["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert keys["llama.rope.freq_base"] == 10000.0
    assert json.loads(keys["anyshape.shape"]) == shape.to_dict()
    assert keys["anyshape.parent"] == "llama-gqa"
    names = set(tensors(out))
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names
    assert "blk.2.attn_q.weight" not in names  # two kept layers, renumbered 0 and 1


def test_tied_embeddings_write_no_output_tensor(parent, tmp_path):
    export(parent, "llama-mha-tied", {}, tmp_path / "model.gguf")
    assert "output.weight" not in tensors(tmp_path / "model.gguf")


def test_q_and_k_rows_are_interleaved_per_head(parent, tmp_path):
    rows = torch.arange(16.0)  # two heads of head_dim 8: HF pairs i with i + 4, llama.cpp 2i with 2i + 1
    assert interleave_rotary_halves(rows, heads=2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    out = tmp_path / "model.gguf"
    model, _ = export(parent, "llama-gqa", {}, out)
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach()
    written = torch.from_numpy(np.array(tensors(out)["blk.0.attn_q.weight"].data))
    torch.testing.assert_close(written, interleave_rotary_halves(q_proj, heads=8), atol=0, rtol=0)
    assert not torch.equal(written, q_proj)


def test_qwen2_keeps_hf_rotary_layout(parent, tmp_path):
    out = tmp_path / "model.gguf"
    model, _ = export(parent, "qwen2-gqa", SHAPES["qwen2-gqa"]["width"], out)
    assert metadata(out)["general.architecture"] == "qwen2"
    written = np.array(tensors(out)["blk.0.attn_k.bias"].data)
    np.testing.assert_array_equal(written, model.model.layers[0].self_attn.k_proj.bias.detach().numpy())


# ------------------------------------------------------------------ RoPE scaling


def test_llama3_rope_is_written_as_frequency_divisors(parent, tmp_path):
    out = tmp_path / "model.gguf"
    model, _ = export(parent, "llama3-gqa", {"hidden_size": 32}, out)
    factors = torch.from_numpy(np.array(tensors(out)["rope_freqs.weight"].data)).double()
    default = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(default / factors, model.inv_freq.double(), rtol=1e-6, atol=0)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)  # fast kept, slow scaled
    assert "llama.rope.scaling.type" not in metadata(out)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama-linear", {"type": "linear", "factor": 2.0}),
        ("llama-yarn", {"type": "yarn", "factor": 4.0, "original_context_length": 64, "yarn_beta_fast": 16.0}),
    ],
)
def test_rope_scaling_metadata(parent, tmp_path, name, expected):
    out = tmp_path / "model.gguf"
    export(parent, name, {}, out)
    keys = metadata(out)
    assert {key: keys[f"llama.rope.scaling.{key}"] for key in expected} == expected
    assert "rope_freqs.weight" not in tensors(out)


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips(parent, tmp_path):
    out = tmp_path / "model.gguf"
    _, tokenizer = parent("llama-mha-tied")
    export(parent, "llama-mha-tied", SHAPES["llama-mha-tied"]["mixed"], out)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert reloaded(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]
    assert tokenizer(SENTENCE)["input_ids"][:3] == [254, 108, 249]  # <s>, then "t" "he": merges applied
    assert (reloaded.bos_token, reloaded.eos_token) == ("<s>", "</s>")
    assert reloaded.chat_template == tokenizer.chat_template
    keys = metadata(out)
    assert (keys["tokenizer.ggml.model"], keys["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert keys["tokenizer.ggml.merges"] == [" ".join(pair) for pair in MERGES]
    assert (keys["tokenizer.ggml.bos_token_id"], keys["tokenizer.ggml.eos_token_id"]) == (254, 255)
    assert (keys["tokenizer.ggml.add_bos_token"], keys["tokenizer.ggml.add_eos_token"]) == (True, False)
    assert keys["tokenizer.ggml.token_type"][250:] == [gguf.TokenType.NORMAL] * 4 + [gguf.TokenType.CONTROL] * 2


def test_embedding_rows_without_a_token_are_padded(parent, tmp_path):
    model, _ = parent("llama-mha-tied")
    out = tmp_path / "model.gguf"
    export_gguf(model, model.full_shape, out, bpe_tokenizer(MERGES[:4]))  # 254 tokens for 256 rows
    keys = metadata(out)
    assert keys["tokenizer.ggml.tokens"][-4:] == ["<s>", "</s>", "[PAD254]", "[PAD255]"]
    assert keys["tokenizer.ggml.token_type"][-2:] == [gguf.TokenType.UNUSED] * 2


def pre_tokenizer_json(pre_tokenizer) -> dict:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    return json.loads(backend.to_str())["pre_tokenizer"]


LLAMA3_SPLIT = (  # Llama 3's tokenizer.json
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.mark.parametrize(
    ("pre_tokenizer", "name"),
    [
        (pre_tokenizers.ByteLevel(add_prefix_space=False), "gpt-2"),
        (
            pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            ),
            "smollm",
        ),
        (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            ),
            "llama3",
        ),
        (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            ),
            "qwen2",
        ),
    ],
    ids=["gpt2", "smollm", "llama3", "qwen2"],
)
def test_pre_tokenizer_names(pre_tokenizer, name):
    assert _pre_tokenizer_name(pre_tokenizer_json(pre_tokenizer)) == name


# ------------------------------------------------------------------ out types


def test_out_types_shrink_the_file_and_keep_the_logits(parent, tmp_path):
    model, _ = parent("llama-gqa")
    sizes = {}
    with torch.no_grad():
        expected = model(INPUT_IDS)
        for outtype, atol in [("f32", 1e-4), ("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1)]:
            out = tmp_path / f"{outtype}.gguf"
            export(parent, "llama-gqa", {}, out, outtype=outtype)
            sizes[outtype] = out.stat().st_size
            torch.testing.assert_close(anyshape.load(out)(INPUT_IDS), expected, atol=atol, rtol=0)
    assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < sizes["f32"]
    types = {name: tensor.tensor_type for name, tensor in tensors(tmp_path / "q8_0.gguf").items()}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_q8_0_falls_back_to_f16_where_blocks_do_not_tile_rows(parent, tmp_path):
    out = tmp_path / "model.gguf"
    export(parent, "llama-gqa", {"intermediate_size": 50}, out, outtype="q8_0")
    types = {name: tensor.tensor_type for name, tensor in tensors(out).items()}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of hidden_size 64
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 50 neurons


# ------------------------------------------------------------------ refusals


def tokenizer_with(pre_tokenizer=None, byte_fallback: bool = False) -> PreTrainedTokenizerFast:
    """bpe_tokenizer() with another pre-tokenizer, or SentencePiece-style (byte fallback, Metaspace)."""
    backend = Tokenizer.from_str(bpe_tokenizer().backend_tokenizer.to_str())
    if byte_fallback:
        spec = json.loads(backend.to_str())
        spec["model"]["byte_fallback"] = True
        spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        backend = Tokenizer.from_str(json.dumps(spec))
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize(
    ("tokenizer", "words"),
    [
        (byte_tokenizer(), ["no BPE merges", "trained tokenizer"]),
        (tokenizer_with(byte_fallback=True), ["byte-level BPE", "byte fallback", "convert_hf_to_gguf"]),
        (tokenizer_with(pre_tokenizers.Whitespace()), ["pre-tokenizer (Whitespace)", "no llama.cpp name"]),
        (tokenizer_with(pre_tokenizers.ByteLevel(add_prefix_space=True)), ["pre-tokenizer (ByteLevel)"]),
    ],
    ids=["no-merges", "sentencepiece-style", "unknown-pre-tokenizer", "prefix-space"],
)
def test_unsupported_tokenizers_are_refused(parent, tmp_path, tokenizer, words):
    model, _ = parent("llama-mha-tied")
    with pytest.raises(CheckpointError) as error:
        export_gguf(model, model.full_shape, tmp_path / "model.gguf", tokenizer)
    for word in words:
        assert word in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_larger_than_the_embedding_is_refused(parent, tmp_path):
    model, tokenizer = parent("llama-mha-tied")
    bigger = bpe_tokenizer()
    bigger.add_tokens(["<extra>"])
    with pytest.raises(CheckpointError, match="token id 256, but the model's embedding has 256 rows"):
        export_gguf(model, model.full_shape, tmp_path / "model.gguf", bigger)


def elastic(**changes) -> ElasticLlama:
    """A random tiny Llama with config changes."""
    config = LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=4, **changes)
    return ElasticLlama(LlamaFamilyConfig.from_hf(config))


@pytest.mark.parametrize(
    ("name", "fields", "error", "words"),
    [
        ("mistral-window", {}, CheckpointError, ["sliding_window=8", "context of 256", "no sliding window"]),
        ("qwen2-gqa", {"layers": (0,)}, ShapeError, ["6 * 16 = 96", "hidden_size=64", "choose hidden_size=96"]),
        ("llama-mha-tied", {"hidden_size": 65}, ShapeError, ["hidden_size=65", "1..64"]),
    ],
    ids=["mistral-sliding-window", "qwen2-heads-not-hidden", "invalid-shape"],
)
def test_models_llama_cpp_cannot_run_are_refused(parent, tmp_path, name, fields, error, words):
    model, tokenizer = parent(name)
    with pytest.raises(error) as raised:
        export_gguf(model, Shape(**{**model.full_shape.__dict__, **fields}), tmp_path / "m.gguf", tokenizer)
    for word in words:
        assert word in str(raised.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "words"),
    [({"attention_bias": True}, ["attention_bias"]), ({"hidden_act": "gelu"}, ["hidden_act='gelu'", "SiLU"])],
    ids=["llama-bias", "gelu"],
)
def test_unsupported_llama_variants_are_refused(tmp_path, changes, words):
    model = elastic(**changes)
    with pytest.raises(CheckpointError) as error:
        export_gguf(model, model.full_shape, tmp_path / "model.gguf", bpe_tokenizer())
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    ("out", "outtype", "words"),
    [
        ("model.gguf", "q4_0", ["outtype 'q4_0'", "f32, f16, bf16, q8_0"]),
        ("model.bin", "f16", ["must end in .gguf", "model.gguf"]),
        ("folder.gguf", "f16", ["is a folder", "one file"]),
        ("existing.gguf", "f16", ["already exists", "overwrite=True"]),
    ],
    ids=["bad-outtype", "bad-suffix", "folder", "exists"],
)
def test_bad_outputs_are_refused(parent, tmp_path, out, outtype, words):
    (tmp_path / "folder.gguf").mkdir()
    (tmp_path / "existing.gguf").write_text("mine")
    model, tokenizer = parent("llama-mha-tied")
    with pytest.raises(AnyshapeError) as error:
        export_gguf(model, model.full_shape, tmp_path / out, tokenizer, outtype=outtype)
    for word in words:
        assert word in str(error.value)
    assert (tmp_path / "existing.gguf").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.gguf", "folder.gguf"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_interrupted_export_leaves_nothing(parent, tmp_path, monkeypatch, overwrite):
    def interrupt(*args, **kwargs):  # Ctrl-C while the tensors are written
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupt)
    out = tmp_path / "model.gguf"
    if overwrite:
        out.write_text("previous")
    model, tokenizer = parent("llama-mha-tied")
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, model.full_shape, out, tokenizer, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == (["model.gguf"] if overwrite else [])
    if overwrite:
        assert out.read_text() == "previous"


def test_overwrite_replaces_the_file(parent, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_text("previous")
    model, tokenizer = parent("llama-mha-tied")
    export_gguf(model, model.full_shape, out, tokenizer, overwrite=True)
    assert metadata(out)["general.architecture"] == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


# ------------------------------------------------------------------ llama.cpp itself


@pytest.mark.parametrize(("name", "case"), [("llama3-gqa", "mixed"), ("qwen2-gqa", "mixed")])
def test_llama_cpp_gives_the_elastic_logits(parent, tmp_path, name, case):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    out = tmp_path / "model.gguf"
    fields = SHAPES.get(name, SHAPES["llama-gqa"])[case]
    model, shape = export(parent, name, fields, out)
    ids = INPUT_IDS[0].tolist()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    with torch.no_grad():
        expected = model(INPUT_IDS[:1], shape)[0]
    torch.testing.assert_close(torch.from_numpy(np.array(llm.scores[: len(ids)])), expected, atol=1e-3, rtol=0)


# ------------------------------------------------------------------ the command


def test_export_command_writes_gguf(capsys, parent, parent_dir, tmp_path):
    out = tmp_path / "small.gguf"
    fields = {"layers": [1, 3], "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 33}
    args = ["export", parent_dir("llama-gqa"), "--shape", json.dumps(fields), "--outtype", "f32", "--out", out]
    status, stdout, err = run(capsys, *args, "--json")
    assert status == 0, err
    record = json.loads(stdout)
    model, _ = parent("llama-gqa")
    shape = Shape.from_dict(fields, model.config)
    assert (record["out"], record["format"], record["outtype"]) == (str(out), "gguf", "f32")
    assert record["shape"] == shape.to_dict() and record["bytes"] == out.stat().st_size
    assert record["num_parameters"] == shape.num_parameters(model.config)
    assert record["tensor_types"] == {"f32": 2 * 9 + 3}  # 9 tensors per layer, embedding, head, final norm
    with torch.no_grad():
        torch.testing.assert_close(anyshape.load(out)(INPUT_IDS), model(INPUT_IDS, shape), atol=1e-4, rtol=0)

    status, stdout, err = run(capsys, *args[:-3], "q8_0", "--out", out, "--overwrite", "--json")
    assert status == 0, err
    assert json.loads(stdout)["tensor_types"] == {"f16": 2, "f32": 5, "q8_0": 14}  # ffn_down: rows of 33
    assert "2 matrices are stored as f16, not q8_0" in err and "--align 32" in err


def test_export_command_writes_hf(capsys, parent, parent_dir, tmp_path):
    out = tmp_path / "small"
    args = ["export", parent_dir("llama-gqa"), "--format", "hf", "--outtype", "bf16", "--out", out]
    status, _, err = run(capsys, *args, "--shape", '{"num_hidden_layers": 2}')
    assert status == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2 and reloaded.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--outtype", "q4_0"], ["--outtype", "'q4_0' is not one of f32, f16, bf16, q8_0"]),
        (["--format", "hf", "--outtype", "q8_0"], ["'q8_0' is not one of f32, f16, bf16", "--format hf"]),
        (["--format", "onnx"], ["--format", "'onnx' is not one of gguf, hf"]),
        (["--out", "EXISTS"], ["already exists", "--overwrite"]),
        (["--out", "FOLDER"], ["is a folder", "one file"]),
        (["--out", "model.bin"], ["must end in .gguf"]),
        (["--shape", '{"layers": [0, 9]}'], ["index 9", "0..3"]),
    ],
    ids=["bad-outtype", "q8_0-for-hf", "bad-format", "exists", "folder", "bad-suffix", "bad-shape"],
)
def test_export_command_bad_input(capsys, parent_dir, tmp_path, args, words):
    (tmp_path / "exists.gguf").write_text("mine")
    (tmp_path / "folder.gguf").mkdir()
    replace = {"EXISTS": tmp_path / "exists.gguf", "FOLDER": tmp_path / "folder.gguf", "model.bin": tmp_path / "m.bin"}
    args = [replace.get(arg, arg) for arg in args]
    out = [] if "--out" in args else ["--out", tmp_path / "new.gguf"]
    assert_bad_input(capsys, ["export", parent_dir("llama-mha-tied"), *out, *args], *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf", "folder.gguf"]
    assert (tmp_path / "exists.gguf").read_text() == "mine"


@pytest.mark.parametrize(
    ("model", "words"),
    [("mistral-window", ["sliding_window=8", "anyshape extract"]), ("no-merges", ["no BPE merges"])],
)
def test_export_command_refuses_what_llama_cpp_cannot_run(capsys, parent_dir, tiny_dir, tmp_path, model, words):
    folder = tiny_dir("llama-mha-tied") if model == "no-merges" else parent_dir(model)
    out = tmp_path / "model.gguf"
    assert_bad_input(capsys, ["export", folder, "--out", out], *words)
    assert not out.exists()


def test_export_help_teaches(capsys):
    status, out, _ = run(capsys, "export", "--help")
    assert status == 0
    for words in ("llama.cpp", "q8_0", "--overwrite", "anyshape export smollm2-135m"):
        assert words in out
