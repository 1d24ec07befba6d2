"""Ray Tune sweeps of ST hyperparameters against the challenge score (vcc_dist.tune.sweep):
named search spaces whose keys are checked against the ST config tree, ASHA or FIFO,
Optuna or random search, one ST run per trial, the trial table and the best recipe."""
