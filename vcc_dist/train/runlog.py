"""Training-metrics logging for rank 0: CSV files always, wandb when configured, a PNG at the end.

The ST trainer (and later the SE trainer) builds one :class:`RunLogger` per run, on every rank,
with ``enabled=(rank == 0)``: on the other ranks every method is a cheap no-op that writes
nothing and never imports wandb. (Ray Train V2's ``setup_wandb(rank_zero_only=True)`` does not
restrict logging, so the rank check is explicit; see docs/stack_notes.md.)

What lands in ``run_dir``::

    metrics_train.csv   one wide CSV per ``kind``: step, time (unix seconds), then metric names
    metrics_val.csv
    summary.json        final values from :meth:`RunLogger.summary`
    curves.png          written by :meth:`RunLogger.finish` (see :func:`plot_curves`)
    wandb_id.txt        the wandb run id, reused when the job restarts (only when wandb is on)
    wandb/              wandb's own files (``offline-run-*`` or ``run-*`` folders)

The CSVs are the source of truth; wandb is a convenience that may be missing or failing. A row
is appended and flushed per :meth:`RunLogger.log` call, so a killed job keeps everything logged
before the kill. A metric name first seen mid-run extends the header: the file is rewritten
(tmp file + ``os.replace``) and earlier rows read back as NaN in that column.

Restarts: a job restarted from a checkpoint at optimizer step ``s`` passes ``resume_step=s``.
Rows with ``step > s`` are dropped from every ``metrics_*.csv`` (those steps will be run and
logged again); rows up to ``s`` are kept. Without ``resume_step`` existing CSVs are kept as they
are and appended to, so a fresh run should get a fresh ``run_dir``. wandb continues the same
run (id from ``wandb_id.txt``, ``resume="allow"``); steps below wandb's current step are not
sent to wandb again (wandb drops out-of-order steps), so after a rollback wandb keeps the values
first logged for those steps while the CSVs hold the re-logged ones.

wandb offline mode (0.31): every (re)start writes a new ``run_dir/wandb/offline-run-<time>-<id>``
folder with the same id (``...-<id>-1`` when two starts fall in the same second); ``wandb sync``
given all of them (``wandb sync run_dir/wandb/offline-run-*-<id>*``) uploads them in start-time
order into one run. Offline runs do not know the step already logged, so after a rollback wandb
receives the re-logged steps again; online, wandb drops them (see above). With mode "online" and
no network, ``wandb.init`` gives up after its 90 s ``init_timeout`` and the logger warns.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import netrc
import operator
import os
import re
import secrets
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from vcc_dist.fileio import atomic_write_text

if TYPE_CHECKING:  # pandas is imported lazily: the logger itself does not need it
    import pandas

WANDB_MODES = ("auto", "online", "offline", "disabled")
RESERVED_COLUMNS = ("step", "time")
CSV_PATTERN = "metrics_{kind}.csv"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
WANDB_ID_FILE = "wandb_id.txt"

# Validation panels of the curves figure: (candidate column names, title), in display order.
VAL_PANELS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("overall_score", "score"), "Overall score"),
    (("overlap_at_N",), "DES (overlap_at_N)"),
    (("discrimination_score_l1",), "PDS (discrimination_score_l1)"),
    (("mae",), "MAE"),
    (("val_loss",), "Validation loss"),
)

_DEFAULT_WANDB_HOSTS = ("api.forge.coreweave.com", "api.wandb.ai")
_KIND_RE = re.compile(r"^[A-Za-z0-9_]+$")
_WANDB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# ---------------------------------------------------------------- config

@dataclass(frozen=True)
class WandbConfig:
    """Where and whether the run goes to Weights & Biases.

    mode: "auto" resolves to the ``WANDB_MODE`` environment variable when that is set, else to
    "online" when credentials are found (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a
    ``.netrc`` entry for the wandb host written by ``wandb login``), else "offline" (sync later
    with ``wandb sync``). "online", "offline" and "disabled" are used as given.
    """

    project: str = "vcc-dist"
    mode: str = "auto"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.project, str) or not self.project.strip():
            raise ValueError(f"WandbConfig.project must be a non-empty string, got {self.project!r}")
        if self.mode not in WANDB_MODES:
            raise ValueError(f"WandbConfig.mode must be one of {WANDB_MODES}, got {self.mode!r}")
        for key in ("entity", "group"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"WandbConfig.{key} must be None or a non-empty string, got {v!r}")
        if isinstance(self.tags, str):
            raise TypeError(f"WandbConfig.tags must be a list of strings, not one string; "
                             f"use tags=({self.tags!r},)")
        tags = tuple(self.tags)  # JSON lists -> tuple
        for t in tags:
            if not isinstance(t, str) or not 1 <= len(t) <= 64:
                raise ValueError(f"WandbConfig.tags must be strings of 1 to 64 characters "
                                 f"(wandb's limit), got {t!r}")
        object.__setattr__(self, "tags", tags)

    @property
    def resolved_mode(self) -> str:
        """"online", "offline" or "disabled": "auto" resolved as described in the class doc."""
        return resolve_wandb_mode(self.mode)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WandbConfig:
        if not isinstance(d, Mapping):
            raise TypeError(f"WandbConfig.from_dict needs a mapping, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown WandbConfig key(s) {unknown}; valid keys are {valid}")
        return cls(**d)


def _has_wandb_credentials() -> bool:
    """True when wandb would find credentials without prompting. Reads the environment and
    ``.netrc`` only: no network, no wandb import."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    token_file = os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "").strip()
    if token_file and Path(token_file).is_file():
        return True
    base_url = os.environ.get("WANDB_BASE_URL", "").strip()
    # wandb 0.31 defaults to CoreWeave Forge (api.forge.coreweave.com) and also accepts the
    # api.wandb.ai entry that older `wandb login` versions wrote
    hosts = [urlsplit(base_url).netloc or base_url] if base_url else list(_DEFAULT_WANDB_HOSTS)
    netrc_path = Path(os.environ.get("NETRC", "") or Path.home() / ".netrc")
    try:
        rc = netrc.netrc(str(netrc_path))
    except (OSError, netrc.NetrcParseError):
        return False
    return any(rc.authenticators(h) is not None for h in hosts)


def resolve_wandb_mode(mode: str) -> str:
    """Resolve a :class:`WandbConfig` mode to "online", "offline" or "disabled"."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    env_mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if _has_wandb_credentials() else "offline"


# ---------------------------------------------------------------- small helpers

def _to_float(name: str, value: Any) -> float:
    """A metric value as a Python float: floats, ints, numpy scalars and 0-d numpy arrays or
    torch tensors. (A CUDA tensor is copied to the host here: that is a device sync.)"""
    if isinstance(value, bool):
        return float(value)
    ndim = getattr(value, "ndim", 0)
    if ndim != 0:
        shape = tuple(getattr(value, "shape", ()))
        raise TypeError(f"metric {name!r} must be a scalar, got an array of shape {shape}; "
                        f"reduce it first (e.g. .mean().item())")
    if hasattr(value, "item"):  # numpy scalar / 0-d array, torch 0-d tensor
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a number, got {value!r} "
                        f"({type(value).__name__})") from None


def _check_step(step: Any) -> int:
    if isinstance(step, bool):
        raise TypeError(f"step must be an int, got {step!r}")
    try:
        step = operator.index(step)  # int, numpy integer
    except TypeError:
        raise TypeError(f"step must be an int, got {step!r} ({type(step).__name__})") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"kind must be letters, digits or '_' (it names metrics_<kind>.csv), "
                         f"got {kind!r}")
    return kind


def _read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], []
    return rows[0], [r for r in rows[1:] if r]


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _truncate_csv(path: Path, resume_step: int) -> int:
    """Drop rows with step > resume_step (atomic rewrite); returns the number dropped."""
    header, rows = _read_csv_rows(path)
    if not header:
        return 0
    if header[0] != "step":
        raise ValueError(f"{path} is not a runlog metrics CSV (first column {header[0]!r}, "
                         f"expected 'step'); move it out of the run directory")
    kept = [r for r in rows if float(r[0]) <= resume_step]
    if len(kept) != len(rows):
        atomic_write_text(path, _csv_text(header, kept))
    return len(rows) - len(kept)


def _check_baselines(baselines: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, float]]:
    if baselines is None:
        return {}
    if not isinstance(baselines, Mapping):
        raise TypeError(f"baselines must be a mapping name -> {{metric: value}}, "
                        f"got {type(baselines).__name__}")
    out: dict[str, dict[str, float]] = {}
    for name, values in baselines.items():
        if not isinstance(values, Mapping):
            raise TypeError(f"baselines[{name!r}] must be a mapping metric -> value, "
                            f"got {values!r}")
        out[str(name)] = {str(k): _to_float(f"baselines[{name!r}][{k!r}]", v)
                          for k, v in values.items()}
    return out


# ---------------------------------------------------------------- the logger

class RunLogger:
    """Per-run metrics logger; construct it on every rank with ``enabled=(rank == 0)``.

    Usable as a context manager (``finish()`` on exit). See the module doc for the files written,
    restarts (``resume_step``) and wandb behaviour. wandb never stops training: a failure to
    initialise or to log warns once and the run continues with CSV logs only.
    """

    def __init__(self, run_dir: str | os.PathLike, *, run_name: str, config: Mapping[str, Any],
                 wandb: WandbConfig | None = None, enabled: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self._finished = False
        self._png: Path | None = None
        self._headers: dict[str, list[str]] = {}
        self._wandb_run: Any = None
        self._wandb_warned = False
        self.wandb_mode = "disabled"
        if not self.enabled:
            return  # non-zero ranks: no validation cost, no files, no wandb import
        if not isinstance(run_name, str) or not run_name.strip():
            raise ValueError(f"RunLogger run_name must be a non-empty string, got {run_name!r}")
        if not isinstance(config, Mapping):
            raise TypeError(f"RunLogger config must be a mapping (e.g. cfg.to_dict()), "
                            f"got {type(config).__name__}")
        if wandb is not None and not isinstance(wandb, WandbConfig):
            raise TypeError(f"RunLogger wandb must be a WandbConfig or None, got {type(wandb).__name__}; "
                            f"build one with WandbConfig.from_dict(...)")
        if resume_step is not None:
            resume_step = _check_step(resume_step)
        self.resume_step = resume_step
        self.run_dir.mkdir(parents=True, exist_ok=True)

        for path in sorted(self.run_dir.glob(CSV_PATTERN.format(kind="*"))):
            if resume_step is not None:
                _truncate_csv(path, resume_step)

        cfg = wandb if wandb is not None else WandbConfig()
        self.wandb_mode = cfg.resolved_mode
        if self.wandb_mode != "disabled":
            self._init_wandb(cfg, dict(config))

    # ------------------------------------------------------------ wandb

    def _wandb_id(self) -> str:
        path = self.run_dir / WANDB_ID_FILE
        if path.is_file():
            run_id = path.read_text().strip()
            if not _WANDB_ID_RE.match(run_id):
                raise ValueError(f"{path} holds {run_id!r}, not a wandb run id; delete the file "
                                 f"to start a new wandb run")
            return run_id
        run_id = secrets.token_hex(4)  # 8 chars of [0-9a-f], valid for wandb
        atomic_write_text(path, run_id + "\n")
        return run_id

    def _warn_wandb(self, what: str, exc: BaseException) -> None:
        if not self._wandb_warned:
            self._wandb_warned = True
            warnings.warn(f"wandb {what} failed ({type(exc).__name__}: {exc}); continuing with "
                          f"CSV logs only in {self.run_dir}", RuntimeWarning, stacklevel=3)
        self._wandb_run = None

    def _init_wandb(self, cfg: WandbConfig, config: dict[str, Any]) -> None:
        run_id = self._wandb_id()
        try:
            import wandb

            self._wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                name=self.run_name, config=config, id=run_id, resume="allow",
                dir=str(self.run_dir), mode=self.wandb_mode, reinit="create_new",
                # quiet; no git probing; no stdout/stderr capture (Ray already keeps the logs)
                settings=wandb.Settings(silent=True, disable_git=True, console="off"))
        except Exception as exc:  # noqa: BLE001 - wandb must never stop training
            self._warn_wandb("init", exc)
            return
        if self.wandb_mode == "offline":
            print(f"[runlog] wandb offline run {run_id} is in {self.run_dir / 'wandb'}; upload it "
                  f"with: wandb sync {self.run_dir / 'wandb'}/offline-run-*-{run_id}*",
                  file=sys.stderr, flush=True)

    # ------------------------------------------------------------ logging

    def _csv_path(self, kind: str) -> Path:
        return self.run_dir / CSV_PATTERN.format(kind=kind)

    def _header(self, kind: str) -> list[str]:
        if kind not in self._headers:
            path = self._csv_path(kind)
            header = _read_csv_rows(path)[0] if path.is_file() else []
            if header and header[:2] != list(RESERVED_COLUMNS):
                raise ValueError(f"{path} is not a runlog metrics CSV (header starts {header[:2]}, "
                                 f"expected {list(RESERVED_COLUMNS)}); move it out of the run "
                                 f"directory")
            self._headers[kind] = header
        return self._headers[kind]

    def log(self, step: int, metrics: Mapping[str, Any], *, kind: str = "train") -> None:
        """Append one row ``step, time, metrics...`` to ``metrics_<kind>.csv`` (flushed) and send
        ``<kind>/<name>`` values to wandb at ``step``. Values: floats, ints, numpy scalars, 0-d
        tensors (NaN and inf are kept)."""
        if not self.enabled:
            return
        if self._finished:
            raise RuntimeError("RunLogger.log called after finish(); create a new RunLogger")
        step = _check_step(step)
        kind = _check_kind(kind)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping name -> value, got {type(metrics).__name__}")
        values: dict[str, float] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric names must be non-empty strings, got {name!r}")
            if name in RESERVED_COLUMNS:
                raise ValueError(f"metric name {name!r} is reserved for the CSV's own columns "
                                 f"{RESERVED_COLUMNS}; rename it")
            values[name] = _to_float(name, value)
        if not values:
            return

        path = self._csv_path(kind)
        header = self._header(kind)
        new = [k for k in values if k not in header]
        if not header:
            header[:] = [*RESERVED_COLUMNS, *new]
            atomic_write_text(path, _csv_text(header, []))
        elif new:
            # a metric first seen now: rewrite the file with the wider header (atomic)
            _, rows = _read_csv_rows(path)
            header.extend(new)
            rows = [r + [""] * (len(header) - len(r)) for r in rows]
            atomic_write_text(path, _csv_text(header, rows))
        row = [str(step), repr(time.time())] + [
            repr(values[c]) if c in values else "" for c in header[len(RESERVED_COLUMNS):]]
        with open(path, "a", newline="") as f:  # closed (flushed) per call: a kill keeps the row
            csv.writer(f, lineterminator="\n").writerow(row)

        run = self._wandb_run
        if run is not None:
            try:
                # wandb drops (with a warning per call) steps below its current one, which
                # happens after a rollback: those steps stay in the CSV only
                if step >= (run.step or 0):
                    run.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)
            except Exception as exc:  # noqa: BLE001
                self._warn_wandb("log", exc)

    def summary(self, **values: Any) -> None:
        """Record final values: merged into ``summary.json`` (atomic) and wandb's run summary.
        Numbers are stored as floats; strings, bools and None as they are."""
        if not self.enabled:
            return
        clean: dict[str, Any] = {}
        for k, v in values.items():
            clean[k] = v if (v is None or isinstance(v, (str, bool))) else _to_float(k, v)
        path = self.run_dir / SUMMARY_FILE
        current = json.loads(path.read_text()) if path.is_file() else {}
        current.update(clean)
        atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True, allow_nan=True) + "\n")
        if self._wandb_run is not None:
            try:
                self._wandb_run.summary.update(clean)
            except Exception as exc:  # noqa: BLE001
                self._warn_wandb("summary", exc)

    def finish(self, *, baselines: Mapping[str, Mapping[str, float]] | None = None) -> Path | None:
        """Write ``curves.png`` (see :func:`plot_curves`), close the wandb run and return the PNG
        path (None when disabled). Calling it again returns the same path and does nothing."""
        if not self.enabled:
            return None
        if self._finished:
            return self._png
        try:
            self._png = plot_curves(self.run_dir, self.run_dir / CURVES_FILE, baselines=baselines)
        finally:
            self._finished = True
            run, self._wandb_run = self._wandb_run, None
            if run is not None:
                try:
                    if self._png is not None:
                        import wandb

                        run.log({"curves": wandb.Image(str(self._png))})
                except Exception as exc:  # noqa: BLE001
                    self._warn_wandb("image upload", exc)
                try:
                    run.finish()
                except Exception as exc:  # noqa: BLE001
                    self._warn_wandb("finish", exc)
        return self._png

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


# ---------------------------------------------------------------- reading and plotting

def read_metrics(run_dir: str | os.PathLike, kind: str = "train") -> pandas.DataFrame:
    """``metrics_<kind>.csv`` as a DataFrame (an empty one with ``step, time`` when missing).
    Metrics absent from a row are NaN."""
    import pandas as pd

    path = Path(run_dir) / CSV_PATTERN.format(kind=_check_kind(kind))
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "time": pd.Series(dtype="float64")})
    df = pd.read_csv(path)
    metric_cols = [c for c in df.columns if c not in RESERVED_COLUMNS]
    df[metric_cols] = df[metric_cols].astype("float64")
    return df


def _series(df: pandas.DataFrame, col: str) -> tuple[Any, Any]:
    sub = df[["step", col]].dropna()
    return sub["step"].to_numpy(), sub[col].to_numpy(dtype=float)


def plot_curves(csv_dir: str | os.PathLike, png_path: str | os.PathLike, *,
                baselines: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Plot the run's curves from the CSVs in ``csv_dir`` into ``png_path`` (atomic write).

    Panels, each only when its columns exist: training loss (``loss`` and ``loss/<part>``; log
    y-scale when all values are positive), learning rate (``lr``), then one per validation
    metric (``overall_score``/``score``, ``overlap_at_N``, ``discrimination_score_l1``, ``mae``,
    ``val_loss``; read from the val CSV, else the train CSV). ``baselines`` maps a baseline name
    to ``{metric: value}``; each value is drawn as a dashed horizontal line on its metric's panel.
    A run with nothing to plot gives a figure saying "no metrics logged".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    base = _check_baselines(baselines)
    csv_dir, png_path = Path(csv_dir), Path(png_path)
    train, val = read_metrics(csv_dir, "train"), read_metrics(csv_dir, "val")

    # (title, ylabel, [(label, steps, values)], baseline key or None, log-scale allowed)
    panels: list[tuple[str, str, list[tuple[str, Any, Any]], str | None, bool]] = []
    loss_cols = [c for c in train.columns if c == "loss" or c.startswith("loss/")]
    loss_lines = [(c, *_series(train, c)) for c in loss_cols]
    loss_lines = [ln for ln in loss_lines if len(ln[1])]
    if loss_lines:
        panels.append(("Training loss", "loss", loss_lines, None, True))
    if "lr" in train.columns and len(_series(train, "lr")[0]):
        panels.append(("Learning rate", "lr", [("lr", *_series(train, "lr"))], None, False))
    for candidates, title in VAL_PANELS:
        for df in (val, train):
            col = next((c for c in candidates if c in df.columns and len(_series(df, c)[0])), None)
            if col is not None:
                panels.append((title, col, [(col, *_series(df, col))], col, False))
                break

    n = len(panels)
    ncols = min(3, max(n, 1))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    if n == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
    for i, (title, ylabel, lines, base_key, log_ok) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for label, steps, values in lines:
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None,
                    markersize=3)
        if log_ok and all((v > 0).all() for _, _, v in lines):
            ax.set_yscale("log")
        if base_key is not None:
            keys = ("overall_score", "score") if base_key in ("overall_score", "score") else (base_key,)
            for j, (name, values) in enumerate(base.items()):  # one colour per baseline name
                key = next((k for k in keys if k in values), None)
                if key is not None:
                    ax.axhline(values[key], linestyle="--", linewidth=1, color=f"C{1 + j % 9}",
                               label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(ax.get_legend_handles_labels()[0]) > 1 or base_key is not None:
            ax.legend(fontsize=8)
    fig.suptitle(csv_dir.name)

    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, png_path)
    return png_path
