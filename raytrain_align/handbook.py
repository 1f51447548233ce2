"""The alignment-handbook's recipes as current TRL reads them: renamed and removed fields, the older mixture
format, and the settings the installed TRL accepts but does not carry out. Each gets one warning line, or one
error line where training would fail later; nothing is changed silently."""

from __future__ import annotations

from typing import Any

from .errors import RecipeError

# Fields current TRL/transformers renamed: translated with one warning line each, never dropped.
RENAMED_FIELDS = {
    "warmup_ratio": "warmup_steps",  # transformers 5: warmup_steps < 1 is a ratio
    "max_seq_length": "max_length",
    "torch_dtype": "dtype",
    "hub_model_revision": "hub_revision",  # the handbook's own field, now transformers' (the branch pushed to)
}
# Values current TRL renamed, per field: translated with one warning line.
RENAMED_VALUES = {
    ("packing_strategy", "ffd"): "bfd",  # TRL 0.20+: first-fit-decreasing became best-fit-decreasing
    ("packing_strategy", "bfd-requeue"): "bfd_split",
}
# Fields the handbook's recipes still carry that current TRL/transformers removed, and what happens instead.
# Each is dropped with one warning line naming the replacement; nothing is dropped silently.
REMOVED_FIELDS = {
    "overwrite_output_dir": "transformers 5 removed it; each run exports into output_dir afresh and checkpoints "
                            "live in Ray storage",
    "max_prompt_length": "TRL 1.x removed it; the trainer truncates prompt+completion to max_length",
    "max_completion_length": "TRL 1.x removed it; DPO truncates prompt+completion to max_length (truncation_mode)",
}
LEGACY_MIXER_KEYS = ("dataset_mixer", "dataset_splits", "dataset_configs")  # the handbook's format before #221


def translate(where: str, raw: dict, known: set[str]) -> list[str]:
    """Rewrites `raw` in place into current TRL's fields; returns one warning line per translation."""
    warnings: list[str] = []
    if any(k in raw for k in LEGACY_MIXER_KEYS):
        raw["dataset_mixture"] = translate_dataset_mixer(where, raw)
        warnings.append(
            f"warning: {', '.join(repr(k) for k in LEGACY_MIXER_KEYS if k in raw)}: the handbook's older mixture format; "
            "translated to dataset_mixture with its behaviour (first rows of each dataset, shuffle seed 42, the test "
            "splits whole); the older scripts' column selection is not applied, select columns if the data needs it")
        for k in LEGACY_MIXER_KEYS:
            raw.pop(k, None)
    for old, new in RENAMED_FIELDS.items():
        if old in raw and new in known:
            if new in raw:
                raise RecipeError(f"{where}: both '{old}' and its new name '{new}' are set; keep only '{new}'")
            raw[new] = raw.pop(old)
            warnings.append(f"warning: '{old}' is now '{new}' in TRL/transformers; translated (rename it in the recipe)")
    for old, why in REMOVED_FIELDS.items():
        if old in raw and old not in known:
            value = raw.pop(old)
            warnings.append(f"warning: '{old}: {value}' ignored: {why}")
    for (key, old), new in RENAMED_VALUES.items():
        if raw.get(key) == old:
            raw[key] = new
            warnings.append(f"warning: '{key}: {old}' is now '{key}: {new}' in TRL; translated")
    return warnings


def method_limits(where: str, method: str, training: dict[str, Any]) -> list[str]:
    """What TRL 1.16's trainer for `method` does differently from what the recipe asks: a warning where it
    trains the same model another way, an error where it would fail after the model has loaded."""
    if method != "dpo":
        return []
    gc_kwargs = training.get("gradient_checkpointing_kwargs") or {}
    if training.get("gradient_checkpointing", True) and "every_n_layers" in gc_kwargs:
        raise RecipeError(
            f"{where}: gradient_checkpointing_kwargs.every_n_layers does not work with TRL 1.16's DPOTrainer (its "
            "reference pass re-enables checkpointing and hands every_n_layers to torch.utils.checkpoint, which fails "
            "at the second step); remove it")
    if training.get("padding_free"):
        return ["warning: 'padding_free: true' is not carried out: TRL 1.16's DPOTrainer pads every pair (its "
                "padding-free path is disabled); set padding_free: false to say what runs"]
    return []


def translate_dataset_mixer(where: str, raw: dict) -> dict:
    """The older `dataset_mixer: {id: fraction}` + `dataset_splits` (+ `dataset_configs`) as a dataset_mixture
    that keeps what alignment.data.mix_datasets did: each split named train_* trains on the first
    int(fraction x rows) rows, each test_* split is the test set whole, both shuffled with seed 42."""
    if "dataset_mixture" in raw:
        raise RecipeError(f"{where}: both dataset_mixture and the older dataset_mixer are set; keep only dataset_mixture")
    mixer, splits = raw.get("dataset_mixer"), raw.get("dataset_splits") or ["train", "test"]
    configs = raw.get("dataset_configs") or [None] * len(mixer or {})
    if not isinstance(mixer, dict) or not mixer or not isinstance(splits, list) or len(configs) != len(mixer):
        raise RecipeError(f"{where}: dataset_mixer must map dataset ids to fractions, dataset_splits list split names, "
                          "and dataset_configs (if set) name one config per dataset")
    entries = []
    for (dataset, fraction), config in zip(mixer.items(), configs):
        for split in splits:
            if "train" not in split and "test" not in split:
                raise RecipeError(f"{where}: dataset_splits entry '{split}' names neither a train nor a test split")
            entry = {"id": dataset, "config": config, "split": split}
            entries.append({**entry, "weight": fraction} if "train" in split else {**entry, "test": True})
    return {"datasets": entries, "seed": 42, "take": "first"}
