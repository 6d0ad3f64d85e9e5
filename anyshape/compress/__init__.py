"""compress: one model into a family of smaller standard models (stages, compensation, baselines, report)."""
