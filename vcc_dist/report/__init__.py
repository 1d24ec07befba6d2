"""Reports: the corpus statistics report (statistics: per-gene CSV, plots, summary)."""
