"""Model architectures (pure torch): no ray, deepspeed or wandb here."""
