"""SE (State Embedding) model: a transformer that turns one cell into an embedding.

Architecture only (STYLE habit 1): no ray, deepspeed, wandb or rank logic here. The cell
sentences it reads are built by :mod:`vcc_dist.data.se_tokens` (in Ray Data, not in the
training worker).

Reconstruction of STATE's SE (ArcInstitute/state, ``emb/``), written from its paper and a
reading of its structure, not from its code, with its known defects fixed:

- **Gene tokens**: a frozen table of ESM2 gene embeddings (``jobs/embed_genes.py``), centred
  (``center_genes``: genes' mean-pooled protein embeddings share one dominant direction) and
  each row L2-normalised, projected by a learned ``Linear -> LayerNorm -> SiLU`` to ``d_model``. Genes
  with no embedding are not in the table (the tokeniser never emits them). Only the genes a
  batch uses are projected (at SE-600M a full 19k x 5,120 table projection would cost ~200
  GFLOP per step).
- **Sentence**: ``[CLS] g_1 .. g_k [DS]``, padding after the genes; a learned CLS token and
  one learned dataset token (the same for every dataset, so unseen datasets can be embedded).
- **Expression** enters through soft binning: an MLP maps each gene's expression (a monotone
  function of its share of the cell's counts, see se_tokens) to a softmax over ``n_bins``
  bins, which weights ``n_bins`` learned bin embeddings added to the gene token.
- **Encoder**: pre-LayerNorm transformer blocks, non-causal SDPA with a key-padding mask;
  attention dropout is applied only in training (STATE leaves it on in eval, so its
  embeddings change from one pass to the next).
- **Outputs**: the cell embedding is the L2-normalised projection of the CLS output; the
  dataset embedding is the projection of the DS output, trained by a dataset-classification
  head. :meth:`SEModel.embed` returns ``[cell, dataset]`` (or the cell part alone).
- **Decoder**: predicts each target gene's log1p expression from ``[gene token, cell
  embedding, log read depth, dataset embedding]`` (an MLP; its first layer is split so the
  per-gene and per-cell halves are computed once each, then broadcast-added).

Objective (:func:`se_loss`): per cell, P expressed + N unexpressed target genes plus S genes
shared by the batch, **masked from the input sentence** (STATE builds a mask and never applies
it; ``mask_targets=False`` keeps that behaviour as an explicit option); MSE, or energy distance
between the predictions and the truths of ``n_copies`` binomially downsampled copies of each
cell; plus ``dataset_weight`` x the dataset-classification cross-entropy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _ckpt

from vcc_dist.config import check_ints, from_dict_checked
from vcc_dist.models.losses import LossRecord, energy_distance

SE_LOSSES = ("mse", "energy")

#: target genes per cell (P expressed, N unexpressed, S shared by the batch)
TARGET_PRESETS: dict[str, tuple[int, int, int]] = {
    "state_code": (512, 512, 512),   # what STATE's code draws
    "state_paper": (640, 640, 0),    # the paper's 1,280 genes per cell, half expressed
}


@dataclass(frozen=True)
class SEConfig:
    """Typed, validated configuration of the SE model and of its cell sentences."""

    # from the data (0: not known yet; the SE trainer fills them in from the gene table and
    # the corpus, so a training config's model section leaves them at 0)
    n_genes: int = 0                # rows of the gene table (genes that have an embedding)
    gene_dim: int = 0               # ESM2 embedding width (5,120 for ESM2-15B)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_hid: int = 512                # feed-forward width
    output_dim: int = 128           # cell embedding width
    dataset_dim: int = 16           # dataset embedding width (0: no dataset embedding/term)
    n_datasets: int = 0             # classes of the dataset head (0: one per corpus store)
    n_bins: int = 10
    decoder_hidden: int = 256
    dropout: float = 0.0
    attn_dropout: float = 0.0       # applied only in training
    # -- the sentence and the objective (read by vcc_dist.data.se_tokens) --
    sentence_len: int = 255         # k: top expressed genes per cell (2,047 in STATE)
    n_expressed: int = 64           # P
    n_unexpressed: int = 64         # N
    n_shared: int = 64              # S
    mask_targets: bool = True       # False: STATE's behaviour (targets stay in the input)
    loss: str = "mse"
    n_copies: int = 1               # downsampled copies per cell (energy needs >= 2)
    min_downsample: float = 0.3     # copies keep each count with p ~ U(min_downsample, 1)
    dataset_weight: float = 0.1
    target_sum: float = 1e4         # expression = log1p(target_sum * count / cell total)
    activation_checkpointing: bool = False
    # subtract the table's mean vector before L2-normalising: mean-pooled ESM2 embeddings share
    # a large common direction (cosine ~0.95 between genes here), which carries no identity
    center_genes: bool = True

    def __post_init__(self) -> None:
        check_ints(self, ("d_model", "n_layers", "n_heads", "d_hid",
                          "output_dim", "n_bins", "decoder_hidden", "sentence_len",
                          "n_copies"),
                   ("n_genes", "gene_dim", "n_datasets", "dataset_dim", "n_expressed",
                    "n_unexpressed", "n_shared"))
        if self.n_targets < 1:
            raise ValueError("SEConfig: n_expressed + n_unexpressed + n_shared must be >= 1 "
                             "(the objective needs target genes)")
        if self.d_model % self.n_heads:
            raise ValueError(f"SEConfig.d_model={self.d_model} must be divisible by "
                             f"n_heads={self.n_heads}")
        if self.loss not in SE_LOSSES:
            raise ValueError(f"SEConfig.loss={self.loss!r}: choose one of {SE_LOSSES}")
        if self.loss == "energy" and self.n_copies < 2:
            raise ValueError("SEConfig.loss='energy' compares the predictions for several "
                             "downsampled copies of a cell with their truths: set n_copies >= 2 "
                             "(or loss='mse')")
        for k in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ValueError(f"SEConfig.{k}={getattr(self, k)!r} must be in [0, 1)")
        if not 0.0 < self.min_downsample <= 1.0:
            raise ValueError(f"SEConfig.min_downsample={self.min_downsample} must be in (0, 1]")
        if self.dataset_weight < 0 or self.target_sum <= 0:
            raise ValueError("SEConfig.dataset_weight must be >= 0 and target_sum > 0")

    @property
    def n_targets(self) -> int:
        return self.n_expressed + self.n_unexpressed + self.n_shared

    @property
    def seq_len(self) -> int:
        """Tokens per sentence: CLS + k genes + DS."""
        return self.sentence_len + 2

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`SEModel.embed` with the dataset part (what ST reads)."""
        return self.output_dim + self.dataset_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SEConfig:
        return from_dict_checked(cls, d, "SEConfig")


_PRESETS: dict[str, dict[str, Any]] = {
    # builds and steps on CPU in well under a second
    "debug": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_hid": 64, "output_dim": 32,
              "dataset_dim": 8, "decoder_hidden": 32, "sentence_len": 63, "n_expressed": 16,
              "n_unexpressed": 16, "n_shared": 16},
    # trains on a few CPU cores in minutes
    "small": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_hid": 512, "output_dim": 128,
              "dataset_dim": 16, "decoder_hidden": 256, "sentence_len": 255, "n_expressed": 64,
              "n_unexpressed": 64, "n_shared": 64},
    # STATE's SE-600M shape (its code's 512/512/512 targets; "state_paper" targets via
    # se_preset(..., targets="state_paper"))
    "se600m": {"d_model": 2048, "n_layers": 16, "n_heads": 16, "d_hid": 4096,
               "output_dim": 2048, "dataset_dim": 10, "decoder_hidden": 1024,
               "sentence_len": 2047, "n_expressed": 512, "n_unexpressed": 512, "n_shared": 512,
               "dropout": 0.1},
}
SE_PRESETS = tuple(_PRESETS)


def preset_values(name: str, targets: str | None = None) -> dict[str, Any]:
    """The model options a named shape (and a :data:`TARGET_PRESETS` entry) sets (a copy)."""
    if name not in _PRESETS:
        raise ValueError(f"SE preset {name!r} is unknown; choose one of {SE_PRESETS}")
    d = dict(_PRESETS[name])
    if targets:
        if targets not in TARGET_PRESETS:
            raise ValueError(f"targets={targets!r}: choose one of {tuple(TARGET_PRESETS)}")
        d["n_expressed"], d["n_unexpressed"], d["n_shared"] = TARGET_PRESETS[targets]
    return d


def se_preset(name: str, n_genes: int, gene_dim: int, *, targets: str | None = None,
              **overrides: Any) -> SEConfig:
    """A named shape plus overrides; ``targets`` picks a :data:`TARGET_PRESETS` entry
    (one dataset class unless ``n_datasets`` is given)."""
    d = {"n_datasets": 1, **preset_values(name, targets)}
    known = {f.name for f in dataclasses.fields(SEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown SEConfig override(s) {unknown}; valid keys: {sorted(known)}")
    return SEConfig(n_genes=n_genes, gene_dim=gene_dim, **{**d, **overrides})


class SoftBin(nn.Module):
    """Expression -> softmax over ``n_bins`` -> convex combination of bin embeddings."""

    def __init__(self, n_bins: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, 2 * n_bins), nn.SiLU(), nn.Linear(2 * n_bins, n_bins))
        self.bins = nn.Parameter(torch.randn(n_bins, dim) * 0.02)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mlp(x.unsqueeze(-1)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x) @ self.bins


class Block(nn.Module):
    """Pre-LayerNorm transformer block (bidirectional SDPA with a key-padding mask)."""

    def __init__(self, cfg: SEConfig):
        super().__init__()
        self.h, self.p = cfg.n_heads, cfg.attn_dropout
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_hid), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.d_hid, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                           dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class SEModel(nn.Module):
    """See the module docstring. ``gene_table``: [n_genes, gene_dim] ESM2 embeddings (frozen;
    saved with the weights so a checkpoint is self-contained)."""

    def __init__(self, cfg: SEConfig, gene_table: torch.Tensor | None = None):
        super().__init__()
        if not (cfg.n_genes and cfg.gene_dim and cfg.n_datasets):
            raise ValueError(f"SEModel needs a complete SEConfig: n_genes={cfg.n_genes}, "
                             f"gene_dim={cfg.gene_dim}, n_datasets={cfg.n_datasets} (the SE "
                             "trainer fills them in from the gene table and the corpus)")
        self.cfg = cfg
        table = torch.zeros(cfg.n_genes, cfg.gene_dim) if gene_table is None else gene_table.float()
        if tuple(table.shape) != (cfg.n_genes, cfg.gene_dim):
            raise ValueError(f"gene_table has shape {tuple(table.shape)}, the config says "
                             f"({cfg.n_genes}, {cfg.gene_dim})")
        if cfg.center_genes and gene_table is not None:
            table = table - table.mean(dim=0, keepdim=True)
        self.register_buffer("gene_table", F.normalize(table, dim=-1))
        d = cfg.d_model
        self.gene_proj = nn.Sequential(nn.Linear(cfg.gene_dim, d), nn.LayerNorm(d), nn.SiLU())
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        self.ds_token = nn.Parameter(torch.randn(d) * 0.02)
        self.softbin = SoftBin(cfg.n_bins, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.cell_head = nn.Linear(d, cfg.output_dim)
        if cfg.dataset_dim:
            self.ds_head = nn.Linear(d, cfg.dataset_dim)
            self.ds_classifier = nn.Linear(cfg.dataset_dim, cfg.n_datasets)
        h = cfg.decoder_hidden
        self.dec_gene = nn.Linear(d, h, bias=False)
        self.dec_cell = nn.Linear(cfg.output_dim + 1 + cfg.dataset_dim, h)
        self.dec_out = nn.Sequential(nn.SiLU(), nn.Dropout(cfg.dropout), nn.Linear(h, h),
                                     nn.SiLU(), nn.Linear(h, 1))

    def project_genes(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected tokens of the distinct genes in ``ids`` (>= 0) and the inverse index."""
        uniq, inv = torch.unique(ids.clamp(min=0), return_inverse=True)
        return self.gene_proj(self.gene_table[uniq].to(self.cls.dtype)), inv

    def encode(self, gene_ids: torch.Tensor, expr: torch.Tensor,
               toks: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``gene_ids`` [B, k] (-1 = padding), ``expr`` [B, k] -> cell and dataset embeddings."""
        b, k = gene_ids.shape
        cfg = self.cfg
        proj, inv = toks if toks is not None else self.project_genes(gene_ids)
        pad = gene_ids < 0
        x = proj[inv[..., :k] if toks is not None else inv] + self.softbin(expr.to(proj.dtype))
        x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        x = torch.cat([self.cls.expand(b, 1, -1), x, self.ds_token.expand(b, 1, -1)], dim=1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), ~pad,
                          torch.ones(b, 1, dtype=torch.bool, device=x.device)], dim=1)
        keep = keep[:, None, None, :]
        for blk in self.blocks:
            if cfg.activation_checkpointing and self.training:
                x = _ckpt(blk, x, keep, use_reentrant=False)
            else:
                x = blk(x, keep)
        x = self.norm(x)
        out = {"cell": F.normalize(self.cell_head(x[:, 0]), dim=-1)}
        if cfg.dataset_dim:
            out["dataset"] = self.ds_head(x[:, -1])
            out["dataset_logits"] = self.ds_classifier(out["dataset"])
        return out

    def decode(self, cell: torch.Tensor, dataset: torch.Tensor | None, depth: torch.Tensor,
               gene_tok: torch.Tensor) -> torch.Tensor:
        """Predicted log1p expression [B, T] of target genes whose tokens are ``gene_tok``
        [B, T, d_model] (or [T, d_model], shared by every cell)."""
        parts = [cell, torch.log1p(depth.to(cell.dtype)).unsqueeze(-1)]
        if dataset is not None:
            parts.append(dataset)
        c = self.dec_cell(torch.cat(parts, dim=-1))                       # [B, H]
        g = self.dec_gene(gene_tok)                                       # [B, T, H] or [T, H]
        return self.dec_out(g + c.unsqueeze(-2)).squeeze(-1)

    def forward(self, gene_ids: torch.Tensor, expr: torch.Tensor, target_ids: torch.Tensor,
                depth: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training forward: ``target_ids`` [B, T] genes to predict (-1 = none),
        ``depth`` [B] read depth. Returns the encoder outputs plus ``pred`` [B, T]."""
        k = gene_ids.shape[1]
        proj, inv = self.project_genes(torch.cat([gene_ids, target_ids], dim=1))
        out = self.encode(gene_ids, expr, toks=(proj, inv))
        out["pred"] = self.decode(out["cell"], out.get("dataset"), depth, proj[inv[:, k:]])
        return out

    @torch.no_grad()
    def embed(self, gene_ids: torch.Tensor, expr: torch.Tensor, with_dataset: bool = True) -> torch.Tensor:
        """The cell embedding [B, output_dim (+ dataset_dim)]; call in eval mode."""
        out = self.encode(gene_ids, expr)
        if with_dataset and "dataset" in out:
            return torch.cat([out["cell"], out["dataset"]], dim=-1)
        return out["cell"]


def se_loss(out: dict[str, torch.Tensor], target: torch.Tensor, weight: torch.Tensor,
            dataset: torch.Tensor | None, cfg: SEConfig) -> LossRecord:
    """The SE objective. ``target``/``weight`` [B*C, T] (copies of a cell adjacent, C =
    ``cfg.n_copies``; weight 0 marks a missing target), ``dataset`` [B*C] class ids.

    ``parts``: "expr" (MSE over weighted targets, or the mean energy distance between each
    cell's C predicted and C true target vectors) and "dataset" (cross-entropy)."""
    pred = out["pred"].float()
    target, weight = target.float(), weight.float()
    if cfg.loss == "mse":
        expr = (weight * (pred - target) ** 2).sum() / weight.sum().clamp(min=1.0)
    else:
        c, t = cfg.n_copies, pred.shape[-1]
        # missing targets are zeroed in both sets, so they add no distance
        expr = energy_distance((pred * weight).view(-1, c, t), (target * weight).view(-1, c, t)).mean()
    parts = {"expr": expr}
    total = expr
    if cfg.dataset_dim and dataset is not None and "dataset_logits" in out:
        parts["dataset"] = F.cross_entropy(out["dataset_logits"].float(), dataset.long())
        total = total + cfg.dataset_weight * parts["dataset"]
    return LossRecord(total=total, parts=parts)


def count_parameters(cfg: SEConfig) -> int:
    """Trainable parameters of a config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        m = SEModel(cfg)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


__all__ = ["SEConfig", "SEModel", "SE_PRESETS", "TARGET_PRESETS", "count_parameters", "se_loss",
           "se_preset"]
