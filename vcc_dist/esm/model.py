"""ESM2 helpers around fair-esm: loading release checkpoints, tiny test checkpoints, the
long-sequence rule, token-budget batching and residue mean-pooling.

No Ray here (the distributed job is ``vcc_dist.esm.embed``); torch and fair-esm are imported
where they are used, so importing this module is cheap.

Weights are never downloaded: ``load_esm`` reads a fair-esm release file from disk through
fair-esm's own ``esm.pretrained.load_model_and_alphabet_local``, which also needs the
``<name>-contact-regression.pt`` file beside it. ``save_tiny_esm2`` writes a randomly
initialised ESM2 in that same release layout, so tests exercise the real loading code.

Release layout of an ESM2 checkpoint, as fair-esm 2.0.0's loader reads it
(``esm/pretrained.py``: ``load_model_and_alphabet_core`` and ``_load_model_and_alphabet_core_v2``):

* ``<name>.pt``: ``{"model": state_dict, "cfg": {"model": argparse.Namespace(...)}}``. The
  state dict keys carry fairseq's prefixes: ``encoder.sentence_encoder.`` for
  ``embed_tokens``, ``layers.N.*`` (rotary ``inv_freq`` buffers included) and
  ``emb_layer_norm_after``; ``encoder.`` for ``lm_head.*`` (its ``weight`` tied to
  ``embed_tokens.weight``). The loader strips both prefixes. From the config it reads
  ``encoder_layers``, ``encoder_embed_dim``, ``encoder_attention_heads`` and ``token_dropout``.
  The ``Namespace`` is why torch >= 2.6 (``weights_only=True`` by default) refuses the file
  unless the load runs under ``torch.serialization.safe_globals([argparse.Namespace])``.
* ``<name>-contact-regression.pt``: ``{"model": {"contact_head.regression.weight": ...,
  "contact_head.regression.bias": ...}}`` (no prefix), merged into the state dict before a
  strict ``load_state_dict``.
* The loader is chosen from the file *name*: stems starting with ``esm2`` go to the ESM2
  loader, anything else to the ESM-1 loader (which reads ``args.arch``). The regression file is
  required for every name except those containing ``esm1v`` or ``esm_if``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Longest protein (in residues) given to ESM2: its trained positional range is 1,024 tokens,
#: BOS and EOS included.
MAX_RESIDUES = 1022

#: ``prepare_sequence`` rules for sequences longer than ``MAX_RESIDUES``.
LONG_SEQUENCE_RULES = ("truncate", "error")

#: Residue letters of the ESM alphabet (``esm.constants.proteinseq_toks`` without the gap
#: symbols ``.`` and ``-``): the 20 standard amino acids, X, B, U, Z and O.
RESIDUES = frozenset("LAGVSERTIDPKQNFYMHWCXBUZO")

#: Tokens added to every sequence by the ESM2 alphabet (BOS/CLS and EOS).
SPECIAL_TOKENS_PER_SEQ = 2

_MIB = 1 << 20
_RELEASE_EXAMPLE = "esm2_t33_650M_UR50D.pt"


class ESMLoadError(ValueError):
    """An ESM checkpoint cannot be loaded; the message names the file and the fix."""


# --------------------------------------------------------------------------- loading


def regression_path(path: str | os.PathLike) -> Path:
    """Where fair-esm looks for the contact-regression weights of checkpoint ``path``."""
    p = Path(path)
    return Path(str(p.with_suffix("")) + "-contact-regression.pt")


def _torch_load_release(path: Path) -> Any:
    """``torch.load`` as fair-esm does it (CPU, weights-only default) with the Namespace
    allowed; memory-mapped when the file is a zip archive, so diagnosing a large file is cheap."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", mmap=zipfile.is_zipfile(path))


def _short(err: BaseException) -> str:
    """One readable line from an exception (torch's unpickling errors run to paragraphs)."""
    text = str(err)
    m = re.search(r"WeightsUnpickler error: [^\n]*", text)
    line = m.group(0) if m else (text.strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {line[:300]}"


def _diagnose(path: Path, reg: Path, err: BaseException) -> str:
    """Why fair-esm's loader failed on ``path``, in terms of what the user should change.
    Only runs after a failure, so reading the file a second time costs nothing on success."""
    name = path.stem
    expected = (f"expected a fair-esm release file such as {_RELEASE_EXAMPLE}: a dict with a "
                "'model' state dict and 'cfg' (ESM2) or 'args' (ESM-1)")
    try:
        data = _torch_load_release(path)
    except Exception as e:  # noqa: BLE001 - any read failure means "not a checkpoint"
        return (f"{path} is not an ESM checkpoint: torch.load cannot read it ({_short(e)}); "
                f"{expected}")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        return f"{path} is not an ESM checkpoint (found {found}); {expected}"
    is_v2 = isinstance(data.get("cfg"), dict) and "model" in data["cfg"]
    if is_v2 and not name.startswith("esm2"):
        return (f"{path} holds an ESM2 checkpoint but its name {name!r} does not start with "
                "'esm2': fair-esm picks the loader from the file name. Rename it and its "
                f"regression file to esm2_<...>.pt and esm2_<...>-contact-regression.pt "
                f"(e.g. {_RELEASE_EXAMPLE})")
    if name.startswith("esm2") and not is_v2:
        return (f"{path} is named esm2_* but has no 'cfg' entry, so it is not an ESM2 release "
                f"file (keys: {sorted(map(str, data))}); {expected}")
    if not is_v2 and getattr(data.get("args"), "arch", None) is None:
        return f"{path} is not an ESM checkpoint (no 'cfg' and no 'args.arch'); {expected}"
    if reg.is_file():
        try:
            rdata = _torch_load_release(reg)
        except Exception as e:  # noqa: BLE001 - any read failure: the file is unusable
            return f"contact-regression file {reg} cannot be read ({_short(e)})"
        if not isinstance(rdata, dict) or not isinstance(rdata.get("model"), dict):
            return (f"{reg} is not a contact-regression file: expected {{'model': "
                    "{'contact_head.regression.weight': ..., 'contact_head.regression.bias': ...}}")
    return (f"fair-esm could not load {path} ({_short(err)}); the weights may not match the "
            "architecture in the checkpoint's config, or the regression file may belong to "
            "another model")


def load_esm(path: str | os.PathLike) -> tuple[Any, Any]:
    """Load a fair-esm release checkpoint from disk; returns ``(model, alphabet)``, the model
    in eval mode on the CPU.

    Goes through fair-esm's own ``esm.pretrained.load_model_and_alphabet_local`` under
    ``torch.serialization.safe_globals([argparse.Namespace])`` (torch >= 2.6 refuses the
    pickled Namespace in the release files otherwise). Raises ``ESMLoadError`` naming the file
    and the fix for a missing checkpoint, a missing contact-regression file, a file that is not
    an ESM checkpoint, and an ESM2 checkpoint whose name fair-esm cannot route (it must start
    with ``esm2``).
    """
    import esm.pretrained  # fair-esm: heavy, loaded only to load a checkpoint

    p = Path(path).expanduser()
    if p.is_dir():
        raise ESMLoadError(f"{p} is a folder: pass the checkpoint file itself, e.g. "
                           f"{p / _RELEASE_EXAMPLE}")
    if not p.is_file():
        raise ESMLoadError(
            f"ESM checkpoint {p} does not exist. Weights cannot be downloaded here: place the "
            f"release file (e.g. {_RELEASE_EXAMPLE}) and its contact-regression file (e.g. "
            f"{Path(_RELEASE_EXAMPLE).stem}-contact-regression.pt) side by side in "
            f"{p.parent} and pass the path of the first")
    reg = regression_path(p)
    # fair-esm 2.0.0's own rule (every model except ESM-1v and ESM-IF has regression weights)
    if esm.pretrained._has_regression_weights(p.stem) and not reg.is_file():
        raise ESMLoadError(
            f"contact-regression file {reg} is missing: fair-esm loads it together with {p.name}. "
            f"Place it beside the checkpoint (it comes with the release, e.g. "
            f"{Path(_RELEASE_EXAMPLE).stem}-contact-regression.pt next to {_RELEASE_EXAMPLE})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(p))
    except MemoryError:
        raise
    except Exception as err:  # re-raised with a diagnosis; fair-esm's error stays chained
        raise ESMLoadError(_diagnose(p, reg, err)) from err
    return model.eval(), alphabet


def _arch(model: Any) -> tuple[int, int, int]:
    """(num_layers, embed_dim, attention_heads) of an ESM2 or ESM-1 model."""
    if hasattr(model, "embed_dim"):  # ESM2
        return int(model.num_layers), int(model.embed_dim), int(model.attention_heads)
    args = model.args  # ESM-1 / ESM-1b (ProteinBertModel)
    return int(args.layers), int(args.embed_dim), int(args.attention_heads)


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the file's size and its first and last MiB (the whole file when it is at
    most 2 MiB): identifies a multi-GB checkpoint without reading it all."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        if size <= 2 * _MIB:
            h.update(f.read())
        else:
            h.update(f.read(_MIB))
            f.seek(size - _MIB)
            h.update(f.read(_MIB))
    return h.hexdigest()


def model_info(model: Any, alphabet: Any, path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description of a loaded checkpoint, for manifests and run keys."""
    p = Path(path)
    n_layers, dim, heads = _arch(model)
    return {
        "name": p.stem,
        "path": str(p),
        "num_layers": n_layers,
        "embed_dim": dim,
        "attention_heads": heads,
        # parameters() yields tied weights (lm_head.weight = embed_tokens.weight) once
        "n_params": int(sum(t.numel() for t in model.parameters())),
        "alphabet_size": len(alphabet),
        "file_bytes": p.stat().st_size,
        "sha256": file_fingerprint(p),
    }


# --------------------------------------------------------------------------- tiny checkpoints


def save_tiny_esm2(directory: str | os.PathLike, num_layers: int = 2, embed_dim: int = 32,
                   attention_heads: int = 4, seed: int = 0, name: str | None = None) -> Path:
    """Write a randomly initialised ESM2 in fair-esm's release layout (see the module
    docstring) plus its ``-contact-regression.pt`` file; returns the checkpoint path.

    ``load_esm`` loads it through fair-esm's real loader with identical weights. The weights
    depend only on ``seed`` (the global torch RNG is left untouched). The default name is
    ``esm2_t{num_layers}_{embed_dim}_tiny.pt``; a given ``name`` must start with ``esm2``.
    """
    from esm.model.esm2 import ESM2  # fair-esm: heavy, loaded only here

    if num_layers < 1 or embed_dim < 1 or attention_heads < 1:
        raise ValueError(f"num_layers={num_layers}, embed_dim={embed_dim}, "
                         f"attention_heads={attention_heads}: all must be >= 1")
    if embed_dim % attention_heads or (embed_dim // attention_heads) % 2:
        raise ValueError(f"embed_dim={embed_dim} must be attention_heads={attention_heads} "
                         "times an even head size (rotary embeddings rotate pairs)")
    stem = name or f"esm2_t{num_layers}_{embed_dim}_tiny"
    stem = stem.removesuffix(".pt")
    if not stem.startswith("esm2"):
        raise ValueError(f"name={name!r} must start with 'esm2': fair-esm picks its loader "
                         "from the file name")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.pt"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ESM2(num_layers=num_layers, embed_dim=embed_dim,
                     attention_heads=attention_heads, alphabet="ESM-1b", token_dropout=True)
    state = model.state_dict()
    release, regression = {}, {}
    for key, value in state.items():
        if key.startswith("contact_head."):
            regression[key] = value
        elif key.startswith("lm_head."):
            release["encoder." + key] = value
        else:
            release["encoder.sentence_encoder." + key] = value
    cfg = argparse.Namespace(
        arch="esm2", encoder_layers=num_layers, encoder_embed_dim=embed_dim,
        encoder_ffn_embed_dim=4 * embed_dim, encoder_attention_heads=attention_heads,
        token_dropout=True)

    def _save(obj: Any, target: Path) -> None:  # atomic: a file exists only when complete
        tmp = target.with_name(target.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, target)

    _save({"model": regression}, regression_path(path))
    _save({"model": release, "cfg": {"model": cfg}}, path)
    return path


# --------------------------------------------------------------------------- sequences


def prepare_sequence(seq: str, rule: str = "truncate") -> tuple[str, bool]:
    """Normalise a protein sequence for ESM2; returns ``(sequence, truncated)``.

    Whitespace is removed, letters upper-cased and one trailing stop ``*`` dropped; any other
    character outside the ESM residue alphabet (``RESIDUES``) is a ``ValueError``.

    Long sequences (more than ``MAX_RESIDUES`` = 1,022 residues): ``rule="truncate"`` keeps the
    first 1,022 residues, ``rule="error"`` raises ``ValueError``. Truncation is what ESM's own
    ``extract.py`` (``truncation_seq_length=1022``) and STATE's gene-embedding scripts do, and
    it is the right default: ESM2 was trained on crops of at most 1,024 tokens including BOS
    and EOS, so positions past that were never seen. Tiling into windows and averaging would
    instead pool fragments the model never saw as whole proteins (each window lacks the real
    termini), mix in representations of an arbitrary window layout, and cost a forward pass
    per window; it also differs from how the reference embeddings were made. The N-terminal
    1,022 residues keep the signal peptide and usually the first domains.
    """
    if rule not in LONG_SEQUENCE_RULES:
        raise ValueError(f"rule={rule!r}: choose one of {LONG_SEQUENCE_RULES}")
    s = "".join(str(seq).split()).upper()
    s = s.removesuffix("*")
    if not s:
        raise ValueError("empty protein sequence")
    bad = set(s) - RESIDUES
    if bad:
        first = min(s.index(c) for c in bad)
        context = s[max(0, first - 5):first + 5]
        raise ValueError(f"protein sequence has characters outside the ESM alphabet "
                         f"{sorted(bad)} (first at position {first}: {context!r}); "
                         f"allowed: {''.join(sorted(RESIDUES))}")
    if len(s) <= MAX_RESIDUES:
        return s, False
    if rule == "error":
        raise ValueError(f"protein sequence of {len(s)} residues exceeds ESM2's {MAX_RESIDUES}; "
                         "use rule='truncate' to keep the first 1022 residues")
    return s[:MAX_RESIDUES], True


def count_tokens(seqs: Sequence[str]) -> int:
    """Tokens ESM2 processes for ``seqs`` without padding: residues + BOS + EOS each."""
    return int(sum(len(s) + SPECIAL_TOKENS_PER_SEQ for s in seqs))


def token_batches(lengths: Sequence[int] | np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Indices into ``lengths`` (residue counts), longest first (stable), packed greedily into
    batches with ``n * (max_len + 2) <= max_tokens`` (the padded token count of the batch).

    A sequence longer than the budget gets a batch of its own. Every index appears exactly
    once. Sorting by length keeps padding small (~2.5x faster than naive batching on CPU).
    """
    if int(max_tokens) != max_tokens or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} must be a positive integer")
    arr = np.asarray(lengths)
    if arr.size == 0:
        return []
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise ValueError("lengths must be a 1-D sequence of non-negative integers")
    order = np.argsort(-arr.astype(np.int64), kind="stable")
    batches, i = [], 0
    while i < order.size:
        # the first index of a batch is its longest sequence (descending order)
        width = int(arr[order[i]]) + SPECIAL_TOKENS_PER_SEQ
        n = max(1, int(max_tokens) // width)
        batches.append(order[i:i + n].copy())
        i += n
    return batches


def resolve_layer(layer: int, num_layers: int) -> int:
    """Representation index for ``layer``: 0 = token embeddings, 1..num_layers = after that
    block (the last one with the final layer norm); negatives count from the end (-1 = last)."""
    resolved = num_layers + 1 + layer if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise ValueError(f"layer={layer}: the model has representation layers 0..{num_layers} "
                         "(negative values count from the end, -1 = last)")
    return resolved


def embed_sequences(model: Any, alphabet: Any, seqs: Sequence[str], layer: int = -1,
                    max_tokens: int = 4096, device: Any = "cpu", dtype: Any = None,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Mean-pooled ESM representations, float32 ``[len(seqs), embed_dim]`` in input order.

    Each sequence's ``layer`` representation (``resolve_layer``; -1 = the last layer) is
    averaged over its residue positions only: BOS/CLS, EOS and padding are excluded using the
    true sequence lengths, so the result does not depend on what a sequence is batched with.
    Sequences run in length-sorted token-budget batches (``token_batches``) under
    ``torch.inference_mode()``. Sequences must be prepared first (``prepare_sequence``): one
    longer than ``MAX_RESIDUES`` or empty is a ``ValueError``.

    The model is put in eval mode and moved to ``device`` (and ``dtype`` when given) in place,
    as ``nn.Module.to`` does. Pooling is accumulated in float32 whatever the model dtype.
    ``progress(n_done)`` is called after each batch with the number of sequences done so far.
    """
    seqs = list(seqs)
    n_layers, dim, _ = _arch(model)
    rep_layer = resolve_layer(layer, n_layers)
    out = np.empty((len(seqs), dim), np.float32)
    if not seqs:
        return out
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    for name, bad in (("empty", lengths == 0), (f"longer than {MAX_RESIDUES} residues",
                                                  lengths > MAX_RESIDUES)):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{int(bad.sum())} sequence(s) {name} (first: index {i}, "
                             f"{lengths[i]} residues); run prepare_sequence on them first")
    if not (alphabet.prepend_bos and alphabet.append_eos):
        raise ValueError("embed_sequences expects an ESM2/ESM-1b alphabet (BOS and EOS added)")

    model.eval()
    model.to(device=device, dtype=dtype)
    convert = alphabet.get_batch_converter()
    done = 0
    with torch.inference_mode():
        for idx in token_batches(lengths, max_tokens):
            _, _, tokens = convert([("", seqs[i]) for i in idx])
            tokens = tokens.to(device)
            reps = model(tokens, repr_layers=[rep_layer])["representations"][rep_layer]
            # residues sit at positions 1..L (0 = BOS, L+1 = EOS, then padding)
            lens = torch.as_tensor(lengths[idx], device=reps.device)
            pos = torch.arange(reps.shape[1], device=reps.device)
            keep = (pos[None, :] >= 1) & (pos[None, :] <= lens[:, None])
            summed = reps.float().masked_fill(~keep[..., None], 0.0).sum(dim=1)
            pooled = summed / lens[:, None].float()
            out[idx] = pooled.cpu().numpy()  # host-device sync, once per batch
            done += len(idx)
            if progress is not None:
                progress(done)
    return out
