"""Search for the best Shapes under parameter, FLOP and latency budgets (Pareto fronts)."""
