"""Ray Tune sweeps of ST hyperparameters against the challenge score (vcc_dist.tune.sweep)."""
