"""Generation: greedy decoding matches `transformers`' generate on an exported Shape; sampling
follows the softmax and its nucleus, reproducibly; streamed text joins to the decoded text."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyshape
from anyshape import AnyshapeError, Shape, export_hf
from anyshape.runtime.generate import Decoder, Sampling, generate, next_token, stream_text
from anyshape.runtime.sample import sample_text, sample_tokens
from tests.conftest import byte_tokenizer

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # 12 token ids of the byte tokenizer


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """A smaller Shape of the tiny Llama 3 model, exported as a Hugging Face folder."""
    parent = anyshape.load(tiny_dir("llama3-gqa"))
    shape = Shape.from_dict({"layers": [0, 1, 3], "hidden_size": 48, "intermediate_size": 64}, parent.config)
    return export_hf(parent, shape, tmp_path_factory.mktemp("gen") / "small", tokenizer=byte_tokenizer())


@pytest.mark.parametrize("name", ["llama3-gqa", "mistral-window", "qwen2-gqa"])
def test_greedy_generation_equals_transformers(tiny_dir, exported, name):
    folder = exported if name == "llama3-gqa" else tiny_dir(name)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    reference.generation_config.eos_token_id = None  # generate all 16 tokens in both
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=None
        )[0, len(PROMPT) :].tolist()
    actual = list(generate(anyshape.load(folder), PROMPT, max_new_tokens=16))
    assert len(actual) == 16
    assert actual == expected


def test_generation_stops_at_a_stop_token(exported):
    model = anyshape.load(exported)
    tokens = list(generate(model, PROMPT, max_new_tokens=16))
    stop = tokens[5]
    first = tokens.index(stop)
    assert list(generate(model, PROMPT, max_new_tokens=16, stop_tokens={stop})) == tokens[:first]


def test_generation_at_a_shape_equals_generation_by_its_export(tiny_dir, exported):
    parent = anyshape.load(tiny_dir("llama3-gqa"))
    shape = Shape.from_dict({"layers": [0, 1, 3], "hidden_size": 48, "intermediate_size": 64}, parent.config)
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=3)
    at_shape = list(generate(parent, PROMPT, shape, max_new_tokens=12, sampling=sampling))
    assert at_shape == list(generate(anyshape.load(exported), PROMPT, max_new_tokens=12, sampling=sampling))


def test_sampling_is_seeded(exported):
    model = anyshape.load(exported)

    def sample(seed: int) -> list[int]:
        return list(generate(model, PROMPT, max_new_tokens=12, sampling=Sampling(temperature=1.0, seed=seed)))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_sampling_follows_the_softmax_and_its_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)

    def frequencies(sampling: Sampling, n: int = 4000) -> torch.Tensor:
        counts = torch.bincount(torch.tensor([next_token(logits, sampling, generator) for _ in range(n)]), minlength=4)
        return counts / n

    torch.testing.assert_close(
        frequencies(Sampling(temperature=1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0
    )
    # top_p=0.7: the nucleus is the two most likely tokens (0.5 + 0.3 reaches it), renormalised
    torch.testing.assert_close(
        frequencies(Sampling(temperature=1.0, top_p=0.7)), torch.tensor([0.625, 0.375, 0, 0]), atol=0.03, rtol=0
    )
    assert frequencies(Sampling(temperature=1.0, top_p=0.4))[0] == 1  # one token already reaches 0.4
    assert next_token(logits, Sampling(), generator) == 0  # temperature 0: greedy
    # a low temperature sharpens the distribution towards the most likely token
    assert frequencies(Sampling(temperature=0.25))[0] > 0.85


def test_a_decoder_reuses_its_cache_for_a_shared_prefix(exported):
    model = anyshape.load(exported)
    decoder = Decoder(model)
    first = list(decoder.generate(PROMPT, max_new_tokens=6))
    assert decoder.tokens == PROMPT + first[:-1]  # the last token was chosen, never run
    follow_up = PROMPT + first + [10, 63]
    ran: list[int] = []
    hidden_states = model.hidden_states
    model.hidden_states = lambda ids, *args: ran.append(ids.shape[1]) or hidden_states(ids, *args)
    second = list(decoder.generate(follow_up, max_new_tokens=6))
    del model.hidden_states
    assert ran[0] == 3  # the last answer token and the two new ones
    assert second == list(generate(model, follow_up, max_new_tokens=6))


def test_streamed_text_joins_to_the_decoded_text():
    tokenizer = byte_tokenizer()
    text = "naïve café: 3€, 🙂!"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: characters span several tokens
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) == len(text)  # each character as soon as its last byte arrives
    assert "".join(stream_text(tokenizer, ids[:-2])) == tokenizer.decode(ids[:-2])  # a cut character, flushed


@pytest.mark.parametrize(
    ("sampling", "match"),
    [
        (dict(temperature=-0.1), "temperature=-0.1 must be >= 0"),
        (dict(top_p=0.0), "top_p=0.0 must be in"),
        (dict(top_p=1.5), "top_p=1.5 must be in"),
    ],
)
def test_bad_sampling_settings_are_refused(sampling, match):
    with pytest.raises(AnyshapeError, match=match):
        Sampling(**sampling)


def test_bad_generation_requests_are_refused(exported):
    model = anyshape.load(exported)
    with pytest.raises(AnyshapeError, match="the prompt is empty"):
        list(generate(model, [], max_new_tokens=4))
    with pytest.raises(AnyshapeError, match="max_new_tokens=0 must be at least 1"):
        list(generate(model, PROMPT, max_new_tokens=0))


def test_sampled_text_draws_each_token_from_the_models_distribution(tiny_dir):
    model = anyshape.load(tiny_dir("llama3-gqa"))
    sampled = sample_tokens(model, start=1, num_sequences=3, length=6, batch_size=2, seed=4)
    assert sampled.shape == (3, 6) and torch.equal(sampled, sample_tokens(model, 1, 3, 6, batch_size=2, seed=4))
    generator = torch.Generator().manual_seed(4)
    expected = []
    for first in (0, 2):  # the same draws, each from a full forward pass without the cache
        tokens = torch.ones((min(2, 3 - first), 1), dtype=torch.long)
        for _ in range(6):
            probs = torch.softmax(model(tokens)[:, -1].float(), dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
        expected.append(tokens[:, 1:])
    assert torch.equal(sampled, torch.cat(expected))
    tokenizer = byte_tokenizer()
    with pytest.raises(AnyshapeError, match="no beginning- or end-of-sequence token"):
        sample_text(model, tokenizer, num_tokens=20, length=10)
    tokenizer.bos_token = "!"  # token 0
    two = sample_tokens(model, start=0, num_sequences=2, length=10, seed=0).tolist()
    text = sample_text(model, tokenizer, num_tokens=20, length=10)
    assert text == "\n\n".join(tokenizer.decode(sequence) for sequence in two)
