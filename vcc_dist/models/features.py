"""Perturbation features for ST: one-hot, or vectors from a ``{gene: vector}`` ``.pt`` file.

The file format is STATE's (e.g. ``ESM2_pert_features.pt``): a dict mapping a gene symbol to a
1-D tensor, read with ``torch.load(weights_only=True)`` by the one reader of the format,
:func:`vcc_dist.data.gene_tables.read_gene_table` (re-exported here). Unlike STATE, which silently gives a zero
vector to any perturbation missing from the file, a missing perturbation is an error here. The one
exception is the control label (``CONTROL_LABEL``, "non-targeting"): when the file has no entry
for it, it gets the zero vector, which is what STATE does for the control.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vcc_dist import storage
from vcc_dist.constants import CONTROL_LABEL
from vcc_dist.data.gene_tables import read_gene_table

__all__ = ["PerturbationFeatures", "read_gene_table"]

_MISSING_EXAMPLES = 10


def _check_names(perturbations: list[str]) -> list[str]:
    names = list(perturbations)
    if not names:
        raise ValueError("perturbations is empty; pass at least one perturbation name")
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})
    if dupes:
        raise ValueError(f"perturbations contains duplicates: {dupes[:_MISSING_EXAMPLES]}")
    return names




class PerturbationFeatures:
    """A [P, D] float32 feature matrix, one row per perturbation in the given order."""

    def __init__(
        self,
        matrix: Tensor,
        names: list[str],
        *,
        kind: str,
        source: str | None = None,
        sha256: str | None = None,
    ) -> None:
        names = _check_names(names)
        if matrix.dim() != 2 or matrix.shape[0] != len(names):
            raise ValueError(
                f"matrix must be [P, D] with P = {len(names)} perturbations; got {tuple(matrix.shape)}"
            )
        self.matrix = matrix.to(torch.float32)
        self.names = names
        self.kind = kind
        self.source = source
        self.sha256 = sha256
        self._index = {n: i for i, n in enumerate(names)}

    @classmethod
    def one_hot(cls, perturbations: list[str]) -> PerturbationFeatures:
        """Identity features: perturbation i is the unit vector e_i (D = P)."""
        names = _check_names(perturbations)
        return cls(torch.eye(len(names), dtype=torch.float32), names, kind="one_hot")

    @classmethod
    def from_file(cls, path: str | Path, perturbations: list[str]) -> PerturbationFeatures:
        """Rows from a ``{gene: vector}`` ``.pt`` file, in the order of ``perturbations``."""
        path = storage.location(path)  # a local path or an s3:// URI
        names = _check_names(perturbations)
        table = read_gene_table(path)
        (dim,) = torch.as_tensor(next(iter(table.values()))).shape

        missing = [n for n in names if n not in table and n != CONTROL_LABEL]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(names)} perturbations have no vector in {path} "
                f"(first {min(len(missing), _MISSING_EXAMPLES)}: {missing[:_MISSING_EXAMPLES]}); "
                "add them to the file or drop them from the perturbation list"
            )
        rows = [
            torch.as_tensor(table[n], dtype=torch.float32) if n in table else torch.zeros(dim)
            for n in names
        ]
        return cls(torch.stack(rows), names, kind="file", source=str(path),
                   sha256=storage.sha256(path))

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Row of ``name`` in ``matrix``."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(
                f"perturbation {name!r} is not among the {len(self.names)} featurised perturbations"
            ) from None

    def to_manifest(self) -> dict:
        """What a run records to reproduce these features."""
        return {
            "kind": self.kind,
            "source": self.source,
            "sha256": self.sha256,
            "dim": self.dim,
            "n": len(self.names),
        }
