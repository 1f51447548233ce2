"""A driver joins a cluster in the cluster's own auth mode: a head without auth while a stray token exists here,
and a head that wants a token this machine does not have (one `error:` line). The token head with the token is
what every other test's driver joins."""

import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

# what the README's jobs do first: join, then run a Ray Data pipeline whose objects the driver owns
JOIN_AND_RUN = """
import os, ray
from raytrain_align import launch
launch.init_ray()
assert ray.data.range(2000, override_num_blocks=8).map_batches(lambda b: b).count() == 2000
print("mode", os.environ.get("RAY_AUTH_MODE", "disabled"))
"""


def test_driver_with_a_stray_token_joins_a_head_without_auth(monkeypatch):
    """Ray only guesses a cluster's mode from whether a token exists here; guessing wrong makes the driver refuse
    the raylet's calls, and Ray Data reports the driver's objects lost (OwnerDiedError)."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head's processes start without auth
    head = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        env.update(RAY_ADDRESS=head.address, RAY_AUTH_TOKEN="a-token-of-some-other-cluster")
        proc = subprocess.run([sys.executable, "-c", JOIN_AND_RUN], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "mode disabled" in proc.stdout
    finally:
        head.shutdown()


def test_head_wanting_a_token_this_machine_lacks_is_one_error_line(ray_address, tmp_path):
    env = {"RAY_ADDRESS": ray_address, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": "", "RAY_AUTH_MODE": ""}
    env = {k: v for k, v in {**os.environ, **env}.items() if v}  # no token anywhere, no mode
    storage = tmp_path / "storage"
    proc = subprocess.run([sys.executable, "-m", "raytrain_align", "prepare", "sft_mid", "--tiny", "--cpu",
                           "--storage", str(storage)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "RAY_AUTH_TOKEN" in lines[0], lines
    assert not storage.exists() or not any(storage.iterdir())

