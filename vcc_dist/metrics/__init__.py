"""Challenge metrics with cell-eval 0.8.2 semantics (docs/cell_eval_0.8.2_semantics.md):
per-file normalisation and input checks (normalize), Wilcoxon DE against shared controls with BH
(de), file summaries, DES/PDS/MAE and the overall score (vcc). Pure numpy/scipy: no Ray import
(the optional parallel DE goes through vcc_dist.ray_utils.ray_map); baselines are in
vcc_dist.infer.baselines."""
