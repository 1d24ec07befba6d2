"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import threading
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


def tree_cpu(proc=None) -> float:
    """User+system CPU seconds of a process (default: this one), its reaped children and its
    live descendants (Ray workers, DataLoader workers)."""
    import psutil

    proc = proc or psutil.Process()
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            ct = child.cpu_times()
            total += ct.user + ct.system
        except psutil.Error:
            pass
    return total


class MemSampler(threading.Thread):
    """Peak RSS and PSS (shared pages split) summed over this process and its live
    descendants, sampled in a background thread; ``stop()`` takes a last sample."""

    def __init__(self, interval: float = 0.25, pss_every: int = 4):
        import psutil

        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop_evt = threading.Event()

    def sample(self, with_pss: bool) -> None:
        import psutil

        procs = [self.proc]
        try:
            procs += self.proc.children(recursive=True)
        except psutil.Error:
            pass
        rss = pss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
                if with_pss:
                    pss += p.memory_full_info().pss
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, rss)
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss)

    def run(self) -> None:
        i = 0
        while not self._stop_evt.is_set():
            self.sample(with_pss=(i % self.pss_every == 0))
            i += 1
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()
        self.sample(with_pss=True)
