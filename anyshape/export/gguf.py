"""Export a Shape as one GGUF file that llama.cpp runs.

Llama, SmolLM and Mistral are written as llama.cpp's `llama` architecture, Qwen2 as `qwen2`. The
weights come from `extract_state_dict` (the one slicer) and take GGUF names from gguf's own
tensor-name map. Three things differ from a Hugging Face checkpoint:

- RoPE layout. HF rotates the two halves of each head; llama.cpp's `llama` architecture rotates
  adjacent channel pairs, so the rows of q_proj and k_proj are interleaved per head
  (`interleave_rotary_halves`; readers such as transformers' undo it). `qwen2` keeps HF's layout.
- head_dim. After slicing, H'/Q' need not equal head_dim, so it is written explicitly as the key,
  value and RoPE dimensions. (llama.cpp's `qwen2` still needs Q' * head_dim = H'.)
- RoPE scaling. `linear` and `yarn` are metadata; `llama3` is a `rope_freqs` tensor of
  per-frequency divisors, as llama.cpp's converter writes it.

Tensors of one dimension (norms, biases, rope_freqs) stay float32 in every out type, as in
llama.cpp's converter; q8_0 falls back to float16 for a matrix whose rows are not whole 32-value
blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType, TokenType
from torch import Tensor
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import AnyshapeError, CheckpointError, ShapeError
from anyshape.export.extract import extract_state_dict
from anyshape.files import atomic_file
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from anyshape.shape import Shape
from anyshape.version import __version__

# --outtype -> (type of every matrix, the file type llama.cpp reports)
OUTTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}

# tokenizer.json's `Split` regex -> llama.cpp's pre-tokenizer name (the first name wins), from
# the table transformers uses to rebuild tokenizers from GGUF files.
SPLIT_PRE_TOKENIZERS = {regex: name for name, regex in reversed(GGUF_PRE_TOKENIZER_SPLITS.items())}
CONVERT_INSTEAD = (
    "export a Hugging Face folder with `anyshape extract` and convert it with llama.cpp's convert_hf_to_gguf.py"
)


def export_gguf(
    model: ElasticLlama,
    shape: Shape,
    out: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    outtype: str = "f16",
    parent: str = "",
    overwrite: bool = False,
) -> Path:
    """Writes the Shape's sub-network and `tokenizer` to the GGUF file `out`, atomically (a
    temporary file beside it, renamed when complete).

    `outtype` is one of f32, f16, bf16, q8_0. `parent` names the source model in `general.name`
    and `anyshape.parent`. An existing `out` is replaced only with `overwrite=True`. Returns `out`.
    """
    out = Path(out)
    if outtype not in OUTTYPES:
        raise AnyshapeError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    _check_out(out, overwrite)
    architecture = gguf_architecture(model.config, shape.validate(model.config))
    tensor_type, file_type = OUTTYPES[outtype]

    writer = GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[architecture])
    writer.add_name(f"{Path(parent).name or 'model'} (anyshape)")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, model, shape)
    _add_tokenizer(writer, tokenizer, model.config.vocab_size)
    writer.add_string("anyshape.version", __version__)
    writer.add_string("anyshape.parent", parent)
    writer.add_string("anyshape.shape", shape.to_json())
    for name, tensor in gguf_tensors(model, shape, architecture):
        data, data_type = _encode(tensor, tensor_type)
        writer.add_tensor(name, data, raw_dtype=data_type)

    with atomic_file(out) as temporary:
        try:
            writer.write_header_to_file(temporary)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out


def gguf_architecture(config: LlamaFamilyConfig, shape: Shape) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a Shape of the model; raises CheckpointError (or ShapeError)
    for what llama.cpp cannot run as written."""
    hf = config.hf
    if hf is None:
        raise AnyshapeError("the model has no transformers config to export; load it with anyshape.load")
    if config.model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models, not {config.model_type!r}; {CONVERT_INSTEAD}"
        )
    if config.hidden_act != "silu":
        raise CheckpointError(
            f"hidden_act={config.hidden_act!r}: llama.cpp's {config.model_type} MLP is SiLU-gated; {CONVERT_INSTEAD}"
        )
    if config.model_type == "llama" and (config.qkv_bias or config.o_bias or config.mlp_bias):
        raise CheckpointError(
            "GGUF export of a Llama with attention_bias or mlp_bias is not supported; " + CONVERT_INSTEAD
        )
    context = hf.max_position_embeddings
    if config.sliding_window is not None and config.sliding_window < context:
        raise CheckpointError(
            f"this Mistral attends to sliding_window={config.sliding_window} tokens, fewer than its context of "
            f"{context}, and llama.cpp's llama architecture has no sliding window, so the GGUF would compute "
            "another function on longer inputs; export a Hugging Face folder with `anyshape extract`, or set "
            '"sliding_window": null in config.json if the model was trained with full attention'
        )
    rope_type = _rope(config).get("rope_type", "default")
    if config.model_type == "qwen2" and rope_type == "llama3":
        raise CheckpointError(f"rope_type 'llama3' is written only for the llama architecture; {CONVERT_INSTEAD}")
    q_width = shape.num_attention_heads * config.head_dim
    if config.model_type == "qwen2" and q_width != shape.hidden_size:
        raise ShapeError(
            f"llama.cpp's qwen2 architecture needs num_attention_heads * head_dim == hidden_size, but this Shape "
            f"has {shape.num_attention_heads} * {config.head_dim} = {q_width} and hidden_size={shape.hidden_size}; "
            f"choose hidden_size={q_width}, or num_attention_heads=hidden_size/{config.head_dim}"
        )
    return ARCHITECTURES[config.model_type]


def gguf_tensors(model: ElasticLlama, shape: Shape, architecture: gguf.MODEL_ARCH) -> Iterator[tuple[str, Tensor]]:
    """(GGUF name, tensor) of every tensor of the Shape's sub-network, in llama.cpp's layout."""
    names = gguf.get_tensor_name_map(architecture, len(shape.layers))
    for hf_name, tensor in extract_state_dict(model, shape).items():
        if architecture == gguf.MODEL_ARCH.LLAMA and ".q_proj." in hf_name:
            tensor = interleave_rotary_halves(tensor, shape.num_attention_heads)
        elif architecture == gguf.MODEL_ARCH.LLAMA and ".k_proj." in hf_name:
            tensor = interleave_rotary_halves(tensor, shape.num_key_value_heads)
        yield names.get_name(hf_name, try_suffixes=(".weight", ".bias")), tensor
    if _rope(model.config).get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_frequency_factors(model)


def interleave_rotary_halves(tensor: Tensor, heads: int) -> Tensor:
    """q_proj/k_proj rows (heads * d, ...) from HF's order, where RoPE pairs channel i with i + d/2
    of each head, to llama.cpp's, where it pairs 2i with 2i + 1."""
    return tensor.unflatten(0, (heads, 2, -1)).transpose(1, 2).reshape(tensor.shape)


def rope_frequency_factors(model: ElasticLlama) -> Tensor:
    """(d/2,) float32 divisors that turn the default RoPE frequencies theta^(-2i/d) into the
    model's (llama.cpp's `rope_freqs`), computed from the model's own frequencies."""
    d = model.config.head_dim
    theta = _rope(model.config).get("rope_theta", 10000.0)
    default = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    return (default / model.inv_freq.double().cpu()).float()


def _rope(config: LlamaFamilyConfig) -> dict:
    return getattr(config.hf, "rope_parameters", None) or {}


def _add_hyperparameters(writer: GGUFWriter, model: ElasticLlama, shape: Shape) -> None:
    """The `<arch>.*` keys: geometry of the Shape, the rest of the parent's config."""
    config, hf = model.config, model.config.hf
    rope = _rope(config)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_block_count(len(shape.layers))
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(shape.num_attention_heads)
    writer.add_head_count_kv(shape.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":  # the keys llama.cpp's converter writes, where the config states them
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", hf.max_position_embeddings))
        if rope.get("attention_factor") is not None:
            writer.add_rope_scaling_yarn_attn_factor(rope["attention_factor"])
        if rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])


def _add_tokenizer(writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The `tokenizer.*` keys of a byte-level BPE tokenizer (GGUF model "gpt2"): tokens and their
    types for every row of the embedding, merges, special token ids, BOS/EOS flags, chat template."""
    spec = _tokenizer_json(tokenizer)
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"].get("merges", [])]
    if not merges:
        raise CheckpointError(
            "the tokenizer has no BPE merges, and llama.cpp needs at least one to read a byte-level BPE "
            "vocabulary; pass the model's trained tokenizer"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(
            f"the tokenizer has token id {max(vocab.values())}, but the model's embedding has {vocab_size} rows; "
            "pass the model's own tokenizer"
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # an embedding row no token uses
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index not in added:
            types.append(TokenType.NORMAL)
        else:
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    for kind, index in special.items():
        if index is not None:
            getattr(writer, f"add_{kind}_token_id")(index)
    encoded = tokenizer("a")["input_ids"]  # what the tokenizer adds around a text, observed
    writer.add_add_bos_token(special["bos"] is not None and encoded[0] == special["bos"])
    writer.add_add_eos_token(special["eos"] is not None and encoded[-1] == special["eos"])
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The tokenizer's `tokenizer.json` content; raises CheckpointError unless it is byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(
            f"GGUF export needs a fast tokenizer (tokenizer.json), not {type(tokenizer).__name__}; {CONVERT_INSTEAD}"
        )
    spec = json.loads(backend.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model["type"] != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        kind = model["type"] + (" with byte fallback (SentencePiece-style)" if model.get("byte_fallback") else "")
        raise CheckpointError(
            f"GGUF export writes byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2); this one is {kind} with a "
            f"{decoder.get('type')} decoder; {CONVERT_INSTEAD}"
        )
    return spec


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level pre-tokenizer, recognised from its structure."""
    steps = (pre.get("pretokenizers") or [pre]) if pre else []
    kinds = [step["type"] for step in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
            split = steps[0]
            regex = split.get("pattern", {}).get("Regex")
            if split.get("behavior") == "Isolated" and not split.get("invert") and regex in SPLIT_PRE_TOKENIZERS:
                return SPLIT_PRE_TOKENIZERS[regex]
    raise CheckpointError(
        f"the tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'}) has no llama.cpp name anyshape knows "
        "(it knows GPT-2's, SmolLM's and the Split regexes of Llama 3, Qwen2 and others); " + CONVERT_INSTEAD
    )


def _encode(tensor: Tensor, tensor_type: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The tensor as GGUF data of `tensor_type`, or float32 for 1-D tensors, or float16 where q8_0
    blocks do not tile the rows (as llama.cpp's converter falls back)."""
    data = tensor.detach().cpu().float().numpy()
    if data.ndim == 1:
        tensor_type = GGMLQuantizationType.F32
    elif data.shape[-1] % gguf.GGML_QUANT_SIZES[tensor_type][0]:
        tensor_type = GGMLQuantizationType.F16
    return gguf.quants.quantize(data, tensor_type), tensor_type


def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise AnyshapeError(f"{out}: a GGUF file's name must end in .gguf, e.g. {out.with_suffix('.gguf')}")
    if out.is_dir():
        raise AnyshapeError(f"{out} is a folder; GGUF export writes one file, e.g. {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise AnyshapeError(f"{out} already exists; choose another path or pass overwrite=True")
