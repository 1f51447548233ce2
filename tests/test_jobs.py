"""`ray job submit`-style runs through `raytrain_align.jobs` against a real Ray head on loopback with the
dashboard (Jobs API) and token auth; stop mid-run; the notebooks executed against the same head.

One head and one storage for the module; three short trainings in all: a finished run, a run stopped after
its first committed checkpoint, and that run resumed to the end by notebook 1.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raytrain_align import jobs

from .conftest import REPO, _free_port

pytestmark = pytest.mark.slow

TINY = ["sft_mid", "--tiny"]
FINISHED_RUN, STOPPED_RUN = "smollm3-midtraining-tiny", "stopme-tiny"
STOP_ARGS = ["--set", "run_name=stopme", "--set", "max_steps=90", "--set", "save_steps=15"]


# Ports given as 0: Ray binds a free one itself, so nothing else on the machine (another Ray cluster, a benchmark)
# can take it between our choice and Ray's bind. (The session head in conftest still uses `ray start` + `ray stop`:
# started like this one, Ray Data placed its actors on one of its two nodes only.) The Ray client's port cannot be 0.
AUTO_PORTS = ("--port=0", "--dashboard-port=0", "--dashboard-agent-listen-port=0", "--dashboard-agent-grpc-port=0",
              "--metrics-export-port=0", "--runtime-env-agent-port=0")


def start_ray_node(args, log: Path, env=None) -> subprocess.Popen:
    """`ray start ARGS --block` as its own process group: terminating it stops exactly the processes it started.
    (`ray stop` would stop every Ray cluster of this user on the machine, a user's own or a benchmark's.)"""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
                                 *args], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_ray_node(proc: subprocess.Popen) -> None:
    proc.terminate()  # the --block process stops what it started
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 300):
    """Poll `condition()` until it returns something true (returned), the node process ends, or `timeout`."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"ray start exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        if value := condition():
            return value
        assert time.time() < deadline, f"{what}: not within {timeout}s\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def start_head(temp: Path, log: Path, *args, env=None) -> tuple[subprocess.Popen, str]:
    """A head node (2 CPUs, no GPUs, dashboard on loopback) under `temp`; returns (process, GCS address), the
    address read from the file `ray start` writes once the head is up."""
    proc = start_ray_node(["--head", "--num-cpus=2", "--num-gpus=0", "--dashboard-host=127.0.0.1",
                           f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp}", *AUTO_PORTS, *args], log, env)
    address_file = temp / "ray_current_cluster"
    return proc, wait_until(lambda: address_file.exists() and address_file.read_text().strip(), "head up", proc, log)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with the dashboard and a token (RAY_AUTH_MODE=token). Its own
    process: terminating it stops exactly this cluster (the session's `ray_address` head runs no dashboard,
    hence no Jobs API). RAY_ADDRESS / RAY_AUTH_TOKEN point at it for the module, as a user's shell would."""
    tmp = tmp_path_factory.mktemp("jobs_head")
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rta-", dir="/tmp"))  # short: Ray's unix sockets live under it (107 bytes)
    proc, gcs = start_head(ray_tmp, tmp / "head.log", "--node-ip-address=127.0.0.1", env=env)
    # the dashboard's address as Ray's own job CLI finds it from the GCS address
    code = "from ray.dashboard.utils import ray_address_to_api_server_url as url; print(url(%r))" % gcs
    address = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout.split()[-1]
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_ADDRESS=address, RAY_AUTH_TOKEN=token)
    try:
        wait_until(_jobs_api_answers, "the Jobs API answers", proc, tmp / "head.log", timeout=180)
        yield {"address": address, "token": token, "root": tmp}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        jobs._client.cache_clear()
        stop_ray_node(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _jobs_api_answers() -> bool:
    jobs._client.cache_clear()
    try:
        jobs.client().list_jobs()
        return True
    except Exception:  # connection refused until the dashboard's HTTP server is up
        return False


@pytest.fixture(scope="module")
def storage(head):
    return head["root"] / "storage"


@pytest.fixture(scope="module")
def finished(head, storage):
    """A tiny sft_mid run submitted like `ray job submit --working-dir . -- python -m raytrain_align sft_mid --tiny`,
    followed to the end. Returns (job id, [(seconds since submit, status when seen, line)], final status)."""
    out = head["root"] / "model"
    job = jobs.submit(*TINY, "--output-dir", str(out), "--set", "max_steps=30", "--set", "report_to=tensorboard",
                      storage=str(storage))
    t0, seen = time.time(), []
    for line in jobs.follow(job):
        # the status at the moment the first progress line arrives shows whether logs stream during the run
        first_progress = line.startswith("step ") and not any(s[2].startswith("step ") for s in seen)
        seen.append((time.time() - t0, jobs.status(job) if first_progress else None, line))
    return job, seen, jobs.wait(job, timeout=60), out


def test_token_auth_is_on(head):
    req = urllib.request.Request(f"{head['address']}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401
    req.add_header("Authorization", f"Bearer {head['token']}")
    assert urllib.request.urlopen(req, timeout=10).status == 200


def _ray_job_submit(env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    """Ray's own `ray job submit` CLI from the repository root, as the README has users type it."""
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--working-dir", ".", "--",
                           *entrypoint], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_ray_job_submit_cli_with_the_environment_the_docs_give(head):
    """README / cluster/README.md: RAY_ADDRESS, RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or
    ~/.ray/auth_token). Without RAY_AUTH_MODE Ray's CLI sends no token and the head refuses the job."""
    user = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    user.update(RAY_ADDRESS=head["address"], RAY_AUTH_TOKEN=head["token"])
    refused = _ray_job_submit(user, "python", "-m", "raytrain_align", "recipes")
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()
    done = _ray_job_submit({**user, "RAY_AUTH_MODE": "token"}, "python", "-m", "raytrain_align", "plan", "sft_mid",
                           "--tiny", "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout.lower() and '"world_size": 2' in done.stdout


def test_bad_address_is_one_line_naming_the_fix(head):
    with socket.socket() as closed, pytest.raises(jobs.JobsError) as e:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        jobs.client(f"http://127.0.0.1:{closed.getsockname()[1]}")
    assert "\n" not in str(e.value) and "http://HEAD:8265" in str(e.value)


def test_submit_succeeds_streams_logs_and_exports(finished, storage):
    job, seen, final, out = finished
    lines = [s[2] for s in seen]
    text = "\n".join(lines)
    assert final == "SUCCEEDED", text[-4000:]
    # streamed: the first progress line arrived while the job was still running
    assert [s[1] for s in seen if s[1] is not None] == ["RUNNING"], text[-2000:]
    assert "train         2 Ray workers" in text and "sft_mid done" in text
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert jobs.status(job) == "SUCCEEDED" and "sft_mid done" in jobs.logs(job)


def test_runs_metrics_checkpoints_from_storage(finished, storage):
    runs = jobs.runs(str(storage)).set_index("run")
    row = runs.loc[FINISHED_RUN]
    assert row.finished and row.step == 30 and row.tokens > 0 and row.tokens_per_s > 0
    m = jobs.metrics(str(storage), FINISHED_RUN)
    assert list(m.index) == list(range(1, 31)) and {"loss", "learning_rate", "num_tokens"} <= set(m.columns)
    ck = jobs.checkpoints(str(storage), FINISHED_RUN)
    assert list(ck[ck.committed].name) == ["final_model"]
    prep = jobs.prepared(str(storage))
    assert len(prep) == 1 and prep.rows_out.iloc[0] > 0
    data = jobs.load_prepared(str(storage), prep.key.iloc[0])
    assert {"input_ids", "labels", "seq_lengths"} <= set(data.columns) and len(data) == prep.rows_out.iloc[0]


def test_tensorboard_report_to_passes_through_offline(finished, storage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = storage / FINISHED_RUN / "tensorboard"
    events = list(tb.glob("events.out.tfevents.*"))
    assert len(events) == 1, list(tb.iterdir()) if tb.exists() else "no tensorboard folder"
    acc = EventAccumulator(str(tb))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 31))
    assert loss[-1].value == pytest.approx(jobs.metrics(str(storage), FINISHED_RUN).loss.iloc[-1], rel=1e-5)


@pytest.fixture(scope="module")
def stopped(finished, head, storage):
    """A run stopped with `ray job stop` as soon as its first checkpoint is committed (step 15 of 90)."""
    job = jobs.submit(*TINY, *STOP_ARGS, "--output-dir", str(head["root"] / "stopme"), storage=str(storage))
    deadline = time.time() + 400
    while True:
        ck = jobs.checkpoints(str(storage), STOPPED_RUN)
        if ck.committed.any():
            break
        assert jobs.status(job) in ("PENDING", "RUNNING") and time.time() < deadline, jobs.logs(job)[-3000:]
        time.sleep(0.3)
    t0 = time.time()
    final = jobs.stop(job)
    return job, final, time.time() - t0


def test_stop_stops_cleanly_and_leaves_last_checkpoint_valid(stopped, storage):
    import torch

    job, final, seconds = stopped
    assert final == "STOPPED", jobs.logs(job)[-3000:]
    assert seconds < 60  # Ray's stop: SIGTERM, then SIGKILL after its 3 s grace; generous on a loaded machine
    ck = jobs.checkpoints(str(storage), STOPPED_RUN)
    assert not ck.final.any()  # it did not finish
    last = ck[ck.committed].sort_values("step").iloc[-1]
    path = Path(last.path)
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["global_step"] == last.step == 15
    # a complete ZeRO-3 checkpoint: DeepSpeed's `latest` tag names a folder with both ranks' model and optimizer shards
    tag = (path / "latest").read_text().strip()
    shards = sorted(p.name for p in (path / tag).iterdir())
    assert sum("model_states" in s for s in shards) == 2 and sum("optim_states" in s for s in shards) == 2, shards
    for s in shards:
        torch.load(path / tag / s, map_location="cpu", weights_only=False)  # every shard reads back
    assert (path / "config.json").exists() and (path / "tokenizer_config.json").exists()


# ------------------------------------------------------------------------------------------- notebooks


def _execute(name, head, storage, tmp, **env):
    import nbclient
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is committed with outputs"
    saved = dict(os.environ)
    os.environ.update(RAY_ADDRESS=head["address"], RAYTRAIN_ALIGN_STORAGE=str(storage), **env)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend renders the figures as PNG outputs
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    nbformat.write(nb, tmp / name)  # executed copy for inspection, never committed
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text += "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    return text, images


@pytest.fixture(scope="module")
def notebook_1(stopped, head, storage, tmp_path_factory):
    """Notebook 1 submits the stopped run's command again: it resumes from the last committed checkpoint."""
    args = " ".join([*TINY, *STOP_ARGS, "--output-dir", str(head["root"] / "stopme")])
    return _execute("1_submit_and_monitor.ipynb", head, storage, tmp_path_factory.mktemp("nb1"), RAYTRAIN_ALIGN_ARGS=args)


def test_notebook_1_resumes_the_stopped_run_with_live_loss(notebook_1, storage):
    text, images = notebook_1
    assert "SUCCEEDED" in text and images
    # it continued from the stopped run's checkpoint (step 15), not from scratch
    hist = jobs.history()
    hist = hist[hist.run == STOPPED_RUN].sort_values("start")
    assert list(hist.status) == ["STOPPED", "SUCCEEDED"] and list(hist.sessions) == [1, 1]
    launch = jobs.run_of(hist.job.iloc[-1])
    assert launch["run"] == STOPPED_RUN and launch["storage"] == str(storage)
    resumed = jobs.progress(str(storage), STOPPED_RUN, launch["launch_id"])  # the resumed job's progress events
    assert resumed.step.min() > 15 and resumed.step.max() == 90
    assert jobs.progress(str(storage), STOPPED_RUN).step.min() < 15  # the run's: both jobs
    m = jobs.metrics(str(storage), STOPPED_RUN)
    assert m.index.max() == 90
    # its tokens/s counts only the tokens of the resumed session (steps 16-90), not those before the stop
    row = jobs.runs(str(storage)).set_index("run").loc[STOPPED_RUN]
    assert row.tokens_per_s * row.train_seconds == pytest.approx(m.num_tokens[90] - m.num_tokens[15], rel=1e-6)


def test_notebook_2_inspects_prepared_data(finished, head, storage, tmp_path):
    text, images = _execute("2_prepared_data.ipynb", head, storage, tmp_path)
    assert images and "fill ratio" in text
    assert "background:#c8f7c5" in text  # the rendered row, loss-carrying tokens highlighted


def test_notebook_3_compares_runs(notebook_1, head, storage, tmp_path):
    text, images = _execute("3_compare_runs.ipynb", head, storage, tmp_path)
    assert images and FINISHED_RUN in text and STOPPED_RUN in text and "restarts" in text
