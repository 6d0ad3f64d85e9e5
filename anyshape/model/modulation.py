"""Policy-aware modulation (LLaMaFlex): a per-channel output scale conditioned on the Shape.

A small non-linear head after each attention and MLP block (on o_proj and down_proj) maps the
active Shape's features (`shape_features`, 5 numbers) to a scale per hidden channel,

    scale = 1 + W2 silu(W1 features + b1) + b2        (H,), sliced to the Shape's H'

W2 and b2 start at zero, so the scale starts at 1 and training starts from the model as it is.
For a fixed Shape the scale is a constant vector, so export folds it into the projection
(row i of the weight and bias times scale[i]) and the exported model is a plain checkpoint.
"""

from __future__ import annotations

from torch import Tensor, nn

from anyshape.model.llama import ElasticLinear, ElasticLlama
from anyshape.model.masks import shape_features
from anyshape.model.slicing import axes_of, slice_along
from anyshape.shape import Shape

MODULATED = ("o_proj", "down_proj")  # the projections that end an elastic block


class Modulation(nn.Module):
    """The output scale (out',) of one projection for a Shape."""

    def __init__(self, base: ElasticLinear, width: int = 32):
        super().__init__()
        self.config = base.config
        self.out_axis = axes_of(f"{base.name}.weight")[0]
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.head = nn.Sequential(nn.Linear(5, width, **like), nn.SiLU(), nn.Linear(width, base.out_features, **like))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def scale(self, shape: Shape) -> Tensor:
        """(out,) the full-width scale for `shape`; its Shape slice is what the forward uses."""
        return 1 + self.head(shape_features(shape, self.config).to(self.head[0].weight))

    def forward(self, shape: Shape) -> Tensor:
        return slice_along(self.scale(shape), (self.out_axis,), self.config, shape)


def add_modulation(model: ElasticLlama, width: int = 32) -> list[nn.Parameter]:
    """Puts a Modulation on every o_proj and down_proj of `model`; returns its parameters."""
    added = []
    for module in model.modules():
        if isinstance(module, ElasticLinear) and module.name in MODULATED:
            module.modulation = Modulation(module, width)
            added += list(module.modulation.parameters())
    return added
