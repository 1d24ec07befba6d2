"""The options the trainer jobs share (train_st, pretrain_se, tune_st), with their help texts,
and the one way a job joins Ray.

Every option gets a help text with its default and accepted values; values the library defines
(recipe names, wandb modes) are read from it, never restated here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vcc_dist.ray_utils import RayConnectError, ensure_ray
from vcc_dist.train.runlog import WANDB_MODES, WandbConfig


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout (examples) and wraps option help normally."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def job_parser(doc: str) -> argparse.ArgumentParser:
    """A job's parser: the first paragraph of its docstring as the description, the rest (the
    examples and outputs) as the epilog."""
    head, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest or None,
                                   formatter_class=HelpFormatter)


def one_of(names: Sequence[str]) -> str:
    return ", ".join(str(n) for n in names)


def add_recipe(ap: argparse.ArgumentParser, recipes: Sequence[str], default: str,
               what: str, example: str = "") -> None:
    """--recipe; ``recipes`` are the library's names (e.g. vcc_dist.train.st.RECIPES)."""
    ap.add_argument("--recipe", default=default, metavar="NAME|FILE",
                    help=f"{what} recipe: one of {one_of(recipes)}, or a JSON/YAML recipe file"
                         f"{example} (default: {default})")


def add_overrides(ap: argparse.ArgumentParser, example: str) -> None:
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                    help="override any config option, dotted into sections (repeatable), e.g. "
                         f"{example} (default: none)")


def add_run_dir(ap: argparse.ArgumentParser, what: str) -> None:
    ap.add_argument("--run-dir", metavar="DIR",
                    help=f"{what} (shared storage on a multi-node cluster); the same command "
                         "with the same --run-dir resumes (default: the recipe's; required "
                         "unless the recipe sets it)")


def add_workers(ap: argparse.ArgumentParser, cpus_note: str) -> None:
    ap.add_argument("--num-workers", type=int, metavar="N",
                    help="Ray Train workers, one model replica (and ZeRO shard) each "
                         "(default: the recipe's, 1)")
    ap.add_argument("--cpus-per-worker", type=float, metavar="C",
                    help=f"CPUs each worker reserves (default: the recipe's, 1; {cpus_note})")
    ap.add_argument("--use-gpu", action="store_true",
                    help="one GPU per worker; bf16 with the default precision 'auto' "
                         "(default: off, CPU)")


def add_schedule(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--epochs", type=int, metavar="N",
                    help="passes over the training data (default: the recipe's)")
    ap.add_argument("--max-steps", type=int, metavar="N",
                    help="stop after N optimizer steps; 0 = epochs x steps per epoch "
                         "(default: the recipe's, 0)")
    ap.add_argument("--checkpoint-every", type=int, metavar="N",
                    help="validate and checkpoint every N optimizer steps, as well as at each "
                         "epoch's end; 0 = at each epoch's end only (default: the recipe's, 0)")
    ap.add_argument("--max-failures", type=int, metavar="N",
                    help="worker-group restarts from the latest checkpoint after a worker "
                         "fails (default: the recipe's, 2)")


def add_seed(ap: argparse.ArgumentParser, what: str = "data order, initialisation") -> None:
    ap.add_argument("--seed", type=int, metavar="N",
                    help=f"seed of every random choice ({what}) (default: the recipe's, 0)")


def add_wandb(ap: argparse.ArgumentParser) -> None:
    d = WandbConfig()
    ap.add_argument("--wandb", choices=WANDB_MODES, metavar="MODE",
                    help=f"Weights & Biases mode: {one_of(WANDB_MODES)}; auto = WANDB_MODE if "
                         "set, else online when credentials are configured, else offline "
                         f"(default: the recipe's, {d.mode})")
    ap.add_argument("--wandb-project", metavar="NAME",
                    help=f"wandb project (default: the recipe's, {d.project})")


def add_ray(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--num-cpus", type=int, metavar="N",
                    help="CPUs of the embedded local Ray; ignored when joining a cluster "
                         "(RAY_ADDRESS, set by ray job submit) (default: all)")


def add_progress(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bars (default: progress bars on)")


def add_print_config(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--print-config", action="store_true",
                    help="print the complete config as JSON and exit (default: off)")


def wandb_overrides(a: argparse.Namespace) -> dict:
    """The ``wandb`` section that --wandb / --wandb-project ask for ({} when neither)."""
    out = {}
    if a.wandb:
        out["mode"] = a.wandb
    if a.wandb_project:
        out["project"] = a.wandb_project
    return out


def connect_ray(prog: str, **kwargs) -> bool:
    """Join the job's Ray cluster or start an embedded one (vcc_dist.ray_utils.ensure_ray).
    On a refused connection, print the error with its fix and return False (no traceback)."""
    try:
        ensure_ray(**kwargs)
    except RayConnectError as e:
        print(f"error: [{prog}] {e}", file=sys.stderr)
        return False
    return True
