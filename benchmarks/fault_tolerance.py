"""Fault-tolerance scenarios on a real multi-node Ray cluster on one machine, and what each restart cost.

A `ray.cluster_utils.Cluster` (a head without CPUs, "nodes" = raylets with 2 CPUs each) runs tiny ZeRO-3 SFT
through the CLI (`python -m raytrain_align sft_mid --tiny --num-workers 2:4 ...`), global batch 12, 30 steps,
a checkpoint every 5. Each scenario breaks the run the way production does — a node removed and added back, a
node drained with a deadline then removed, a worker killed while a checkpoint is being written, the driver
killed and the command relaunched over a damaged latest checkpoint — and returns one record from the run's own log (run_log.jsonl), its sample
log and its losses, compared with an uninterrupted run of the same data, seed and global batch.
`tests/test_elastic.py` asserts on these records; run this file to write the table:

    python -m benchmarks.fault_tolerance   # -> benchmarks/results/fault_tolerance-<date>.{json,md}, docs/fault-tolerance.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STEPS, SAVE_EVERY, GBS = 30, 5, 12
NODE = {"num_cpus": 2, "num_gpus": 0, "object_store_memory": 512 * 2**20}  # one "node": 2 CPU workers


@contextlib.contextmanager
def _no_token_auth():
    """RAY_AUTH_MODE=disabled for the Ray processes started inside (the head and raylets inherit the
    environment), then the caller's value back: a leaked `disabled` would keep every later driver of this
    process from joining a token-auth cluster (the test session's own head)."""
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield
    finally:
        os.environ.pop("RAY_AUTH_MODE", None) if saved is None else os.environ.__setitem__("RAY_AUTH_MODE", saved)


def wait_until_idle(address: str, timeout: float = 300) -> None:
    """Until Ray's state API lists no live actor of a run and no placement group on the cluster (the runs here are
    its only users; detached actors, such as Ray Data's statistics actor, live as long as the cluster): the previous
    run's controller and workers are gone and their resources free, so an elastic run starts at the size the
    whole cluster allows, not at what a slow cleanup left over."""
    from ray.util.state import list_actors, list_placement_groups

    deadline = time.time() + timeout
    with _no_token_auth():
        while True:
            busy = [a.class_name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True,
                                                      raise_on_missing_output=False) if not a.is_detached]
            busy += [f"placement group {g.placement_group_id[:8]} ({g.state})" for g in list_placement_groups(
                address=address, raise_on_missing_output=False) if g.state != "REMOVED"]
            if not busy:
                return
            assert time.time() < deadline, f"cluster still busy after {timeout}s: {busy}"
            time.sleep(0.5)


def add_node(c):
    """One more 2-CPU "node" (raylet) without token auth, like the rest of the cluster."""
    with _no_token_auth():
        return c.add_node(**NODE)


def cluster(nodes: int = 2):
    """A head without CPUs (it only hosts Ray's control plane) plus `nodes` raylets of 2 CPUs, without token
    auth; the drivers are told the same (Run), since the CLI otherwise turns token auth on when it finds a
    token of another cluster in ~/.ray."""
    from ray.cluster_utils import Cluster

    import socket

    with socket.socket() as s:  # the dashboard (as on real clusters): Ray Train's state API, used by its
        s.bind(("127.0.0.1", 0))  # cleanup of a dead driver's placement groups, needs it
        port = s.getsockname()[1]
    from raytrain_align.launch import NODE_HEALTH_CHECKS

    with _no_token_auth():  # the node health checks the project sets on every cluster it starts or describes
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": True, "dashboard_port": port,
                                    "dashboard_host": "127.0.0.1", "_system_config": NODE_HEALTH_CHECKS})
    workers = [add_node(c) for _ in range(nodes)]
    c.wait_for_nodes()
    return c, workers


class Run:
    """One `python -m raytrain_align` driver, its output read line by line in a thread."""

    def __init__(self, address: str, storage: Path, name: str, workers: str = "2:4", extra: tuple[str, ...] = (),
                 storage_uri: str | None = None):
        """`storage_uri`: the same folder as the driver names it (e.g. through an fsspec plugin); read here as `storage`."""
        self.name, self.storage, self.out, self.address = name, storage, storage.parent / f"out-{name}", address
        self.cmd = [sys.executable, "-m", "raytrain_align", "sft_mid", "--tiny", "--storage", storage_uri or str(storage),
                    "--output-dir", str(self.out), "--num-workers", workers, "--max-failures", "3",
                    "--set", f"run_name={name}", "--set", f"max_steps={STEPS}", "--set", f"save_steps={SAVE_EVERY}",
                    "--set", "logging_steps=1", "--set", "per_device_train_batch_size=1",
                    "--set", f"ray.global_batch_size={GBS}", "--set", "ray.resize_interval_s=5", *extra]
        self.env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
        self.lines: list[str] = []
        self._start()

    def _start(self):
        wait_until_idle(self.address)  # a relaunch too: Ray ends a dead driver's controller and workers first
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self._q), daemon=True).start()

    @staticmethod
    def _read(proc, q):
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    def relaunch(self):
        """The same command again (after the driver was killed)."""
        self._start()

    def _read_output(self, wait: float) -> None:
        """Keep the driver's output (for the error message) without letting its pipe fill up."""
        try:
            line = self._q.get(timeout=wait)
        except queue.Empty:
            return
        assert line is not None, "the driver exited; output tail:\n" + "".join(self.lines[-60:])
        self.lines.append(line)
        while not self._q.empty() and (line := self._q.get()) is not None:
            self.lines.append(line)

    def wait_until(self, done, timeout: float = 300):
        """Poll `done()` (about 3 times a second) until it returns something true; returns that."""
        deadline = time.time() + timeout
        while not (result := done()):
            assert time.time() < deadline, f"condition not met in {timeout}s; output tail:\n" + "".join(self.lines[-60:])
            self._read_output(0.3)
        return result

    def events(self, kind: str) -> list[dict]:
        """The run's events of one kind so far (events.py: what the driver and rank 0 recorded)."""
        from raytrain_align import events

        return events.read(str(self.storage), f"{self.name}-tiny", {kind})

    def wait_event(self, kind: str, match=lambda e: True, after: float = 0.0, timeout: float = 300) -> dict:
        """The first event of `kind` recorded after unix time `after` for which `match(event)` holds."""
        return self.wait_until(lambda: next((e for e in self.events(kind) if e["unix"] >= after and match(e)), None),
                               timeout)

    def wait_resumed(self, world: int | None = None) -> dict:
        """A restart's start event (a resumed checkpoint loaded), at world size `world` if given."""
        return self.wait_event("start", lambda e: e["cause"] != "start" and world in (None, e["world_size"]))

    def starts(self) -> list[dict]:
        """The run log's start records so far (one per start of the worker group, written once its checkpoint is
        loaded): what the workers wrote, not what the log says."""
        from raytrain_align import elastic

        return [r for r in elastic.read_jsonl(f"{elastic.log_dir(str(self.storage), self.name + '-tiny')}/{elastic.RUN_LOG}")
                if r.get("event") == "start"]

    def wait_for_start(self, after: int, world: int | None = None, timeout: float = 300) -> dict:
        """Wait until the run log holds a start beyond the first `after` ones (at world size `world`, if given, as
        the latest); returns that start. A fault may cost more than one restart; this waits for the state the
        next fault needs, not for a count."""
        def reached():
            starts = self.starts()
            return len(starts) > after and (world is None or starts[-1]["world_size"] == world)

        self.wait_until(reached, timeout)
        return self.starts()[-1]

    def wait_step(self, step: int, timeout: float = 300) -> int:
        """The step of the first progress event from now on at or past `step`."""
        return self.wait_event("progress", lambda e: e["step"] >= step, after=time.time(), timeout=timeout)["step"]

    def finish(self, timeout: float = 600) -> int:
        deadline = time.time() + timeout
        while self.proc.poll() is None and time.time() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is not None:
                self.lines.append(line)
        while not self._q.empty():
            line = self._q.get()
            if line is not None:
                self.lines.append(line)
        return self.proc.wait(timeout=5)

    def kill_driver(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def trained_exactly_once(summary: dict, steps_total: int) -> tuple[dict[int, list[str]], bool]:
    """From a finished run's summary (raytrain_align_run.json): the sample log over every attempt ({step: row ids}),
    and whether each epoch's steps trained exactly the rows of that epoch's order, each once, every step of the
    run present once."""
    from raytrain_align import elastic
    from raytrain_align.prepare import read_prepared

    trained = elastic.trained_samples(summary["run_log_dir"])
    order = summary["data_order"]
    ids = [elastic.sample_id(r) for r in read_prepared(summary["prepared"]["path"])]
    sampler = elastic.GlobalOrderSampler(order["rows"], order["global_batch_size"], order["seed"])
    per_epoch = order["steps_per_epoch"]
    ok = sorted(trained) == list(range(1, steps_total + 1))
    for epoch in range(steps_total // per_epoch + 1):
        steps = [s for s in trained if (s - 1) // per_epoch == epoch]
        if not steps:
            continue
        got = Counter(i for s in steps for i in trained[s])
        full = len(steps) == per_epoch
        want = Counter(ids[i] for i in sampler.order(epoch)[: len(steps) * order["global_batch_size"]])
        ok &= got == want and (full or steps[-1] == steps_total)
    return trained, ok


def evidence(run: Run, reference: dict | None, steps: int = STEPS) -> dict:
    """What the run's own files say: the run log, exactly-once per epoch, losses vs the uninterrupted run."""
    from raytrain_align import elastic

    if run.proc.returncode != 0:
        raise AssertionError(f"run {run.name} failed ({run.proc.returncode}):\n" + "".join(run.lines[-80:]))
    summary = json.loads((run.out / "raytrain_align_run.json").read_text())
    logs = summary["run_log_dir"]
    starts = [r for r in elastic.read_jsonl(f"{logs}/{elastic.RUN_LOG}") if r["event"] == "start"]
    trained, exactly_once = trained_exactly_once(summary, steps)
    losses = {e["step"]: e["loss"] for e in summary["log_history"] if "loss" in e}
    record = {
        "scenario": run.name,
        "returncode": run.proc.returncode,
        "steps": summary["metrics"]["step"],
        "starts": starts,
        "restarts": len(starts) - 1,
        "trained_steps": sorted(trained),
        "samples_per_step": sorted({len(v) for v in trained.values()}),
        "exactly_once": exactly_once,
        "losses": losses,
        "final_world_size": summary["world_size"],
    }
    if reference is not None:
        ref = reference["losses"]
        record["max_loss_diff_vs_uninterrupted"] = max(abs(losses[s] - ref[s]) for s in ref)
        record["final_loss_rel_diff"] = abs(losses[steps] - ref[steps]) / ref[steps]
    return record


# ------------------------------------------------------------------------------------------- scenarios
def uninterrupted(address, storage, steps: int = STEPS):
    name = "reference" if steps == STEPS else f"reference-{steps}"
    run = Run(address, storage, name, workers="2", extra=("--set", f"max_steps={steps}"))
    run.finish()
    return evidence(run, None, steps)


FSDP = ("--accelerate-config", "recipes/accelerate_configs/fsdp.yaml")


def node_lost_and_back(c, nodes, address, storage, reference, backend="deepspeed"):
    """4 workers on 2 nodes; a node dies after the step-5 checkpoint -> 2 workers (same GBS, optimizer state
    resharded: ZeRO-3 through DeepSpeed's universal checkpoint, FSDP2 by torch distributed checkpoint); the node
    comes back -> 4 workers again."""
    name = "node-lost-and-back" + ("-fsdp" if backend == "fsdp" else "")
    # 1 s per step more: time for the returning raylet to register and Ray Train's resize check (every 5 s) to
    # see it before the 30 steps are over (a tiny step takes ~0.3 s here)
    run = Run(address, storage, name, extra=(*(FSDP if backend == "fsdp" else ()), "--set", "ray.callbacks=[benchmarks.faults:SlowSteps]"))
    run.wait_event("workers_formed", lambda e: e["world_size"] == 4)
    run.wait_step(SAVE_EVERY + 2)
    c.remove_node(nodes[1], allow_graceful=False)
    run.wait_resumed(world=2)
    run.wait_step(2 * SAVE_EVERY + 1)
    nodes[1] = add_node(c)
    run.wait_resumed(world=4)
    run.finish()
    return evidence(run, reference)


def node_drained(c, nodes, address, storage, reference):
    """A drain notice with a 60 s deadline (Ray's drain API, reason PREEMPTION, as a spot reclaim sends): the
    workers checkpoint at once and stop stepping; the node is then taken away and the run goes on at 2."""
    run = Run(address, storage, "node-drained")
    run.wait_event("workers_formed", lambda e: e["world_size"] == 4)
    run.wait_step(SAVE_EVERY + 2)
    _drain(address, nodes[1])
    preempted = run.wait_event("preemption")  # the emergency checkpoint is committed
    c.remove_node(nodes[1], allow_graceful=False)  # the reclaim
    run.wait_resumed(world=2)
    run.finish()
    nodes[1] = add_node(c)
    record = evidence(run, reference)
    record["emergency_checkpoint_step"] = preempted["step"]
    return record


def crash_during_checkpoint(c, nodes, address, storage, reference):
    """The last rank dies while the step-10 checkpoint is being written (before it is committed): the run
    resumes from step 5's, which must be whole."""
    run = Run(address, storage, "crash-during-checkpoint", workers="2",
              extra=("--set", f"ray.callbacks=[{{benchmarks.faults:CrashInSave: {{step: {2 * SAVE_EVERY}}}}}]"))
    run.wait_resumed()
    committed = sorted(p.name for p in (storage / f"{run.name}-tiny").glob("checkpoint-*"))
    run.finish()
    record = evidence(run, reference)
    record["checkpoints_in_storage_at_restart"] = committed
    return record


def driver_killed(c, nodes, address, storage, reference):
    """SIGKILL the driver (the CLI process) after the step-10 checkpoint, truncate one shard of the latest committed
    checkpoint while nothing runs, and launch the same command again: it resumes from the checkpoint before."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    run = Run(address, storage, "driver-killed", workers="2", extra=("--set", "save_total_limit=2"))
    run.wait_step(2 * SAVE_EVERY + 3)
    run.kill_driver()
    wait_until_idle(address)  # Ray ends the dead driver's workers; what they committed last is final now
    run_dir = storage / f"{run.name}-tiny"
    snapshot = json.loads((run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
    *_, before, latest = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    shard = max((run_dir / latest).rglob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    os.truncate(shard, shard.stat().st_size // 2)  # a half-written upload, a storage fault
    run.relaunch()
    run.finish()
    record = evidence(run, reference)
    record.update(damaged_checkpoint=latest, checkpoint_before=before)
    return record


FLAKY_WRITES = 3  # checkpoint-file writes that fail in the flaky-storage scenario


def flaky_uploads(c, nodes, address, storage, reference):
    """The first FLAKY_WRITES writes of checkpoint files fail with a reset connection, as an object store's uploads
    sometimes do (faults.FlakyFileSystem, an fsspec plugin installed on every node of the cluster): each file is
    sent again after 1, 2, 4 ... s, and the run neither restarts nor loses its previous checkpoint."""
    for i in range(FLAKY_WRITES):
        Path(os.environ["FSSPEC_FLAKY_TOKENS"], str(i)).touch()
    run = Run(address, storage, "flaky-uploads", workers="2", storage_uri=f"flaky://{storage}")
    run.finish()
    record = evidence(run, reference)
    record["failed_writes_retried"] = FLAKY_WRITES - len(os.listdir(os.environ["FSSPEC_FLAKY_TOKENS"]))
    assert record["restarts"] == 0 and record["failed_writes_retried"] == FLAKY_WRITES, record["starts"]
    return record


def kill_a_worker(address: str, rng) -> int:
    """SIGKILL one training worker process (a RayTrainWorker actor, found through Ray's state API); returns its pid."""
    from ray.util.state import list_actors

    with _no_token_auth():
        workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                              detail=True, raise_on_missing_output=False)
    pid = rng.choice(sorted(a.pid for a in workers))
    os.kill(pid, signal.SIGKILL)
    return pid


CHAOS_STEPS = 200
CHAOS_FAULTS = ("worker killed", "node removed", "node added back", "node drained", "crash while saving",
                "driver killed")


def chaos(c, nodes, address, storage, reference, steps: int = CHAOS_STEPS, save_every: int = 10, seed: int = 0,
          name: str = "chaos"):
    """One longer run, elastic 2..4 workers, with every fault of CHAOS_FAULTS in that order, each at a seeded random
    step of its own stretch of the run (or later), once the restarts of the faults before have loaded their
    checkpoints: one fault at a time, each restart with one cause. The crash while saving is a callback armed by a
    file at its turn; the drained node is taken away and then added back. `reference`: the uninterrupted run of as
    many steps."""
    import random

    rng = random.Random(seed)
    span = steps // (len(CHAOS_FAULTS) + 1)
    at = {f: rng.randint(i * span + 2, (i + 1) * span - 2) for i, f in enumerate(CHAOS_FAULTS)}
    arm = storage.parent / f"{name}-crash"
    run = Run(address, storage, name, extra=(
        "--max-failures", "10",  # the worker kill, the node loss, the crash (and the drained node's removal)
        "--set", f"max_steps={steps}", "--set", f"save_steps={save_every}", "--set", "save_total_limit=2",
        "--set", f"ray.callbacks=[{{benchmarks.faults:SlowSteps: {{seconds: 0.5}}}}, "
                 f"{{benchmarks.faults:CrashInSave: {{arm_file: '{arm}'}}}}]"))
    injected = []
    run.wait_for_start(0, world=4)
    for fault in CHAOS_FAULTS:
        injected.append({"fault": fault, "step": run.wait_step(at[fault])})
        before = len(run.starts())
        if fault == "worker killed":
            injected[-1]["pid"] = kill_a_worker(address, rng)
            run.wait_for_start(before, world=4)
        elif fault == "node removed":
            c.remove_node(nodes[1], allow_graceful=False)
            run.wait_for_start(before, world=2)
        elif fault == "node added back":
            nodes[1] = add_node(c)
            run.wait_for_start(before, world=4)  # Ray Train's resize check grows the group
        elif fault == "node drained":
            mark = time.time()
            _drain(address, nodes[1])
            run.wait_event("preemption", after=mark)
            c.remove_node(nodes[1], allow_graceful=False)
            run.wait_for_start(before, world=2)
            nodes[1] = add_node(c)
            injected.append({"fault": "node added back", "step": run.wait_step(0)})
            run.wait_for_start(len(run.starts()), world=4)
        elif fault == "crash while saving":  # at the next save
            arm.touch()
            fired = Path(f"{arm}.fired")
            run.wait_until(lambda: fired.exists() and fired.read_text() != "")
            injected[-1]["step"] = int(fired.read_text())
            run.wait_for_start(before, world=4)
        else:  # driver killed: the same command again, over the same storage
            run.kill_driver()
            run.relaunch()
    run.finish()
    record = evidence(run, reference, steps)
    record["injected"] = injected
    return record


def _drain(address: str, node) -> None:
    """Ray's drain API with reason PREEMPTION and a 60 s deadline, as a spot reclaim sends."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=address)
    accepted, why = gcs.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "spot instance reclaimed (fault_tolerance.py)", int(time.time() * 1000) + 60_000)
    assert accepted, why


SCENARIOS = {
    "node lost, then added back (4 -> 2 -> 4 workers)": node_lost_and_back,
    "FSDP2: node lost, then added back (4 -> 2 -> 4 workers)":
        lambda *a: node_lost_and_back(*a, backend="fsdp"),
    "node drained with a 60 s deadline (spot reclaim)": node_drained,
    "worker crash while a checkpoint is written": crash_during_checkpoint,
    "driver killed, latest checkpoint truncated, same command relaunched": driver_killed,
    "checkpoint uploads fail 3 times (a reset connection)": flaky_uploads,
    "chaos: 200 steps, 2..4 workers, all of the above and a worker killed": lambda c, nodes, address, storage, _: chaos(
        c, nodes, address, storage, uninterrupted(address, storage, CHAOS_STEPS)),
}


def table(records: list[dict]) -> str:
    head = ("| scenario | restarts: cause, world size | resumed from step | steps lost | recovery s | seconds lost "
            "| optimizer state after resume (max rel. diff) | every sample once | max loss diff vs uninterrupted "
            "| failed storage writes retried |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in records:
        again = r["starts"][1:]
        lines.append("| " + " | ".join([
            r["title"],
            "; ".join(f"{s['cause']}, {s['prev_world_size']} -> {s['world_size']}" for s in again),
            ", ".join(str(s["resumed_step"]) for s in again),
            ", ".join(str(s.get("steps_lost")) for s in again),
            ", ".join(f"{s.get('recovery_seconds', float('nan')):.1f}" for s in again),
            ", ".join(f"{s.get('seconds_lost', float('nan')):.1f}" for s in again),
            ", ".join(f"{s.get('optimizer_state_max_rel_diff', float('nan')):.1e}" for s in again),
            "yes" if r["exactly_once"] else "NO",
            f"{r['max_loss_diff_vs_uninterrupted']:.1e}",
            str(r.get("failed_writes_retried", 0)),
        ]) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--docs", default=str(REPO / "docs" / "fault-tolerance.md"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fault_tolerance-"))
    storage = work / "storage"
    import fsspec

    from benchmarks.faults import FlakyFileSystem, install_flaky_plugin

    os.environ.update(install_flaky_plugin(work, failures=0)[1])  # the cluster's raylets and drivers start with it
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)  # this process reads the run's files
    c, nodes = cluster()
    try:
        reference = uninterrupted(c.address, storage)
        records = []
        for title, fn in SCENARIOS.items():
            t0 = time.time()
            record = fn(c, nodes, c.address, storage, reference)
            record.update(title=title, wall_seconds=round(time.time() - t0, 1))
            records.append(record)
            print(f"{title}: {json.dumps({k: v for k, v in record.items() if k not in ('losses', 'trained_steps')})}", flush=True)
    finally:
        c.shutdown()
    import torch

    date = time.strftime("%Y-%m-%d")
    meta = {"command": "python -m benchmarks.fault_tolerance " + " ".join(argv or sys.argv[1:]), "date": date,
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
            "torch": torch.__version__, "settings": {"steps": STEPS, "save_steps": SAVE_EVERY, "global_batch": GBS}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fault_tolerance-{date}.json").write_text(json.dumps({**meta, "reference": reference, "records": records},
                                                                 indent=2, default=str))
    md = (f"Command: `{meta['command']}`  \nMachine: {meta['machine']}, torch {meta['torch']}  \nDate: {date}\n\n"
          + table(records))
    (out / f"fault_tolerance-{date}.md").write_text(md)
    docs = Path(args.docs)
    if docs.exists():
        text = docs.read_text()
        start, end = text.index("<!-- table -->"), text.index("<!-- /table -->")
        docs.write_text(text[: start + len("<!-- table -->")] + "\n" + md + text[end:])
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
