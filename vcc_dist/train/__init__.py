"""Training: the DeepSpeed engine wrapper and, later, the ST/SE training loops."""
