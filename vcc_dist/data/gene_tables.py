"""The one reader of STATE's ``{gene: vector}`` ``.pt`` files.

The format (e.g. ``ESM2_pert_features.pt``, the simulator's ``pert_features.pt``, the SE gene
table written by ``jobs/embed_genes.py``) is a ``torch.save`` of a dict mapping a gene symbol
to a 1-D tensor. Every user reads it here: ST's perturbation features
(:class:`vcc_dist.models.features.PerturbationFeatures`), the ridge baseline's per-gene
features (:func:`vcc_dist.infer.baselines.load_pert_features`) and the SE gene table
(``vcc_dist.esm.embed.load_gene_embeddings``).
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from vcc_dist import storage

if TYPE_CHECKING:
    from torch import Tensor


def read_gene_table(path: str | os.PathLike) -> dict[str, Tensor]:
    """A STATE-format ``{gene: 1-D tensor}`` file, checked: a non-empty dict whose vectors are
    all 1-D of one length, loaded with ``torch.load(weights_only=True)`` on the CPU.

    Raises ``FileNotFoundError`` when ``path`` is not a file, ``ValueError`` (naming the file)
    when torch cannot load it or its content is not such a dict."""
    import torch  # heavy: only when a table is read

    path = storage.location(path)  # a local path or an s3:// URI
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"perturbation feature file not found: {path}") from None
    try:
        table = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors of a damaged or foreign file
        raise ValueError(f"{path}: cannot load it with torch.load ({type(e).__name__}: {e}); "
                         "expected a torch.save of a dict {gene: 1-D tensor}") from e
    if not isinstance(table, dict) or not table:
        raise ValueError(
            f"{path}: expected a non-empty dict {{gene: 1-D tensor}}; got {type(table).__name__}"
        )
    dims = {tuple(torch.as_tensor(v).shape) for v in table.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"{path}: every vector must be 1-D of one length; found shapes {sorted(dims)}")
    return table
