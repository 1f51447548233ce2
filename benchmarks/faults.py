"""Faults the scenarios rehearse: callbacks installed through the recipe's `ray.callbacks` (raytrain_align/callbacks.py),
and a storage whose uploads fail, installed as an fsspec plugin (the `fsspec.specs` entry point)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from transformers import TrainerCallback


class SlowSteps(TrainerCallback):
    """A pause after every optimizer step: a model slow enough for a returning node to rejoin mid-run."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


class CrashInSave(TrainerCallback):
    """The last rank dies in a save: that checkpoint is written on some ranks only and never committed, so the
    restart must resume from the one before. Either at save `step` of the first attempt, or (`arm_file`, a path
    every node sees) at the first save after that file appears; then it writes `arm_file` + ".fired" and never
    fires again."""

    def __init__(self, step: int | None = None, arm_file: str | None = None):
        import ray.train

        ctx = ray.train.get_context()
        self.step, self.arm_file = step, arm_file
        first = ray.train.get_checkpoint() is None if arm_file is None else True
        self.armed = first and ctx.get_world_rank() == ctx.get_world_size() - 1

    def on_save(self, args, state, control, **kwargs):
        if not self.armed:
            return
        if self.arm_file is None and state.global_step == self.step:
            os.kill(os.getpid(), 9)
        if self.arm_file and os.path.exists(self.arm_file) and not os.path.exists(self.arm_file + ".fired"):
            with open(self.arm_file + ".fired", "w") as f:  # the step of the save it cut short
                f.write(str(state.global_step))
            os.kill(os.getpid(), 9)


class FlakyFileSystem(LocalFileSystem):
    """Local files behind `flaky:///abs/path`, where writes of files whose path contains `fail_paths` fail the way
    an object store's uploads sometimes do (a reset connection), once per token file in the folder `tokens`: every
    process that writes takes one (the first `os.remove` of it wins), so N tokens fail exactly N writes in all.
    fsspec gives `tokens` from FSSPEC_FLAKY_TOKENS, and Ray sends it to the workers inside the pickled filesystem."""

    protocol = "flaky"

    def __init__(self, tokens: str | None = None, fail_paths: str = "checkpoint-", **kwargs):
        super().__init__(**kwargs)
        self.tokens, self.fail_paths = tokens, fail_paths

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode and self.tokens and self.fail_paths in str(path) and self._take_token():
            raise ConnectionResetError(errno.ECONNRESET, f"injected: connection reset while uploading {path}")
        return super()._open(path, mode=mode, **kwargs)

    def _take_token(self) -> bool:
        for name in sorted(os.listdir(self.tokens)):
            try:
                os.remove(os.path.join(self.tokens, name))
                return True
            except FileNotFoundError:  # another process took it
                continue
        return False


def install_flaky_plugin(folder: Path, failures: int) -> tuple[str, dict[str, str]]:
    """FlakyFileSystem registered the way fsspec plugins are (an `fsspec.specs` entry point in a dist-info folder
    under `folder`), failing the first `failures` writes of checkpoint files. Returns the token folder and the
    environment that installs the plugin in a process started with it (a driver, a raylet and its workers)."""
    plugin = folder / "plugins" / "flaky_storage-0.dist-info"
    plugin.mkdir(parents=True, exist_ok=True)
    (plugin / "METADATA").write_text("Metadata-Version: 2.1\nName: flaky-storage\nVersion: 0\n")
    (plugin / "entry_points.txt").write_text("[fsspec.specs]\nflaky = benchmarks.faults:FlakyFileSystem\n")
    tokens = folder / "failures"
    tokens.mkdir(exist_ok=True)
    for i in range(failures):
        (tokens / str(i)).touch()
    return str(tokens), {"PYTHONPATH": os.pathsep.join(p for p in (str(plugin.parent), os.environ.get("PYTHONPATH")) if p),
                         "FSSPEC_FLAKY_TOKENS": str(tokens)}
