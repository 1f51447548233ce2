"""One real local Ray cluster (a head started with `ray start`) shared by every test that needs Ray."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    """A port free now (Ray binds it right after; the Jobs head asks Ray to choose every port it can)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """Address of a running local Ray head (2 CPUs, no GPUs, dashboard on), stopped at the end of the session."""
    from raytrain_align.launch import NODE_HEALTH_CHECKS

    import secrets

    # Token auth, as Ray 2.60 clusters run, with a token of the session's own, fixed before the head starts, so
    # nothing depends on whether ~/.ray/auth_token exists. Drivers ask the head for its mode (launch.join_auth_mode).
    saved_token = os.environ.get("RAY_AUTH_TOKEN")
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    # With its dashboard, as real clusters run: the Jobs API and Ray Train's state queries need it. Node health
    # checks as the project's cluster files set them (RAY_<name> variables).
    health = {f"RAY_{k}": str(v) for k, v in NODE_HEALTH_CHECKS.items()}
    r = _ray("start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={_free_port()}", f"--temp-dir={temp}", "--disable-usage-stats", timeout=180,
             env={**os.environ, **health, "RAY_AUTH_MODE": "token"})
    assert r.returncode == 0, r.stdout + r.stderr
    address = f"127.0.0.1:{port}"
    yield address
    _ray("stop", "--force", timeout=120)
    os.environ.pop("RAY_AUTH_TOKEN") if saved_token is None else os.environ.__setitem__("RAY_AUTH_TOKEN", saved_token)


@pytest.fixture(scope="session")
def two_nodes(ray_address):
    """The session head plus a second raylet (2 CPUs, resource `second_node`): a 2-node cluster on one machine.
    Stays up for the rest of the session (stopped with the head)."""
    r = _ray("start", f"--address={ray_address}", "--num-cpus=2", "--num-gpus=0", '--resources={"second_node": 1}',
             "--disable-usage-stats", timeout=180, env={**os.environ, "RAY_AUTH_MODE": "token"})  # as the head
    assert r.returncode == 0, r.stdout + r.stderr
    yield ray_address


def run_cli(args, env_extra=None, timeout=900):
    """Run `python -m raytrain_align ...` as a user would; returns CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "raytrain_align", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)
    proc.seconds = time.time() - t0
    return proc


def launched_run(storage: str, since: float) -> dict | None:
    """The launch (driver's `launch` event: run, launch_id, ...) that a command started after `since` left in
    `storage`, or None before its driver got that far."""
    from raytrain_align import jobs

    return next((launch for launch in jobs.launches(storage) if launch["unix"] >= since), None)


def launch_events(launch: dict, kinds: set[str]) -> list[dict]:
    """That launch's events of `kinds`, oldest first."""
    from raytrain_align import events

    return [e for e in events.read(launch["storage"], launch["run"], kinds) if e["launch_id"] == launch["launch_id"]]


def run_killing_rank1(args, ray_address, checkpoint_step: int, env_extra=None):
    """Run `python -m raytrain_align ARGS` (with --storage) and SIGKILL the world-rank-1 worker process as soon as
    the checkpoint of `checkpoint_step` is committed (Ray Train's checkpoint list in storage) and training has gone
    past it (a progress event). Returns (returncode, log, step of the last progress event before the kill or None,
    time of the kill, the launch's workers_formed, start and progress events)."""
    from raytrain_align import jobs

    storage, t0 = args[args.index("--storage") + 1], time.time()
    proc = subprocess.Popen([sys.executable, "-m", "raytrain_align", *args], cwd=REPO,
                            env={**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1", **(env_extra or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    launch, killed_at, t_kill = None, None, None
    while proc.poll() is None and killed_at is None:
        time.sleep(0.2)
        launch = launch or launched_run(storage, t0)
        if launch is None:
            continue
        seen = launch_events(launch, {"workers_formed", "progress"})
        past = [e["step"] for e in seen if e["event"] == "progress" and e["step"] > checkpoint_step]
        if past and checkpoint_step in set(jobs.checkpoints(storage, launch["run"]).query("committed").step):
            killed_at, t_kill = past[-1], time.time()
            os.kill([e for e in seen if e["event"] == "workers_formed"][-1]["pids"][1], signal.SIGKILL)
    proc.wait(timeout=900)
    reader.join(timeout=60)
    seen = launch_events(launch, {"workers_formed", "start", "progress"}) if launch else []
    return proc.returncode, "".join(lines), killed_at, t_kill, seen


def progress_after_restarts(seen: list[dict]) -> list[list[int]]:
    """The steps of the progress events of each worker-group start, in order."""
    starts: list[list[int]] = []
    for e in seen:
        if e["event"] == "workers_formed":
            starts.append([])
        elif starts and e["event"] == "progress":
            starts[-1].append(e["step"])
    return starts


# Tiny ZeRO-3 runs of 20 logged steps, each run once per session and shared by the modules that compare against
# it: SFT (checkpoint every 5) by test_fidelity (the plain accelerate launch) and test_fsdp (FSDP2); DPO with
# its partitioned reference model by test_fidelity and test_dpo_reference (the reference's other forms).
ZERO3_SFT_ARGS = ["sft_mid", "--tiny", "--set", "max_steps=20", "--set", "logging_steps=1", "--set", "save_steps=5",
                  "--set", "run_name=zero3-sft"]
ZERO3_DPO_ARGS = ["dpo_apo_zero", "--tiny", "--set", "max_steps=20", "--set", "logging_steps=1",
                  "--set", "run_name=zero3-dpo"]


def _shared_run(args, ray_address, root):
    """(run summary, storage, output dir) of `python -m raytrain_align ARGS` under `root`."""
    import json

    storage, out = root / "storage", root / "model"
    proc = run_cli([*args, "--storage", str(storage), "--output-dir", str(out)], env_extra={"RAY_ADDRESS": ray_address})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "raytrain_align_run.json").read_text()), storage, out


@pytest.fixture(scope="session")
def zero3_sft(ray_address, tmp_path_factory):
    return _shared_run(ZERO3_SFT_ARGS, ray_address, tmp_path_factory.mktemp("zero3_sft"))


@pytest.fixture(scope="session")
def zero3_dpo(ray_address, tmp_path_factory):
    return _shared_run(ZERO3_DPO_ARGS, ray_address, tmp_path_factory.mktemp("zero3_dpo"))


def write_checkpoint(run_dir: Path, step: int, damage: str | None = None) -> Path:
    """A committed checkpoint as the workers write it (two nodes' shards, position file, each node's file list),
    listed in Ray Train's snapshot, then `damage`d: 'truncated', 'shard deleted', 'position unreadable', 'gone'."""
    import json
    import shutil

    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from raytrain_align import elastic

    name = f"checkpoint-{step:07d}"
    for node in (0, 1):  # what each node wrote, then uploaded into the same folder
        local = run_dir.parent / f"node{node}" / name
        (local / f"global_step{step}").mkdir(parents=True)
        (local / f"global_step{step}" / f"zero_pp_rank_{node}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
        if node == 0:
            position = elastic.position(step, 8, 2, 2, 1.0, "save", "a0", None)
            (local / elastic.POSITION_FILE).write_text(json.dumps(position))
        elastic.write_file_list(str(local), node)
        shutil.copytree(local, run_dir / name, dirs_exist_ok=True)
    ckpt = run_dir / name
    shard = ckpt / f"global_step{step}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncated":
        shard.write_bytes(b"x" * 400)
    elif damage == "shard deleted":
        shard.unlink()
    elif damage == "position unreadable":
        (ckpt / elastic.POSITION_FILE).write_text('{"global_step": 1')
    elif damage == "gone":
        shutil.rmtree(ckpt)
    snapshot = run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    state = json.loads(snapshot.read_text()) if snapshot.exists() else {"checkpoint_results": []}
    state["checkpoint_results"].append({"checkpoint_dir_name": name, "metrics": {"step": step}})
    snapshot.write_text(json.dumps(state))
    return ckpt
