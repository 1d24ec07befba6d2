"""Model architectures (pure torch): ST (st), SE (se), distribution losses (losses) and
perturbation feature tables (features). No ray, deepspeed or wandb here (tests/test_imports.py)."""
