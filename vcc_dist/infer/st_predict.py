"""ST inference: sets of a context's control cells -> predicted perturbed cells.

Shared by validation during training (vcc_dist.train.st) and ``jobs/predict.py``:

* :func:`plan_sets` — for every perturbation with ``n`` cells to predict, ``ceil(n / S)`` sets
  of ``S`` control cells (each set draws without replacement while the controls last; seeded);
  the first ``n`` predicted cells of its sets are the perturbation's cells.
* :func:`run_sets` — many sets per forward pass (``sets_per_batch``), optionally split over
  ranks (every rank runs the same number of forward passes, as ZeRO-3 requires).
* :func:`prepare_context` — draws every set of a context up front (seeded, in the
  perturbations' order), so where the sets are then predicted (:func:`predict_set_range`: in
  this process, or ranges of :func:`set_ranges` on Ray tasks of ``jobs/predict.py``) cannot
  change a number of the result.
* :class:`SubmissionWriter` — writes a challenge-format ``.h5ad`` block by block (CSR rows
  appended to the file), so a prediction never holds the whole matrix; written under a
  temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.io import sparse_dataset, write_elem
from tqdm.auto import tqdm

from vcc_dist.checkpoint import (
    ST_KIND,
    STManifest,
    fp32_weights,
    gather_checked_embeddings,
    open_checkpoint,
    st_features,
)
from vcc_dist.constants import BATCH_KEY, CONTROL_LABEL, PERT_KEY
from vcc_dist.data.plans import SetStreamConfig
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.streams import cell_labels, set_plan
from vcc_dist.models.st import STConfig, STModel


@dataclass
class SetPlanOut:
    """``pert[k]``: which perturbation set k predicts; ``ctrl[k]``: its control rows;
    ``take[k]``: how many of its cells are kept (the last set of a perturbation may keep
    fewer than S)."""

    pert: np.ndarray  # [K] index into the perturbation list
    ctrl: np.ndarray  # [K, S] index into the control matrix
    take: np.ndarray  # [K]


def plan_sets(counts: Sequence[int], n_controls: int, set_size: int, seed: int = 0) -> SetPlanOut:
    if n_controls < 1:
        raise ValueError("no control cells to predict from")
    rng = np.random.default_rng(seed)
    pert, ctrl, take = [], [], []
    for i, n in enumerate(counts):
        n = int(n)
        if n <= 0:
            continue
        k = -(-n // set_size)
        # without replacement while the controls last, then a fresh permutation
        reps = -(-(k * set_size) // n_controls)
        idx = np.concatenate([rng.permutation(n_controls) for _ in range(reps)])[: k * set_size]
        ctrl.append(idx.reshape(k, set_size))
        pert += [i] * k
        take += [set_size] * (k - 1) + [n - (k - 1) * set_size]
    if not pert:
        return SetPlanOut(np.zeros(0, np.int64), np.zeros((0, set_size), np.int64),
                          np.zeros(0, np.int64))
    return SetPlanOut(np.array(pert, np.int64), np.concatenate(ctrl).astype(np.int64),
                      np.array(take, np.int64))


def run_sets(forward: Callable, plan: SetPlanOut, controls: np.ndarray, features: np.ndarray,
             *, sets_per_batch: int, rank: int = 0, world_size: int = 1,
             batch_index: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(set id, predicted cells [take, G])`` for this rank's sets.

    ``forward(ctrl [b, S, G] float32, feats [b, D], batch [b, S] or None) -> [b, S, G]`` (numpy
    in, numpy out). ``features[i]`` are the features of perturbation i; ``batch_index[j]`` the
    experimental batch of control cell j (for models with a batch embedding: a predicted cell
    keeps its control cell's batch). Batches of
    ``sets_per_batch`` sets are dealt round-robin to ranks; every rank calls ``forward`` the
    same number of times (a rank without a batch left repeats its last one and drops it)."""
    K = plan.pert.size
    starts = list(range(0, K, sets_per_batch))
    mine = starts[rank::world_size]
    n_calls = -(-len(starts) // world_size) if starts else 0
    for j in range(n_calls):
        real = j < len(mine)
        a = mine[j] if real else (mine[-1] if mine else 0)
        sl = slice(a, min(a + sets_per_batch, K))
        ctrl = controls[plan.ctrl[sl]]
        feats = features[plan.pert[sl]]
        b = None if batch_index is None else batch_index[plan.ctrl[sl]]
        out = forward(ctrl, feats, b)
        if not real:
            continue
        for k, pred in zip(range(sl.start, sl.stop), out):
            yield k, pred[: plan.take[k]]


class SubmissionWriter:
    """Append-only writer of a challenge-format prediction ``.h5ad`` (float32 CSR log1p X,
    obs ``target_gene`` categorical, var index = genes, obs names "0".."n-1").

    The row labels are fixed up front (``labels``: one per row, in row order); ``append``
    takes the next rows (dense or CSR) and ``close`` checks that every row was written and
    renames the file into place. Nothing appears at ``path`` until then."""

    def __init__(self, path: str | os.PathLike, labels: Sequence[str], genes: Sequence[str], *,
                 pert_col: str = PERT_KEY, control_label: str = CONTROL_LABEL):
        self.path = Path(path)
        labels = np.asarray(labels, dtype=object).astype(str)
        if not (labels == control_label).any():
            raise ValueError(f"a submission needs control cells labelled {control_label!r}")
        self.n_rows, self.n_genes = labels.size, len(genes)
        self.done = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp.h5ad")
        self.f = h5py.File(self.tmp, "w")
        self.f.attrs["encoding-type"] = "anndata"
        self.f.attrs["encoding-version"] = "0.1.0"
        cats = list(dict.fromkeys(labels.tolist()))
        obs = pd.DataFrame({pert_col: pd.Categorical(labels, categories=cats)},
                           index=pd.Index(np.arange(self.n_rows).astype(str)))
        write_elem(self.f, "obs", obs)
        write_elem(self.f, "var", pd.DataFrame(index=pd.Index([str(g) for g in genes])))
        for k in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(self.f, k, {})
        self._x = None
        self._ad = ad

    def append(self, rows) -> None:
        # a CSR block is copied: it is cleaned in place below, and may be read-only (one
        # fetched from Ray's object store) or still the caller's
        x = sp.csr_matrix(rows, dtype=np.float32, copy=sp.issparse(rows))
        if x.shape[1] != self.n_genes:
            raise ValueError(f"rows have {x.shape[1]} genes, the file {self.n_genes}")
        if self.done + x.shape[0] > self.n_rows:
            raise ValueError(f"more rows than labels ({self.n_rows})")
        if x.nnz and (not np.isfinite(x.data).all() or (x.data < 0).any()):
            raise ValueError("predicted values must be finite and >= 0 (log1p space)")
        x.eliminate_zeros()
        x.sort_indices()
        if self._x is None:
            write_elem(self.f, "X", x)
            self._x = sparse_dataset(self.f["X"])
        elif x.shape[0]:
            self._x.append(x)
        self.done += x.shape[0]

    def close(self, uns: dict | None = None) -> Path:
        """Finish the file (``uns``: e.g. provenance, known only once the rows are written)
        and rename it into place."""
        if self.done != self.n_rows:
            self.abort()
            raise ValueError(f"{self.done} of {self.n_rows} rows written; the file was discarded")
        if uns:
            del self.f["uns"]
            write_elem(self.f, "uns", uns)
        # the X group records the matrix shape; rows appended grew it
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


# ---------------------------------------------------------------------------------------------
# trained checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedST:
    model: STModel         # eval mode, fp32, CPU
    manifest: STManifest
    features: np.ndarray   # [C, P, D]
    path: Path

    @property
    def genes(self) -> list[str]:
        return list(self.manifest.genes)

    @property
    def contexts(self) -> list[str]:
        return self.manifest.contexts

    @property
    def perturbations(self) -> list[str]:
        return self.manifest.perturbations


def load_st_checkpoint(path: str | os.PathLike, which: str = "best") -> LoadedST:
    """The fp32 model of a training checkpoint or run directory (``which``: its best or
    latest checkpoint), any ZeRO stage and training precision, without Ray or a process
    group (vcc_dist.checkpoint)."""
    ck, man = open_checkpoint(path, which, ST_KIND)
    model = STModel(STConfig.from_dict(man.model_config))
    model.load_state_dict(fp32_weights(ck, man))
    model.eval()
    return LoadedST(model, man, st_features(ck), ck)


def check_compatible(loaded: LoadedST, reader) -> None:
    """The corpus a prediction reads controls from must have the checkpoint's genes (in its
    order) and know its contexts; otherwise the error names what differs."""
    genes = loaded.genes
    if list(reader.genes) != genes:
        have = set(reader.genes)
        missing = [g for g in genes if g not in have]
        raise ValueError(f"the corpus's genes differ from the checkpoint's: {len(missing)} of "
                         f"{len(genes)} missing (e.g. {missing[:5]}); predict from a corpus "
                         "with the training gene vocabulary")


@dataclass
class ContextInputs:
    """What predicting a context's sets needs, as plain arrays: small enough to ship to Ray
    tasks, and the same wherever the sets are predicted (the draws are made once, here)."""

    context: str
    perts: list[str]              # in output order
    counts: list[int]             # cells to predict per perturbation
    controls: np.ndarray          # [n, G or D] model inputs (expression or SE embeddings)
    control_batch: np.ndarray | None  # [n] batch index per control (batch-embedding models)
    features: np.ndarray          # [P, D] features of ``perts`` in this context
    sets: SetPlanOut

    @property
    def n_sets(self) -> int:
        return int(self.sets.pert.size)


@dataclass
class PreparedContext:
    """:class:`ContextInputs` plus where all of the context's control cells are (the
    submission ends with them) and the submission's row labels."""

    inputs: ContextInputs
    reader: CorpusReader
    control_st: np.ndarray        # store of every control cell of the context
    control_rows: np.ndarray      # row in that store

    @property
    def labels(self) -> list[str]:
        i = self.inputs
        return ([p for p, n in zip(i.perts, i.counts) for _ in range(n)]
                + [CONTROL_LABEL] * int(self.control_st.size))


#: ``(model, inputs, sets_per_batch) -> predicted rows`` in set order (blocks of rows, dense or
#: CSR): how a context's sets are predicted (in process, or spread over Ray tasks by a job)
RowSource = Callable[[STModel, ContextInputs, int], Iterable[np.ndarray | sp.spmatrix]]


def prepare_context(loaded: LoadedST, corpus: str | os.PathLike, context: str,
                    counts: dict[str, int], *, max_set_controls: int = 8192,
                    seed: int = 0) -> PreparedContext:
    """Check the request, read the controls the sets are drawn from (at most
    ``max_set_controls``, sampled with ``seed``) and draw every set (:func:`plan_sets`, seeded,
    in ``counts`` order). All randomness is here, so where the sets are predicted cannot
    change the result."""
    man = loaded.manifest
    if context not in loaded.contexts:
        raise ValueError(f"context {context!r} is not one the model knows: {loaded.contexts}")
    unknown = [p for p in counts if p not in loaded.perturbations]
    if unknown:
        raise ValueError(f"{len(unknown)} perturbations are not in the model's perturbation "
                         f"map (e.g. {unknown[:5]}); its features cover only those")
    val = man.val or {}
    if val.get("context") == context:
        reused = sorted(set(counts) & set(val.get("perts", ())))
        if reused:
            warnings.warn(
                f"{len(reused)} of the perturbations to predict in {context!r} (e.g. "
                f"{reused[:5]}) are validation perturbations of this checkpoint: its selection "
                "and its validation metrics saw them, so scores on them are optimistic; predict "
                "perturbations disjoint from the split's validation set", stacklevel=3)
    norm = man.normalization
    reader = CorpusReader(corpus, genes=loaded.genes, target_sum=norm["target_sum"])
    check_compatible(loaded, reader)
    ci = loaded.contexts.index(context)
    plan, _ = set_plan(corpus, SetStreamConfig(target_sum=norm["target_sum"]), None, reader=reader)
    # all of the context's controls (training role) ...
    pool = plan.pools.get((plan.labels.contexts.index(context), -1))
    if pool is None or pool.n == 0:
        raise ValueError(f"the corpus has no control cells of context {context!r}")
    all_st, all_rw = pool.locate(np.arange(pool.n))
    rng = np.random.default_rng(seed)
    k = np.arange(pool.n) if pool.n <= max_set_controls else np.sort(
        rng.choice(pool.n, max_set_controls, replace=False))
    if man.embeddings:  # ST on SE: the controls' SE embeddings are the input
        ctrl = gather_checked_embeddings(str(corpus), man.embeddings, all_st[k], all_rw[k])
    else:
        ctrl = reader.dense(reader.read_many(all_st[k], all_rw[k], normalize=True))
    ctrl_batch = (control_batches(reader, plan.labels, all_st[k], all_rw[k],
                                  man.labels["batches"])
                  if loaded.model.cfg.n_batches else None)
    S = int(man.model_config["cell_set_len"])
    perts = list(counts)
    n = [int(counts[p]) for p in perts]
    pidx = np.array([loaded.perturbations.index(p) for p in perts], np.int64)
    inputs = ContextInputs(context, perts, n, ctrl, ctrl_batch, loaded.features[ci, pidx],
                           plan_sets(n, ctrl.shape[0], S, seed=seed))
    return PreparedContext(inputs, reader, all_st, all_rw)


def set_ranges(n_sets: int, sets_per_batch: int, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous ranges ``[start, stop)`` of sets, as even as whole forward
    passes allow. Cut only between forward passes, each range's passes hold exactly the sets of
    the in-process run's passes, so its predictions are the same numbers."""
    n_batches = -(-n_sets // sets_per_batch)
    cuts = np.array_split(np.arange(n_batches), max(1, min(parts, n_batches)))
    return [(int(c[0]) * sets_per_batch, min(int(c[-1] + 1) * sets_per_batch, n_sets))
            for c in cuts if c.size]


def predict_set_range(model: STModel, inputs: ContextInputs, start: int, stop: int, *,
                      sets_per_batch: int) -> Iterator[np.ndarray]:
    """Predicted cells of sets ``[start, stop)`` in set order (``start`` on a forward-pass
    boundary, see :func:`set_ranges`); what one Ray task of a spread prediction runs."""
    s = inputs.sets
    sub = SetPlanOut(s.pert[start:stop], s.ctrl[start:stop], s.take[start:stop])
    for _, pred in run_sets(make_forward(model), sub, inputs.controls, inputs.features,
                            sets_per_batch=sets_per_batch, batch_index=inputs.control_batch):
        yield pred


def predict_in_process(model: STModel, inputs: ContextInputs,
                       sets_per_batch: int) -> Iterator[np.ndarray]:
    """The default :data:`RowSource`: every set in this process."""
    return predict_set_range(model, inputs, 0, inputs.n_sets, sets_per_batch=sets_per_batch)


def predict_context(loaded: LoadedST, corpus: str | os.PathLike, context: str,
                    counts: dict[str, int], out_path: str | os.PathLike, *,
                    sets_per_batch: int = 32, max_set_controls: int = 8192,
                    control_block: int = 4096, seed: int = 0, progress: bool = False,
                    rows: RowSource | None = None,
                    uns: Callable[[], dict] | None = None) -> Path:
    """Predict ``counts[p]`` cells of every perturbation ``p`` in ``context`` from that
    context's control cells in ``corpus``, and write a challenge-format submission: the
    predicted cells (perturbations in ``counts`` order), then the context's control cells.

    ``rows`` predicts the sets (default :func:`predict_in_process`; jobs/predict.py spreads
    them over Ray tasks): the sets are drawn beforehand (:func:`prepare_context`), so the file
    does not depend on it. ``uns`` is called once the rows are written (a spread prediction
    knows its nodes only then); its dict becomes the file's ``uns`` (provenance).

    Memory: at most ``max_set_controls`` control cells (sampled) are held to draw sets from;
    predictions go to the file block by block; the controls are appended to the file in
    blocks of ``control_block`` cells."""
    prep = prepare_context(loaded, corpus, context, counts, max_set_controls=max_set_controls,
                           seed=seed)
    source = rows or predict_in_process
    reader, all_st, all_rw = prep.reader, prep.control_st, prep.control_rows
    with SubmissionWriter(out_path, prep.labels, loaded.genes) as w:
        bar = tqdm(total=sum(prep.inputs.counts), desc=f"predict {context}", unit="cell",
                   disable=not progress)
        for block in source(loaded.model, prep.inputs, sets_per_batch):
            w.append(block)
            bar.update(block.shape[0])
        bar.close()
        for a in range(0, all_st.size, control_block):
            w.append(reader.dense(reader.read_many(all_st[a:a + control_block],
                                                   all_rw[a:a + control_block], normalize=True)))
        return w.close(uns=uns() if uns is not None else None)


def control_batches(reader, labels, st: np.ndarray, rows: np.ndarray,
                    trained_batches: list[str] | None = None) -> np.ndarray:
    """Corpus-wide batch index of each control cell (for the batch embedding). With
    ``trained_batches`` (a checkpoint's batch names), the index is the one the model was
    trained with (by batch name); a batch the model never saw is an error."""
    idx = cell_labels(reader, labels.store_maps, st, rows)["batch_index"].astype(np.int64)
    if trained_batches is None:
        return idx
    trained = {b: i for i, b in enumerate(trained_batches)}
    names = [labels.names[BATCH_KEY][i] for i in idx]
    unknown = sorted({n for n in names if n not in trained})
    if unknown:
        raise ValueError(f"control cells come from batches the model has no embedding for: "
                         f"{unknown[:5]}; use a model without a batch embedding")
    return np.array([trained[n] for n in names], np.int64)


def make_forward(model, *, device=None, dtype=None):
    """The ``forward`` of :func:`run_sets` for a model (numpy in and out, no gradients): inputs
    cast to ``device``/``dtype`` (the engine's under DeepSpeed), gene-space output
    (``pred_genes`` when the model has a gene decoder)."""

    def forward(ctrl, feats, batch):
        with torch.no_grad():
            c = torch.from_numpy(np.ascontiguousarray(ctrl)).to(device=device, dtype=dtype)
            f = torch.from_numpy(np.ascontiguousarray(feats)).to(device=device, dtype=dtype)
            b = None if batch is None else torch.from_numpy(np.asarray(batch)).to(device)
            out = model(c, f, b)
            return out.get("pred_genes", out["pred"]).float().cpu().numpy()

    return forward
