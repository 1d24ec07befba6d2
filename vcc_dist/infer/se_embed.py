"""SE cell embeddings: a trained SE checkpoint -> ``obsm/<key>`` in every corpus store.

    loaded = load_se_checkpoint("runs/demo/se")                 # best checkpoint of a run
    embed_corpus(loaded, "runs/demo/corpus", key="X_se")        # Ray tasks, one per store
    export_anndata("runs/demo/corpus", "X_se", "cells.h5ad")    # obsm["X_state"] for scanpy

Each store is embedded by one Ray task (a GPU each when the cluster has GPUs): rows in
order, read in blocks of raw counts, tokenised as in training but deterministically (no
targets, no downsampled copies, ties broken by a fixed per-gene key: a cell's embedding does
not depend on its batch), embedded in eval mode (no dropout), and streamed into the store
through vcc_dist.data.embeddings.EmbeddingWriter (local or ``s3://`` corpora; each store's
manifest records the node that wrote it): atomic per store, resumable after a kill
(a rerun continues a partial store from its last flushed shard), and skipped when the store
already holds a complete embedding made by the same checkpoint.

The checkpoint works on any corpus: the gene map is rebuilt from the corpus's vocabulary and
the checkpoint's gene table genes (vocabulary genes it has no embedding for are left out,
as in training).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from vcc_dist.checkpoint import SE_KIND, SEManifest, fp32_weights, open_checkpoint
from vcc_dist.data.embeddings import EmbeddingWriter, embedding_status
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.se_tokens import SETokenizer, gene_map_for
from vcc_dist.models.se import SEConfig, SEModel
from vcc_dist.provenance import node_ids
from vcc_dist.ray_utils import ensure_ray


@dataclass
class LoadedSE:
    model: SEModel        # eval mode, fp32, CPU
    manifest: SEManifest
    path: Path

    @property
    def table_genes(self) -> list[str]:
        return list(self.manifest.table_genes)

    def gene_map(self, vocab: list[str]) -> np.ndarray:
        gm, _ = gene_map_for(list(vocab), self.table_genes)
        if (gm >= 0).sum() == 0:
            raise ValueError(f"no gene of this corpus's vocabulary is in the SE checkpoint's gene "
                             f"table ({self.path}); embed a corpus with the same gene symbols")
        return gm

    @property
    def identity(self) -> dict[str, Any]:
        """What identifies the model in the embeddings' manifest."""
        return se_identity(self.path, self.manifest)


def se_identity(ck: str | os.PathLike, manifest: SEManifest) -> dict[str, Any]:
    """What identifies an SE checkpoint in the embeddings' manifest (from its manifest alone:
    no model is loaded)."""
    return {"checkpoint": str(ck),
            "checkpoint_id": hashlib.sha256(json.dumps(
                [manifest.saved_at, manifest.model_config, manifest.trainer_state.to_dict()],
                sort_keys=True).encode()).hexdigest()[:16],
            "model": "SE", "step": manifest.step}


def load_se_checkpoint(path: str | os.PathLike, which: str = "best") -> LoadedSE:
    """The fp32 SE model of a training checkpoint (any ZeRO stage, any training precision:
    an fp16/bf16 GPU checkpoint loads on a CPU) or run directory (``which``: its best or
    latest checkpoint), without Ray or a process group (vcc_dist.checkpoint)."""
    ck, man = open_checkpoint(path, which, SE_KIND)
    model = SEModel(SEConfig.from_dict(man.model_config))
    model.load_state_dict(fp32_weights(ck, man))
    model.eval()
    return LoadedSE(model, man, ck)


def embed_rows(loaded: LoadedSE, indptr, indices, counts, totals, gene_map: np.ndarray,
               with_dataset: bool = True, device=None, tokenizer=None) -> np.ndarray:
    """Embeddings [n, dim] of cells given as raw-count CSR over the corpus vocabulary
    (``tokenizer``: an SETokenizer of this model and gene map, reused across calls)."""
    tok = tokenizer or SETokenizer(loaded.model.cfg, gene_map, seed=0)
    t = tok(indptr, indices, counts, totals, train=False)
    device = device or next(loaded.model.parameters()).device
    ids = torch.from_numpy(t["gene_ids"][:, 0]).long().to(device)
    expr = torch.from_numpy(t["expr"][:, 0]).to(device)
    return loaded.model.embed(ids, expr, with_dataset=with_dataset).float().cpu().numpy()


def _embed_store(ck_path: str, which: str, corpus: str, store: int, key: str, batch_size: int,
                 read_rows: int, with_dataset: bool, threads: int) -> dict:
    """One store, rows in order, into ``obsm/<key>`` (runs in a Ray task or inline)."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = load_se_checkpoint(ck_path, which)
    if torch.cuda.is_available():
        loaded.model.cuda()
    reader = CorpusReader(corpus, normalize=False)
    gm = loaded.gene_map(reader.manifest.genes)
    tok = SETokenizer(loaded.model.cfg, gm, seed=0)  # one per store, not per batch
    n = int(reader.n_cells[store])
    dim = loaded.model.cfg.embed_dim if with_dataset else loaded.model.cfg.output_dim
    w = EmbeddingWriter(reader.store_paths[store], key, n, dim,
                        meta={**loaded.identity, "with_dataset": with_dataset}, resume=True)
    start = w.next_row
    while start < n:
        rows = np.arange(start, min(n, start + read_rows))
        blk = reader.read(store, rows)
        out = np.empty((rows.size, dim), np.float32)
        for a in range(0, rows.size, batch_size):
            z = min(rows.size, a + batch_size)
            ip = blk.indptr[a:z + 1]
            sl = slice(int(ip[0]), int(ip[-1]))
            out[a:z] = embed_rows(loaded, ip - ip[0], blk.indices[sl], blk.data[sl],
                                  blk.totals[a:z], gm, with_dataset, tokenizer=tok)
        w.write(start, out)
        start += rows.size
    m = w.commit()
    return {"store": reader.store_names[store], "cells": n, "resumed_at": int(w.rows_done),
            "seconds": time.perf_counter() - t0, "written_by": m["written_by"]}


def embed_corpus(checkpoint: str | os.PathLike, corpus: str | os.PathLike, *, key: str = "X_se",
                 which: str = "best", batch_size: int = 256, read_rows: int = 4096,
                 with_dataset: bool = True, overwrite: bool = False, parallel: str = "ray",
                 cpus_per_task: float = 1.0, progress: bool = True) -> dict:
    """Embed every store of ``corpus`` with an SE checkpoint (see the module docstring).
    Returns a summary: stores embedded / skipped, cells, seconds, cells/s."""
    if parallel not in ("ray", "serial"):
        raise ValueError(f"parallel={parallel!r}: 'ray' or 'serial'")
    t0 = time.perf_counter()
    loaded = load_se_checkpoint(checkpoint, which)
    ck = str(loaded.path)
    reader = CorpusReader(corpus, normalize=False)
    loaded.gene_map(reader.manifest.genes)  # fail early on a foreign vocabulary
    ident = {**loaded.identity, "with_dataset": with_dataset}
    status = embedding_status(corpus, key)
    todo, skipped = [], []
    for i, name in enumerate(reader.store_names):
        m = status.get(name)
        if (not overwrite and m is not None
                and all(m.get(k) == v for k, v in ident.items())):
            skipped.append(name)
        else:
            todo.append(i)
    args = (key, batch_size, read_rows, with_dataset)
    results = []
    bar = None
    if progress and todo:
        bar = tqdm(total=int(reader.n_cells[todo].sum()), unit="cell", desc="embed_cells")
    if parallel == "serial" or not todo:
        for i in todo:
            results.append(_embed_store(ck, "best", str(corpus), i, *args, threads=0))
            if bar:
                bar.update(results[-1]["cells"])
    else:
        ensure_ray()
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # SPREAD: stores go to every host of a cluster (a corpus in object storage is read
        # from anywhere); a task lost with its host is retried elsewhere
        task = ray.remote(_embed_store).options(num_cpus=cpus_per_task, num_gpus=gpus,
                                                max_retries=2, scheduling_strategy="SPREAD")
        threads = max(1, int(cpus_per_task))
        pending = [task.remote(ck, "best", str(corpus), i, *args, threads=threads) for i in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results.append(ray.get(ready[0]))
            if bar:
                bar.update(results[-1]["cells"])
    if bar:
        bar.close()
    cells = sum(r["cells"] for r in results)
    wall = time.perf_counter() - t0
    return {"checkpoint": ck, "key": key, "embedded": [r["store"] for r in results],
            "skipped": skipped, "cells": cells, "seconds": wall,
            "node_ids": node_ids([r["written_by"] for r in results]),
            "cells_per_s": cells / wall if cells else None,
            "dim": loaded.model.cfg.embed_dim if with_dataset else loaded.model.cfg.output_dim}


__all__ = ["LoadedSE", "embed_corpus", "embed_rows", "load_se_checkpoint"]
