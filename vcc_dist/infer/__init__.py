"""Inference: baselines (cell-mean, context-mean, ridge) on AnnData, ST predictions from a
checkpoint (st_predict), SE cell embeddings into a corpus (se_embed), held-out cells of a split
(heldout), and challenge submissions: writing and validating them (submission, counts).
Checkpoints are read through vcc_dist.checkpoint only; infer/ imports nothing from train/
but the engine's fp32 reconstruction (tests/test_imports.py)."""
