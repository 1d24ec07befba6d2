"""Who wrote an output: the Ray node, host and process. Recorded in the manifests of
conversion stores, cell embeddings, predictions and evaluations, so that a multi-host run
shows which hosts did its work (the multi-host tests check it)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any


def process_provenance() -> dict[str, Any]:
    """The Ray node id and IP when this process runs in Ray (None otherwise), host and pid.
    Ray is never imported just for this: serial runs stay Ray-free."""
    ray = sys.modules.get("ray")
    node_id = node_ip = None
    if ray is not None and ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
        node_ip = ray.util.get_node_ip_address()
    return {"node_id": node_id, "node_ip": node_ip, "host": socket.gethostname(),
            "pid": os.getpid()}


def node_ids(records: list[dict[str, Any] | None]) -> list[str]:
    """The distinct Ray node ids of provenance records, sorted."""
    return sorted({r["node_id"] for r in records if r and r.get("node_id")})


__all__ = ["node_ids", "process_provenance"]
