"""One real local Ray cluster (a head started with `ray start`) shared by every test that needs Ray."""

import os
import re
import signal
import socket
import subprocess
import sys
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
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    # With its dashboard, as real clusters run: the Jobs API and Ray Train's state queries need it.
    r = _ray("start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={_free_port()}", f"--temp-dir={temp}", "--disable-usage-stats", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    address = f"127.0.0.1:{port}"
    yield address
    _ray("stop", "--force", timeout=120)


@pytest.fixture(scope="session")
def two_nodes(ray_address):
    """The session head plus a second raylet (2 CPUs, resource `second_node`): a 2-node cluster on one machine.
    Stays up for the rest of the session (stopped with the head)."""
    from raytrain_align.launch import token_available

    # the head (started without RAY_AUTH_MODE) uses token auth exactly when a token exists; the raylet must match
    auth = {"RAY_AUTH_MODE": "token"} if token_available() and "RAY_AUTH_MODE" not in os.environ else {}
    r = _ray("start", f"--address={ray_address}", "--num-cpus=2", "--num-gpus=0", '--resources={"second_node": 1}',
             "--disable-usage-stats", timeout=180, env={**os.environ, **auth})
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


def run_killing_rank1(args, ray_address, kill_from_step: int):
    """Run `python -m raytrain_align ARGS` and SIGKILL the world-rank-1 worker process at the first progress line
    at or past `kill_from_step`. Returns (returncode, log, step killed at or None, time of the kill)."""
    proc = subprocess.Popen([sys.executable, "-m", "raytrain_align", *args], cwd=REPO,
                            env={**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, victim, killed_at, t_kill = [], None, None, None
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"pid=(\d+)\) world_rank=1", line):
            victim = int(m.group(1))
        step = re.search(r"step +(\d+)/", line)
        if killed_at is None and victim and step and int(step.group(1)) >= kill_from_step:
            killed_at, t_kill = int(step.group(1)), time.time()
            os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode, "".join(lines), killed_at, t_kill
