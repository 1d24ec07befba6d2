"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
from pathlib import Path


def du(path: Path) -> tuple[int, int]:
    """Bytes and number of files under a path (or of one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, 1
    size = files = 0
    for root, _, fs in os.walk(path):
        for f in fs:
            size += os.path.getsize(os.path.join(root, f))
            files += 1
    return size, files
