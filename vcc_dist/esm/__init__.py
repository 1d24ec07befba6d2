"""ESM2 gene embeddings: isoform input (fasta), fair-esm loading of local weights and pooling
(model), the resumable Ray Data embedding job (embed)."""
