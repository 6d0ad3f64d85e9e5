"""Importance scores for every prunable unit, exact importance sorting, and depth selection."""
