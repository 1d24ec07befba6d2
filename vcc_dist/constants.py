"""Key names shared by every part of vcc-dist (the AnnData contract).

User files may use other column names; jobs take ``*_key`` options and map them onto these.
"""

# --- obs columns (canonical names inside a corpus and in simulator output) ---
PERT_KEY = "target_gene"  # perturbed gene symbol; controls carry CONTROL_LABEL
CONTROL_LABEL = "non-targeting"
GUIDE_KEY = "guide_id"
BATCH_KEY = "batch"
CONTEXT_KEY = "cell_type"  # cell context (cell type / cell line)
TOTAL_COUNTS_KEY = "total_counts"  # raw library size of the cell over all source genes
SOURCE_ROW_KEY = "source_row"  # row of the cell in its source file

# obs columns every corpus store carries, in this order
CORPUS_OBS_KEYS = (CONTEXT_KEY, PERT_KEY, BATCH_KEY, GUIDE_KEY)

# --- var columns ---
GENE_ID_KEY = "gene_id"  # var index holds the gene symbol

# --- corpus layout ---
CORPUS_MANIFEST = "corpus.json"
CORPUS_STORES_DIR = "stores"
CORPUS_FORMAT = "vcc-dist-corpus"
CORPUS_FORMAT_VERSION = 1
STORE_UNS_KEY = "vcc_dist"  # uns entry with the store's own manifest
STORE_GROUPS_KEY = "vcc_dist_groups"  # uns DataFrame: one row per (context, pert, batch) group

# normalisation used for the statistics stored in the corpus (scanpy's "CP10k")
STATS_TARGET_SUM = 1e4
