"""Elastic and fault-tolerant training on a real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`:
a head without CPUs plus 2-CPU raylets, nodes removed, drained and added for real), tiny ZeRO-3 SFT over gloo.
The scenarios are `benchmarks/fault_tolerance.py`'s (which writes docs/fault-tolerance.md from the same records):
ZeRO-3 and FSDP2 losing a node and getting it back, a drain, a crash while saving, the driver killed and
relaunched over a damaged latest checkpoint, and (opt-in) a chaos run with every fault in one run. Here
each one is asserted: restart cause and world sizes, global batch kept, optimizer state equal after the
resume (digest from the shards), every sample of each epoch trained exactly once (the per-sample log), the loss
continuing the uninterrupted run's curve, the final model loading."""

import os

import pytest

from benchmarks import fault_tolerance as ft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c, nodes = ft.cluster()
    yield c, nodes
    c.shutdown()


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("elastic") / "storage"  # one data preparation for every run below


@pytest.fixture(scope="module")
def reference(cluster, storage):
    ref = ft.uninterrupted(cluster[0].address, storage)
    assert ref["restarts"] == 0 and ref["exactly_once"] and ref["samples_per_step"] == [ft.GBS]
    return ref


def _common(r, reference):
    """What every scenario must show."""
    assert r["returncode"] == 0 and r["steps"] == ft.STEPS
    assert r["exactly_once"], r["trained_steps"]  # each epoch's rows, each once, across every attempt
    assert r["samples_per_step"] == [ft.GBS]  # every optimizer step had the full global batch
    for start in r["starts"]:
        assert start["global_batch_size"] == ft.GBS
        assert start["gradient_accumulation_steps"] * start["world_size"] == ft.GBS
    losses, ref = r["losses"], reference["losses"]
    for start in r["starts"][1:]:
        s = start["resumed_step"]
        assert s > 0 and s % ft.SAVE_EVERY == 0 or start["cause"].startswith("preemption")
        assert start["optimizer_state_max_rel_diff"] < 1e-9  # Adam moments + master weights as saved
        # the curve goes on from where it was, far below the initial loss a fresh optimizer or a rewound data
        # position would give
        assert 0.2 < losses[1] - losses[s + 1], (s, losses[s + 1], ref[s + 1])
    # and it is the uninterrupted run's curve: to the last digit at one world size; through a reshard (another
    # reduction order at world 4, DeepSpeed's universal format repaired by elastic.repair_universal_load, or
    # torch distributed checkpoint) within 1e-4 over every step
    exact = all(s["world_size"] == 2 for s in r["starts"])
    assert r["max_loss_diff_vs_uninterrupted"] < (1e-5 if exact else 1e-4), r["max_loss_diff_vs_uninterrupted"]


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_node_lost_then_added_back_keeps_batch_and_optimizer(cluster, storage, reference, backend):
    c, nodes = cluster
    r = ft.node_lost_and_back(c, nodes, c.address, storage, reference, backend=backend)
    # FSDP2 is compared with the ZeRO-3 uninterrupted run: their losses agree within 1e-3 (tests/test_fsdp.py)
    _common(r, reference)
    first, shrink, grow = r["starts"]
    assert first["world_size"] == 4 and first["gradient_accumulation_steps"] == 3
    assert shrink["cause"] == "shrink 4 -> 2 (workers lost)" and shrink["gradient_accumulation_steps"] == 6
    assert grow["cause"] == "grow 2 -> 4 (resources added)" and grow["world_size"] == 4
    for start in (shrink, grow):
        if backend == "deepspeed":  # deepspeed refuses a ZeRO-3 checkpoint of another world size: universal format
            assert "via universal checkpoint" in start["resharded"]
            # deepspeed's universal load shares one Adam step tensor between the sub-groups; split on every rank
            assert "shared Adam step counter split" in start["resharded"]
        else:  # torch distributed checkpoint: the sharded model and optimizer state reshard on load
            assert start["resharded"].startswith("fsdp 4 -> 2" if start is shrink else "fsdp 2 -> 4")
    assert r["final_world_size"] == 4


def test_node_drain_takes_an_emergency_checkpoint_and_loses_no_step(cluster, storage, reference):
    c, nodes = cluster
    r = ft.node_drained(c, nodes, c.address, storage, reference)
    _common(r, reference)
    assert r["restarts"] == 1
    restart = r["starts"][1]
    assert restart["cause"] == "preemption (node drain)" and restart["world_size"] == 2
    assert restart["resumed_step"] == r["emergency_checkpoint_step"] == restart["prev_last_step"]
    assert restart["steps_lost"] == 0


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(cluster, storage, reference):
    c, nodes = cluster
    r = ft.crash_during_checkpoint(c, nodes, c.address, storage, reference)
    _common(r, reference)
    restart = r["starts"][1]
    assert restart["cause"] == "worker group restart after a failure"
    assert restart["resumed_step"] == ft.SAVE_EVERY  # the step-10 checkpoint never became the latest
    assert f"checkpoint-{2 * ft.SAVE_EVERY:07d}" not in r["checkpoints_in_storage_at_restart"]


def test_killed_driver_relaunched_continues_from_the_last_whole_checkpoint(cluster, storage, reference):
    c, nodes = cluster
    r = ft.driver_killed(c, nodes, c.address, storage, reference)
    _common(r, reference)
    restart = r["starts"][1]
    assert restart["cause"] == "driver relaunch"
    # the latest checkpoint had a truncated shard: skipped with what was wrong, the one before it resumed
    assert restart["resumed_step"] == int(r["checkpoint_before"].split("-")[1]) >= ft.SAVE_EVERY
    [skipped] = restart["damaged_checkpoints_skipped"]
    assert skipped.startswith(f"{r['damaged_checkpoint']}: global_step") and "bytes, " in skipped


@pytest.fixture(scope="module")
def chaos_reference(cluster, storage):
    return ft.uninterrupted(cluster[0].address, storage, CHAOS_STEPS)


CHAOS_STEPS = 120


# Opt-in (RAYTRAIN_ALIGN_CHAOS=1): in a clean-clone run on 2 cores the run had not grown back to 4 workers when the
# drain came, so the drained node held no worker and no emergency checkpoint followed; the harness counted resume
# lines, which a fault costing two restarts runs ahead of, and now waits for run-log states (docs/fault-tolerance.md).
# Each fault it combines is asserted on its own above and in the driver test; benchmarks/fault_tolerance.py runs it whole.
@pytest.mark.skipif(not os.environ.get("RAYTRAIN_ALIGN_CHAOS"), reason="opt-in: RAYTRAIN_ALIGN_CHAOS=1")
def test_chaos_run_survives_every_fault_in_one_run(cluster, storage, chaos_reference):
    """benchmarks/fault_tolerance.py's chaos run, shorter: a worker killed, a node removed and added back, a node
    drained (then removed and added back), a worker crashing while a checkpoint is written and the driver killed
    and relaunched, at seeded random steps of one elastic 2..4-worker run."""
    c, nodes = cluster
    r = ft.chaos(c, nodes, c.address, storage, chaos_reference, steps=CHAOS_STEPS, save_every=10, seed=1)
    check_chaos(r, CHAOS_STEPS, save_every=10)


def check_chaos(r: dict, steps: int, save_every: int) -> None:
    """What a chaos run must show (also applied to the benchmark's 200-step record)."""
    summary = {k: r[k] for k in ("injected", "restarts")} | {"causes": [s["cause"] for s in r["starts"]]}
    assert r["returncode"] == 0 and r["steps"] == steps
    assert r["exactly_once"], r["trained_steps"]
    assert r["samples_per_step"] == [ft.GBS]
    causes = [s["cause"] for s in r["starts"][1:]]
    for cause in ("worker group restart after a failure", "shrink 4 -> 2 (workers lost)", "grow 2 -> 4 (resources added)",
                  "preemption (node drain)", "driver relaunch"):
        assert cause in causes, (cause, summary)
    assert len(causes) >= 7, summary  # the run log lists every restart
    crash = next(f["step"] for f in r["injected"] if f["fault"] == "crash while saving")
    emergency = {s["resumed_step"] for s in r["starts"] if s["cause"] == "preemption (node drain)"}
    first = r["starts"][0]
    assert first["world_size"] == 4 and first["gradient_accumulation_steps"] == 3
    for start in r["starts"][1:]:
        assert start["global_batch_size"] == ft.GBS
        assert start["gradient_accumulation_steps"] * start["world_size"] == ft.GBS
        if start["resumed_step"]:  # (a fault before the first checkpoint starts over)
            assert start["optimizer_state_max_rel_diff"] < 1e-9, summary  # Adam moments + master weights as saved
        if start["cause"] == "preemption (node drain)":  # the emergency checkpoint: no step lost
            assert start["steps_lost"] == 0 and start["resumed_step"] == start["prev_last_step"], summary
        else:  # a committed checkpoint: a save step, or the drain's emergency one
            assert start["resumed_step"] % save_every == 0 or start["resumed_step"] in emergency, summary
        if start.get("resharded"):  # a checkpoint of another world size: deepspeed's universal format, repaired on
            assert "via universal checkpoint" in start["resharded"]  # every rank (elastic.py)
            assert "shared Adam step counter split" in start["resharded"]
    for change in ("shrink", "grow"):  # (a grow may resume from a checkpoint saved at its own size: no reshard)
        assert any(s["cause"].startswith(change) and s.get("resharded") for s in r["starts"]), (change, summary)
    # the save the crash cut short never became the checkpoint a restart resumed from: the one before it did
    assert any(s["cause"] in ("worker group restart after a failure", "shrink 4 -> 2 (workers lost)")
               and crash - save_every <= s["resumed_step"] < crash for s in r["starts"][1:]), (crash, summary)
    assert r["final_world_size"] == 4
    assert r["max_loss_diff_vs_uninterrupted"] < 1e-4 and r["final_loss_rel_diff"] < 0.02, summary
