"""Which layer reads which layer's weights: the sharing plan, its builders and its checks.

A plan is a list of (layer, reference) pairs and the components they share: layer `layer`
computes its `components` (MLP, attention or both) with layer `reference`'s weights plus its own
recovery parameters (`anyshape.share.recovery`). Everything else of a replaced layer (its norms,
its biases, the components it does not share) stays its own.

Builders, for a model of L layers:
    next-interval  from `start`, groups of `group` layers: each group's first layer is the
                   reference and the others read its weights (group 2: every other layer is
                   replaced by its predecessor; group 3: two of every three)
    consecutive    layers start+1 .. start+count all read layer `start` (one block)
    explicit       the pairs as given, e.g. "11:10,13:12" (layer:reference)
"""

from __future__ import annotations

from dataclasses import dataclass

from anyshape.errors import AnyshapeError

STRATEGIES = ("next-interval", "consecutive", "explicit")
COMPONENTS = {
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
COMPONENT_CHOICES = ("mlp", "attention", "both")
RECOVERIES = ("lowrank", "scaled")


@dataclass(frozen=True)
class SharingPlan:
    """`pairs`: (layer, reference) with reference < layer; `components`: a subset of COMPONENTS;
    `recovery`: lowrank (W_ref + B A) or scaled (s * W_ref + B A, rank reduced to the same
    parameter count); `rank`: 0 shares the weights directly, with no recovery."""

    pairs: tuple[tuple[int, int], ...]
    components: tuple[str, ...] = ("mlp",)
    recovery: str = "lowrank"
    rank: int = 32

    @property
    def projections(self) -> tuple[str, ...]:
        """The HF projection names each replaced layer reads from its reference."""
        return tuple(name for component in self.components for name in COMPONENTS[component])

    @property
    def replaced(self) -> tuple[int, ...]:
        return tuple(layer for layer, _ in self.pairs)

    def validate(self, num_layers: int) -> SharingPlan:
        """Returns self, or raises AnyshapeError naming the bad pair and the fix."""
        if not self.pairs:
            raise AnyshapeError("the plan replaces no layer; choose a start layer and count that fit the model")
        unknown = sorted(set(self.components) - set(COMPONENTS))
        if unknown or not self.components:
            raise AnyshapeError(f"unknown components {unknown}; choose from {', '.join(COMPONENT_CHOICES)}")
        if self.recovery not in RECOVERIES:
            raise AnyshapeError(f"unknown recovery {self.recovery!r}; choose one of {', '.join(RECOVERIES)}")
        if self.rank < 0 or (self.recovery == "scaled" and self.rank == 1):
            raise AnyshapeError(
                f"rank={self.rank} must be 0 (direct sharing) or at least 1 (lowrank), 2 (scaled: its "
                "per-channel scale costs about one rank)"
            )
        replaced = [layer for layer, _ in self.pairs]
        for layer, reference in self.pairs:
            if not (0 <= layer < num_layers and 0 <= reference < num_layers):
                raise AnyshapeError(
                    f"pair {layer}:{reference} is out of range; the model has {num_layers} layers, 0..{num_layers - 1}"
                )
            if layer == reference:
                raise AnyshapeError(
                    f"pair {layer}:{reference} replaces layer {layer} with itself; pick an earlier layer"
                )
            if layer == 0:
                raise AnyshapeError(
                    "layer 0 cannot be replaced: a layer reads the weights of an earlier one, and none precedes it"
                )
            if reference > layer:
                raise AnyshapeError(
                    f"pair {layer}:{reference}: a layer reads an earlier layer's weights; use a reference below {layer}"
                )
            if reference in replaced:
                raise AnyshapeError(
                    f"pair {layer}:{reference}: layer {reference} is itself replaced, so it holds no weights of its "
                    f"own; point layer {layer} at the layer that layer {reference} reads"
                )
        if len(set(replaced)) != len(replaced):
            twice = sorted({layer for layer in replaced if replaced.count(layer) > 1})
            raise AnyshapeError(f"layer {twice[0]} is replaced twice; give each layer one reference")
        return self

    def to_dict(self) -> dict:
        return {
            "pairs": [list(pair) for pair in self.pairs],
            "components": list(self.components),
            "recovery": self.recovery,
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, record: dict) -> SharingPlan:
        return cls(
            tuple((int(layer), int(reference)) for layer, reference in record["pairs"]),
            tuple(record["components"]),
            record["recovery"],
            int(record["rank"]),
        )


def build_plan(
    strategy: str,
    num_layers: int,
    start: int | None = None,
    count: int | None = None,
    group: int = 2,
    pairs: str | None = None,
    components: str = "mlp",
    recovery: str = "lowrank",
    rank: int = 32,
) -> SharingPlan:
    """The validated plan of `strategy` (see the module docstring). `count` limits how many
    layers next-interval replaces (None: up to the last layer) and is required by consecutive;
    `pairs` ("11:10,13:12") is required by explicit."""
    if strategy not in STRATEGIES:
        raise AnyshapeError(f"unknown replacement plan {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if components not in COMPONENT_CHOICES:
        raise AnyshapeError(f"unknown components {components!r}; choose one of {', '.join(COMPONENT_CHOICES)}")
    chosen = tuple(COMPONENTS) if components == "both" else (components,)
    if strategy == "explicit":
        if not pairs:
            raise AnyshapeError("--replace explicit needs --pairs, e.g. --pairs 11:10,13:12 (layer:reference)")
        plan_pairs = _parse_pairs(pairs)
    else:
        if start is None:
            raise AnyshapeError(f"--replace {strategy} needs --start-layer (the first reference layer)")
        if not 0 <= start < num_layers:
            raise AnyshapeError(
                f"--start-layer {start} is out of range; the model has {num_layers} layers, 0..{num_layers - 1}"
            )
        if strategy == "consecutive":
            if count is None or count < 1:
                raise AnyshapeError(
                    "--replace consecutive needs --count N >= 1: layers start+1 .. start+N are replaced"
                )
            plan_pairs = tuple((start + i, start) for i in range(1, count + 1))
        else:
            if group < 2:
                raise AnyshapeError(f"--group {group} must be at least 2 (a reference and at least one reader)")
            plan_pairs = tuple(
                (layer, layer - (layer - start) % group)
                for layer in range(start, num_layers)
                if (layer - start) % group
            )[:count]
    return SharingPlan(plan_pairs, chosen, recovery, rank).validate(num_layers)


def _parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in text.split(","):
        try:
            layer, reference = (int(part) for part in item.split(":"))
        except ValueError:
            raise AnyshapeError(
                f"cannot read pair {item.strip()!r} of --pairs; write layer:reference pairs such as 11:10,13:12"
            ) from None
        pairs.append((layer, reference))
    return tuple(pairs)
