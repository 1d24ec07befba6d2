"""ST (State Transition) model: a set transformer mapping control cells to perturbed cells.

Architecture only (STYLE habit 1): no ray, deepspeed, wandb or rank logic here.

Reconstruction of STATE's ST family (ArcInstitute/state, ``tx/models/state_transition.py``),
written from a reading of its structure, not from its code:

- perturbation encoder: an MLP of ``n_encoder_layers`` Linear layers ``pert_dim -> h -> ... -> h``
  with GELU (+ dropout) between them and no LayerNorm;
- basal encoder: the same MLP over the control cells' input, or (``basal_mlp=False``, as in
  STATE's ``state_sm``, where ``use_basal_projection: False``) a single ``Linear(input_dim, h)``;
- the two encodings are summed, plus an optional batch embedding;
- a bidirectional Llama-style transformer over the set with no positional information (STATE
  uses a HF Llama with RoPE replaced by an identity; its frozen, zeroed token embedding holds no
  trainable parameters and is omitted here);
- an output MLP ``h -> ... -> h -> output_dim`` of ``n_decoder_layers`` Linear layers; with
  ``residual="hidden"`` the basal encoding is added to the transformer output before it (STATE's
  ``predict_residual`` in gene/embedding space); ReLU on gene-space outputs.

Attention is ``scaled_dot_product_attention(is_causal=False)`` with no mask, so the model is
equivariant to permutations of the cells in a set (STATE once shipped a causal mask here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vcc_dist.config import from_dict_checked

OUTPUT_SPACES = ("genes", "embedding")
RESIDUALS = ("hidden", "input", "none")


@dataclass(frozen=True)
class STConfig:
    """Typed, validated configuration of the ST model. Derived values are properties."""

    # from the data (0: not known yet; the ST trainer fills them in from the corpus and the
    # perturbation features, so a training config's model section leaves them at 0)
    n_genes: int = 0
    pert_dim: int = 0
    output_space: str = "genes"          # "genes": ctrl/pred live in gene space; "embedding": in embed_dim
    embed_dim: int | None = None         # required when output_space="embedding"
    hidden_dim: int = 672
    n_encoder_layers: int = 4
    n_decoder_layers: int = 4
    basal_mlp: bool = True               # False: basal encoder is a single Linear (STATE state_sm)
    n_layers: int = 4                    # transformer blocks
    n_heads: int = 8
    ffn_dim: int = 2688                  # SwiGLU intermediate size
    norm_eps: float = 1e-6
    dropout: float = 0.0                 # MLP dropout (encoders, output MLP, gene decoder)
    attn_dropout: float = 0.0            # applied only in training
    residual: str = "hidden"
    relu: bool | None = None             # None: on for gene-space outputs, off for embeddings
    n_batches: int | str = 0             # >0: add nn.Embedding(n_batches, hidden_dim);
    #                                      "auto": one per experimental batch of the corpus
    gene_decoder: bool = False           # embedding space only: MLP embed_dim -> n_genes
    gene_decoder_hidden: tuple[int, ...] = (1024, 1024, 512)
    cell_set_len: int = 128              # cells per set during training (the data side uses it)
    # Add the first output_dim perturbation features to the prediction (genes only). With
    # "transfer" features first (the perturbation's mean effect in other contexts) and
    # residual="input", the model predicts a correction to the context-mean shift.
    feature_shift: bool = False
    zero_init_output: bool = False       # last output Linear starts at zero (pred = shortcut paths)

    def __post_init__(self) -> None:
        # Normalise list -> tuple so configs from JSON compare equal and stay hashable.
        object.__setattr__(self, "gene_decoder_hidden", tuple(self.gene_decoder_hidden))
        for key in ("hidden_dim", "n_encoder_layers", "n_decoder_layers",
                    "n_layers", "n_heads", "ffn_dim", "cell_set_len"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"STConfig.{key}={v!r} must be a positive integer")
        for key in ("n_genes", "pert_dim"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"STConfig.{key}={v!r} must be a positive integer (0: from the "
                                 "data, filled in by the trainer)")
        if self.n_batches != "auto" and (isinstance(self.n_batches, bool)
                                         or not isinstance(self.n_batches, int)
                                         or self.n_batches < 0):
            raise ValueError(f"STConfig.n_batches={self.n_batches!r} must be an integer >= 0 "
                             "(0 disables the batch embedding) or 'auto' (one per batch of "
                             "the corpus)")
        if self.output_space not in OUTPUT_SPACES:
            raise ValueError(f"STConfig.output_space={self.output_space!r}: choose one of {OUTPUT_SPACES}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"STConfig.residual={self.residual!r}: choose one of {RESIDUALS}")
        if self.hidden_dim % self.n_heads:
            raise ValueError(f"STConfig.hidden_dim={self.hidden_dim} must be divisible by "
                             f"STConfig.n_heads={self.n_heads}; change hidden_dim or n_heads")
        for key in ("dropout", "attn_dropout"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"STConfig.{key}={v!r} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ValueError(f"STConfig.norm_eps={self.norm_eps!r} must be > 0")
        if self.output_space == "embedding":
            if not isinstance(self.embed_dim, int) or isinstance(self.embed_dim, bool) or self.embed_dim < 1:
                raise ValueError(f"STConfig.embed_dim={self.embed_dim!r} must be a positive integer "
                                 "when output_space='embedding'")
        elif self.embed_dim is not None:
            raise ValueError(f"STConfig.embed_dim={self.embed_dim!r} is only used with "
                             "output_space='embedding'; leave it None for gene outputs")
        if self.gene_decoder and self.output_space != "embedding":
            raise ValueError("STConfig.gene_decoder=True needs output_space='embedding' "
                             "(gene outputs need no decoder)")
        if self.feature_shift and (self.output_space != "genes"
                                   or (self.complete and self.pert_dim < self.n_genes)):
            raise ValueError(f"STConfig.feature_shift needs gene outputs and pert_dim >= n_genes "
                             f"(got output_space={self.output_space!r}, pert_dim={self.pert_dim}, "
                             f"n_genes={self.n_genes}); put 'transfer' first in the features")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.gene_decoder_hidden):
            raise ValueError(f"STConfig.gene_decoder_hidden={self.gene_decoder_hidden!r} must hold "
                             "positive integers")

    # -- derived values (computed, never stored twice) --
    @property
    def complete(self) -> bool:
        """Every data-derived value is known (a model can be built)."""
        return self.n_genes > 0 and self.pert_dim > 0 and isinstance(self.n_batches, int)

    @property
    def input_dim(self) -> int:
        """Width of the control cells' input (and of the prediction): genes or embedding."""
        return self.n_genes if self.output_space == "genes" else int(self.embed_dim)  # type: ignore[arg-type]

    @property
    def output_dim(self) -> int:
        return self.input_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def apply_relu(self) -> bool:
        return self.output_space == "genes" if self.relu is None else bool(self.relu)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gene_decoder_hidden"] = list(self.gene_decoder_hidden)  # JSON-friendly
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STConfig:
        return from_dict_checked(cls, d, "STConfig")


_PRESETS: dict[str, dict[str, Any]] = {
    # STATE's state_sm.yaml: set 128, hidden 672, 4-layer encoders/decoders, basal encoder a single
    # Linear (use_basal_projection: False), 4 Llama layers x 8 heads (head_dim 84), FFN 2688.
    "state_sm": {"hidden_dim": 672, "n_encoder_layers": 4, "n_decoder_layers": 4, "basal_mlp": False,
                     "n_layers": 4, "n_heads": 8, "ffn_dim": 2688, "cell_set_len": 128, "residual": "hidden"},
    # Tiny: builds and steps on CPU in well under a second.
    "debug": {"hidden_dim": 32, "n_encoder_layers": 2, "n_decoder_layers": 2, "basal_mlp": True,
                  "n_layers": 2, "n_heads": 4, "ffn_dim": 64, "cell_set_len": 8, "residual": "hidden",
                  "gene_decoder_hidden": (32,)},
}
ST_PRESETS = tuple(_PRESETS)


def preset_values(name: str) -> dict[str, Any]:
    """The model options a named preset sets (a copy)."""
    if name not in _PRESETS:
        raise ValueError(f"preset name={name!r} is unknown; choose one of {ST_PRESETS}")
    return dict(_PRESETS[name])


def st_preset(name: str, n_genes: int, pert_dim: int, **overrides: Any) -> STConfig:
    """A named recipe plus overrides, e.g. ``st_preset("debug", 50, 16, attn_dropout=0.1)``."""
    if name not in _PRESETS:
        raise ValueError(f"preset name={name!r} is unknown; choose one of {ST_PRESETS}")
    known = {f.name for f in dataclasses.fields(STConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown STConfig override(s) {unknown}; valid keys: {sorted(known)}")
    return STConfig(n_genes=n_genes, pert_dim=pert_dim, **{**_PRESETS[name], **overrides})


def _mlp(in_dim: int, out_dim: int, hidden_dim: int, n_layers: int, dropout: float) -> nn.Sequential:
    """``n_layers`` Linear layers in -> h -> ... -> h -> out, GELU + dropout between (none after)."""
    dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers += [nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the set; bidirectional, no mask, no positions, no bias."""

    def __init__(self, cfg: STConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.p = cfg.n_heads, cfg.head_dim, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.hidden_dim, 3 * cfg.hidden_dim, bias=False)
        self.out = nn.Linear(cfg.hidden_dim, cfg.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # is_causal=False and no mask: every cell attends to every cell, so the map is
        # permutation-equivariant. Dropout only while training (STATE left it on in eval).
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0,
                                           is_causal=False)
        return self.out(y.transpose(1, 2).reshape(b, s, h))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, ffn_dim, bias=False)
        self.up = nn.Linear(dim, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: STConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.hidden_dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class STModel(nn.Module):
    """State Transition model. ``forward`` returns ``{"pred": [B,S,G_out]}`` (+ ``"pred_genes"``)."""

    def __init__(self, cfg: STConfig):
        super().__init__()
        if not cfg.complete:
            raise ValueError(f"STModel needs a complete STConfig: n_genes={cfg.n_genes}, "
                             f"pert_dim={cfg.pert_dim}, n_batches={cfg.n_batches!r} (the ST "
                             "trainer fills them in from the data; set them when building a "
                             "model directly)")
        self.cfg = cfg
        h = cfg.hidden_dim
        self.pert_encoder = _mlp(cfg.pert_dim, h, h, cfg.n_encoder_layers, cfg.dropout)
        self.basal_encoder = (_mlp(cfg.input_dim, h, h, cfg.n_encoder_layers, cfg.dropout)
                              if cfg.basal_mlp else nn.Linear(cfg.input_dim, h))
        self.batch_embedding = nn.Embedding(cfg.n_batches, h) if cfg.n_batches > 0 else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(h, eps=cfg.norm_eps)
        self.project_out = _mlp(h, cfg.output_dim, h, cfg.n_decoder_layers, cfg.dropout)
        if cfg.zero_init_output:
            last = self.project_out[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.gene_decoder: nn.Sequential | None = None
        if cfg.gene_decoder:
            layers: list[nn.Module] = []
            d = cfg.output_dim
            for w in cfg.gene_decoder_hidden:
                layers += [nn.Linear(d, w), nn.LayerNorm(w), nn.GELU(), nn.Dropout(cfg.dropout)]
                d = w
            layers.append(nn.Linear(d, cfg.n_genes))
            self.gene_decoder = nn.Sequential(*layers)

    def forward(self, ctrl: torch.Tensor, pert_features: torch.Tensor,
                batch_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if ctrl.dim() != 3 or ctrl.shape[-1] != cfg.input_dim:
            raise ValueError(f"ctrl has shape {tuple(ctrl.shape)}; expected [B, S, {cfg.input_dim}] "
                             f"(input_dim from n_genes/embed_dim)")
        b, s, _ = ctrl.shape
        if pert_features.dim() == 2:
            pert_features = pert_features.unsqueeze(1).expand(b, s, -1)
        if pert_features.shape != (b, s, cfg.pert_dim):
            raise ValueError(f"pert_features has shape {tuple(pert_features.shape)}; expected "
                             f"[{b}, {cfg.pert_dim}] or [{b}, {s}, {cfg.pert_dim}] (STConfig.pert_dim)")

        basal = self.basal_encoder(ctrl)                       # [B, S, h]
        x = basal + self.pert_encoder(pert_features)
        if self.batch_embedding is not None:
            if batch_index is None:
                raise ValueError("batch_index is required when STConfig.n_batches > 0")
            if batch_index.dim() == 1:
                batch_index = batch_index.unsqueeze(1).expand(b, s)
            if batch_index.shape != (b, s):
                raise ValueError(f"batch_index has shape {tuple(batch_index.shape)}; expected [{b}] or [{b}, {s}]")
            x = x + self.batch_embedding(batch_index.long())
        elif batch_index is not None:
            raise ValueError("batch_index was given but STConfig.n_batches=0 (no batch embedding); "
                             "set n_batches or pass batch_index=None")

        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)

        if cfg.residual == "hidden":
            pred = self.project_out(x + basal)
        elif cfg.residual == "input":
            pred = self.project_out(x) + ctrl                 # a delta on the control input
        else:
            pred = self.project_out(x)
        if cfg.feature_shift:
            pred = pred + pert_features[..., : cfg.output_dim]
        if cfg.apply_relu:
            pred = F.relu(pred)
        out = {"pred": pred}
        if self.gene_decoder is not None:
            genes = self.gene_decoder(pred)
            # pred_genes is always gene-space: ReLU unless explicitly switched off (relu=False).
            out["pred_genes"] = genes if cfg.relu is False else F.relu(genes)
        return out


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_breakdown(model: STModel) -> dict[str, int]:
    """Trainable parameters per top-level component (for reports and the 37.8M check)."""
    return {name: count_parameters(child) for name, child in model.named_children()}
