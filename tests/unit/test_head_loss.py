"""Losses over the LM head computed a chunk of rows at a time equal the loss of the whole logits,
in value and in gradients, for every chunk size (one row, uneven, all rows at once)."""

import pytest
import torch

import anyshape
from anyshape.model import head
from anyshape.model.nll import next_token_loss, next_token_nll
from anyshape.train.distill import KD_LOSSES, distillation_head_loss, distillation_loss

B, T, H, V = 2, 7, 5, 11


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, T, H), head weight (V, H) (both float64, requiring gradients), ids (B, T), teacher (B, T, V)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=generator)
    teacher = 3 * torch.randn(B, T, V, generator=generator, dtype=torch.float64)
    return hidden, weight, ids, teacher


def value_and_grads(loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    scaled = 1.7 * loss  # a gradient into the loss other than 1
    return [loss.detach(), *torch.autograd.grad(scaled, (hidden, weight))]


@pytest.mark.parametrize("rows", [1, 4, 100])
@pytest.mark.parametrize("kind", ["none", *KD_LOSSES])
def test_chunked_head_losses_equal_the_whole_logits_loss(monkeypatch, rows, kind):
    hidden, weight, ids, teacher = inputs()
    logits = hidden @ weight.T
    whole = next_token_nll(logits, ids) if kind == "none" else distillation_loss(kind, logits, teacher)
    expected = value_and_grads(whole, hidden, weight)
    monkeypatch.setattr(head, "CHUNK_VALUES", rows * V)
    objective = next_token_loss(ids) if kind == "none" else distillation_head_loss(kind, teacher)
    chunked = value_and_grads(objective(hidden, weight), hidden, weight)
    for got, want in zip(chunked, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_without_gradients_the_chunked_loss_is_the_same_value(monkeypatch):
    hidden, weight, ids, _ = inputs(1)
    monkeypatch.setattr(head, "CHUNK_VALUES", 3 * V)
    with torch.no_grad():
        expected = next_token_nll(hidden @ weight.T, ids)
        got = next_token_loss(ids)(hidden, weight)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do(monkeypatch):
    hidden, weight, ids, _ = inputs(2)
    frozen = weight.detach()
    monkeypatch.setattr(head, "CHUNK_VALUES", 2 * V)
    expected = torch.autograd.grad(next_token_nll(hidden @ frozen.T, ids), hidden)[0]
    got = torch.autograd.grad(next_token_loss(ids)(hidden, frozen), hidden)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_the_model_returns_the_loss_of_its_logits_and_its_gradients(tiny_dir, monkeypatch):
    model = anyshape.load(tiny_dir("llama3-gqa")).double()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    shape = model.full_shape
    whole = next_token_nll(model(ids, shape), ids)
    expected = [whole.detach(), *torch.autograd.grad(whole, list(model.parameters()), allow_unused=True)]
    monkeypatch.setattr(head, "CHUNK_VALUES", 5 * model.config.vocab_size)
    chunked = model(ids, shape, loss=next_token_loss(ids))
    got = [chunked.detach(), *torch.autograd.grad(chunked, list(model.parameters()), allow_unused=True)]
    for a, b in zip(got, expected, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
