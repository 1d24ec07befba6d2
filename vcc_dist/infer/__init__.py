"""Inference: baselines and challenge submissions (predicted h5ad files)."""
