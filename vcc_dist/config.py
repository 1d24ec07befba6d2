"""Shared checks of the typed configs (models, trainers, sweeps): unknown keys and integer
fields fail at construction with the field's name."""

from __future__ import annotations

import dataclasses


def from_dict_checked(cls, d: dict, what: str):
    """``cls(**d)`` with a clear error naming unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid: {sorted(known)}")
    return cls(**d)


def check_ints(obj, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Each named field of ``obj`` must be an int (not a bool) >= 1 or >= 0."""
    name = type(obj).__name__
    for lo, keys in ((1, positive), (0, non_negative)):
        for k in keys:
            v = getattr(obj, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}.{k}={v!r} must be "
                                 + ("a positive integer" if lo else "an integer >= 0"))
