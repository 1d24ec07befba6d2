"""Training / validation / test splits in STATE's (cell-load's) TOML format.

A STATE user's ``starter.toml`` works unchanged::

    [datasets]
    replogle = "/data/replogle/"            # dataset name -> directory (or file) of its h5ad files

    [training]
    replogle = "train"                      # datasets whose cells are used

    [zeroshot]
    "replogle.jurkat" = "test"              # a whole context held out (val or test)

    [fewshot]
    [fewshot."replogle.rpe1"]               # some perturbations of a context held out
    val = ["AARS"]
    test = ["NUP107", "POLR2B"]

Semantics (as cell-load 0.10.4): every cell of a ``[training]`` dataset is a training cell,
except the perturbed cells of ``[zeroshot]`` contexts (the whole context goes to the named
split: "val", "test" or "train") and the listed perturbations of ``[fewshot]`` contexts (their
cells go to val and/or test; a perturbation listed in both goes to both; the unlisted ones stay
in training). Control cells are never held out: every split may draw its controls from them,
and the controls of a held-out context still form training control sets. Keys are
``"<dataset>.<context>"`` split at the first dot. Unlike cell-load, a key whose context is not in
the corpus is an error (cell-load silently ignores it, so a typo trains on the test context).

The same rule (:meth:`SplitSpec.pert_role`) applies to AnnData files (the baselines' path,
:meth:`SplitSpec.cell_roles`), where cells carry a context but no dataset: keys are matched by
their context part, and ``[datasets]``/``[training]`` are not applied there. This module is the
one reader of split files for both paths.

A corpus store belongs to the dataset whose ``[datasets]`` path matches the store's source file:
a directory containing it, the file itself, or a glob (``*``, ``?``, ``[...]``, ``{a,b}``) matching
it; with a single dataset every store belongs to it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vcc_dist import storage

TRAIN, VAL, TEST = "train", "val", "test"
ROLES = (TRAIN, VAL, TEST)


class SplitError(ValueError):
    """A split file is malformed or does not fit the corpus; the message says what to fix."""


@dataclass
class SplitSpec:
    datasets: dict[str, str]
    training: dict[str, str] = field(default_factory=dict)
    zeroshot: dict[str, str] = field(default_factory=dict)
    fewshot: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    source: str = ""  # where it was read from (for messages)

    # -- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> SplitSpec:
        """Read a split file: a local path or an ``s3://`` URI (vcc_dist.storage)."""
        p = storage.location(path)
        try:
            text = storage.read_bytes(p).decode()
        except (FileNotFoundError, IsADirectoryError):
            raise SplitError(f"split file {p} does not exist") from None
        return cls.loads(text, source=str(p))

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> SplitSpec:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SplitError(f"split file {source}: not valid TOML ({e})") from e
        unknown = set(doc) - {"datasets", "training", "zeroshot", "fewshot"}
        if unknown:
            raise SplitError(f"split file {source}: unknown section(s) {sorted(unknown)}; "
                             "expected [datasets], [training], [zeroshot], [fewshot]")
        datasets = doc.get("datasets") or {}
        if not datasets or not isinstance(datasets, Mapping):
            raise SplitError(f"split file {source}: [datasets] is missing or empty; add "
                             'name = "/path/to/h5ad/dir"')
        training = doc.get("training") or {}
        for name, val in training.items():
            if name not in datasets:
                raise SplitError(f"split file {source}: [training] names dataset {name!r}, "
                                 f"which [datasets] does not define ({sorted(datasets)})")
            if val != TRAIN:
                raise SplitError(f"split file {source}: [training] {name} = {val!r}; the only "
                                 'value cell-load accepts is "train"')
        zeroshot: dict[str, str] = {}
        for key, val in (doc.get("zeroshot") or {}).items():
            if val not in ROLES:
                raise SplitError(f"split file {source}: [zeroshot] {key!r} = {val!r}; use "
                                 '"val", "test" or "train"')
            _check_key(key, datasets, source, "zeroshot")
            zeroshot[key] = val
        fewshot: dict[str, dict[str, list[str]]] = {}
        for key, entry in (doc.get("fewshot") or {}).items():
            if not isinstance(entry, Mapping):
                raise SplitError(f"split file {source}: [fewshot.{key!r}] must be a table with "
                                 "val = [...] and/or test = [...]")
            _check_key(key, datasets, source, "fewshot")
            bad = set(entry) - {VAL, TEST}
            if bad:
                raise SplitError(f"split file {source}: [fewshot.{key!r}] has unknown keys "
                                 f"{sorted(bad)}; only val and test are allowed")
            fewshot[key] = {r: [str(x) for x in entry.get(r, [])] for r in (VAL, TEST)}
            if key in zeroshot:
                raise SplitError(f"split file {source}: context {key!r} is both zeroshot and "
                                 "fewshot; keep one")
        return cls({k: str(v) for k, v in datasets.items()}, dict(training), zeroshot,
                   fewshot, source)

    def to_toml(self) -> str:
        def q(s: str) -> str:
            return json.dumps(s)

        lines = ["[datasets]"] + [f"{k} = {q(v)}" for k, v in self.datasets.items()]
        lines += ["", "[training]"] + [f"{k} = {q(v)}" for k, v in self.training.items()]
        lines += ["", "[zeroshot]"] + [f"{q(k)} = {q(v)}" for k, v in self.zeroshot.items()]
        lines += ["", "[fewshot]"]
        for k, entry in self.fewshot.items():
            lines += ["", f"[fewshot.{q(k)}]"]
            for r in (VAL, TEST):
                lines.append(f"{r} = [{', '.join(q(x) for x in entry.get(r, []))}]")
        return "\n".join(lines) + "\n"

    # -- the one role rule (corpus path and AnnData path) ---------------------------------------
    def pert_role(self, key: str, pert: str) -> str:
        """Role of the perturbed cells of ``pert`` in the context ``key``
        (``"<dataset>.<context>"``): the zero-shot role of a ``[zeroshot]`` context; for a
        ``[fewshot]`` context "val", "test" or "val,test" where listed, else "train"; "train"
        elsewhere. Control cells are never held out (callers give them "train")."""
        if key in self.zeroshot:
            return self.zeroshot[key]
        entry = self.fewshot.get(key)
        if entry is not None:
            held = [r for r in (VAL, TEST) if pert in entry[r]]
            return ",".join(held) if held else TRAIN
        return TRAIN

    # -- applying it to AnnData (no corpus stores) -----------------------------------------------
    def context_keys(self) -> dict[str, str]:
        """Context name -> its ``"<dataset>.<context>"`` key, for data whose cells carry a
        context but no dataset (an AnnData: :meth:`cell_roles`). A context named under two
        datasets is ambiguous there and raises ``SplitError``."""
        out: dict[str, str] = {}
        for key in [*self.zeroshot, *self.fewshot]:
            ctx = key.split(".", 1)[1]
            if ctx in out:
                raise SplitError(f"split {self.source}: context {ctx!r} is named by both "
                                 f"{out[ctx]!r} and {key!r}; AnnData cells carry no dataset, "
                                 "so keep one entry per context name")
            out[ctx] = key
        return out

    def cell_roles(self, contexts: Sequence[str] | np.ndarray, perturbations: Sequence[str] |
                   np.ndarray, control_label: str) -> np.ndarray:
        """Role of every cell of an AnnData from its obs context and perturbation labels, by
        :meth:`pert_role` ("train", "val", "test" or "val,test"; control cells "train").

        AnnData cells carry no dataset, so split keys are matched by their context part and
        ``[datasets]``/``[training]`` are not applied (every cell given is a candidate); a
        context of the split that is absent from these cells is not an error here (one file
        may hold some contexts only): :func:`vcc_dist.data.heldout.heldout_rows` and
        ``jobs/baseline.py`` check it."""
        ctx = np.asarray(contexts).astype(str)
        pert = np.asarray(perturbations).astype(str)
        if ctx.shape != pert.shape:
            raise ValueError(f"cell_roles: {ctx.shape[0]} contexts but {pert.shape[0]} "
                             "perturbation labels; pass one of each per cell")
        keys = self.context_keys()
        roles = np.full(ctx.shape[0], TRAIN, dtype=object)
        for c, key in keys.items():
            in_c = np.flatnonzero((ctx == c) & (pert != control_label))
            if not in_c.size:
                continue
            names, inv = np.unique(pert[in_c], return_inverse=True)
            roles[in_c] = np.array([self.pert_role(key, n) for n in names], dtype=object)[inv]
        return roles

    def heldout_contexts(self) -> list[str]:
        """Context names (without dataset) that hold out cells for val or test, sorted."""
        keys = self.context_keys()
        return sorted(c for c, k in keys.items()
                      if (k in self.zeroshot and self.zeroshot[k] != TRAIN)
                      or (k in self.fewshot and (self.fewshot[k][VAL] or self.fewshot[k][TEST])))

    # -- applying it to a corpus ----------------------------------------------------------------
    def store_datasets(self, sources: Sequence[str]) -> list[str | None]:
        """Dataset name of each store (by its source file path); None = not in any dataset."""
        if len(self.datasets) == 1:
            return [next(iter(self.datasets))] * len(sources)
        out: list[str | None] = []
        for src in sources:
            s = os.path.realpath(src)
            hits = [k for k, v in self.datasets.items() if _path_matches(v, s)]
            out.append(max(hits, key=lambda k: len(self.datasets[k])) if hits else None)
        return out

    def group_roles(self, groups: pd.DataFrame, store_sources: Sequence[str],
                    contexts: Sequence[str], perturbations: Sequence[str],
                    control_index: int) -> np.ndarray:
        """Role of every group row (``store``, ``context``, ``pert`` codes): "train", "val",
        "test", "val,test" (a few-shot perturbation listed in both), or "" (not used: its
        dataset is not in [training]). Control groups are "train" (and serve as controls for
        every split)."""
        ds_of_store = self.store_datasets(store_sources)
        if all(d is None for d in ds_of_store):
            raise SplitError(f"split {self.source}: no corpus store comes from a [datasets] "
                             f"path ({self.datasets}); store sources are e.g. "
                             f"{list(store_sources)[:2]}")
        training = set(self.training) if self.training else set(self.datasets)
        ctx_names = np.asarray(contexts, dtype=object)
        pert_names = np.asarray(perturbations, dtype=object)
        roles = np.full(len(groups), "", dtype=object)
        seen_keys: set[str] = set()
        listed_found: dict[str, set[str]] = {}
        store = groups["store"].to_numpy()
        ctx = groups["context"].to_numpy()
        pert = groups["pert"].to_numpy()
        for i in range(len(groups)):
            ds = ds_of_store[store[i]]
            if ds is None or ds not in training:
                continue
            key = f"{ds}.{ctx_names[ctx[i]]}"
            seen_keys.add(key)
            if pert[i] == control_index:
                roles[i] = TRAIN
                continue
            name = pert_names[pert[i]]
            roles[i] = self.pert_role(key, name)
            if key in self.fewshot and roles[i] != TRAIN:
                listed_found.setdefault(key, set()).add(name)
        missing = [k for k in list(self.zeroshot) + list(self.fewshot) if k not in seen_keys]
        if missing:
            known = sorted(seen_keys)
            raise SplitError(f"split {self.source}: context(s) {missing} are not in the corpus "
                             f"(known dataset.context keys: {known[:10]}"
                             f"{'...' if len(known) > 10 else ''})")
        for key, entry in self.fewshot.items():
            listed = set(entry[VAL]) | set(entry[TEST])
            absent = sorted(listed - listed_found.get(key, set()))
            if absent:
                warnings.warn(f"split {self.source}: {len(absent)} perturbation(s) listed for "
                              f"{key} have no cells there, e.g. {absent[:5]}", stacklevel=2)
        return roles


def has_role(role: str, split: str) -> bool:
    """Whether a group role string ("train", "val,test", ...) includes ``split``."""
    return split in role.split(",")


def _expand_braces(pattern: str) -> list[str]:
    i = pattern.find("{")
    j = pattern.find("}", i + 1)
    if i < 0 or j < 0:
        return [pattern]
    return [x for alt in pattern[i + 1:j].split(",")
            for x in _expand_braces(pattern[:i] + alt + pattern[j + 1:])]


def _path_matches(spec: str, source_realpath: str) -> bool:
    """Whether a [datasets] path (directory, file or glob with braces) covers a source file."""
    spec = os.path.expanduser(spec)
    if any(c in spec for c in "*?[{"):
        return any(fnmatch.fnmatch(source_realpath, os.path.realpath(p)) or
                   fnmatch.fnmatch(source_realpath, p) for p in _expand_braces(spec))
    root = os.path.realpath(spec)
    return source_realpath == root or source_realpath.startswith(root.rstrip(os.sep) + os.sep)


def _check_key(key: str, datasets: Mapping, source: str, section: str) -> None:
    if "." not in key:
        raise SplitError(f"split file {source}: [{section}] key {key!r} must be "
                         '"<dataset>.<context>"')
    ds = key.split(".", 1)[0]
    if ds not in datasets:
        raise SplitError(f"split file {source}: [{section}] key {key!r} names dataset {ds!r}, "
                         f"which [datasets] does not define ({sorted(datasets)})")
