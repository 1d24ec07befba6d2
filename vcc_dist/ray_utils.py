"""Starting or joining Ray the same way in every job, and the one Ray helper the pure layers use
(``ray_map``: vcc_dist.metrics splits its DE work over Ray tasks through it, so that metrics
itself never imports Ray)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import AuthenticationError

#: what a client needs when the cluster has token authentication on (Ray 2.60's default)
AUTH_FIX = ("set RAY_AUTH_MODE=token and give this client the cluster's token: "
            "RAY_AUTH_TOKEN=<token> or the file ~/.ray/auth_token (cluster/README.md, "
            "'Token authentication')")


class RayConnectError(RuntimeError):
    """Joining the Ray cluster failed; the message names the address and the fix."""


def _looks_like_auth(e: BaseException) -> bool:
    if isinstance(e, AuthenticationError):
        return True
    text = str(e).lower()
    return any(k in text for k in ("unauthenticated", "authentication", "auth token",
                                   "auth_token"))


def ensure_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster of a Ray job (``ray job submit`` sets RAY_ADDRESS) or start an embedded
    local Ray. ``address="local"`` always starts a fresh local instance: a stale
    ``ray_current_cluster`` file cannot make it attach to a dead cluster
    (docs/stack_notes.md, "Ray clusters and jobs").

    Raises :class:`RayConnectError` naming ``RAY_AUTH_MODE=token`` and the token when the
    cluster refuses the connection for lack of authentication."""
    if ray.is_initialized():
        return
    kwargs.setdefault("log_to_driver", True)
    kwargs.setdefault("configure_logging", False)
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            # joining a cluster: its head decides the dashboard (a cluster's head runs it)
            kwargs.pop("include_dashboard", None)
            ray.init(**kwargs)
        else:
            kwargs.setdefault("include_dashboard", False)
            if kwargs["include_dashboard"]:
                _pin_dashboard(kwargs)
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    except Exception as e:  # noqa: BLE001 - only authentication failures are translated
        if not _looks_like_auth(e):
            raise
        where = f"the Ray cluster at {address}" if address else "the local Ray"
        raise RayConnectError(f"{where} refused the connection (token authentication): "
                              f"{AUTH_FIX}. Ray said: {e}") from None


def ray_map(fn: Callable[..., Any], shared: Any, chunks: Sequence[Any]) -> list[Any]:
    """``[fn(shared, chunk) for chunk in chunks]`` as Ray tasks, with ``shared`` put in the
    object store once (joins or starts Ray through :func:`ensure_ray`). Results come back in
    the order of ``chunks``."""
    ensure_ray()
    task = ray.remote(fn)
    ref = ray.put(shared)
    return ray.get([task.remote(ref, c) for c in chunks])


def _with_node(fn: Callable[[Any, Any], Any], shared: Any, chunk: Any) -> tuple[Any, str]:
    """One Ray task: ``fn(shared, chunk)`` and the node it ran on."""
    return fn(shared, chunk), ray.get_runtime_context().get_node_id()


class SpreadMap:
    """:func:`ray_map` with the tasks placed ``SPREAD`` (chunks land on different hosts of a
    cluster), recording the Ray nodes they ran on in :attr:`node_ids` (the provenance that
    jobs write into their outputs)."""

    def __init__(self) -> None:
        self.node_ids: set[str] = set()

    def __call__(self, fn: Callable[[Any, Any], Any], shared: Any,
                 chunks: Sequence[Any]) -> list[Any]:
        ensure_ray()
        task = ray.remote(_with_node).options(scheduling_strategy="SPREAD")
        ref = ray.put(shared)
        out = ray.get([task.remote(fn, ref, c) for c in chunks])
        self.node_ids.update(node for _, node in out)
        return [r for r, _ in out]


def _pin_dashboard(kwargs: dict) -> None:
    """Give an embedded Ray's dashboard a known port and tell every process of the job where
    it is. Ray's state API (which Ray Train's placement-group cleaner uses to see that a
    stopped trial's controller is gone) otherwise finds the cluster through Ray's
    ``ray_current_cluster`` file, which a local ``ray.init`` does not write: a stale one, left
    by any earlier ``ray start``, makes every stopped Tune trial leak its workers' CPUs."""
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
