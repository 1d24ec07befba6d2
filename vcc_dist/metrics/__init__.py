"""Challenge metrics (DES, PDS, MAE, overall score) with cell-eval 0.8.2 semantics, baselines."""
