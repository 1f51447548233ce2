"""Fidelity: on the same data, seed and world size, raytrain_align (Ray Data preparation + Ray Train workers)
logs the same first 20 losses as the plain handbook path (`accelerate launch --config_file zero3.yaml`
running TRL's SFTTrainer / DPOTrainer / ORPOTrainer, which tokenize and pack on their own) with the same DeepSpeed
ZeRO-3 config, on CPU, within 1e-4. ORPO runs the handbook's own recipe file (zephyr-141b-A35b, a tiny Mixtral)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from raytrain_align import tiny

from .conftest import REPO, ZERO3_DPO_ARGS, ZERO3_SFT_ARGS, run_cli

pytestmark = pytest.mark.slow

STEPS = 20
SETTINGS = ["--set", f"max_steps={STEPS}", "--set", "logging_steps=1"]


def _losses(history):
    return [e["loss"] for e in history if "loss" in e][:STEPS]


HANDBOOK_ORPO = "tests/data/handbook/recipes/zephyr-141b-A35b/orpo/config_full.yaml"
TRAINERS = {"handbook_sft.py": "SFTTrainer", "handbook_dpo.py": "DPOTrainer", "handbook_orpo.py": "ORPOTrainer"}


@pytest.mark.parametrize("recipe, script", [("sft_mid", "handbook_sft.py"), ("dpo_apo_zero", "handbook_dpo.py"),
                                            (HANDBOOK_ORPO, "handbook_orpo.py")])
def test_losses_equal_plain_accelerate_launch(ray_address, tmp_path, recipe, script, request):
    storage, ours, args = tmp_path / "storage", tmp_path / "ray", [recipe, "--tiny", *SETTINGS]
    shared = {"sft_mid": ("zero3_sft", ZERO3_SFT_ARGS), "dpo_apo_zero": ("zero3_dpo", ZERO3_DPO_ARGS)}.get(recipe)
    if shared:  # the session's run of these settings (conftest), shared with other modules
        _, storage, ours = request.getfixturevalue(shared[0])
        args = shared[1]
    plan = run_cli(["plan", *args, "--storage", str(storage), "--output-dir", str(ours), "--json"])
    assert plan.returncode == 0, plan.stderr
    plan = json.loads(plan.stdout[plan.stdout.index("{"):])

    # The plain path gets the resolved recipe as one handbook YAML: the same model, mixture and TRL fields.
    tiny.materialize(tiny.assets_dir(str(storage)), plan["recipe_model"])
    training = {**plan["training"], "output_dir": str(tmp_path / "plain"), "save_strategy": "no"}
    training.pop("save_steps", None)
    plain_recipe = tmp_path / "plain.yaml"
    plain_recipe.write_text(yaml.safe_dump({**plan["model"], **plan["script"], **training}))
    plain_json = tmp_path / "plain.json"
    plain = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / plan["accelerate_config"]),
         "--num_processes", str(plan["world_size"]), "--num_machines", "1", "--mixed_precision", "no",
         str(REPO / "benchmarks" / script), str(plain_recipe)],
        env={**os.environ, "BENCH_CPU": "1", "BENCH_RESULT": str(plain_json)}, cwd=REPO, capture_output=True, text=True,
        timeout=900,
    )
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]

    if not shared:
        run = run_cli([*args, "--storage", str(storage), "--output-dir", str(ours)], env_extra={"RAY_ADDRESS": ray_address})
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    summary = json.loads((ours / "raytrain_align_run.json").read_text())
    assert summary["trainer"] == TRAINERS[script]
    theirs = _losses(json.loads(plain_json.read_text())["log_history"])
    mine = _losses(summary["log_history"])
    print("plain accelerate launch:", theirs, "\nraytrain_align:        ", mine)
    assert len(mine) == len(theirs) == STEPS
    assert max(abs(a - b) for a, b in zip(mine, theirs)) <= 1e-4
