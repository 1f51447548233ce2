"""A training worker killed mid-run (SIGKILL, as when its node's OOM killer or a hardware fault takes it): Ray
Train restarts the worker group (FailureConfig max_failures), the workers resume from the latest committed
ZeRO-3 checkpoint (uploaded in the background: `ray.checkpoint_upload: async`), the run finishes, the loss curve
continues, and the exported model loads. The same run's storage is an object store whose first checkpoint uploads
fail (a reset connection): each failed file is sent again, and none of them costs a restart."""

import json
import time

import pytest

from .conftest import progress_after_restarts, run_cli, run_killing_rank1

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 80, 20


def flaky_storage(tmp_path, failures: int) -> tuple[str, dict]:
    """A `flaky:///...` storage URI and the driver's environment for it: benchmarks/faults.py's FlakyFileSystem,
    registered the way fsspec plugins are (an `fsspec.specs` entry point), failing its first `failures` writes
    of checkpoint files."""
    import fsspec

    from benchmarks.faults import FlakyFileSystem, install_flaky_plugin

    _, env = install_flaky_plugin(tmp_path, failures)
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)  # this process reads the run's files too
    return f"flaky://{tmp_path / 'storage'}", env


def test_killed_worker_restarts_from_last_checkpoint(tmp_path):
    """On a local Ray of the driver's own (RAY_ADDRESS=local): an fsspec plugin must be installed wherever storage
    is opened, Ray Data's and Ray Train's workers included, and the workers of a cluster the driver starts share
    its environment; those of the tests' shared head do not."""
    out = tmp_path / "model"
    # two failed uploads (3 s of retries) of the step-20 checkpoint's first file, before it is committed
    uri, env = flaky_storage(tmp_path, failures=2)
    args = ["sft_mid", "--tiny", "--storage", uri, "--output-dir", str(out), "--max-failures", "1",
            "--set", f"max_steps={STEPS}", "--set", f"save_steps={SAVE_EVERY}",
            # checkpoints uploaded in the background: the one the restart finds was uploaded while training went on
            "--set", "ray.checkpoint_upload=async"]
    # once step 20's checkpoint is committed, before step 40's
    returncode, log, killed_at, t_kill, seen = run_killing_rank1(args, "local", SAVE_EVERY, env)
    assert returncode == 0, log[-5000:]
    assert killed_at is not None, log[-3000:]
    # the failed uploads were sent again in place (the one restart below is the kill's)
    assert list((tmp_path / "failures").iterdir()) == [] and "injected: connection reset" in log
    assert "storage       uploading " in log

    starts = progress_after_restarts(seen)
    assert len(starts) == 2, starts  # restarted once
    # from the latest checkpoint committed when the worker died: step 20's (committed before the kill) or, where
    # its background upload finished late, step 40's, committed between that and the worker's end; never from 0
    restart = [e for e in seen if e["event"] == "start"][-1]
    assert restart["cause"] == "worker group restart after a failure", restart
    assert restart["resumed_step"] in (SAVE_EVERY, 2 * SAVE_EVERY)
    assert starts[1] and starts[1][0] > restart["resumed_step"]
    print(f"killed after step {killed_at}; resumed from step {restart['resumed_step']}; recovered and finished "
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



def test_storage_scheme_missing_on_the_nodes_is_one_error_line(ray_address, tmp_path):
    """The same plugin installed where the driver runs but not on the shared head's nodes: one `error:` line
    naming the fix, exit 2, before anything is prepared or written to that storage."""
    uri, env = flaky_storage(tmp_path, failures=0)
    proc = run_cli(["sft_mid", "--tiny", "--storage", uri, "--output-dir", str(tmp_path / "model")],
                   env_extra={**env, "RAY_ADDRESS": ray_address}, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "'flaky://' does not open on node" in errors[0] and "install the fsspec plugin" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "storage").exists()  # nothing written: no prepared data, no run folder
