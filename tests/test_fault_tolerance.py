"""A training worker killed mid-run (SIGKILL, as when its node's OOM killer or a hardware fault takes it): Ray
Train restarts the worker group (FailureConfig max_failures), the workers resume from the latest committed
ZeRO-3 checkpoint (uploaded in the background: `ray.checkpoint_upload: async`), the run finishes, the loss curve
continues, and the exported model loads."""

import json
import re
import time

import pytest

from .conftest import run_killing_rank1

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 80, 20


def test_killed_worker_restarts_from_last_checkpoint(ray_address, tmp_path):
    storage, out = tmp_path / "storage", tmp_path / "model"
    args = ["sft_mid", "--tiny", "--storage", str(storage), "--output-dir", str(out), "--max-failures", "1",
            "--set", f"max_steps={STEPS}", "--set", f"save_steps={SAVE_EVERY}",
            # checkpoints uploaded in the background: the one the restart finds was uploaded while training went on
            "--set", "ray.checkpoint_upload=async"]
    # past step 20's checkpoint (committed) and before step 40's
    returncode, log, killed_at, t_kill = run_killing_rank1(args, ray_address, 2 * SAVE_EVERY - 4)
    assert returncode == 0, log[-5000:]
    assert killed_at is not None, log[-3000:]

    starts = re.split(r"process group formed at \d\d:\d\d:\d\d", log)  # rank 0's line (not a traceback's source)
    assert len(starts) == 3, [line for line in log.splitlines() if "process group formed" in line]  # restarted once
    resumed = [int(s) for s in re.findall(r"step +(\d+)/", starts[2])]
    assert resumed and SAVE_EVERY < resumed[0] <= killed_at  # continued from the step-20 checkpoint, not from 0
    print(f"killed at step {killed_at}; resumed from step {SAVE_EVERY}; recovered and finished "
          f"{time.time() - t_kill:.0f}s after the kill")

    assert "uploaded in the background" in log
    run = json.loads((out / "raytrain_align_run.json").read_text())
    assert run["metrics"]["step"] == STEPS
    assert run["timing"]["checkpoint_commit_seconds"] == []  # no save waited for its commit
    # the per-sample log over both attempts: every row of each epoch trained exactly once, none twice after the resume
    from benchmarks.fault_tolerance import trained_exactly_once

    trained, once = trained_exactly_once(run, STEPS)
    assert once and len(trained) == STEPS
    losses = {e["step"]: e["loss"] for e in run["log_history"] if "loss" in e}
    first = losses[min(losses)]
    assert all(loss < 0.9 * first for step, loss in losses.items() if step > SAVE_EVERY)  # no jump back to the start

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "smollm3"
