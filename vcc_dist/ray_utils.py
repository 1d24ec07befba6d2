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
        # joining a cluster: its head decides the dashboard (a cluster's head runs it)
        kwargs.pop("include_dashboard", None)
        ray.init(**kwargs)
    else:
        kwargs.setdefault("include_dashboard", False)
        if kwargs["include_dashboard"]:
            _pin_dashboard(kwargs)
        ray.init(address="local", num_cpus=num_cpus, **kwargs)


def _pin_dashboard(kwargs: dict) -> None:
    """Give an embedded Ray's dashboard a known port and tell every process of the job where
    it is. Ray's state API (which Ray Train's placement-group cleaner uses to see that a
    stopped trial's controller is gone) otherwise finds the cluster through Ray's
    ``ray_current_cluster`` file, which a local ``ray.init`` does not write: a stale one, left
    by any earlier ``ray start``, makes every stopped Tune trial leak its workers' CPUs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    kwargs.setdefault("dashboard_host", "127.0.0.1")
    kwargs.setdefault("dashboard_port", port)
    env = dict((kwargs.get("runtime_env") or {}).get("env_vars") or {})
    env.setdefault("RAY_API_SERVER_ADDRESS", url)
    kwargs["runtime_env"] = {**(kwargs.get("runtime_env") or {}), "env_vars": env}
    os.environ["RAY_API_SERVER_ADDRESS"] = url
