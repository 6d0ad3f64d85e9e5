"""`anyshape route`: the Shape a trained budget router picks for a parameter budget."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from anyshape.cli.app import app, emit
from anyshape.cli.options import JsonOpt
from anyshape.router.router import Route

RunArg = Annotated[
    Path, typer.Argument(help="Run folder of `anyshape train --router`.", metavar="RUN", show_default=False)
]
BudgetOpt = Annotated[
    str,
    typer.Option(
        help="Fraction of the parent's parameters in (0, 1], e.g. 0.4, or a count such as 60M; counted as the "
        "run was trained (--budget-basis: total or non-embedding parameters).",
        metavar="BUDGET",
        show_default=False,
    ),
]


@app.command()
def route(run: RunArg, budget: BudgetOpt, as_json: JsonOpt = False) -> None:
    """Print the Shape the router of RUN picks for BUDGET, its parameters, and whether the
    router's own choice met the budget. Budgets between the trained anchors are interpolated.
    The answer never exceeds the budget (where the router's choice does, a warning says so and
    the most probable Shape within it stands in) and grows with it: it is the largest of the
    router's answers for every budget up to BUDGET, in steps of 1/256.

    \b
    Examples:
      anyshape route flex/ --budget 0.4 --json
      anyshape route flex/ --budget 60M
    """
    emit(route_record(routed(run, budget)), as_json)


def routed(run: Path, budget: str) -> Route:
    """The router's answer for `budget`, warning on stderr when its own choice was over it."""
    from anyshape.checkpoints import load_config
    from anyshape.router.control import load_router
    from anyshape.search.budget import Budget

    router = load_router(run)
    answer = router.route(Budget.parse(budget, load_config(run), router.basis))
    if not answer.meets_budget:
        chosen = answer.chosen.num_parameters(router.space.config, embeddings=router.basis == "total")
        print(
            f"warning: the router's choice has {chosen:,} parameters ({router.basis}), over the budget of "
            f"{answer.budget_parameters:,}; answering with the largest Shape it picks within the budget",
            file=sys.stderr,
        )
    return answer


def route_record(answer: Route) -> dict:
    return {
        "budget": answer.budget.fraction,
        "budget_basis": answer.budget.basis,
        "budget_parameters": answer.budget_parameters,
        "shape": answer.shape.to_dict(),
        "num_parameters": answer.num_parameters,
        "num_parameters_non_embedding": answer.num_parameters_non_embedding,
        "meets_budget": answer.meets_budget,
    }
