"""The learned budget router (LLaMaFlex): a budget -> one Shape choice per elastic axis.

e(b)       the router's input: a learned embedding per anchor budget; between two anchors
           the linear interpolation of theirs (the ends are held beyond the outermost)
logits     one categorical distribution per axis of the search space (depth, hidden size, KV
           groups, query heads per group, MLP size) over its options: sigmoid(MLP(e(b))) gives
           each axis a centre c in (0, 1), a fraction of the parent's size, and an option of
           relative size x gets the logit -(x - c)^2 / (2 WIDTH^2): a bump, so that between two
           anchors the centre moves between theirs instead of the argmax jumping between
           their modes (with free logits per option the 37.5% route took the 25% anchor's
           depth and hidden size, 1.28x the loss of a random search's Shape; a learned width
           grew until the distribution was flat)
training   a Gumbel-softmax sample per axis from softmax(logits / tau), one-hot in the forward
           and soft in the backward (straight-through), turned into channel masks
           (`MaskedShape`); tau anneals, so sampling explores first and ends near the argmax;
           the budget loss relu(E[params] / budget - 1), E over that same distribution, is the
           parameter count at the expected sizes (exact: the count is multilinear in the sizes
           and the axes are independent)
settling   the MLP is free off the anchors: a 37.5% route had fewer layers than the 25% and
           50% anchors. Before routing, a short fit moves each axis's centre at every budget
           between two anchors into the range of the anchors' centres, holding the anchors'
           own centres (`load_router` settles the router it loads)
routing    the argmax choice per axis; if its Shape is over the budget, the most probable
           Shape of the grid that is within it
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyshape.errors import AnyshapeError
from anyshape.model.masks import MaskedShape
from anyshape.search.budget import Budget, parent_parameters
from anyshape.search.space import AXES, SearchSpace
from anyshape.shape import Shape, parameter_count

WIDTH = 0.1  # each axis's bump: its standard deviation, in fractions of the parent's size
START_STEPS = 300  # Adam steps that fit the router to its starting centres
SETTLE_STEPS = 600  # Adam steps that settle the centres between the anchors


ROUTE_STEPS = 256  # budgets are routed in steps of 1/256 of the parent


@dataclass(frozen=True)
class Route:
    """The router's answer for a budget: `shape`, its parameters (total and non-embedding),
    and whether the router's own choice at the budget (`chosen`) met it."""

    budget: Budget
    shape: Shape
    chosen: Shape  # the argmax choice per axis at the budget
    meets_budget: bool
    num_parameters: int
    num_parameters_non_embedding: int
    budget_parameters: int


class BudgetRouter(nn.Module):
    """Maps a budget (fraction of the parent's parameters on `basis`) to per-axis choices."""

    def __init__(self, space: SearchSpace, anchors: Sequence[float], basis: str = "total", width: int = 64):
        super().__init__()
        self.space, self.basis = space, basis
        config = space.config
        self.register_buffer("anchors", torch.tensor(sorted(anchors), dtype=torch.float64))
        self.anchor_embeddings = nn.Parameter(torch.randn(len(anchors), width))
        self.net = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, len(AXES)))
        parent = {
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_key_value_heads": config.num_key_value_heads,
            "queries_per_group": config.queries_per_group,
            "intermediate_size": config.intermediate_size,
        }
        self.parent_sizes = parent
        self.parent_parameters = parent_parameters(config, basis)
        for axis in AXES:
            options = space.options[axis]
            self.register_buffer(f"sizes_{axis}", torch.tensor(options, dtype=torch.float32), persistent=False)
            if axis == "num_hidden_layers":  # which layers each depth keeps
                units = [[float(i in space.layer_sets[n]) for i in range(parent[axis])] for n in options]
            else:  # a prefix of the units
                units = [[float(i < n) for i in range(parent[axis])] for n in options]
            self.register_buffer(f"units_{axis}", torch.tensor(units), persistent=False)
        grids = torch.meshgrid(*(self._sizes(axis).double() for axis in AXES), indexing="ij")
        counts = parameter_count(config, *grids, embeddings=basis == "total")  # (k_1, ..., k_5) every grid Shape's
        self.register_buffer("grid_counts", counts, persistent=False)

    def start_at_budgets(self) -> None:
        """Fits the router so that each anchor starts at its budget: every axis's bump centred
        on f, the uniform scale whose Shape has the anchor's parameters (Adam on the squared
        error of the centres). Training then moves parameters between axes at about the budget,
        rather than trimming down from the parent, where the budget loss of the smallest anchors
        drags the others (they share the MLP) far below their budgets."""
        anchors = self.anchors.tolist()
        targets = torch.tensor([[self._uniform_scale(anchor)] for anchor in anchors])  # (anchors, 1)
        self._fit(lambda step: (self._anchor_centres() - targets).pow(2).sum(), START_STEPS, lr=0.01)

    def _uniform_scale(self, fraction: float) -> float:
        """The f in [0, 1] at which every axis at f x the parent's size has `fraction` of the
        parent's parameters (bisection: the count grows with f)."""
        low, high = 0.0, 1.0
        for _ in range(40):
            middle = (low + high) / 2
            sizes = [middle * self.parent_sizes[axis] for axis in AXES]
            count = parameter_count(self.space.config, *sizes, embeddings=self.basis == "total")
            low, high = (middle, high) if count < fraction * self.parent_parameters else (low, middle)
        return low

    # ------------------------------------------------------------------ the distribution

    def embedding(self, budget: float) -> Tensor:
        """(width,) the router input for a budget fraction: interpolated between anchors."""
        anchors = self.anchors.tolist()
        budget = min(max(budget, anchors[0]), anchors[-1])
        upper = next(i for i, anchor in enumerate(anchors) if anchor >= budget)
        if anchors[upper] == budget or upper == 0:
            return self.anchor_embeddings[upper]
        t = (budget - anchors[upper - 1]) / (anchors[upper] - anchors[upper - 1])
        return (1 - t) * self.anchor_embeddings[upper - 1] + t * self.anchor_embeddings[upper]

    def settle_between_anchors(self) -> None:
        """Fits the router so that each axis's centre at every budget between two anchors lies
        between the anchors' centres, which stay where training put them (Adam on the
        betweenness loss at budgets spread over each interval, plus 100 x the anchors' squared
        drift: they move by about 1e-4, which leaves their routes as they were)."""
        with torch.no_grad():
            trained = self._anchor_centres()

        def loss(step: int) -> Tensor:
            t = (step % 19 + 1) / 20  # 0.05 .. 0.95
            return 100 * (self._anchor_centres() - trained).pow(2).sum() + self.betweenness_loss(t)

        self._fit(loss, SETTLE_STEPS, lr=0.003)

    def _fit(self, loss: Callable[[int], Tensor], steps: int, lr: float) -> None:
        """`steps` Adam steps on `loss(step)`; no gradients are left behind (training's first
        step must not add a fit's)."""
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss(step).backward()
            optimizer.step()
        self.zero_grad(set_to_none=True)

    def _anchor_centres(self) -> Tensor:
        """(anchors, axes) each anchor's centres."""
        return torch.stack([self.centres(anchor) for anchor in self.anchors.tolist()])

    def betweenness_loss(self, t: float) -> Tensor:
        """() how far each axis's centre at the budget a fraction `t` in (0, 1) of the way from
        one anchor to the next lies outside the range of the two anchors' centres (held fixed),
        summed over axes and neighbouring pairs: zero when every interpolated centre lies
        between its anchors'."""
        anchors = self.anchors.tolist()
        centres = self._anchor_centres().detach()  # (anchors, axes)
        low, high = torch.minimum(centres[:-1], centres[1:]), torch.maximum(centres[:-1], centres[1:])
        pairs = zip(anchors[:-1], anchors[1:], strict=True)
        between = torch.stack([self.centres(a + t * (b - a)) for a, b in pairs])  # (anchors - 1, axes)
        return (F.relu(low - between) + F.relu(between - high)).sum()

    def centres(self, budget: float) -> Tensor:
        """(axes,) each axis's bump centre for a budget fraction, in fractions of the parent's size."""
        return self.net(self.embedding(budget)).sigmoid()

    def logits(self, budget: float) -> dict[str, Tensor]:
        """axis -> (k_axis,) logits over `space.options[axis]`: -(x - c)^2 / (2 WIDTH^2) for an
        option of x times the parent's size and the axis's centre c."""
        centres = self.centres(budget)
        return {
            axis: -0.5 * ((self._sizes(axis) / self.parent_sizes[axis] - centres[i]) / WIDTH) ** 2
            for i, axis in enumerate(AXES)
        }

    def expected_fraction(self, logits: dict[str, Tensor], tau: float = 1.0) -> Tensor:
        """() expected parameters of a Shape drawn from softmax(logits / tau), as a fraction of
        the parent's (both on the router's basis)."""
        sizes = [(logits[axis] / tau).softmax(-1) @ self._sizes(axis) for axis in AXES]
        return parameter_count(self.space.config, *sizes, embeddings=self.basis == "total") / self.parent_parameters

    def budget_loss(self, budget: float, logits: dict[str, Tensor], tau: float = 1.0) -> Tensor:
        """() relu(E[params] / budget - 1), `budget` a fraction: zero within the budget."""
        return F.relu(self.expected_fraction(logits, tau) / budget - 1)

    # ------------------------------------------------------------------ training

    def sample(self, logits: dict[str, Tensor], tau: float, generator: torch.Generator) -> MaskedShape:
        """One straight-through Gumbel-softmax choice per axis, as the masks of its Shape."""
        choice = {axis: straight_through(logits[axis], tau, generator) for axis in AXES}
        masks = {axis: choice[axis] @ getattr(self, f"units_{axis}") for axis in AXES}
        sizes = torch.stack([choice[axis] @ self._sizes(axis) / self.parent_sizes[axis] for axis in AXES])
        return MaskedShape.of(
            self.space.config,
            layer_mask=masks["num_hidden_layers"],
            hidden_mask=masks["hidden_size"],
            head_mask=torch.outer(masks["num_key_value_heads"], masks["queries_per_group"]).flatten(),
            neuron_mask=masks["intermediate_size"],
            features=sizes,
        )

    # ------------------------------------------------------------------ routing

    @torch.no_grad()
    def route(self, budget: Budget) -> Route:
        """The Shape for `budget` (on the router's basis), monotone in the budget: of the
        answers `within` gives for every budget on a 1/ROUTE_STEPS grid up to this one that some
        Shape fits (the budget itself if there is none), the one with the most parameters. So a larger
        budget never gets a smaller Shape, and a budget gets at least its grid neighbour's."""
        if budget.basis != self.basis:
            raise AnyshapeError(f"this router was trained on {self.basis} budgets; ask for a {self.basis} budget")
        config = self.space.config
        smallest = self.grid_counts.min().item() / self.parent_parameters  # below it nothing fits
        first, last = math.ceil(smallest * ROUTE_STEPS - 1e-9), math.floor(budget.fraction * ROUTE_STEPS + 1e-9)
        grid = [step / ROUTE_STEPS for step in range(max(1, first), last + 1)] or [budget.fraction]
        shape = max((self.within(fraction) for fraction in grid), key=self._count)
        chosen = self._argmax(self.logits(budget.fraction))
        return Route(
            budget, shape, chosen, self._count(chosen) <= budget.parameters(config), shape.num_parameters(config),
            shape.num_parameters(config, embeddings=False), round(budget.parameters(config)),
        )  # fmt: skip

    def within(self, fraction: float) -> Shape:
        """The argmax choice per axis at budget `fraction`, or if that Shape is over it, the most
        probable Shape of the grid within it."""
        logits = self.logits(fraction)
        chosen = self._argmax(logits)
        limit = fraction * self.parent_parameters
        return chosen if self._count(chosen) <= limit else self._most_probable_within(logits, limit)

    def _most_probable_within(self, logits: dict[str, Tensor], limit: float) -> Shape:
        """The grid Shape of the highest probability (product over axes) within `limit` params."""
        scores = sum(
            logits[axis].log_softmax(-1).double().reshape([-1 if i == j else 1 for j in range(len(AXES))])
            for i, axis in enumerate(AXES)
        )
        scores = scores.masked_fill(self.grid_counts > limit, -torch.inf)
        if torch.isinf(scores.max()):
            smallest = self._count(self.space.smallest())
            raise AnyshapeError(
                f"no Shape of the router's space fits {limit:,.0f} parameters; its smallest has {smallest:,}: "
                "ask for a larger budget"
            )
        return self._shape(list(torch.unravel_index(scores.argmax(), scores.shape)))

    def _argmax(self, logits: dict[str, Tensor]) -> Shape:
        return self._shape([int(logits[axis].argmax()) for axis in AXES])

    def _shape(self, indices: Sequence[int | Tensor]) -> Shape:
        return self.space.shape({axis: self.space.options[axis][int(i)] for axis, i in zip(AXES, indices, strict=True)})

    def _count(self, shape: Shape) -> int:
        return shape.num_parameters(self.space.config, embeddings=self.basis == "total")

    def _sizes(self, axis: str) -> Tensor:
        return getattr(self, f"sizes_{axis}")


def straight_through(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """(k,) a one-hot sample of softmax(logits / tau) whose gradient is that of its
    Gumbel-softmax relaxation; the noise comes from `generator` (CPU), so it replays."""
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(uniform)).to(logits)
    soft = (logits / tau + gumbel).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft)
    return hard - soft.detach() + soft


def temperature(step: int, steps: int, start: float, end: float) -> float:
    """The Gumbel-softmax temperature at `step`: annealed exponentially from `start` to `end`."""
    return start * (end / start) ** (step / max(1, steps - 1))
