"""Submit, watch and stop runs on a Ray cluster, and read what runs left in storage — for notebooks.

    from raytrain_align import jobs                        # RAY_ADDRESS=http://HEAD:8265 (the dashboard)
    job = jobs.submit("sft_mid", "--tiny", storage="/mnt/efs/runs")
    for line in jobs.follow(job): print(line)               # streams until the job ends
    jobs.status(job); jobs.stop(job)
    launch = jobs.run_of(job)                               # its run and storage, from the driver's launch event
    jobs.progress(launch["storage"], launch["run"])         # the run's progress events (step, loss, lr, tok/s)
    jobs.runs("/mnt/efs/runs")                              # one row per run in that storage
    jobs.metrics("/mnt/efs/runs", "smollm3-midtraining")    # its log history, one row per logged step
    jobs.checkpoints("/mnt/efs/runs", "smollm3-midtraining")

The cluster side is the Ray Jobs SDK (`ray.job_submission.JobSubmissionClient`), so everything here is also
`ray job submit|logs|status|stop`. The storage side reads each run's event stream (events.py), Ray Train's run
folders (`<storage>/<run>/checkpoint-*`, `final_model/raytrain_align_run.json`) and the prepared-data cache
(`<storage>/prepared/<key>/`), local or s3://. A job finds its run through the stream: the driver's `launch`
event names the job's submission id.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shlex
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from . import events
from . import storage as store
from .errors import RecipeError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
CHECKOUT = Path(__file__).resolve().parent.parent
# Lines from Ray workers reach the driver as "\x1b[36m(RayTrainWorker pid=123)\x1b[0m text": `clean` strips that.
PREFIX = re.compile(r"^(?:\x1b\[[\d;]*m)?\([^)]*pid=\d+[^)]*\)(?:\x1b\[[\d;]*m)?\s?|\x1b\[[\d;]*m")


def clean(line: str) -> str:
    """A log line without the `(RayTrainWorker pid=...)` prefix and colour codes Ray adds to worker output."""
    return PREFIX.sub("", line).rstrip()


class JobsError(RecipeError):
    """A one-line problem with the cluster address, a job or a storage path, naming the fix."""


# --------------------------------------------------------------------------------------------- cluster


def _token() -> str | None:
    """The Ray auth token, found where Ray itself looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            return Path(path).read_text().strip() or None
    return None


def client(address: str | None = None):
    """A JobSubmissionClient for `address` (default RAY_ADDRESS), sending the Ray auth token if there is one."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError("no cluster address: set RAY_ADDRESS=http://HEAD:8265 (run `ray dashboard cluster/aws.yaml` "
                        "for a tunnel to a launcher cluster) or pass address=")
    return _client(address, _token())


@lru_cache(maxsize=8)
def _client(address: str, token: str | None):
    import logging
    import warnings

    # the SDK's INFO lines about packaging the working dir, and ipywidgets hints, are noise in a notebook
    for name in ("ray._private.runtime_env", "ray.dashboard.modules", "ray.widgets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="IProgress not found")
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    # the SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its address argument: hide them while it resolves
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # ConnectionError, or an HTTP error from a non-dashboard port
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise JobsError(f"cannot reach the Ray Jobs API at {address} ({first}); RAY_ADDRESS must be the dashboard "
                        "address http://HEAD:8265 (not the GCS port 6379), with a token in RAY_AUTH_TOKEN or "
                        "~/.ray/auth_token if the cluster uses token auth") from None
    finally:
        os.environ.update(saved)


def submit(recipe: str, *args: str, storage: str | None = None, working_dir: str | None = "auto",
           env: dict[str, str] | None = None, address: str | None = None, submission_id: str | None = None) -> str:
    """Submit `python -m raytrain_align RECIPE ARGS... [--storage STORAGE]`; returns the submission id.

    working_dir="auto" uploads this checkout when the package runs from one (so every node imports the same code),
    and nothing when the package is installed (the cluster has it, e.g. cluster/aws.yaml's setup commands).
    `env` becomes environment variables of the driver and every Ray worker (e.g. TENSORBOARD_LOGGING_DIR)."""
    argv = ["python", "-m", "raytrain_align", recipe, *args] + (["--storage", storage] if storage else [])
    if working_dir == "auto":
        working_dir = str(CHECKOUT) if (CHECKOUT / "pyproject.toml").exists() else None
    runtime_env: dict = {}
    if working_dir:
        runtime_env.update(working_dir=str(working_dir), excludes=["data/", ".venv/", "*.ipynb_checkpoints"])
    if env:
        runtime_env["env_vars"] = {k: str(v) for k, v in env.items()}
    return client(address).submit_job(
        entrypoint=shlex.join(argv), runtime_env=runtime_env or None, submission_id=submission_id,
        # what the run is: its recipe and arguments, and the storage whose event stream finds its run (run_of)
        metadata={"raytrain_align": recipe, "args": shlex.join(args), **({"storage": storage} if storage else {})},
    )


def status(job: str, address: str | None = None) -> str:
    """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED."""
    return str(client(address).get_job_status(job).value)


def wait(job: str, timeout: float | None = None, address: str | None = None, poll: float = 1.0) -> str:
    """Block until the job ends (or `timeout` seconds pass); returns its status."""
    t0 = time.time()
    while (s := status(job, address)) not in TERMINAL and (timeout is None or time.time() - t0 < timeout):
        time.sleep(poll)
    return s


def logs(job: str, address: str | None = None) -> str:
    """Everything the job printed so far."""
    return client(address).get_job_logs(job)


def follow(job: str, address: str | None = None) -> Iterator[str]:
    """The job's output, line by line (worker prefixes stripped), as it is printed; ends when the job ends. Works in Jupyter
    (the SDK's async tail runs on its own event loop in a thread)."""
    c, lines, done = client(address), queue.Queue(), object()

    async def tail():
        async for chunk in c.tail_job_logs(job):
            lines.put(chunk)

    def run():
        try:
            asyncio.run(tail())
        except Exception as e:  # the stream broke: say so instead of hanging
            lines.put(f"[follow] log stream ended: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        lines.put(done)

    threading.Thread(target=run, daemon=True).start()
    partial = ""
    while (chunk := lines.get()) is not done:
        *complete, partial = (partial + chunk).split("\n")
        yield from map(clean, complete)
    if partial:
        yield clean(partial)


def stop(job: str, address: str | None = None, timeout: float = 120) -> str:
    """Stop the job (SIGTERM to the driver, SIGKILL 3 s later); its last committed checkpoint stays valid.
    Returns the final status."""
    client(address).stop_job(job)
    return wait(job, timeout, address, poll=0.5)


def _storage_of(job_info, default: str | None = None) -> str:
    """The storage a job's runs went to: what submit recorded in its metadata, else the driver's default."""
    return store.root((job_info.metadata or {}).get("storage") or default)


def launches(storage: str) -> list[dict]:
    """Every driver launch in the storage (its `launch` event: run, job, launch_id, unix) with `sessions`, the
    worker-group starts under it (1 + restarts)."""
    root, out = _root(storage), []
    for run in store.list_dirs(root):
        seen = events.read(root, run, {"launch", "workers_formed"})
        for e in seen:
            if e["event"] == "launch":
                out.append({**e, "sessions": sum(w["event"] == "workers_formed" and w["launch_id"] == e["launch_id"]
                                                 for w in seen)})
    return out


def run_of(job: str, address: str | None = None, storage: str | None = None) -> dict | None:
    """The launch of `job` ({run, storage, launch_id, sessions, ...}), or None until its driver has checked the recipe."""
    where = _storage_of(client(address).get_job_info(job), storage)
    return next((launch for launch in launches(where) if launch.get("job") == job), None)


def progress(storage: str, run: str, launch_id: str | None = None) -> "pd.DataFrame":  # noqa: F821
    """The run's progress events (about one per 5% of each session: step, loss, lr, tokens/s), only those of one
    launch if given."""
    import pandas as pd

    cols = ["step", "max_steps", "loss", "learning_rate", "tokens_per_s", "launch_id", "unix"]
    rows = [{c: e.get(c) for c in cols} for e in events.read(_root(storage), run, {"progress"})
            if launch_id in (None, e["launch_id"])]
    return pd.DataFrame(rows, columns=cols)


def history(address: str | None = None, storage: str | None = None) -> "pd.DataFrame":  # noqa: F821
    """raytrain_align jobs on the cluster: id, status, and from the storage's event stream its run, storage and
    `sessions` — how many times training (re)started in that job (worker-group restarts included). A job submitted
    without a storage is looked up in `storage` (default: RAYTRAIN_ALIGN_STORAGE, else ~/ray_results)."""
    import pandas as pd

    rows, by_storage = [], {}
    for j in client(address).list_jobs():
        if not (j.metadata or {}).get("raytrain_align") and "raytrain_align" not in (j.entrypoint or ""):
            continue
        where = _storage_of(j, storage)
        if where not in by_storage:
            by_storage[where] = {launch["job"]: launch for launch in launches(where) if launch.get("job")}
        launch = by_storage[where].get(j.submission_id, {})
        rows.append({
            "job": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
            "run": launch.get("run"), "storage": launch.get("storage"), "sessions": launch.get("sessions", 0),
            "start": pd.to_datetime(j.start_time, unit="ms") if j.start_time else None,
        })
    return pd.DataFrame(rows, columns=["job", "status", "entrypoint", "run", "storage", "sessions", "start"])


# --------------------------------------------------------------------------------------------- storage


def _root(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _read_json(path: str):
    text = store.read_text(path)
    return None if text is None else json.loads(text)


def checkpoints(storage: str, run: str) -> "pd.DataFrame":  # noqa: F821
    """The run's checkpoint folders: name, path, step, and `committed` — Ray Train recorded it as reported
    (a folder that is not committed was cut off mid-upload and is never resumed from)."""
    import pandas as pd

    root = _root(storage)
    snap = _read_json(f"{root}/{run}/checkpoint_manager_snapshot.json") or {}
    committed = {r["checkpoint_dir_name"]: r["metrics"] for r in snap.get("checkpoint_results", [])}
    rows = []
    for name in store.list_dirs(f"{root}/{run}"):
        if not name.startswith(("checkpoint-", "final_model")):
            continue
        step = committed.get(name, {}).get("step")
        if step is None and name.startswith("checkpoint-"):
            step = int(name.split("-")[1])
        rows.append({"name": name, "path": f"{root}/{run}/{name}", "step": step, "committed": name in committed,
                     "final": name == "final_model"})
    return pd.DataFrame(rows, columns=["name", "path", "step", "committed", "final"])


def _run_record(root: str, run: str) -> dict | None:
    """What the run left: the final export's raytrain_align_run.json, else the latest committed HF checkpoint's
    trainer_state.json (a run still going, or stopped)."""
    final = _read_json(f"{root}/{run}/final_model/raytrain_align_run.json")
    if final is not None:
        return {"finished": True, "log_history": final["log_history"], "metrics": final["metrics"],
                "world_size": final.get("world_size"), "prepared": final.get("prepared", {}).get("key"),
                "path": f"{root}/{run}/final_model"}
    snap = _read_json(f"{root}/{run}/checkpoint_manager_snapshot.json") or {}
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    state = _read_json(f"{root}/{run}/{latest}/trainer_state.json") if latest else None
    if state is None:
        return None
    return {"finished": False, "log_history": state["log_history"], "metrics": {"step": state["global_step"]},
            "world_size": None, "prepared": None, "path": f"{root}/{run}/{latest}"}


def run_record(storage: str, run: str) -> dict:
    """finished, metrics, log_history, world_size, prepared (its cache key) and path (the exported model, or the
    latest committed checkpoint: both hold the tokenizer)."""
    rec = _run_record(_root(storage), run)
    if rec is None:
        raise JobsError(f"no run '{run}' with a committed checkpoint in {storage}; list them with jobs.runs('{storage}')")
    return rec


def metrics(storage: str, run: str) -> "pd.DataFrame":  # noqa: F821
    """The run's log history (loss, learning_rate, grad_norm, num_tokens, ... per logged step), one row per step."""
    import pandas as pd

    rows = [e for e in run_record(storage, run)["log_history"] if "loss" in e]
    return pd.DataFrame(rows).set_index("step") if rows else pd.DataFrame()


def runs(storage: str) -> "pd.DataFrame":  # noqa: F821
    """One row per run in the storage: finished or not, steps, final loss, tokens, tokens/s, latest checkpoint."""
    import pandas as pd

    root = _root(storage)
    rows = []
    for run in store.list_dirs(root):
        rec = _run_record(root, run)
        if rec is None:
            continue
        m, losses = rec["metrics"], [e["loss"] for e in rec["log_history"] if "loss" in e]
        tokens, seconds = m.get("num_tokens"), m.get("train_runtime")
        session_tokens = tokens
        if tokens and seconds and m.get("train_steps_per_second"):
            # a resumed run's num_tokens counts from step 0 but train_runtime only covers the last session,
            # which trained train_steps_per_second x train_runtime steps: count only the tokens of those
            start = m["step"] - round(m["train_steps_per_second"] * seconds)
            before = [e["num_tokens"] for e in rec["log_history"] if "num_tokens" in e and e.get("step", 0) <= start]
            session_tokens = tokens - (before[-1] if before else 0)
        ckpts = checkpoints(storage, run)
        latest = ckpts[ckpts.committed].sort_values("step")
        rows.append({
            "run": run, "finished": rec["finished"], "step": m.get("step"), "loss": losses[-1] if losses else None,
            "tokens": tokens, "train_seconds": seconds,
            "tokens_per_s": session_tokens / seconds if session_tokens and seconds else None,  # last session's
            "world_size": rec["world_size"], "latest_checkpoint": latest.name.iloc[-1] if len(latest) else None,
        })
    return pd.DataFrame(rows, columns=["run", "finished", "step", "loss", "tokens", "train_seconds", "tokens_per_s",
                                       "world_size", "latest_checkpoint"])


def prepared(storage: str) -> "pd.DataFrame":  # noqa: F821
    """The prepared-data cache entries (`<storage>/prepared/<key>/manifest.json`), one row per key."""
    import pandas as pd

    root = _root(storage)
    rows = []
    for key in store.list_dirs(f"{root}/prepared"):
        if (m := _read_json(f"{root}/prepared/{key}/manifest.json")) is not None:
            rows.append({**{k: v for k, v in m.items() if k not in ("spec", "drop_examples")},
                         "max_length": (m.get("spec") or {}).get("fields", {}).get("max_length")})
    return pd.DataFrame(rows)


def load_prepared(storage: str, key: str, split: str = "train", rows: int = 10_000) -> "pd.DataFrame":  # noqa: F821
    """The first `rows` rows of one prepared split as a DataFrame (input_ids, labels, seq_lengths for SFT; *_ids
    for DPO), read from the memory-mapped shards: a sample to look at, never the whole split in memory."""
    from .prepare import read_prepared

    manifest = _read_json(f"{_root(storage)}/prepared/{key}/manifest.json")
    if manifest is None:
        raise JobsError(f"no prepared data '{key}' in {storage}; list them with jobs.prepared('{storage}')")
    path = manifest["path"] if split == "train" else manifest.get("eval_path")
    if path is None:
        raise JobsError(f"prepared data '{key}' has no '{split}' split")
    data = read_prepared(path)
    return data.select(range(min(rows, len(data)))).to_pandas()


def compare(storage: str) -> "pd.DataFrame":  # noqa: F821
    """`runs(storage)` plus, from each run's event stream, `launches` (drivers that ran it) and `restarts`
    (training sessions beyond the first: resumed launches and worker-group restarts)."""
    table, seen = runs(storage), launches(storage)
    table["launches"] = [sum(launch["run"] == r for launch in seen) for r in table.run]
    table["restarts"] = [max(0, sum(launch["sessions"] for launch in seen if launch["run"] == r) - 1) for r in table.run]
    return table
