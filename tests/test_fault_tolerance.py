"""A training worker killed mid-run (SIGKILL, as when its node's OOM killer or a hardware fault takes it): Ray
Train restarts the worker group (FailureConfig max_failures), the workers resume from the latest committed
ZeRO-3 checkpoint, the run finishes, the loss curve continues, and the exported model loads."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 80, 20


def test_killed_worker_restarts_from_last_checkpoint(ray_address, tmp_path):
    storage, out = tmp_path / "storage", tmp_path / "model"
    cmd = [sys.executable, "-m", "raytrain_align", "sft_mid", "--tiny", "--storage", str(storage), "--output-dir", str(out),
           "--max-failures", "1", "--set", f"max_steps={STEPS}", "--set", f"save_steps={SAVE_EVERY}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, victim, killed_at = [], None, None
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"pid=(\d+)\) world_rank=1", line):
            victim = int(m.group(1))
        step = re.search(r"step +(\d+)/", line)
        if killed_at is None and victim and step and int(step.group(1)) >= 2 * SAVE_EVERY - 4:
            killed_at = int(step.group(1))  # past step 20's checkpoint (committed) and before step 40's
            t_kill = time.time()
            os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=60)
    log = "".join(lines)
    assert proc.returncode == 0, log[-5000:]
    assert killed_at is not None, log[-3000:]

    assert log.count("process group formed") == 2  # the worker group was started again
    resumed = [int(s) for s in re.findall(r"step +(\d+)/", log.split("process group formed")[2])]
    assert resumed and SAVE_EVERY < resumed[0] <= killed_at  # continued from the step-20 checkpoint, not from 0
    print(f"killed at step {killed_at}; resumed from step {SAVE_EVERY}; recovered and finished "
          f"{time.time() - t_kill:.0f}s after the kill")

    run = json.loads((out / "raytrain_align_run.json").read_text())
    assert run["metrics"]["step"] == STEPS
    losses = {e["step"]: e["loss"] for e in run["log_history"] if "loss" in e}
    first = losses[min(losses)]
    assert all(loss < 0.9 * first for step, loss in losses.items() if step > SAVE_EVERY)  # no jump back to the start

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "smollm3"
