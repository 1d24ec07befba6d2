"""The typed config tree: one recursive checked constructor, dotted overrides checked against
the tree, recipes (named or files) and the checks shared by every config.

Every run config (ST training, SE pretraining, a Tune sweep) is a frozen dataclass whose
sections are frozen dataclasses too (``optim``: :class:`~vcc_dist.train.engine.OptimConfig`,
``engine``, ``data``, ``model``, ``wandb``). :func:`build` makes one from nested dicts (JSON,
YAML, ``--set`` overrides) and names the dotted key of anything wrong; :func:`to_dict` is its
inverse. A config class may declare *derived* keys (``DERIVED``: values computed from other
keys, such as ``data.set_size`` from ``model.cell_set_len``): they are left out of its dict
form and refused as input unless they equal what they derive to, so every value has one
source of truth.

    cfg = build(STTrainConfig, recipe_dict("debug", RECIPES, parse_overrides(["optim.lr=1e-3"]),
                                           {"corpus": "c", "run_dir": "r"}))
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from vcc_dist import storage


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key and the fix."""


# ---------------------------------------------------------------------------------------------
# shared field checks
# ---------------------------------------------------------------------------------------------


def check_ints(obj, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Each named field of ``obj`` must be an int (not a bool) >= 1 or >= 0."""
    name = type(obj).__name__
    for lo, keys in ((1, positive), (0, non_negative)):
        for k in keys:
            v = getattr(obj, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name}.{k}={v!r} must be "
                                  + ("a positive integer" if lo else "an integer >= 0"))


def from_dict_checked(cls, d: dict, what: str):
    """``cls(**d)`` with a clear error naming unknown keys (flat configs, no sections)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}; valid: {sorted(known)}")
    return cls(**d)


# ---------------------------------------------------------------------------------------------
# the tree
# ---------------------------------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_type(tp) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        cands = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(cands) == 1:
            return cands[0]
    return None


def sections(cls) -> dict[str, type]:
    """The fields of ``cls`` that are sections (dataclasses), by name."""
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        st = _section_type(hints[f.name])
        if st is not None:
            out[f.name] = st
    return out


def derived_keys(cls) -> dict[str, tuple[str, ...]]:
    """``{section: (key, ...)}`` of values a config computes itself (class attribute
    ``DERIVED``); "" is the config's own level."""
    return dict(getattr(cls, "DERIVED", {}))


def check_sections(obj) -> None:
    """Every section of a built config is an instance of its type (not a dict: build
    configs from dicts with :func:`build` or the config's ``from_dict``)."""
    for name, sec in sections(type(obj)).items():
        v = getattr(obj, name)
        if v is not None and not isinstance(v, sec):
            raise ConfigError(f"{type(obj).__name__}.{name} must be a {sec.__name__}, got "
                              f"{type(v).__name__}; build the config from a dict with "
                              f"{type(obj).__name__}.from_dict")


def check_keys(cls, d: dict, path: str = "") -> None:
    """Every key of the nested dict ``d`` must be an option of ``cls`` (recursively into its
    sections), and no derived key may be given. Values are not checked (they may be search
    domains of a Tune space)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path or cls.__name__} must be a section (a mapping of options), "
                          f"got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    secs = sections(cls)
    for k, v in d.items():
        key = f"{path}.{k}" if path else k
        if k not in names:
            raise ConfigError(f"unknown option {key!r}; valid options of "
                              f"{path or cls.__name__}: {sorted(names)}")
        if k in secs and isinstance(v, dict):
            check_keys(secs[k], v, key)


def check_dotted(cls, key: str) -> None:
    """A dotted key (``optim.lr``) must name an option of the tree of ``cls``."""
    nested: dict[str, Any] = {}
    set_dotted(nested, key, None)
    check_keys(cls, nested)


def build(cls, d: dict | Any, path: str = ""):
    """``cls`` from a nested dict: sections are built recursively, unknown keys are refused
    with the dotted key and the valid ones, and a section's own validation errors are
    prefixed with its dotted path. An instance of ``cls`` is returned as it is."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{path or cls.__name__} must be a section (a mapping of options), "
                          f"got {d!r}")
    check_keys(cls, {k: None for k in d}, path)
    kw = dict(d)
    for name, sec in sections(cls).items():
        if isinstance(kw.get(name), dict):
            kw[name] = build(sec, kw[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        where = path or cls.__name__
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_dict(obj) -> dict[str, Any]:
    """The nested-dict (JSON) form of a config, without its derived keys."""
    drop = derived_keys(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        if f.name in drop.get("", ()):
            continue
        v = _plain(getattr(obj, f.name))
        if f.name in drop and isinstance(v, dict):
            v = {k: x for k, x in v.items() if k not in drop[f.name]}
        out[f.name] = v
    return out


def take_derived(d: dict, section: str, key: str, value: Any) -> None:
    """Put a derived ``value`` at ``d[section][key]``, refusing a different value given."""
    sec = d.setdefault(section, {})
    if not isinstance(sec, dict):
        return
    if key in sec and sec[key] != value:
        raise ConfigError(f"{section}.{key}={sec[key]!r} cannot be set: it is derived "
                          f"({value!r} here); " + DERIVED_FIX.get(f"{section}.{key}",
                                                                    "remove it"))
    sec[key] = value


#: how to change a derived value
DERIVED_FIX = {
    "data.set_size": "set the set size with model.cell_set_len (training, validation and "
                     "prediction all use it)",
    "data.seed": "set the run's seed (seed=...)",
    "data.normalize": "SE sentences are built from raw counts; remove it",
    "data.genes": "SE sentences use every gene of the corpus; remove it",
    "model.n_genes": "it comes from the corpus (and the gene table); remove it",
    "model.pert_dim": "it comes from the perturbation features; remove it",
    "model.gene_dim": "it comes from the gene table; remove it",
}


# ---------------------------------------------------------------------------------------------
# overrides and recipes
# ---------------------------------------------------------------------------------------------


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    cur[parts[-1]] = value


def parse_overrides(pairs: list[str] | tuple[str, ...], cls=None) -> dict[str, Any]:
    """``key=value`` strings (dotted keys into sections, values parsed as JSON when they
    parse, else kept as strings) -> a nested dict, checked against the tree of ``cls`` when
    given (a typo fails here, naming the valid options)."""
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"override {p!r} is not key=value (e.g. optim.lr=3e-4)")
        k, v = p.split("=", 1)
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        set_dotted(out, k.strip(), val)
    if cls is not None:
        check_keys(cls, out)
    return out


def merge(base: dict, over: dict) -> dict:
    """Nested dict merge (``over`` wins; sections merge key by key)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file (JSON or YAML; a local path or an ``s3://`` URI) as a nested dict."""
    path = storage.location(path)
    text = storage.read_bytes(path).decode()
    yaml_file = str(path).endswith((".yaml", ".yml"))
    base = yaml.safe_load(text) if yaml_file else json.loads(text)
    if not isinstance(base, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping of options")
    return base


def recipe_dict(recipe: str | os.PathLike, named: dict[str, dict], overrides: dict | None,
                top: dict[str, Any], required: tuple[str, ...] = ("corpus", "run_dir")
                ) -> dict[str, Any]:
    """A named recipe or a JSON/YAML recipe file, merged with nested ``overrides`` and
    top-level values (None values are ignored); checks that ``required`` keys are set."""
    if str(recipe) in named:
        base = json.loads(json.dumps(named[str(recipe)]))
    elif storage.exists(recipe) if storage.is_remote(recipe) else Path(recipe).is_file():
        base = read_recipe_file(recipe)
    else:
        raise ConfigError(f"recipe {str(recipe)!r} is neither a named recipe {tuple(named)} "
                          "nor a file")
    d = merge(base, overrides or {})
    d = merge(d, {k: v for k, v in top.items() if v is not None})
    missing = [k for k in required if not d.get(k)]
    if missing:
        raise ConfigError(f"the config needs {missing} (e.g. --{missing[0].replace('_', '-')})")
    return d


__all__ = ["ConfigError", "build", "check_dotted", "check_ints", "check_keys", "check_sections", "derived_keys",
           "from_dict_checked", "merge", "parse_overrides", "read_recipe_file", "recipe_dict",
           "sections", "set_dotted", "take_derived", "to_dict"]
