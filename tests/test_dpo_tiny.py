"""`python -m raytrain_align dpo_apo_zero --tiny` end to end: Ray Data prepares the preference pairs with
TRL's DPO preparation, 2 Ray Train workers run TRL's DPOTrainer (loss apo_zero) under DeepSpeed ZeRO-3
with a ZeRO-3-partitioned reference model, and the exported model prefers the right answers more often."""

import json

import pytest

from raytrain_align import tiny

from .conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_run(ray_address, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_tiny")
    storage, out = root / "storage", root / "model"
    proc = run_cli(["dpo_apo_zero", "--tiny", "--storage", str(storage), "--output-dir", str(out)],
                   env_extra={"RAY_ADDRESS": ray_address})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, storage, out


def test_dpo_under_zero3_with_partitioned_reference(dpo_run):
    _, _, out = dpo_run
    run = json.loads((out / "raytrain_align_run.json").read_text())
    facts = run["facts"]
    assert run["world_size"] == 2 and facts["zero_stage"] == 3 and facts["params_partitioned"]
    assert facts["ref_engine"] == "DeepSpeedEngine" and facts["ref_params_partitioned"] and facts["ref_optimizer"] == "DeepSpeedZeRoOffload"
    assert run["prepared"]["method"] == "dpo" and run["prepared"]["rows_out"] == 450  # 600 x 0.5 + 600 x 0.25
    logged = [k for entry in run["log_history"] for k in entry]
    assert "rewards/accuracies" in logged or "rewards/chosen" in logged  # DPOTrainer's own metrics


def test_dpo_moved_preferences(dpo_run, tmp_path):
    _, storage, out = dpo_run
    assets = tiny.assets_dir(str(storage))
    before = tiny.preference_accuracy(tiny.model_dir(assets, "HuggingFaceTB/SmolLM3-3B"), assets / "eval_pairs.jsonl")
    after = tiny.preference_accuracy(out, assets / "eval_pairs.jsonl")
    assert after >= before + 0.2, (before, after)
