"""Peak memory of every process in a process tree, sampled while a run goes: how the scale test and the
scale benchmark show that no process's memory grows with the data."""

from __future__ import annotations

import threading
from dataclasses import dataclass

SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "ray_client_server", "DashboardAgent",
          "RuntimeEnvAgent")


@dataclass
class Peak:
    pid: int
    role: str  # driver | ray worker (with its last task title) | ray system
    title: str
    rss: int  # bytes, resident (file-backed and shared pages included)
    private: int  # bytes, resident minus shared pages (object store and memory-mapped files excluded)


def _role(cmdline: list[str], pid: int, root: int) -> tuple[str, str]:
    if pid == root:
        return "driver", "driver"
    title = " ".join(cmdline)[:120]
    if any(s in title for s in SYSTEM):
        return "ray system", title
    if cmdline and cmdline[0].startswith("ray::"):
        return "ray worker", title
    return "other", title


class TreeSampler:
    """Samples RSS of `root` and of every process started after it (the local Ray cluster it starts: Ray's
    daemons are not its children) every `every` seconds in a thread; `.peaks()` per pid."""

    def __init__(self, root: int, every: float = 0.2, since: float | None = None):
        self.root, self.every, self.since = root, every, since  # since: also processes started after this time
        self._peaks: dict[int, Peak] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                since = self.since or psutil.Process(self.root).create_time()
            except psutil.Error:
                return
            procs = [p for p in psutil.process_iter(["create_time"]) if (p.info["create_time"] or 0) >= since - 0.01]
            for p in procs:
                try:
                    mem, cmd = p.memory_info(), p.cmdline()
                except psutil.Error:
                    continue
                role, title = _role(cmd, p.pid, self.root)
                peak = self._peaks.get(p.pid)
                if peak is None:
                    peak = self._peaks[p.pid] = Peak(p.pid, role, title, 0, 0)
                if role == "ray worker":  # a worker's title changes from its command line to what it runs
                    peak.role = role
                    if "IDLE" not in title:
                        peak.title = title
                peak.rss = max(peak.rss, mem.rss)
                peak.private = max(peak.private, mem.rss - mem.shared)
            self._stop.wait(self.every)

    def peaks(self) -> list[Peak]:
        return list(self._peaks.values())


def summary(peaks: list[Peak]) -> dict[str, dict[str, int]]:
    """Largest peak (rss, private) per kind of process: driver, tokenize actor, train worker, other ray worker."""
    out: dict[str, dict[str, int]] = {}
    for p in peaks:
        if p.role in ("ray system", "other"):
            continue
        kind = p.role
        if p.role == "ray worker":
            kind = ("tokenize actor" if "TokenizeActor" in p.title else
                    "train worker" if "RayTrainWorker" in p.title else "ray task worker")
        cur = out.setdefault(kind, {"rss": 0, "private": 0, "processes": 0})
        cur["rss"], cur["private"] = max(cur["rss"], p.rss), max(cur["private"], p.private)
        cur["processes"] += 1
    return out
