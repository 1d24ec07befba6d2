"""Training on Ray Train + DeepSpeed: the engine (the one place DeepSpeed is used), the run
section and per-worker loop every trainer shares (loop), ST training (st, st_data) and SE
pretraining (se), and rank-0 logging (runlog). The checkpoint contract is vcc_dist.checkpoint;
configs are built with vcc_dist.config."""
