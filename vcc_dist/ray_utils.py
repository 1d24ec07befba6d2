"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster of a Ray job (``ray job submit`` sets RAY_ADDRESS) or start an embedded
    local Ray. ``address="local"`` always starts a fresh local instance: a stale
    ``ray_current_cluster`` file cannot make it attach to a dead cluster (STACK_NOTES)."""
    import ray

    if ray.is_initialized():
        return
    kwargs.setdefault("log_to_driver", True)
    kwargs.setdefault("configure_logging", False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
