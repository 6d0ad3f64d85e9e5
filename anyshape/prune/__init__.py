"""Targeted structured pruning (Sheared LLaMA): hard-concrete masks on layers, KV groups, query
heads, MLP neurons and hidden channels, a Lagrangian that drives their expected sizes to a target
Shape, and the finalisation that keeps exactly the target's top units and exports them."""
