"""The held-out selection rule, one for the corpus path and the AnnData path.

Which cells a validation, a prediction or a score works on: the cells of the perturbations
whose role (:meth:`vcc_dist.data.splits.SplitSpec.pert_role`) includes one of ``roles`` in one
context (default: the one context that has such perturbations), per perturbation in sorted
name order, at most ``max_cells`` of them (a seeded sample without replacement, kept in their
original order), and at most ``max_controls`` control cells of that context (drawn after the
perturbations from the same generator). :func:`select_heldout` is the rule;
``vcc_dist.train.st_data.heldout_groups`` applies it to a corpus plan and :func:`heldout_rows`
to AnnData obs labels, so both paths pick the same cells for the same seed when the cells of
each perturbation come in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vcc_dist.data.splits import SplitSpec, has_role

RoleLike = str | Sequence[str]


def role_matches(role: str, roles: RoleLike) -> bool:
    """Whether a group/cell role string ("train", "val,test", ...) includes any of ``roles``."""
    return any(has_role(role, r) for r in ((roles,) if isinstance(roles, str) else roles))


def choose_context(contexts_with_role: Iterable[str], roles: RoleLike,
                   context: str | None) -> str:
    """``context``, checked to have ``roles`` perturbations, or the one context that has some.
    The messages say "has no" when nothing matches (ST's preparation skips validation then)."""
    what = roles if isinstance(roles, str) else "/".join(roles)
    ctxs = sorted(set(contexts_with_role))
    if not ctxs:
        raise ValueError(f"the split has no {what!r} perturbations")
    if context is None:
        if len(ctxs) != 1:
            raise ValueError(f"the {what!r} perturbations span contexts {ctxs}; name one "
                             "(context=...)")
        return ctxs[0]
    if context not in ctxs:
        raise ValueError(f"context {context!r} has no {what!r} perturbations; contexts with "
                         f"some: {ctxs}")
    return context


@dataclass
class HeldOutDraw:
    """Positions chosen by :func:`select_heldout`: per perturbation (sorted names) into its
    candidate cells, and into the context's control cells."""

    perts: list[str]
    cells: list[np.ndarray]
    controls: np.ndarray


def select_heldout(n_cells: Mapping[str, int], n_controls: int, context: str, *,
                   max_cells: int | None = None, max_controls: int | None = None,
                   seed: int = 0) -> HeldOutDraw:
    """The rule: perturbations in sorted order; each one's first ``n`` positions, or
    ``max_cells`` of them drawn without replacement (sorted) when it has more; then the
    controls' positions, capped the same way at ``max_controls``; one generator seeded with
    ``seed`` for all draws."""
    if n_controls <= 0:
        raise ValueError(f"context {context!r} has no control cells; a prediction starts from "
                         "the target context's controls")
    for name, cap in (("max_cells", max_cells), ("max_controls", max_controls)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name}={cap} must be >= 1 (or None for no cap)")
    rng = np.random.default_rng(seed)

    def draw(n: int, cap: int | None) -> np.ndarray:
        if cap is not None and n > cap:
            return np.sort(rng.choice(n, cap, replace=False))
        return np.arange(n)

    perts = sorted(n_cells)
    cells = [draw(int(n_cells[p]), max_cells) for p in perts]
    return HeldOutDraw(perts, cells, draw(int(n_controls), max_controls))


@dataclass
class HeldOutRows:
    """AnnData rows (positions) of the held-out cells of one context and of its controls."""

    context: str
    perts: list[str]
    rows: list[np.ndarray]   # per perturbation, increasing
    control_rows: np.ndarray

    def counts(self) -> dict[str, int]:
        return {p: int(r.size) for p, r in zip(self.perts, self.rows)}

    def all_rows(self) -> np.ndarray:
        """Every selected row (perturbed and control) in file order."""
        return np.sort(np.concatenate([*self.rows, self.control_rows]))


def heldout_rows(contexts: Sequence[str] | np.ndarray, perturbations: Sequence[str] | np.ndarray,
                 spec: SplitSpec, roles: RoleLike, *, control_label: str,
                 context: str | None = None, max_cells: int | None = None,
                 max_controls: int | None = None, seed: int = 0) -> HeldOutRows:
    """:func:`select_heldout` on an AnnData's obs labels (one entry per cell): the cells whose
    role (:meth:`SplitSpec.cell_roles`) includes one of ``roles``, in ``context``, each
    perturbation's candidates in file order."""
    ctx = np.asarray(contexts).astype(str)
    pert = np.asarray(perturbations).astype(str)
    cell_roles = spec.cell_roles(ctx, pert, control_label)
    is_ctrl = pert == control_label
    held = np.array([role_matches(r, roles) for r in cell_roles], bool) & ~is_ctrl
    context = choose_context(ctx[held], roles, context)
    cand = {}
    sel = np.flatnonzero(held & (ctx == context))
    names, inv = np.unique(pert[sel], return_inverse=True)
    for i, p in enumerate(names):
        cand[str(p)] = sel[inv == i]
    ctrl_rows = np.flatnonzero(is_ctrl & (ctx == context))
    draw = select_heldout({p: r.size for p, r in cand.items()}, ctrl_rows.size, context,
                          max_cells=max_cells, max_controls=max_controls, seed=seed)
    return HeldOutRows(context, draw.perts, [cand[p][k] for p, k in zip(draw.perts, draw.cells)],
                       ctrl_rows[draw.controls])
