"""Fast tests of the pure logic under the slow end-to-end ones: elastic world sizes and gradient accumulation,
the world-size-independent sampler, worker ranges, handbook-style CLI overrides, restart causes, and the event stream jobs.py reads."""

import json

import pytest

from raytrain_align import elastic
from raytrain_align.cli import _handbook_overrides
from raytrain_align.errors import RecipeError
from raytrain_align.plan import worker_range

from .conftest import write_checkpoint


def test_valid_world_sizes_keep_the_global_batch_exact():
    assert elastic.valid_world_sizes(128, 1, 1, 8) == [1, 2, 4, 8]
    assert elastic.valid_world_sizes(96, 2, 2, 6) == [2, 3, 4, 6]
    assert elastic.valid_world_sizes(10, 4, 1, 4) == []
    assert elastic.grad_accum_for(128, 1, 64) == 2 and elastic.grad_accum_for(96, 2, 3) == 16
    with pytest.raises(RecipeError, match="not a multiple of per_device_train_batch_size x world size = 2 x 5"):
        elastic.grad_accum_for(96, 2, 5)


def test_sampler_order_depends_on_seed_and_epoch_not_on_world_size():
    s = elastic.GlobalOrderSampler(n=103, global_batch=8, seed=7)
    assert len(s) == 96  # the last 103 % 8 rows of each epoch's order wait for another epoch
    first, again = s.order(0), elastic.GlobalOrderSampler(103, 8, 7).order(0)
    assert first == again and len(set(first)) == 96 and max(first) < 103
    assert s.order(1) != first
    s.set_epoch(1)
    assert list(s) == s.order(1)
    assert elastic.GlobalOrderSampler(103, 16, 7).order(0)[:96] == first  # a wider global batch: same order
    with pytest.raises(RecipeError, match="fewer than one global batch"):
        elastic.GlobalOrderSampler(5, 8, 0)


@pytest.mark.parametrize("value, per_node, expected", [
    (None, 1, None), (4, 1, (4, 4)), ("2:4", 1, (2, 4)), ("1:2", 8, (8, 16)), ("3", 2, (6, 6))])
def test_worker_range(value, per_node, expected):
    assert worker_range("--nodes", value, per_node) == expected


@pytest.mark.parametrize("value, message", [("two", "must be N or MIN:MAX"), ("4:2", "need 1 <= MIN <= MAX"),
                                            ("0", "need 1 <= MIN <= MAX")])
def test_worker_range_refuses(value, message):
    with pytest.raises(RecipeError, match=message):
        worker_range("--nodes", value)


def test_handbook_style_overrides():
    assert _handbook_overrides(["--gradient_accumulation_steps", "16", "--packing", "--lr=1e-5"]) == [
        "gradient_accumulation_steps=16", "packing=true", "lr=1e-5"]
    with pytest.raises(RecipeError, match="unexpected argument 'oops'"):
        _handbook_overrides(["oops"])


def _start(logs, attempt, world, position=None, launch="L1"):
    return elastic.log_start(logs, attempt, world=world, gbs=8, grad_accum=8 // world, position=position,
                             launch_id=launch, optimizer_match=None, resharded=None)


def test_restart_causes_from_the_run_log(tmp_path):
    logs = str(tmp_path / "logs")
    assert _start(logs, "a0", 4)["cause"] == "start"
    elastic.heartbeat(logs, "a0", 12)
    pos = {"global_step": 10, "saved_unix": 0.0}
    shrink = _start(logs, "a1", 2, pos)
    assert shrink["cause"] == "shrink 4 -> 2 (workers lost)" and shrink["steps_lost"] == 2
    assert _start(logs, "a2", 4, pos)["cause"] == "grow 2 -> 4 (resources added)"
    assert _start(logs, "a3", 4, pos)["cause"] == "worker group restart after a failure"
    drained = {**pos, "reason": "preemption", "attempt": "a3"}  # a3's emergency checkpoint
    assert _start(logs, "a4", 4, drained)["cause"] == "preemption (node drain)"
    assert _start(logs, "a5", 4, drained)["cause"] == "worker group restart after a failure"  # resumed again
    assert _start(logs, "a6", 4, pos, launch="L2")["cause"] == "driver relaunch"
    rows = [json.loads(line) for line in (tmp_path / "logs" / elastic.RUN_LOG).read_text().splitlines()]
    assert [r["attempt"] for r in rows if r["event"] == "start"] == ["a0", "a1", "a2", "a3", "a4", "a5", "a6"]


def test_set_values_parse_as_a_command_line_means_them():
    from raytrain_align.recipe import parse_set

    assert parse_set(["learning_rate=1e-5", "lr2=-2.5E+3", "save_strategy=no", "packing=true", "steps=10",
                      "name=run1", "x=1.0e-6"]) == {
        "learning_rate": 1e-5, "lr2": -2500.0, "save_strategy": "no", "packing": True, "steps": 10, "name": "run1",
        "x": 1e-6}


def test_recipe_files_named_alike_get_the_handbook_run_names():
    """The handbook names most files config_full.yaml: runs take the name from output_dir, so a DPO run in the
    same storage as the SFT run is not mistaken for it (and re-exported instead of trained)."""
    from raytrain_align.plan import default_run_name
    from raytrain_align.recipe import Recipe

    def recipe(name, output_dir=None):
        return Recipe(name=name, path=None, method="sft", training={"output_dir": output_dir} if output_dir else {})

    assert default_run_name(recipe("config_full", "data/zephyr-7b-sft-full")) == "zephyr-7b-sft-full"
    assert default_run_name(recipe("config_full", "data/zephyr-7b-dpo-full")) == "zephyr-7b-dpo-full"
    assert default_run_name(recipe("config_full")) == "config_full"
    assert default_run_name(recipe("sft_mid", "data/SmolLM3-Mid")) == "sft_mid"  # registered: its own name


def test_callback_entries_normalize_to_name_and_keywords():
    from raytrain_align.callbacks import describe, normalize

    specs = normalize(["pkg.mod:Logger", {"pkg.mod:Stop": {"patience": 3}}, {"pkg.mod:Bare": None}])
    assert specs == [{"name": "pkg.mod:Logger", "kwargs": {}}, {"name": "pkg.mod:Stop", "kwargs": {"patience": 3}},
                     {"name": "pkg.mod:Bare", "kwargs": {}}]
    assert describe(specs) == "pkg.mod:Logger, pkg.mod:Stop(patience=3), pkg.mod:Bare"
    assert normalize("pkg.mod:One") == [{"name": "pkg.mod:One", "kwargs": {}}]
    assert normalize(None) == []
    for bad in (["pkg.mod"], [":Name"], ["pkg:"], [{"a:B": 1}], [{"a:B": {}, "c:D": {}}], [3]):
        with pytest.raises(RecipeError, match="is not a callback"):
            normalize(bad)


def test_elastic_restarts_wait_15s_for_their_workers_fixed_runs_ray_default():
    """A restart sized from a node Ray has not yet declared dead waits this long before sizing again."""
    from raytrain_align.plan import build_plan
    from raytrain_align.recipe import load_recipe, parse_set

    def plan(workers, *sets):
        overrides = parse_set(["ray.global_batch_size=12", *sets])
        return build_plan(load_recipe("sft_mid", overrides, None), tiny=True, num_workers=workers,
                          explicit=frozenset(overrides))

    assert plan("2:4").restart_wait_s == 15.0 and plan("2").restart_wait_s == 60.0
    assert plan("2:4", "ray.restart_wait_s=40").restart_wait_s == 40.0


@pytest.mark.parametrize("damage, problem", [
    (None, None),
    ("truncated", "global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt is 400 bytes, 1,000 when written"),
    ("shard deleted", "global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
    ("position unreadable", "raytrain_align_position.json is unreadable (JSONDecodeError)")])
def test_a_damaged_checkpoint_is_told_from_a_whole_one_by_its_file_lists(tmp_path, damage, problem):
    import pyarrow.fs

    ckpt = write_checkpoint(tmp_path / "run", 10, damage)
    assert elastic.checkpoint_problem(pyarrow.fs.LocalFileSystem(), str(ckpt)) == problem


def test_a_relaunch_goes_on_while_one_committed_checkpoint_is_whole(tmp_path):
    from types import SimpleNamespace

    from raytrain_align.launch import check_checkpoints

    plan = SimpleNamespace(storage_path=str(tmp_path), run_name="run")
    check_checkpoints(plan)  # no run yet
    write_checkpoint(tmp_path / "run", 5)
    write_checkpoint(tmp_path / "run", 10, "truncated")
    check_checkpoints(plan)  # the workers fall back to checkpoint-0000005 (train._whole_checkpoint)
    write_checkpoint(tmp_path / "run", 15, "gone")
    with pytest.raises(RecipeError, match="its committed checkpoint-0000015 is gone"):
        check_checkpoints(plan)


def test_repair_universal_load_splits_shared_steps_and_restores_groups():
    """The state deepspeed 0.19.8's ZeRO-3 universal load leaves (benchmarks/zero3_universal_resume.py), repaired."""
    import torch

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    saved = elastic.param_groups(opt)
    step = torch.tensor(7.0)
    for p in (a, b):
        opt.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    opt.param_groups[1]["weight_decay"] = 0.1  # the first group's hyperparameters copied onto every group
    repaired = elastic.repair_universal_load(opt, json.loads(json.dumps(saved)))
    assert repaired == ["2 sub-groups' shared Adam step counter split", "1 parameter-group hyperparameter(s) restored"]
    assert opt.state[a]["step"] is not opt.state[b]["step"] and float(opt.state[b]["step"]) == 7.0
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0] and opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert elastic.repair_universal_load(opt, saved) == []  # nothing left to repair


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    """benchmarks/faults.py's FlakyFileSystem as the `flaky` protocol in this process, its failures in `tokens`."""
    import fsspec

    from benchmarks.faults import FlakyFileSystem
    from raytrain_align import storage

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0, 0, 0))
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    monkeypatch.setitem(fsspec.config.conf, "flaky", {"tokens": str(tokens)})  # what FSSPEC_FLAKY_TOKENS gives
    return lambda n: [(tokens / str(i)).touch() for i in range(n)] and tokens


def _local_checkpoint(tmp_path):
    src = tmp_path / "local" / "checkpoint-5"
    (src / "global_step5").mkdir(parents=True)
    (src / "global_step5" / "shard.pt").write_bytes(bytes(range(256)) * 1000)
    (src / "trainer_state.json").write_text("{}")
    return src


def test_a_checkpoint_upload_that_fails_transiently_is_sent_again_file_by_file(tmp_path, flaky, capsys):
    from raytrain_align import storage

    tokens, src = flaky(3), _local_checkpoint(tmp_path)  # 3 failures for a retry budget of 3 per file
    fs, root = storage.filesystem(f"flaky://{tmp_path}/bucket/run/checkpoint-5")
    storage.upload_dir(str(src), fs, root)
    for rel in ("global_step5/shard.pt", "trainer_state.json"):
        assert (tmp_path / "bucket/run/checkpoint-5" / rel).read_bytes() == (src / rel).read_bytes()
    assert list(tokens.iterdir()) == []
    assert capsys.readouterr().err.count("storage       uploading ") == 3


def test_an_upload_that_keeps_failing_raises_and_a_permanent_error_is_not_retried(tmp_path, flaky, capsys):
    from raytrain_align import storage

    flaky(10)
    fs, root = storage.filesystem(f"flaky://{tmp_path}/bucket/run/checkpoint-5")
    with pytest.raises(ConnectionResetError, match="injected"):
        storage.upload_dir(str(_local_checkpoint(tmp_path)), fs, root)
    assert capsys.readouterr().err.count("trying again") == 3  # RETRY_DELAYS_S, then the error stands
    import errno

    assert storage.transient(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert not storage.transient(PermissionError(errno.EACCES, "denied"))
    assert not storage.transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not storage.transient(ValueError("not an OSError"))


@pytest.mark.parametrize("training, kept", [
    ({}, 2), ({"save_total_limit": 1}, 2), ({"save_total_limit": 3}, 4), ({"save_strategy": "no"}, 0),
    ({"save_strategy": "epoch", "save_total_limit": 2}, 3),
])
def test_storage_space_counts_the_checkpoints_the_recipe_keeps(training, kept):
    from raytrain_align.launch import checkpoints_kept

    assert checkpoints_kept(training) == kept


# ------------------------------------------------------------------------------------------- event stream
def _emit_a_run(storage, run: str, job: str, restarts: int) -> None:
    """What a driver and its rank 0 record for one launch with `restarts` worker-group restarts."""
    from raytrain_align.events import EventLog

    driver = EventLog(str(storage), run, f"driver-{job}", launch_id=f"L-{job}")
    driver.emit("launch", run=run, storage=str(storage), recipe="sft_mid", job=job)
    for attempt in range(restarts + 1):
        rank0 = EventLog(str(storage), run, f"rank0-{job}-{attempt}", launch_id=f"L-{job}", attempt=str(attempt))
        rank0.emit("workers_formed", world_size=2, nodes=1, process_group="gloo", collective_timeout_s=60, rows=10,
                   pids=[11, 12])
        for step in (5, 10):
            rank0.emit("progress", step=step, max_steps=10, loss=1.0 / step, learning_rate=1e-3, tokens_per_s=None,
                       eta_s=0.0)


def test_events_round_trip_each_writer_in_files_of_its_own(tmp_path, monkeypatch, capsys):
    from raytrain_align import events

    monkeypatch.setattr(events, "LINES_PER_FILE", 3)
    log = events.EventLog(str(tmp_path), "r", "rank0-a", launch_id="L", attempt="a")
    for step in range(1, 8):
        log.emit("progress", step=step, max_steps=7, loss=2.0, learning_rate=1e-3, tokens_per_s=1234.5, eta_s=1.0)
    files = sorted((tmp_path / "r" / "raytrain_align" / "events").iterdir())
    assert [len(f.read_text().splitlines()) for f in files] == [3, 3, 1]  # a writer holds one file's lines at most
    got = events.read(str(tmp_path), "r", {"progress"})
    assert [e["step"] for e in got] == list(range(1, 8)) and {e["launch_id"] for e in got} == {"L"}
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "step      7/7 (100%)  loss 2.0000  lr 1.00e-03  1,234 tok/s  eta 1s"  # rendered from the event
    assert events.read(str(tmp_path), "no-such-run") == []


def test_every_event_kind_renders_or_stays_silent_on_purpose():
    from dataclasses import asdict

    from raytrain_align import events
    from raytrain_align.prepare import Prepared

    stamp = {"unix": 0.0, "launch_id": "L", "attempt": "a"}  # what every writer adds
    prepared = Prepared(path="/s/prepared/k/train", key="k", method="sft", rows_in=10, rows_out=4, tokens=100,
                        loss_tokens=60, fill_ratio=0.9, seconds=1.5, nodes=2, finished_at="12:00:00")
    samples = {
        "launch": {"run": "r", "storage": "/s", "recipe": "sft_mid", "job": None},
        "already_finished": {"run": "r", "storage": "/s"},
        "data_prepared": {k: v for k, v in asdict(prepared).items() if k != "spec"},
        "train_submitted": {"run": "r", "storage": "/s", "backend": "deepspeed", "workers": "2"},
        "workers_formed": {"world_size": 2, "nodes": 1, "process_group": "gloo", "collective_timeout_s": 60,
                           "rows": 4, "pids": [1, 2]},
        "checkpoints_skipped": {"damaged": ["checkpoint-0000010: a shard is missing"], "resumed_from": "checkpoint-0000005"},
        "start": {"cause": "start", "resumed_step": 0, "world_size": 2, "gradient_accumulation_steps": 1,
                  "global_batch_size": 2},
        "training": {"max_steps": 10},
        "progress": {"step": 1, "max_steps": 10, "loss": 1.0, "learning_rate": 1e-3, "tokens_per_s": None, "eta_s": 9.0},
        "checkpoint_committed": {"step": 5, "name": "checkpoint-0000005", "commit_seconds": 0.1, "reason": "save"},
        "checkpoint_uploading": {"step": 5, "name": "checkpoint-0000005"},
        "preemption": {"nodes": ["abcdef0123"], "ranks": [1], "deadline_unix": None, "step": 7},
        "exported": {"step": 10, "checkpoint": "final_model"},
        "finished": {"output_dir": "/m", "steps": 10},
    }
    assert set(samples) == set(events.RENDER)
    lines = {kind: events.render({"event": kind, **stamp, **fields}) for kind, fields in samples.items()}
    assert lines["data_prepared"].startswith("data          10 rows -> 4 sequences, 100 tokens (60 in the loss)")
    assert lines["workers_formed"].endswith("world 2, gloo, collective timeout 60s; data already prepared (4 rows)")
    assert "drain by ?; checkpoint at step 7 committed" in lines["preemption"]

    start = {"event": "start", "unix": 0.0, "cause": "shrink 4 -> 2 (workers lost)", "resumed_step": 10,
             "world_size": 2, "gradient_accumulation_steps": 4, "global_batch_size": 8, "steps_lost": 3,
             "optimizer_state_max_rel_diff": 0.0}
    assert events.render(start) == ("resume        shrink 4 -> 2 (workers lost): from step 10 at world 2 (grad-acc 4, "
                                    "GBS 8), 3 step(s) lost; optimizer state kept")
    assert events.render({**start, "cause": "start"}) is None
    assert events.render({"event": "launch", "unix": 0.0}) is None
    with pytest.raises(KeyError):  # a kind nobody declared is a bug, not a silent line
        events.render({"event": "no-such-kind", "unix": 0.0})


def test_jobs_finds_runs_launches_and_restarts_from_the_stream(tmp_path):
    from raytrain_align import jobs

    _emit_a_run(tmp_path, "first", "job-1", restarts=0)
    _emit_a_run(tmp_path, "second", "job-2", restarts=2)
    _emit_a_run(tmp_path, "second", "job-3", restarts=0)  # relaunched
    seen = {launch["job"]: launch for launch in jobs.launches(str(tmp_path))}
    assert {j: (launch["run"], launch["sessions"]) for j, launch in seen.items()} == {
        "job-1": ("first", 1), "job-2": ("second", 3), "job-3": ("second", 1)}
    one = jobs.progress(str(tmp_path), "second", "L-job-3")
    assert list(one.step) == [5, 10] and list(jobs.progress(str(tmp_path), "second").step) == [5, 10] * 4
