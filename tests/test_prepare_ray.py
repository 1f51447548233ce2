"""Data preparation through real Ray Data on a 2-node local cluster: exact TRL parity of the distributed
pipeline (packing included), the no-timeout property, both nodes used, and the cache's reuse and atomicity."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from raytrain_align import events, jobs, mixture_order, prepare, sources, tiny, tokenize_blocks

from . import prep_data
from .conftest import REPO, run_cli
from .test_prepare import SMOL, trl_prepared

pytestmark = pytest.mark.slow

READ_TASK = "MapBatches(read_fragment)"  # Ray Data names a task after its operator
TOKENIZE_ACTOR = "MapWorker(MapBatches(TokenizeActor))"


@pytest.fixture(scope="module")
def ray_client(two_nodes):
    import ray

    from raytrain_align import launch

    os.environ["RAY_ADDRESS"] = two_nodes
    try:
        launch.init_ray()
        yield ray
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)


def _prepare_rows(rows, out, method, tok_dir, training, tmp_path):
    """`rows` as a parquet file of several row groups, read by Ray Data read tasks in their own order and
    tokenized by the actor pool; returns the train split's counts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"{method}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=300)
    srcs = sources.resolve([{"id": str(path)}])
    order = mixture_order.Order(np.arange(len(rows)), None, [0])
    return tokenize_blocks.tokenize(sources.fragments(srcs, order), {0: len(rows)}, str(out), method, tok_dir, training, {},
                            log=lambda _: None)[0]


def test_ray_data_pipeline_equals_trl(ray_client, tmp_path, monkeypatch):
    """2,500 awkward rows read by read tasks and packed across Ray Data blocks on 2 nodes == what TRL's
    SFTTrainer prepares from the same rows in one process; the same for DPO pairs. Ray's own task and actor
    records show read tasks and tokenize actors on both nodes."""
    from ray.util import state
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(sources, "FRAGMENT_BYTES", 1)  # a read task per row group: 9 of them
    assets = tiny.materialize(tmp_path / "assets", SMOL)
    tok_dir = str(tiny.model_dir(assets, SMOL))
    model = AutoModelForCausalLM.from_pretrained(tok_dir)

    rows = prep_data.tricky_messages(2500)
    training = {"chat_template": prep_data.THINK_TEMPLATE, "assistant_only_loss": True, "packing": True, "max_length": 256}
    stats = _prepare_rows(rows, tmp_path / "sft", "sft", tok_dir, training, tmp_path)
    assert stats["rows"] == 2500 and not stats["drops"]
    ours = prepare.read_prepared(str(tmp_path / "sft" / "train"))
    theirs = trl_prepared("sft", rows, tok_dir, model, tmp_path, training)
    for col in ("input_ids", "labels", "seq_lengths"):
        assert ours[col] == theirs[col], col
    nodes = {n.node_id for n in state.list_nodes()}
    read_nodes = {t.node_id for t in state.list_tasks(filters=[("name", "=", READ_TASK)], limit=10_000, detail=True)
                  if t.node_id}
    actor_nodes = {a.node_id for a in state.list_actors(filters=[("class_name", "=", TOKENIZE_ACTOR)], limit=10_000, detail=True)
                   if a.node_id}  # an actor of the pool that was never placed has no node
    assert len(nodes) == 2 and read_nodes == nodes and actor_nodes == nodes, (read_nodes, actor_nodes)

    pairs = prep_data.preferences(300)
    training = {"chat_template": prep_data.THINK_TEMPLATE, "max_length": 64}
    _prepare_rows(pairs, tmp_path / "dpo", "dpo", tok_dir, training, tmp_path)
    ours = prepare.read_prepared(str(tmp_path / "dpo" / "train"))
    theirs = trl_prepared("dpo", pairs, tok_dir, model, tmp_path, training)
    assert len(ours) == len(theirs) < 300
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[col] == theirs[col], col


N_ROWS = 60_000  # 30-60 s of preparation on 2 cores: about twice the 15 s collective timeout or more


@pytest.fixture(scope="module")
def slow_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow_prep")
    rng = random.Random(7)
    with open(root / "sums.jsonl", "w") as f:
        for _ in range(N_ROWS):
            a, b = rng.randrange(10, 1000), rng.randrange(10, 1000)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}) + "\n")
    recipe = root / "sums.yaml"
    recipe.write_text(
        "model_name_or_path: HuggingFaceTB/SmolLM3-3B\n"
        f"dataset_mixture:\n  datasets:\n    - id: {root / 'sums.jsonl'}\n  seed: 0\n"
        "packing: true\nmax_length: 512\nper_device_train_batch_size: 2\nmax_steps: 3\nsave_strategy: 'no'\n"
        "ddp_timeout: 15\nrun_name: sums\n"
    )
    return root, recipe


@pytest.fixture(scope="module")
def slow_run(two_nodes, slow_recipe):
    root, recipe = slow_recipe
    storage = root / "storage"
    proc = run_cli([str(recipe), "--tiny", "--storage", str(storage), "--output-dir", str(root / "model")],
                   env_extra={"RAY_ADDRESS": two_nodes})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    manifests = list((storage / "prepared").glob("*/manifest.json"))
    assert len(manifests) == 1
    return proc, storage, json.loads(manifests[0].read_text())


def test_no_collective_waits_on_data(slow_run):
    """Preparation took longer than the collective timeout, the run still succeeded, and the process group
    was formed only after preparation had finished."""
    proc, storage, manifest = slow_run
    assert manifest["seconds"] > 15, f"preparation took {manifest['seconds']}s: make the dataset larger for this machine"
    (run,) = [launch["run"] for launch in jobs.launches(str(storage))]
    seen = events.read(str(storage), run, {"data_prepared", "workers_formed"})
    assert [e["event"] for e in seen] == ["data_prepared", "workers_formed"], seen  # prepared, then the group formed
    formed = seen[1]
    assert formed["world_size"] == 2 and formed["process_group"] == "gloo" and formed["collective_timeout_s"] == 15
    assert "steps" in proc.stdout and "Traceback" not in proc.stderr


def test_preparation_used_both_nodes(slow_run):
    _, _, manifest = slow_run
    assert manifest["nodes"] == 2
    assert manifest["rows_in"] == N_ROWS and manifest["drops"] == {}
    assert 0.9 < manifest["fill_ratio"] <= 1.0


def test_cache_reused_and_killed_preparation_leaves_nothing(two_nodes, slow_recipe, slow_run):
    root, recipe = slow_recipe
    _, storage, manifest = slow_run
    env = {"RAY_ADDRESS": two_nodes}
    again = run_cli(["prepare", str(recipe), "--tiny", "--storage", str(storage), "--json"], env_extra=env)
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads(again.stdout[again.stdout.index("{"):])
    assert reused["reused"] is True and reused["key"] == manifest["key"]
    assert "TokenizeActor" not in again.stdout + again.stderr  # no Ray Data actor started: nothing tokenized

    # A preparation with another chat template (so another key), killed mid-way.
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    prepared = storage / "prepared"
    log = root / "killed-prepare.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raytrain_align", "prepare", str(recipe), "--tiny", "--storage", str(storage),
             "--set", f"chat_template={template}"],
            cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 600
        # tokenizing is under way: the temp folder holds a shard beside its owner file
        while not any(f.name != "owner.json" for tmp in prepared.glob(".*.tmp-*") for f in tmp.rglob("*") if f.is_file()):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    finished = sorted(p.name for p in prepared.iterdir() if not p.name.startswith("."))
    leftovers = [p.name for p in prepared.iterdir() if p.name.startswith(".")]
    assert finished == [manifest["key"]]  # no entry for the killed preparation
    assert len(leftovers) == 1 and not leftovers[0].startswith(f".{manifest['key']}")  # its key differs
    assert not (prepared / leftovers[0] / "manifest.json").exists()

    cleanup = run_cli(["prepare", str(recipe), "--tiny", "--storage", str(storage)], env_extra=env)
    assert cleanup.returncode == 0
    assert "left half-written by a preparation that was killed" in cleanup.stdout
    assert [p.name for p in prepared.iterdir()] == [manifest["key"]]


def test_object_store_cache(ray_client, tmp_path, monkeypatch):
    """Storage given as a URI (s3://... on a cluster without a shared folder; file:// here, through the same
    pyarrow-filesystem code): shards go to `<key>/attempt-<id>/`, the manifest written last commits them, a
    second preparation reuses them, and reading through the URI gives what a local-folder preparation gives."""
    from raytrain_align.plan import build_plan
    from raytrain_align.recipe import load_recipe

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # tiny assets go to ~/.cache under remote storage
    uri = f"file://{tmp_path}/bucket/runs"
    plans = {where: build_plan(load_recipe("sft_mid"), tiny=True, storage=storage)
             for where, storage in (("remote", uri), ("local", str(tmp_path / "local")))}
    assert plans["remote"].storage_path == uri
    for plan in plans.values():
        tiny.materialize(tiny.assets_dir(plan.storage_path), plan.recipe_model)
    assert tiny.assets_dir(uri).is_relative_to(tmp_path / "home")

    remote = prepare.prepare(plans["remote"], log=lambda _: None)
    assert remote.path.startswith(f"{uri}/prepared/{remote.key}/attempt-") and not remote.reused
    key_dir = tmp_path / "bucket" / "runs" / "prepared" / remote.key
    assert sorted(p.name for p in key_dir.iterdir()) == [remote.path.split("/")[-2], "manifest.json"]
    again = prepare.prepare(plans["remote"], log=lambda _: None)
    assert again.reused and again.path == remote.path

    local = prepare.prepare(plans["local"], log=lambda _: None)
    assert (remote.rows_out, remote.tokens) == (local.rows_out, local.tokens)
    ours, theirs = prepare.read_prepared(remote.path), prepare.read_prepared(local.path)
    assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
