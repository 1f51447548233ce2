"""`python -m raytrain_align pipeline sft_mid sft_multi_task dpo_apo_zero --tiny`: the three SmolLM3 stages through
Ray Data preparation, 2 Ray Train workers and DeepSpeed ZeRO-3 (TRL's SFTTrainer, then DPOTrainer with loss
apo_zero and a partitioned reference model), each from the previous stage's export; every stage learns on
held-out data; a re-run skips them all."""

import json
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from raytrain_align import events, jobs, tiny

from .conftest import run_cli

pytestmark = pytest.mark.slow

STAGES = ["sft_mid", "sft_multi_task", "dpo_apo_zero"]


@pytest.fixture(scope="module")
def pipeline_run(ray_address, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    storage, out = root / "storage", root / "models"
    # 2 epochs per stage (the tiny default is up to 5): enough to show each stage learning, in CI time
    args = ["pipeline", *STAGES, "--tiny", "--storage", str(storage), "--output-dir", str(out), "--set", "num_train_epochs=2"]
    proc = run_cli(args, env_extra={"RAY_ADDRESS": ray_address}, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, args, storage, stage_models(storage)


def stage_models(storage: Path, since: float = 0.0) -> list[Path]:
    """Each stage's model, in the order the stages ran: where its driver's `finished` event says it exported it."""
    return [Path(e["output_dir"]) for kind, e in stage_events(storage, since) if kind == "finished"]


def stage_events(storage: Path, since: float) -> list[tuple[str, dict]]:
    """(kind, event) of every stage launched after `since`, stage by stage."""
    launches = sorted((launch for launch in jobs.launches(str(storage)) if launch["unix"] >= since),
                      key=lambda launch: launch["unix"])
    return [(e["event"], e) for launch in launches for e in events.read(str(storage), launch["run"])
            if e["launch_id"] == launch["launch_id"]]


def test_each_stage_starts_from_the_previous_export(pipeline_run):
    proc, _, storage, models = pipeline_run
    assert len(models) == 3
    runs = [json.loads((m / "raytrain_align_run.json").read_text()) for m in models]
    assert [r["prepared"]["method"] for r in runs] == ["sft", "sft", "dpo"]
    for r in runs:
        assert r["world_size"] == 2 and r["metrics"]["step"] > 0
        assert r["facts"]["zero_stage"] == 3 and r["facts"]["params_partitioned"]
    # DPO: TRL's DPOTrainer with a reference model that ZeRO-3 partitions like the policy (no optimizer of its own)
    dpo = runs[2]
    assert dpo["facts"]["ref_engine"] == "DeepSpeedEngine" and dpo["facts"]["ref_params_partitioned"]
    assert dpo["facts"]["ref_optimizer"] == "DeepSpeedZeRoOffload"
    assert dpo["prepared"]["rows_out"] == 450  # the recipe's two preference splits at weights 0.5 and 0.25 of 600
    assert any(k.startswith("rewards/") for entry in dpo["log_history"] for k in entry)  # DPOTrainer's own metrics
    # stage 2 and 3 were told to start from the previous stage's model, not from the tiny base
    assert f"from {models[0]}" in proc.stdout and f"from {models[1]}" in proc.stdout
    assert "pipeline done (3 stages)" in proc.stdout and proc.stdout.count("skipped (already done)") == 0


def test_every_stage_learned(pipeline_run):
    _, _, storage, models = pipeline_run
    assets = tiny.assets_dir(str(storage))
    base = tiny.model_dir(assets, "HuggingFaceTB/SmolLM3-3B-Base")
    nll = [tiny.answer_nll(m, assets / "eval.jsonl") for m in (base, models[0])]
    print("held-out answer NLL base -> mid-training:", nll)
    assert nll[1] < 0.6 * nll[0]  # mid-training learned the tasks
    # Multi-task SFT trains the think/no_think template with `enable_thinking: false` (the rows'
    # chat_template_kwargs): score its starting model (mid's export) and its result in that same format.
    fmt = {"chat_template": AutoTokenizer.from_pretrained(models[1]).chat_template,
           "template_kwargs": {"enable_thinking": False}}
    sft = [tiny.answer_nll(m, assets / "eval.jsonl", **fmt) for m in (models[0], models[1])]
    print("held-out answer NLL in the multi-task format, before -> after multi-task SFT:", sft)
    assert sft[1] < 0.5 * sft[0] and sft[1] < nll[1]
    acc = [tiny.preference_accuracy(m, assets / "eval_pairs.jsonl") for m in (models[1], models[2])]
    print("held-out preference accuracy SFT -> APO-zero:", acc)
    assert acc[1] > acc[0]


def test_rerun_skips_finished_stages(pipeline_run, ray_address):
    _, args, storage, models = pipeline_run
    t0 = time.time()
    again = run_cli(args, env_extra={"RAY_ADDRESS": ray_address})
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (already done)") == 3
    kinds = [kind for kind, _ in stage_events(storage, t0)]
    assert kinds.count("already_finished") == 3 and "train_submitted" not in kinds  # nothing trained
    assert stage_models(storage, t0) == models  # each exported again to the same folder


HANDBOOK = "tests/data/handbook/recipes"


def test_handbook_recipe_files_of_each_method_run_tiny(ray_address, tmp_path):
    """The handbook's own files, verbatim: zephyr-7b-beta full SFT and DPO, then zephyr-141b-A35b ORPO, end to end
    under --tiny as one pipeline (few steps each), each trained by its method's TRL trainer."""
    stages = [f"{HANDBOOK}/zephyr-7b-beta/sft/config_full.yaml", f"{HANDBOOK}/zephyr-7b-beta/dpo/config_full.yaml",
              f"{HANDBOOK}/zephyr-141b-A35b/orpo/config_full.yaml"]
    proc = run_cli(["pipeline", *stages, "--tiny", "--storage", str(tmp_path / "storage"),
                    "--output-dir", str(tmp_path / "models"), "--set", "max_steps=6", "--set", "logging_steps=2"],
                   env_extra={"RAY_ADDRESS": ray_address})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    models = stage_models(tmp_path / "storage")
    runs = [json.loads((m / "raytrain_align_run.json").read_text()) for m in models]
    assert [r["prepared"]["method"] for r in runs] == ["sft", "dpo", "orpo"] and all(r["metrics"]["step"] == 6 for r in runs)
    assert [r["trainer"] for r in runs] == ["SFTTrainer", "DPOTrainer", "ORPOTrainer"]
    assert runs[1]["facts"]["ref_params_partitioned"]
    assert {"log_odds_ratio", "nll_loss"} <= {k for e in runs[2]["log_history"] for k in e}  # ORPO's own metrics
