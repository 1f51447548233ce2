"""FSDP2 as the alternative backend: the handbook's `fsdp.yaml` (via --accelerate-config or the recipe's
ray.accelerate_config) is mapped onto FSDP2 and shown by `plan` (no Ray); tiny SFT and DPO train on 2 CPU workers
with FSDP2-sharded (DTensor) policy and reference models; the export gathers the trained weights; the first
20 losses equal ZeRO-3's; a killed worker resumes from the sharded (torch distributed checkpoint) checkpoint."""

import json
import re

import pytest
import yaml

from raytrain_align import cli
from raytrain_align.accelerate_config import FSDP2_NOT_HONOURED, FSDP2_UNREAD_ENV

from .conftest import REPO, ZERO3_SFT_ARGS, progress_after_restarts, run_cli, run_killing_rank1

FSDP_YAML = "recipes/accelerate_configs/fsdp.yaml"

# ------------------------------------------------------------------------------------- plan (no Ray)

# The handbook's fsdp_config keys FSDP2 honours -> the variable the worker's FSDP2 plugin reads it from.
HONOURED_ENV = {
    "fsdp_auto_wrap_policy": "FSDP_AUTO_WRAP_POLICY",
    "fsdp_cpu_ram_efficient_loading": "FSDP_CPU_RAM_EFFICIENT_LOADING",
    "fsdp_offload_params": "FSDP_OFFLOAD_PARAMS",
    "fsdp_sharding_strategy": "FSDP_RESHARD_AFTER_FORWARD",  # FULL_SHARD -> true
    "fsdp_state_dict_type": "FSDP_STATE_DICT_TYPE",
}


def _plan(capsys, *args):
    code = cli.main(["plan", *args, "--json"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return json.loads(cap.out), cap.err.strip().splitlines()


def test_handbook_fsdp_yaml_maps_every_key_onto_fsdp2(capsys):
    plan, warnings = _plan(capsys, "sft_mid", "--accelerate-config", FSDP_YAML)
    env, fsdp = plan["accelerate_env"], plan["fsdp_config"]
    assert plan["backend"] == "fsdp" and plan["deepspeed_config"] is None
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert not set(FSDP2_UNREAD_ENV) & set(env)  # FSDP1 knobs the FSDP2 plugin would not read
    keys = yaml.safe_load((REPO / FSDP_YAML).read_text())["fsdp_config"]
    assert set(keys) == set(HONOURED_ENV) | set(FSDP2_NOT_HONOURED)  # every key of the handbook's file accounted for
    for key, value in keys.items():
        if key in HONOURED_ENV:
            expected = {"FULL_SHARD": "true"}.get(value, str(value).lower() if isinstance(value, bool) else value)
            assert env[HONOURED_ENV[key]] == expected, key
        else:  # exactly one warning line, naming the key and its value
            assert sum(f"'{key}: {value}' not honoured by FSDP2" in w for w in warnings) == 1, (key, warnings)
    assert len(warnings) == len(FSDP2_NOT_HONOURED) and all(w.startswith("warning: fsdp.yaml: ") for w in warnings)
    # what the workers' FullyShardedDataParallelPlugin resolves from that environment (accelerate's own class)
    assert fsdp["fsdp_version"] == 2 and fsdp["reshard_after_forward"] is True and fsdp["offload_params"] is False
    assert fsdp["state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["cpu_ram_efficient_loading"] is True
    assert fsdp["auto_wrap"] == "each model._no_split_modules module"
    assert fsdp["mixed_precision"] == {"param_dtype": "bfloat16", "reduce_dtype": "bfloat16"}  # the file's bf16


def test_plan_shows_fsdp_settings_like_deepspeed(capsys):
    assert cli.main(["plan", "sft_mid", "--accelerate-config", FSDP_YAML]) == 0
    out = capsys.readouterr().out
    assert f"backend       fsdp (from {REPO / FSDP_YAML})" in out
    block = out[out.index("fsdp          {"):]
    assert '"fsdp_version": 2' in block and '"reshard_after_forward": true' in block and "deepspeed     " not in out
    assert '"state_dict_type": "SHARDED_STATE_DICT"' in block


def _recipe(tmp_path, ray_section: str) -> str:
    text = (REPO / "recipes/smollm3/sft/mid.yaml").read_text()
    text = text[: re.search(r"^ray:", text, re.M).start()] + ray_section
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def _accelerate_config(tmp_path, **fsdp_config) -> str:
    data = yaml.safe_load((REPO / FSDP_YAML).read_text())
    data["fsdp_config"].update(fsdp_config)
    data["fsdp_config"] = {k: v for k, v in data["fsdp_config"].items() if v is not None}
    path = tmp_path / "fsdp_variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_recipe_level_setting_and_flag_override(capsys, tmp_path):
    recipe = _recipe(tmp_path, f"ray:\n  accelerate_config: {FSDP_YAML}\n  nodes: 2\n  gpus_per_node: 8\n")
    plan, _ = _plan(capsys, recipe)
    assert plan["backend"] == "fsdp" and plan["world_size"] == 16 and plan["accelerate_env"]["FSDP_VERSION"] == "2"
    plan, warnings = _plan(capsys, recipe, "--accelerate-config", "recipes/accelerate_configs/zero3.yaml")
    assert plan["backend"] == "deepspeed" and plan["fsdp_config"] is None and not warnings


def test_ddp_yaml_is_plain_data_parallel(capsys):
    plan, warnings = _plan(capsys, "sft_mid", "--tiny", "--accelerate-config", "recipes/accelerate_configs/ddp.yaml")
    assert plan["backend"] == "ddp" and plan["deepspeed_config"] is None and plan["fsdp_config"] is None
    assert not any(k.startswith("FSDP_") or "DEEPSPEED" in k or "FSDP" in k for k in plan["accelerate_env"])
    assert not warnings


def test_fsdp_variants(capsys, tmp_path):
    cfg = _accelerate_config(tmp_path, fsdp_sharding_strategy="SHARD_GRAD_OP", fsdp_offload_params=True,
                             fsdp_backward_prefetch=None, fsdp_forward_prefetch=None, fsdp_use_orig_params=None,
                             fsdp_sync_module_states=None, fsdp_state_dict_type="FULL_STATE_DICT")
    plan, warnings = _plan(capsys, "sft_mid", "--accelerate-config", cfg)
    assert plan["accelerate_env"]["FSDP_RESHARD_AFTER_FORWARD"] == "false" and not warnings
    assert plan["fsdp_config"]["reshard_after_forward"] is False and plan["fsdp_config"]["offload_params"] is True
    assert plan["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"


FSDP_BAD = {
    "hybrid shard": ({"fsdp_sharding_strategy": "HYBRID_SHARD"}, "has no FSDP2 equivalent here; use FULL_SHARD"),
    "unknown key": ({"fsdp_auto_wrap_polcy": "NO_WRAP"}, "did you mean 'fsdp_auto_wrap_policy'"),
    "local state dict": ({"fsdp_state_dict_type": "LOCAL_STATE_DICT"}, "does not exist in FSDP2"),
}


@pytest.mark.parametrize("case", list(FSDP_BAD))
def test_fsdp_bad_config_one_line_error(case, capsys, tmp_path):
    change, expected = FSDP_BAD[case]
    code = cli.main(["plan", "sft_mid", "--accelerate-config", _accelerate_config(tmp_path, **change)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


# ------------------------------------------------------------------------------- training (Ray, slow)

STEPS, SAVE_EVERY = 20, 5
SETTINGS = ["--set", f"max_steps={STEPS}", "--set", "logging_steps=1", "--set", f"save_steps={SAVE_EVERY}"]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp") / "storage"  # shared: one data preparation for every run below


def _train(ray_address, storage, recipe, out, *extra):
    proc = run_cli([recipe, "--tiny", "--storage", str(storage), "--output-dir", str(out), *SETTINGS, *extra],
                   env_extra={"RAY_ADDRESS": ray_address})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "raytrain_align_run.json").read_text())


def _losses(run):
    return {e["step"]: e["loss"] for e in run["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def fsdp_sft(ray_address, storage):
    out = storage.parent / "fsdp_sft"
    return _train(ray_address, storage, "sft_mid", out, "--accelerate-config", FSDP_YAML,
                  "--set", "run_name=fsdp-sft"), out


def _assert_fsdp2_sharded(facts, prefix=""):
    assert facts[f"{prefix}params_dtensor"] is True
    assert facts[f"{prefix}placements"] == ["(Shard(dim=0),)"]
    assert facts[f"{prefix}mesh"] == {"ranks": [0, 1], "device": "cpu"}  # the world mesh of the 2 Ray workers
    # each rank holds half of every parameter (dim-0 shards of uneven tensors differ by at most a row)
    assert abs(facts[f"{prefix}local_numel"] - facts[f"{prefix}full_param_numel"] / 2) < 0.05 * facts[f"{prefix}full_param_numel"]


@pytest.mark.slow
def test_sft_trains_fsdp2_sharded_and_exports_the_trained_weights(fsdp_sft):
    import torch
    from transformers import AutoModelForCausalLM

    run, out = fsdp_sft
    facts = run["facts"]
    assert run["world_size"] == 2 and run["metrics"]["step"] == STEPS
    assert facts["engine"].startswith("FSDP") and facts["fsdp_version"] == 2
    _assert_fsdp2_sharded(facts)
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    # auto-wrap (TRANSFORMER_BASED_WRAP, the model's _no_split_modules): one unit per decoder layer, plus the root
    # and the units accelerate adds around them (embeddings, head)
    decoder = [n for n in facts["fsdp_unit_types"] if n.endswith("DecoderLayer")]
    assert len(decoder) == 1 and facts["fsdp_unit_types"][decoder[0]] == layers and facts["fsdp_units"] > layers
    assert facts["reshard_after_forward"] is True and facts["cpu_ram_efficient_loading"] is True

    # the export (a full state dict gathered on rank 0) is exactly the trained, sharded weights
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(run["param_checksums"]) == len(dict(model.named_parameters())) > 0
    for name, p in model.named_parameters():
        total, squares = run["param_checksums"][name]
        p = p.detach().double()
        assert p.sum().item() == pytest.approx(total, rel=1e-9, abs=1e-9), name
        assert (p * p).sum().item() == pytest.approx(squares, rel=1e-9), name
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert torch.isfinite(torch.tensor(list(_losses(run).values()))).all()


@pytest.mark.slow
def test_first_20_losses_equal_zero3(fsdp_sft, zero3_sft):
    zero3 = zero3_sft[0]  # the same settings (conftest.ZERO3_SFT_ARGS), on ZeRO-3
    assert all(a in ZERO3_SFT_ARGS for a in SETTINGS)
    assert zero3["facts"]["zero_stage"] == 3
    fsdp, ds = _losses(fsdp_sft[0]), _losses(zero3)
    steps = list(range(1, STEPS + 1))
    assert sorted(fsdp) == sorted(ds) == steps
    diff = max(abs(fsdp[s] - ds[s]) for s in steps)
    print(f"FSDP2 vs ZeRO-3, first {STEPS} losses: max |difference| {diff:.2e}")
    assert diff <= 1e-3


@pytest.mark.slow
def test_killed_worker_resumes_from_sharded_checkpoint(ray_address, storage, fsdp_sft):
    """SIGKILL rank 1 after the step-5 checkpoint (torch distributed checkpoint of model and optimizer, committed
    through ray.train.report): the restarted worker group (same world size) resumes it and the losses after
    the restart are the uninterrupted run's — which they would not be with a fresh optimizer."""
    out = storage.parent / "fsdp_resumed"
    args = ["sft_mid", "--tiny", "--storage", str(storage), "--output-dir", str(out), "--accelerate-config", FSDP_YAML,
            "--max-failures", "1", "--set", "run_name=fsdp-sft-killed", *SETTINGS]
    # once step 5's checkpoint is committed, before step 10's
    returncode, log, killed_at, _, seen = run_killing_rank1(args, ray_address, SAVE_EVERY)
    assert returncode == 0 and killed_at is not None, log[-5000:]
    starts = progress_after_restarts(seen)
    assert len(starts) == 2, starts  # restarted once
    resumed = starts[1]
    assert resumed and resumed[0] == SAVE_EVERY + 1, resumed  # from the step-5 checkpoint, not from 0

    run = json.loads((out / "raytrain_align_run.json").read_text())
    facts = run["facts"]
    _assert_fsdp2_sharded(facts)
    assert facts["state_dict_type"] == "SHARDED_STATE_DICT"
    again, clean = _losses(run), _losses(fsdp_sft[0])
    assert sorted(again) == list(range(1, STEPS + 1))
    diff = max(abs(again[s] - clean[s]) for s in range(SAVE_EVERY + 1, STEPS + 1))
    print(f"killed at step {killed_at}; losses after the resume vs the uninterrupted run: max |difference| {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.slow
def test_dpo_with_fsdp2_sharded_reference(ray_address, storage):
    from transformers import AutoModelForCausalLM

    out = storage.parent / "fsdp_dpo"
    run = _train(ray_address, storage, "dpo_apo_zero", out, "--accelerate-config", FSDP_YAML, "--set", "run_name=fsdp-dpo")
    facts = run["facts"]
    _assert_fsdp2_sharded(facts)
    _assert_fsdp2_sharded(facts, "ref_")  # TRL's prepare_fsdp: the reference is fully_shard-ed over the same mesh
    assert facts["ref_in_optimizer"] is False and facts["ref_full_param_numel"] == facts["full_param_numel"]
    logged = {k for entry in run["log_history"] for k in entry}
    assert "rewards/chosen" in logged or "rewards/accuracies" in logged  # DPOTrainer's own metrics
    model = AutoModelForCausalLM.from_pretrained(out)
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    assert total == pytest.approx(sum(s for s, _ in run["param_checksums"].values()), rel=1e-9)


HANDBOOK_ORPO = "tests/data/handbook/recipes/zephyr-141b-A35b/orpo/config_full.yaml"


@pytest.mark.slow
def test_handbook_orpo_on_fsdp2_resumes_after_a_killed_worker(ray_address, storage):
    """The handbook's ORPO recipe file (a tiny Mixtral) with fsdp.yaml, as the handbook trained it: ORPOTrainer on
    FSDP2-sharded parameters, rank 1 killed after the step-5 checkpoint, resumed from it, finished, exported. (The
    recipe says save_strategy: "no", under which a restart starts from step 0; checkpoints are switched on here.)"""
    from transformers import AutoModelForCausalLM

    out = storage.parent / "fsdp_orpo"
    args = [HANDBOOK_ORPO, "--tiny", "--storage", str(storage), "--output-dir", str(out), "--accelerate-config", FSDP_YAML,
            "--max-failures", "1", "--set", "run_name=fsdp-orpo", "--set", "save_strategy=steps", *SETTINGS]
    returncode, log, killed_at, _, seen = run_killing_rank1(args, ray_address, SAVE_EVERY)
    assert returncode == 0 and killed_at is not None, log[-5000:]
    starts = progress_after_restarts(seen)
    assert len(starts) == 2, starts
    resumed = starts[1]
    assert resumed and resumed[0] == SAVE_EVERY + 1, resumed

    run = json.loads((out / "raytrain_align_run.json").read_text())
    assert run["trainer"] == "ORPOTrainer" and run["prepared"]["method"] == "orpo"
    _assert_fsdp2_sharded(run["facts"])
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(loss == loss for loss in losses.values())  # no NaN
    assert {"log_odds_ratio", "nll_loss"} <= {k for e in run["log_history"] for k in e}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "mixtral"
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    assert total == pytest.approx(sum(s for s, _ in run["param_checksums"].values()), rel=1e-9)
