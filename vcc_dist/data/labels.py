"""Corpus-wide label vocabularies and the table of (context, perturbation, batch) groups.

Each store keeps its own categorical codes; loaders work with one vocabulary per label over the
whole corpus (sorted labels; the control label first among perturbations) and with the groups
of every store as one table. Both are small (one row per group, not per cell) and are built on
the driver from ``obs/*/categories`` and ``uns/vcc_dist_groups``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import zarr

from vcc_dist import constants as K
from vcc_dist.data.reader import LABEL_KEYS, CorpusReader


@dataclass
class CorpusLabels:
    """``names[key]``: corpus-wide labels; ``store_maps[key][s]``: store code -> corpus code."""

    names: dict[str, list[str]]
    store_maps: dict[str, list[np.ndarray]]
    control_label: str = K.CONTROL_LABEL

    @property
    def contexts(self) -> list[str]:
        return self.names[K.CONTEXT_KEY]

    @property
    def perturbations(self) -> list[str]:
        return self.names[K.PERT_KEY]

    @property
    def batches(self) -> list[str]:
        return self.names[K.BATCH_KEY]

    @property
    def control_index(self) -> int:
        return self.perturbations.index(self.control_label)

    def to_json(self) -> dict:
        return {"contexts": self.contexts, "perturbations": self.perturbations,
                "batches": self.batches, "control_label": self.control_label}


def corpus_labels(reader: CorpusReader) -> tuple[CorpusLabels, pd.DataFrame]:
    """Label vocabularies and the group table of a corpus.

    The group table has one row per (store, context, perturbation, batch) group: ``store``,
    ``start``, ``stop`` (a contiguous row range of that store) and corpus-wide codes
    ``context``, ``pert``, ``batch``."""
    per_store_cats: list[dict[str, list[str]]] = []
    frames = []
    for i, name in enumerate(reader.store_names):
        root = zarr.open_group(reader.open_store(i), mode="r")  # local or s3://
        per_store_cats.append({k: [str(c) for c in root["obs"][k]["categories"][:]]
                               for k in LABEL_KEYS})
        g = reader.groups(i)
        g.insert(0, "store", i)
        frames.append(g)
    names: dict[str, list[str]] = {}
    for k in LABEL_KEYS:
        labels = sorted({c for cats in per_store_cats for c in cats[k]})
        if k == K.PERT_KEY and K.CONTROL_LABEL in labels:
            labels.remove(K.CONTROL_LABEL)
            labels.insert(0, K.CONTROL_LABEL)
        names[k] = labels
    pos = {k: {n: i for i, n in enumerate(names[k])} for k in LABEL_KEYS}
    maps = {k: [np.array([pos[k][c] for c in cats[k]], np.int32)
                for cats in per_store_cats] for k in LABEL_KEYS}
    groups = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out = pd.DataFrame({
        "store": groups["store"].to_numpy(np.int32),
        "start": groups["start"].to_numpy(np.int64),
        "stop": groups["stop"].to_numpy(np.int64),
        "context": _codes(groups[K.CONTEXT_KEY], names[K.CONTEXT_KEY]),
        "pert": _codes(groups[K.PERT_KEY], names[K.PERT_KEY]),
        "batch": _codes(groups[K.BATCH_KEY], names[K.BATCH_KEY]),
    })
    return CorpusLabels(names, maps), out


def _codes(values: pd.Series, names: list[str]) -> np.ndarray:
    pos = {n: i for i, n in enumerate(names)}
    return np.array([pos[str(v)] for v in values], np.int32)
