"""Export any Shape as a standard checkpoint."""
