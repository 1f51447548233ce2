"""Recipe loading, planning and bad input: no Ray, no GPU, nothing written."""

import json
from pathlib import Path

import pytest

from raytrain_align import cli

from .conftest import REPO, run_cli


def test_recipes_lists_sft_mid(capsys):
    assert cli.main(["recipes"]) == 0
    assert "sft_mid" in capsys.readouterr().out


def test_plan_sft_mid_is_64_gpus_gbs_128_zero3(capsys, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["plan", "sft_mid", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 64 and plan["nodes"] == 8 and plan["gpus_per_node"] == 8
    assert plan["gradient_accumulation_steps"] == 2
    assert plan["global_batch_size"] == 128
    ds = plan["deepspeed_config"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 128 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_clipping"] == 0.2 and ds["bf16"]["enabled"] is True
    assert plan["accelerate_env"]["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    assert plan["training"]["learning_rate"] == 2e-5 and plan["training"]["packing"] is True
    assert not ray.is_initialized()


def test_plan_dpo_apo_zero_is_2_nodes_gbs_32(capsys):
    assert cli.main(["plan", "dpo_apo_zero", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "dpo" and plan["world_size"] == 16 and plan["global_batch_size"] == 32
    t = plan["training"]
    assert (t["loss_type"], t["beta"], t["learning_rate"], t["max_length"]) == ("apo_zero", 0.05, 1e-6, 24576)
    assert t["lr_scheduler_type"] == "cosine_with_min_lr" and t["warmup_steps"] == 0.1 and t["padding_free"] is False
    assert plan["deepspeed_config"]["zero_optimization"]["stage"] == 3


def test_plan_human_readable_and_handbook_style_override(capsys):
    assert cli.main(["plan", "sft_mid", "--gradient_accumulation_steps", "4", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "world size 16" in out and "GBS 64" in out and '"stage": 3' in out


def test_handbook_style_no_is_a_string_not_a_yaml_boolean(capsys):
    # `--save_strategy no` as in the handbook's commands (YAML 1.1 alone would read `no` as False)
    assert cli.main(["plan", "sft_mid", "--save_strategy", "no", "--set", "eval_strategy=no", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["training"]["save_strategy"] == "no" and plan["training"]["eval_strategy"] == "no"


def test_plan_tiny_is_two_cpu_workers(capsys, tmp_path):
    assert cli.main(["plan", "sft_mid", "--tiny", "--json", "--storage", str(tmp_path / "s")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 2 and plan["use_gpu"] is False
    assert plan["training"]["lr_scheduler_type"] == "cosine_with_min_lr" and plan["training"]["packing"] is True
    assert not (tmp_path / "s").exists()  # plan writes nothing


def _write_recipe(tmp_path, text):
    base = (REPO / "recipes/smollm3/sft/mid.yaml").read_text()
    p = tmp_path / "recipe.yaml"
    p.write_text(base + "\n" + text)
    return str(p)


BAD = {
    "unknown recipe": (lambda t: ["sft_mdi"], "known recipes: sft_mid"),
    "unknown yaml key": (lambda t: [_write_recipe(t, "learnig_rate: 1.0e-5")], "did you mean 'learning_rate'"),
    "wrong type": (lambda t: [_write_recipe(t, "ray:\n  nodes: two")], "ray.nodes must be N or MIN:MAX, got 'two'"),
    "bad checkpoint upload": (lambda t: [_write_recipe(t, "ray:\n  checkpoint_upload: later")],
                              "ray.checkpoint_upload is 'later'; use 'sync'"),
    "wrong type trl field": (lambda t: ["sft_mid", "--set", "num_train_epochs=many"], "'num_train_epochs' must be float"),
    "missing accelerate config": (lambda t: ["sft_mid", "--accelerate-config", "nope.yaml"], "--accelerate-config"),
    "set unknown key": (lambda t: ["sft_mid", "--set", "lerning_rate=1"], "did you mean 'learning_rate'"),
    "no gpus": (lambda t: ["sft_mid"], "--tiny"),
    "missing data path": (lambda t: [_write_missing_data(t)], "does not exist"),
}


def _write_missing_data(tmp_path):
    text = (REPO / "recipes/smollm3/sft/mid.yaml").read_text()
    text = text.replace("id: HuggingFaceTB/smoltalk2", f"id: {tmp_path}/no/such/data.jsonl", 1)
    p = tmp_path / "missing_data.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error_exit_2_nothing_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    make_args, expected = BAD[case]
    storage, out = tmp_path / "storage", tmp_path / "out"
    args = make_args(tmp_path) + ["--storage", str(storage), "--output-dir", str(out)]
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert not storage.exists() and not out.exists()


def test_bad_input_from_the_real_command():
    proc = run_cli(["sft_mdi"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown recipe 'sft_mdi' (did you mean 'sft_mid'?); known recipes: sft_mid,")
    assert lines[0].endswith("(or pass a path to a recipe YAML)")
    assert proc.stdout == ""


def test_renamed_handbook_field_is_translated_with_one_warning(tmp_path, capsys):
    recipe = _write_recipe(tmp_path, "")
    text = Path(recipe).read_text().replace("warmup_steps: 0.03", "warmup_ratio: 0.03")
    Path(recipe).write_text(text)
    assert cli.main(["plan", recipe, "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["training"]["warmup_steps"] == 0.03
    assert cap.err.count("warning: 'warmup_ratio' is now 'warmup_steps'") == 1


HANDBOOK_DIR = REPO / "tests" / "data" / "handbook"
HANDBOOK = sorted(HANDBOOK_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", HANDBOOK, ids=[str(p.relative_to(HANDBOOK_DIR / "recipes")) for p in HANDBOOK])
def test_handbook_recipe_files_load_unchanged(path, capsys):
    """The handbook's own recipe files (copied verbatim into tests/data/handbook, under their handbook paths):
    each plans as the method its folder names, and every key is either used (in the plan) or named in a warning
    line with its replacement (the older dataset_mixer format too); nothing is dropped silently."""
    import yaml

    method = path.parent.name
    code = cli.main(["plan", str(path), "--json"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    plan = json.loads(cap.out)
    assert plan["method"] == method
    placed = set(plan["model"]) | set(plan["script"]) | set(plan["training"])
    for key in yaml.safe_load(path.read_text()):
        assert key in placed or f"'{key}" in cap.err, key
    assert plan["deepspeed_config"]["zero_optimization"]["stage"] == 3


def test_registered_recipes_plan_without_warnings(capsys):
    from raytrain_align.recipe import RECIPES

    for name in RECIPES:
        assert cli.main(["plan", name, "--json"]) == 0, name
        cap = capsys.readouterr()
        assert "warning" not in cap.err, (name, cap.err)
        assert json.loads(cap.out)["method"] == RECIPES[name][1]


def test_pipeline_chains_stage_plans(tmp_path):
    """Each later stage starts from the previous stage's export, with its own stable run name; a bad stage
    fails the whole command before anything runs."""
    from raytrain_align import cli, pipeline

    argv = ["sft_mid", "sft_multi_task", "dpo_apo_zero", "--tiny", "--storage", str(tmp_path), "--output-dir",
            str(tmp_path / "models")]

    def chain():
        args, extra = cli._parser("pipeline", stages=True).parse_known_args(argv)
        return pipeline.chain_plans(args.recipes, lambda n, o, d: cli._load(args, extra, n, o, d, quiet=True), args.output_dir)

    plans = chain()
    assert [p.method for p in plans] == ["sft", "sft", "dpo"]
    assert plans[0].run_name == "smollm3-midtraining-tiny"  # stage 1 is the recipe's own run: a finished one is reused
    assert plans[1].model["model_name_or_path"] == plans[0].output_dir == str(tmp_path / "models" / plans[0].run_name)
    assert plans[2].model["model_name_or_path"] == plans[1].output_dir
    assert len({p.run_name for p in plans}) == 3 and all("-after-" in p.run_name for p in plans[1:])
    assert [p.run_name for p in chain()] == [p.run_name for p in plans]  # stable: a re-run finds its stages

    proc = run_cli(["pipeline", "sft_mid", "sft_mid_typo", "--tiny", "--storage", str(tmp_path / "s")])
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown recipe 'sft_mid_typo'")
    assert not (tmp_path / "s").exists()  # nothing prepared or trained


@pytest.mark.skipif(__import__("importlib").util.find_spec("liger_kernel") is not None, reason="liger-kernel installed")
def test_gpu_recipe_asking_for_liger_without_it_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a GPU cluster stands here: refused before it is reached
    storage = tmp_path / "storage"
    assert cli.main(["sft_mid", "--storage", str(storage), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use_liger_kernel: true and liger-kernel is not installed" in err[0], err
    assert "raytrain_align[gpu]" in err[0] and not storage.exists()
    # the same recipe on CPU workers turns liger off and says so in the plan
    assert cli.main(["plan", "sft_mid", "--cpu", "--json", "--storage", str(storage)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["training"]["use_liger_kernel"] is False and plan["cpu_overrides"]["use_liger_kernel"] is False


def test_dpo_padding_free_says_in_one_warning_that_trl_pads(capsys):
    """TRL 1.16's DPOTrainer turns padding_free off on its own; the plan says so up front."""
    assert cli.main(["plan", "dpo_apo_zero", "--json", "--set", "padding_free=true"]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("warning: 'padding_free: true' is not carried out") == 1, cap.err
