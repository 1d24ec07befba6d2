"""Import-direction guard: the package's layering, read from the source with ``ast``.

Every ``import`` statement counts, at any depth (module level, inside functions, inside
``if TYPE_CHECKING:``), because a function-level import runs as surely as a top-level one,
only later. The rules:

1. ``vcc_dist.models`` and ``vcc_dist.metrics`` (the pure model and metric code) import nothing
   from ``vcc_dist.train``, ``vcc_dist.infer`` or ``vcc_dist.tune``, and neither ``ray``,
   ``deepspeed`` nor ``wandb``.
2. ``vcc_dist.infer`` imports no ``vcc_dist.train`` module except those in
   ``INFER_MAY_IMPORT_FROM_TRAIN`` (the checkpoint contract lives in ``vcc_dist.checkpoint``,
   which infer may import freely).
3. No import cycles among ``vcc_dist`` modules.
4. The package never imports ``jobs/``, ``benchmarks/``, ``tests/`` or ``data_conversion``
   (which is built on top of it: vcc_dist.pipeline gets the conversion functions passed in).
5. No private names (``from x import _name``, or ``module._name`` on an imported project
   module) cross module boundaries within ``vcc_dist``, ``jobs`` and ``data_conversion``.

Each test lists every violation with its file and line, so a failure is a to-do list.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vcc_dist"
#: trees whose modules are checked for private-name imports (rule 5)
PROJECT_TREES = ("vcc_dist", "jobs", "data_conversion")

#: rule 1: the pure layers and what they must not import (module prefixes)
PURE_LAYERS = ("vcc_dist.models", "vcc_dist.metrics")
PURE_FORBIDDEN = ("vcc_dist.train", "vcc_dist.infer", "vcc_dist.tune", "ray", "deepspeed",
                  "wandb")
#: ... except this one Ray helper, and only imported inside a function (the optional parallel
#: path: vcc_dist.metrics.vcc splits its DE over Ray tasks through ray_map when asked to), so
#: importing a pure module never loads Ray (test_pure_modules_load_without_ray_or_deepspeed)
PURE_MAY_CALL_LAZILY = ("vcc_dist.ray_utils",)

#: rule 2: the vcc_dist.train modules inference may import, and why. Keep this table small:
#: what inference needs from a checkpoint belongs in vcc_dist.checkpoint.
INFER_MAY_IMPORT_FROM_TRAIN: dict[str, str] = {
    "vcc_dist.train.engine": "fp32_state_dict: DeepSpeed shards -> one fp32 state dict "
                             "(the only module that touches DeepSpeed)",
}

#: rule 4: top-level names the package must never import
OUTSIDE_THE_PACKAGE = ("jobs", "benchmarks", "tests", "data_conversion")


@dataclass(frozen=True)
class Imp:
    """One imported name: ``module`` (absolute, resolved) and, for ``from m import n``, ``name``."""

    src: str        # importing module (dotted)
    path: Path
    line: int
    module: str     # the module the statement names (absolute)
    name: str = ""  # the imported name for `from module import name`


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _files(tree: str) -> list[Path]:
    return sorted(p for p in (ROOT / tree).rglob("*.py") if "__pycache__" not in p.parts)


def _resolve(src: str, is_pkg: bool, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    base = src.split(".") if is_pkg else src.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def _imports(path: Path) -> list[Imp]:
    src = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[Imp] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Imp(src, path, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(src, path.name == "__init__.py", node.module, node.level)
            out += [Imp(src, path, node.lineno, mod, a.name) for a in node.names]
    return out


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _files(PACKAGE)}


def _targets(imp: Imp, modules: dict[str, Path]) -> list[str]:
    """The project modules an import loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if imp.name and f"{imp.module}.{imp.name}" in modules:
        return [f"{imp.module}.{imp.name}"]
    return [imp.module] if imp.module in modules else []


def _under(module: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _where(imp: Imp) -> str:
    what = f"from {imp.module} import ..." if imp.name else f"import {imp.module}"
    return f"{imp.path.relative_to(ROOT)}:{imp.line}: {what}"


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


ALL_PACKAGE_IMPORTS = [i for p in _files(PACKAGE) for i in _imports(p)]


# ---------------------------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------------------------


def test_the_scan_sees_the_package():
    """The guard is only as good as its parse: it must see the modules and imports we know."""
    modules = _package_modules()
    assert {"vcc_dist.models.st", "vcc_dist.metrics.vcc", "vcc_dist.train.st",
            "vcc_dist.infer.st_predict"} <= set(modules)
    srcs = {i.src for i in ALL_PACKAGE_IMPORTS}
    assert "vcc_dist.train.st" in srcs and "vcc_dist.models.st" in srcs
    # function-level imports are seen too
    assert any(i.src == "vcc_dist.ray_utils" and i.module == "ray" for i in ALL_PACKAGE_IMPORTS)


def _module_level_lines(path: Path) -> set[int]:
    tree = ast.parse(path.read_text())
    return {n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}


def test_models_and_metrics_import_no_training_inference_tuning_or_ray():
    bad = [_where(i) for i in ALL_PACKAGE_IMPORTS
           if _under(i.src, PURE_LAYERS) and (
               _under(i.module, PURE_FORBIDDEN)
               or (_under(i.module, PURE_MAY_CALL_LAZILY)
                   and i.line in _module_level_lines(i.path)))]
    assert not bad, ("models/ and metrics/ are pure torch/numpy: move these imports (or the code "
                     "that needs them) to train/, infer/ or tune/:\n  " + "\n  ".join(_unique(bad)))


def test_infer_imports_from_train_only_the_allowed_modules():
    modules = _package_modules()
    bad = []
    for i in ALL_PACKAGE_IMPORTS:
        if not _under(i.src, ("vcc_dist.infer",)):
            continue
        for t in _targets(i, modules) or [i.module]:
            if _under(t, ("vcc_dist.train",)) and t not in INFER_MAY_IMPORT_FROM_TRAIN:
                bad.append(_where(i))
    assert not bad, ("vcc_dist.infer must not depend on training modules: take what a checkpoint "
                     "needs from vcc_dist.checkpoint (or add a module to "
                     "INFER_MAY_IMPORT_FROM_TRAIN with the reason):\n  "
                     + "\n  ".join(_unique(bad)))


def test_the_package_never_imports_jobs_benchmarks_or_conversion():
    job_names = {p.stem for p in _files("jobs")} | {p.stem for p in _files("benchmarks")}
    bad = [_where(i) for i in ALL_PACKAGE_IMPORTS
           if i.module.split(".")[0] in OUTSIDE_THE_PACKAGE or i.module in job_names]
    assert not bad, ("vcc_dist is the bottom layer; it must not import:\n  "
                     + "\n  ".join(_unique(bad)))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    modules = _package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    where: dict[tuple[str, str], str] = {}
    for i in ALL_PACKAGE_IMPORTS:
        for t in _targets(i, modules):
            if t != i.src:
                graph[i.src].add(t)
                where.setdefault((i.src, t), _where(i))
    cycles = _cycles(graph)
    lines = []
    for comp in cycles:
        lines.append(" <-> ".join(comp))
        lines += [f"    {where[(a, b)]}" for a in comp for b in comp if (a, b) in where]
    assert not cycles, ("import cycles (each listed with the imports that close it; move the "
                        "shared code down a layer):\n  " + "\n  ".join(lines))


def test_no_private_names_cross_modules():
    bad = []
    for tree in PROJECT_TREES:
        for path in _files(tree):
            src = _module_name(path)
            imps = _imports(path)
            for i in imps:
                if i.name.startswith("_") and not i.name.startswith("__") and i.module != src:
                    bad.append(f"{path.relative_to(ROOT)}:{i.line}: from {i.module} import "
                               f"{i.name}")
            # `import vcc_dist.x.y as m; m._name` (or `vcc_dist.x.y._name`)
            aliases = {}
            tree_ = ast.parse(path.read_text())
            for node in ast.walk(tree_):
                if isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] in PROJECT_TREES:
                            aliases[a.asname or a.name] = a.name
                elif isinstance(node, ast.ImportFrom) and node.module:
                    mod = _resolve(src, path.name == "__init__.py", node.module, node.level)
                    for a in node.names:
                        full = f"{mod}.{a.name}"
                        if full.split(".")[0] in PROJECT_TREES and (
                                ROOT / Path(*full.split("."))).with_suffix(".py").is_file():
                            aliases[a.asname or a.name] = full
            for node in ast.walk(tree_):
                if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                        and not node.attr.startswith("__")):
                    base = ast.unparse(node.value)
                    if base in aliases and aliases[base] != src:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                                   f"{base}.{node.attr} ({aliases[base]})")
    assert not bad, ("private names used across modules: make them public (no underscore, "
                     "documented) or move the code that needs them:\n  "
                     + "\n  ".join(_unique(bad)))


@pytest.mark.parametrize("module", ["vcc_dist.models.st", "vcc_dist.models.se",
                                    "vcc_dist.models.losses", "vcc_dist.metrics.vcc"])
def test_pure_modules_load_without_ray_or_deepspeed(module):
    """Rule 1 at run time: importing a pure module loads neither ray nor deepspeed."""
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('ray', 'deepspeed', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"{module} loads {out.stdout.strip()}"
