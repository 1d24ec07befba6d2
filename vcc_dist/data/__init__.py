"""The data layer: the corpus format (corpus), row reads and normalisation (reader), labels and
group index (labels), splits (splits), held-out selection (heldout), epoch plans (plans), the
Ray Data SE cell and ST set streams (streams), SE cell sentences (se_tokens), cell embeddings
stored in the corpus (embeddings), pseudobulks (pseudobulk), gene tables (gene_tables) and the
Perturb-seq simulator (simulate). docs/design.md §3-4."""
