"""ESM2 gene embeddings: isoform input (fasta), the ESM2 model (model), distributed embedding (embed)."""
