"""The DPO reference model's other two forms under DeepSpeed ZeRO-3 on 2 Ray workers (the partitioned reference
engine itself is tested in test_pipeline.py):

- `precompute_ref_log_probs: true`: TRL's precompute pass runs once before step 1 and no reference model is kept;
  the logged losses equal those of the same run with the partitioned reference model.
- LoRA (`use_peft: true`): the reference is the policy with its adapters disabled (no second model); the
  exported adapter holds real, trained weights.
"""

import json

import pytest

from .conftest import ZERO3_DPO_ARGS, run_cli

pytestmark = pytest.mark.slow

STEPS = 20


def _dpo(storage, out, name, *sets, ray_address):
    """The session's shared DPO run (conftest.ZERO3_DPO_ARGS: 20 steps, a loss logged each) with `sets` added."""
    extra = [a for s in (f"run_name={name}", *sets) for a in ("--set", s)]
    proc = run_cli([*ZERO3_DPO_ARGS, "--storage", str(storage), "--output-dir", str(out), *extra],
                   env_extra={"RAY_ADDRESS": ray_address})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "raytrain_align_run.json").read_text())


@pytest.fixture(scope="module")
def runs(ray_address, zero3_dpo, tmp_path_factory):
    engine, storage, _ = zero3_dpo  # its storage: the same prepared data
    root = tmp_path_factory.mktemp("dpo_reference")
    return {
        "engine": engine,
        "precomputed": _dpo(storage, root / "precomputed", "dpo-ref-precomputed", "precompute_ref_log_probs=true",
                            ray_address=ray_address),
        "lora": (_dpo(storage, root / "lora", "dpo-ref-lora", "use_peft=true", "lora_r=16", "lora_alpha=32",
                      "lora_target_modules=all-linear", ray_address=ray_address), root / "lora"),
    }


def _losses(run):
    return [e["loss"] for e in run["log_history"] if "loss" in e]


def test_precomputed_reference_log_probs_match_the_reference_engine(runs):
    engine, pre = runs["engine"], runs["precomputed"]
    assert engine["facts"]["ref_engine"] == "DeepSpeedEngine" and "ref_log_probs" not in engine["facts"]
    assert pre["facts"]["ref_log_probs"] == "precomputed" and "ref_engine" not in pre["facts"]  # no reference kept
    assert pre["facts"]["zero_stage"] == 3 and pre["facts"]["params_partitioned"]
    a, b = _losses(engine), _losses(pre)
    print("losses, reference engine:", a, "\nlosses, precomputed:     ", b)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert a[-1] < a[0]  # and the policy moved (apo_zero starts at exactly 1.0: policy == reference)


def test_lora_dpo_uses_the_adapter_free_base_as_reference(runs):
    from safetensors.torch import load_file

    run, out = runs["lora"]
    facts = run["facts"]
    assert facts["peft"] == "PeftModelForCausalLM" and facts["zero_stage"] == 3 and facts["params_partitioned"]
    assert "ref_engine" not in facts  # no second model: TRL disables the adapters for the reference pass
    losses = _losses(run)
    print("losses, LoRA DPO:", losses)
    assert len(losses) == STEPS and abs(losses[0] - 1.0) < 1e-6  # lora_B = 0 at start: policy == reference
    assert losses[-1] < losses[0]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())  # gathered, not 0-size ZeRO-3 placeholders
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)
