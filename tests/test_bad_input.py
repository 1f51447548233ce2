"""Bad input, table-driven: every case is one `error:` line naming the fix, exit code 2, nothing written, no
traceback. Ranges of recipe and `ray:` values (non-finite numbers included), CLI flags, files that are not UTF-8
YAML mappings, accelerate configs accelerate would reject, and storage that cannot be written. In-process and
fast: each case fails while the plan is built, before Ray or a model is touched."""

from pathlib import Path

import pytest

from raytrain_align import cli

from .conftest import REPO, write_checkpoint

MID = (REPO / "recipes/smollm3/sft/mid.yaml").read_text()
ZERO3 = (REPO / "recipes/accelerate_configs/zero3.yaml").read_text()


def _set(key, value, expected, recipe="sft_mid"):
    return (lambda t: [recipe, "--set", f"{key}={value}"], f"'{key}' must be {expected}, got")


def _file(name, content, extra=()):
    def make(t: Path):
        p = t / "sft" / name  # a folder named after the method, as the handbook keeps recipes
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return [str(p), *extra]
    return make


def _accelerate(old, new):
    def make(t: Path):
        acc = t / "acc.yaml"
        acc.write_text(ZERO3.replace(old, new))
        return ["sft_mid", "--accelerate-config", str(acc)]
    return make


def _checkpoints(*damages):
    def make(t: Path):
        for i, damage in enumerate(damages):
            write_checkpoint(t / "storage" / "r-tiny", 5 * (i + 1), damage)
        return ["sft_mid", "--tiny", "--set", "run_name=r"]
    return make


def _folder_named_yaml(t: Path):
    (t / "dir.yaml").mkdir()
    return [str(t / "dir.yaml")]


def _under_a_file(flag):
    def make(t: Path):
        (t / "a_file").write_text("x")
        return ["sft_mid", "--tiny", flag, str(t / "a_file" / "sub")]
    return make


def _model_larger_than_the_disk(t: Path):
    """A model folder whose safetensors header declares 10^12 parameters: a sparse file, so it takes no space;
    its checkpoints (14 bytes a parameter, twice) would need 28 TB."""
    import json
    import struct

    header = json.dumps({"w": {"dtype": "BF16", "shape": [10**6, 10**6], "data_offsets": [0, 2 * 10**12]}}).encode()
    header += b" " * (-len(header) % 8)
    (t / "huge").mkdir()
    with open(t / "huge" / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * 10**12)
    return ["sft_mid", "--cpu", "--set", f"model_name_or_path={t / 'huge'}"]


POSITIVE, NON_NEGATIVE, UNIT = "a finite number > 0", "a finite number >= 0", "a number in [0, 1)"
INT1 = "an integer >= 1"
CASES = {
    "learning_rate zero": _set("learning_rate", 0, POSITIVE),
    "learning_rate negative": _set("learning_rate", -1e-5, POSITIVE),
    "learning_rate nan": _set("learning_rate", ".nan", POSITIVE),
    "learning_rate inf": _set("learning_rate", ".inf", POSITIVE),
    "num_train_epochs zero": _set("num_train_epochs", 0, POSITIVE),
    "weight_decay negative": _set("weight_decay", -0.1, NON_NEGATIVE),
    "max_grad_norm negative": _set("max_grad_norm", -1.0, NON_NEGATIVE),
    "max_grad_norm nan": _set("max_grad_norm", ".nan", NON_NEGATIVE),
    "warmup_steps negative": _set("warmup_steps", -5, NON_NEGATIVE),
    "adam_beta1 one": _set("adam_beta1", 1.0, UNIT),
    "adam_beta2 above one": _set("adam_beta2", 1.5, UNIT),
    "adam_epsilon zero": _set("adam_epsilon", 0.0, POSITIVE),
    "label_smoothing_factor one": _set("label_smoothing_factor", 1.0, UNIT),
    "per_device_train_batch_size zero": _set("per_device_train_batch_size", 0, INT1),
    "gradient_accumulation_steps zero": _set("gradient_accumulation_steps", 0, INT1),
    "max_length zero": _set("max_length", 0, INT1),
    "max_steps zero": _set("max_steps", 0, "-1 (train num_train_epochs) or an integer >= 1"),
    "max_steps below -1": _set("max_steps", -2, "-1 (train num_train_epochs) or an integer >= 1"),
    "seed negative": _set("seed", -1, "an integer in [0, 2**32)"),
    "seed too large": _set("seed", 2**40, "an integer in [0, 2**32)"),
    "save_steps zero": _set("save_steps", 0, POSITIVE),
    "logging_steps negative": _set("logging_steps", -1, POSITIVE),
    "save_total_limit zero": _set("save_total_limit", 0, INT1),
    "dataset_num_proc zero": _set("dataset_num_proc", 0, INT1),
    "dpo beta zero": _set("beta", 0, POSITIVE, recipe="dpo_apo_zero"),
    "dpo beta nan": _set("beta", ".nan", POSITIVE, recipe="dpo_apo_zero"),
    "ray.max_failures below -1": _set("ray.max_failures", -2, "-1 (no limit) or an integer >= 0"),
    "ray.resize_interval_s zero": _set("ray.resize_interval_s", 0, POSITIVE),
    "ray.restart_wait_s negative": _set("ray.restart_wait_s", -5, POSITIVE),
    "ray.cpus_per_worker zero": _set("ray.cpus_per_worker", 0, INT1),
    "ray.gpus_per_node zero": _set("ray.gpus_per_node", 0, INT1),
    "ray.global_batch_size zero": _set("ray.global_batch_size", 0, INT1),
    "ray.long_samples unknown": (lambda t: ["sft_mid", "--set", "ray.long_samples=maybe"],
                                 "ray.long_samples is 'maybe'; use 'truncate'"),
    "ray.method unknown": (lambda t: ["sft_mid", "--set", "ray.method=kto"], "ray.method 'kto' cannot change that"),
    "mixture seed negative": (lambda t: ["sft_mid", "--set", "dataset_mixture.seed=-1"],
                              "dataset_mixture.seed must be an integer in [0, 2**32)"),
    "mixture test split above one": (lambda t: ["sft_mid", "--set", "dataset_mixture.test_split_size=1.5"],
                                     "test_split_size must be a fraction in (0, 1) or a row count >= 1"),
    "mixture test split zero": (lambda t: ["sft_mid", "--set", "dataset_mixture.test_split_size=0"],
                                "test_split_size must be a fraction in (0, 1) or a row count >= 1"),
    "mixture take unknown": (lambda t: ["sft_mid", "--set", "dataset_mixture.take=random"],
                             "dataset_mixture.take must be 'shuffled' or 'first', got 'random'"),
    "mixture and the older mixer": (_file("both.yaml", MID + "dataset_mixer:\n  some/dataset: 1.0\n"),
                                    "both dataset_mixture and the older dataset_mixer are set"),
    "qlora under zero-3": (_file("qlora.yaml", MID + "use_peft: true\nload_in_4bit: true\n"),
                           "sets load_in_4bit: true (QLoRA), which runs on data-parallel workers only; pass "
                           "--accelerate-config recipes/accelerate_configs/ddp.yaml"),
    "mixture weight nan": (_file("w.yaml", MID.replace("weight: 1.0", "weight: .nan", 1)),
                           "weight must be a finite number >= 0, got nan"),
    "nodes zero": (lambda t: ["sft_mid", "--nodes", "0"], "need 1 <= MIN <= MAX"),
    "gpus per node zero": (lambda t: ["sft_mid", "--gpus-per-node", "0"], "--gpus-per-node must be a positive integer"),
    "elastic range reversed": (lambda t: ["sft_mid", "--num-workers", "4:2"], "need 1 <= MIN <= MAX"),
    "recipe not utf-8": (_file("latin1.yaml", MID.encode() + "# caf\xe9\n".encode("latin-1")), "is not UTF-8 text"),
    "recipe a yaml list": (_file("list.yaml", "- learning_rate: 1.0e-5\n"), "must be a YAML mapping of keys to values"),
    "recipe not yaml": (_file("broken.yaml", "learning_rate: [1\n"), "is not valid YAML"),
    "recipe is a folder": (_folder_named_yaml, "does not exist; pass a YAML path"),
    "accelerate mixed precision": (_accelerate("mixed_precision: bf16", "mixed_precision: fp7"),
                                   "mixed_precision must be one of no, fp8, fp16, bf16, got 'fp7'"),
    "accelerate zero stage": (_accelerate("zero_stage: 3", "zero_stage: 5"), "zero_stage must be 0-3, got 5"),
    "accelerate num processes": (_accelerate("num_processes: 8", "num_processes: 0"), "num_processes must be a positive int"),
    "accelerate distributed type": (_accelerate("distributed_type: DEEPSPEED", "distributed_type: MAGIC"),
                                    "distributed_type must be one of"),
    "callback malformed": (lambda t: ["sft_mid", "--tiny", "--set", "ray.callbacks=[no_colon]"],
                           "ray.callbacks entry 'no_colon' is not a callback; write each as"),
    "callback not importable": (lambda t: ["sft_mid", "--tiny", "--set", "ray.callbacks=[benchmarks.absent:Nothing]"],
                                "ray.callbacks: cannot import benchmarks.absent:Nothing"),
    "callback not a TrainerCallback": (lambda t: ["sft_mid", "--tiny", "--set", "ray.callbacks=[json:dumps]"],
                                       "json:dumps is not a transformers TrainerCallback class"),
    "callback wrong argument": (lambda t: ["sft_mid", "--tiny", "--set", "ray.callbacks=[{benchmarks.faults:CrashInSave: {stp: 3}}]"],
                                "does not take {'stp': 3}"),
    "checkpoints all damaged": (_checkpoints("shard deleted", "truncated"),
                                "has no whole checkpoint to resume from (checkpoint-0000010: global_step10/"),
    "checkpoint position unreadable": (_checkpoints("position unreadable"),
                                       "(checkpoint-0000005: raytrain_align_position.json is unreadable"),
    "committed checkpoint gone": (_checkpoints(None, "gone"), "its committed checkpoint-0000010 is gone"),
    "storage under a file": (_under_a_file("--storage"), "cannot be written: "),
    "output dir under a file": (_under_a_file("--output-dir"), "cannot be written: "),
    "storage without room for the checkpoints": (_model_larger_than_the_disk, "this run writes at least 30,000.0 GB"),
    "dpo with every_n_layers checkpointing": (
        lambda t: ["dpo_apo_zero", "--tiny", "--set", "gradient_checkpointing_kwargs={use_reentrant: true, every_n_layers: 2}"],
        "every_n_layers does not work with TRL 1.16's DPOTrainer"),
    "storage scheme unknown": (lambda t: ["sft_mid", "--tiny", "--storage", "nosuch://bucket/runs"],
                               "--storage nosuch://bucket/runs: Protocol not known: nosuch"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_exit_2_nothing_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    make_args, expected = CASES[case]
    args = make_args(tmp_path)
    storage, out = tmp_path / "storage", tmp_path / "out"
    if "--storage" not in args:
        args += ["--storage", str(storage)]
    if "--output-dir" not in args:
        args += ["--output-dir", str(out)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (case, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert "Traceback" not in err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_the_sweep_is_wide():
    assert len(CASES) >= 40
