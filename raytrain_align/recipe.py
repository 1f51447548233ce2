"""Stage 1 of 5: read a recipe in the alignment-handbook's format and check every key before anything runs.

A recipe is one YAML file of TRL fields (`trl.ModelConfig`, the handbook's `ScriptArguments` with
`dataset_mixture`, `trl.SFTConfig` or `trl.DPOConfig` plus the handbook's `chat_template`) and an optional `ray:` section
for where and how to run. The launch backend comes from an accelerate config file in the handbook's
format. Unknown keys and wrong types are refused here with a one-line hint, never dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from . import handbook
from .accelerate_config import fsdp2_launch_args
from .accelerate_config import load as load_accelerate_config
from .errors import RecipeError, did_you_mean, read_yaml_mapping

# Registered recipe names -> (path under recipes/, training method).
RECIPES: dict[str, tuple[str, str]] = {
    "sft_mid": ("smollm3/sft/mid.yaml", "sft"),
    "sft_multi_task": ("smollm3/sft/sft.yaml", "sft"),
    "dpo_apo_zero": ("smollm3/dpo/apo.yaml", "dpo"),
    "zephyr_sft": ("zephyr-7b-beta/sft/config_full.yaml", "sft"),
    "zephyr_dpo": ("zephyr-7b-beta/dpo/config_full.yaml", "dpo"),
}

# The `ray:` section. CLI flags override it; the handbook's keys keep their meaning.
RAY_FIELDS: dict[str, Any] = {
    "accelerate_config": str,  # path to a handbook accelerate config (zero3.yaml, fsdp.yaml, ddp.yaml)
    "nodes": int | str,  # machines, or "MIN:MAX" (elastic); default: the accelerate config's num_machines
    "num_workers": int | str,  # Ray workers, or "MIN:MAX" (elastic); beats nodes x gpus_per_node
    "resize_interval_s": int | float,  # elastic: how often a running group looks for more resources (Ray: 60)
    "restart_wait_s": int | float,  # elastic: how long a (re)start waits for its workers' resources, then re-plans
    "gpus_per_node": int,  # workers per machine; default: num_processes / num_machines
    "cpus_per_worker": int,  # CPUs reserved per training worker
    "storage_path": str,  # Ray Train storage: local dir, NFS mount or s3:// URI
    "max_failures": int,  # worker-group restarts allowed (FailureConfig)
    "global_batch_size": int,  # if set, gradient_accumulation_steps is derived from it
    "strict_data": bool,  # bad rows are an error instead of being dropped and counted
    "long_samples": str,  # "truncate" (TRL's behaviour) or "drop" rows longer than max_length
    "checkpoint_upload": str,  # "sync" (training waits for the commit) or "async" (uploads in the background)
    "use_gpu": bool,  # false: CPU workers over gloo (what --cpu does), e.g. to try a recipe and its data on a laptop
    "method": str,  # sft | dpo | orpo: beats the folder the recipe sits in (the handbook's recipes/<model>/<method>/)
    "callbacks": list | str | dict,  # extra TrainerCallbacks on every worker: [module:Class, {module:Class: {kwargs}}]
}

# The handbook's training scripts (scripts/sft.py, dpo.py, orpo.py), one per method; its recipes sit in a folder
# named after the script that trains them. Only these can be trained here:
SUPPORTED_METHODS = ("sft", "dpo", "orpo")

# ModelConfig's bitsandbytes quantization (QLoRA) switches.
QUANTIZATION_KEYS = ("load_in_4bit", "load_in_8bit")


def gpu_only_settings(model: dict, training: dict) -> dict[str, Any]:
    """What a recipe asks for that only GPU workers run, and what CPU workers (--tiny, --cpu) use instead:
    no liger-kernel or torch.compile, torch's AdamW for bitsandbytes' 8-bit optimizers (the handbook's ORPO
    recipe), no bitsandbytes quantization (the LoRA adapters stay)."""
    out: dict[str, Any] = {k: False for k in ("use_liger_kernel", "torch_compile") if training.get(k)}
    if "bnb" in str(training.get("optim") or ""):
        out["optim"] = "adamw_torch"
    out.update({k: False for k in QUANTIZATION_KEYS if model.get(k)})
    return out


# The handbook's `dataset_mixture` entries (alignment.configs.DatasetConfig).
MIXTURE_KEYS = {"datasets", "seed", "test_split_size", "take"}  # take: shuffled (default) | first (older handbook)
MIXTURE_ENTRY_KEYS = {"id", "config", "split", "columns", "weight", "test"}  # test: true: a whole named test split

# Fields the handbook adds to TRL's configs.
HANDBOOK_TRAIN_FIELDS: dict[str, Any] = {"chat_template": str | None}
HANDBOOK_SCRIPT_FIELDS: dict[str, Any] = {"dataset_mixture": dict | None}


def recipes_root() -> Path:
    """recipes/ next to the package (a clone or editable install), or $RAYTRAIN_ALIGN_RECIPES."""
    env = os.environ.get("RAYTRAIN_ALIGN_RECIPES")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "recipes", Path.cwd() / "recipes"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


@dataclass
class Recipe:
    """A validated recipe, split by the config class each key belongs to."""

    name: str
    path: Path
    method: str  # "sft" or "dpo": which TRL config/trainer the training keys belong to
    model: dict[str, Any] = field(default_factory=dict)  # trl.ModelConfig fields
    script: dict[str, Any] = field(default_factory=dict)  # dataset_name / dataset_mixture / splits
    training: dict[str, Any] = field(default_factory=dict)  # trl.SFTConfig fields + chat_template
    ray: dict[str, Any] = field(default_factory=dict)  # the `ray:` section
    accelerate: dict[str, Any] = field(default_factory=dict)  # parsed accelerate config file
    accelerate_path: Path | None = None
    accelerate_argv: list[str] = field(default_factory=list)  # FSDP: `accelerate launch` flags mapping it onto FSDP2
    warnings: list[str] = field(default_factory=list)  # one line per translated field


# ----------------------------------------------------------------------------------------------- fields


def _config_fields(method: str) -> tuple[dict, dict, dict]:
    """(model, script, training) field name -> type, from the installed TRL itself."""
    import trl
    from trl.scripts.utils import ScriptArguments

    def hints(cls):
        resolved = typing.get_type_hints(cls)
        return {f.name: resolved.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}

    model = hints(trl.ModelConfig)
    script = {**hints(ScriptArguments), **HANDBOOK_SCRIPT_FIELDS}
    training = {**hints(config_class(method)), **HANDBOOK_TRAIN_FIELDS}
    # ModelConfig and SFTConfig share a few names (e.g. trust_remote_code): both receive them.
    return model, script, training


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value, tp) -> bool:
    """Does a YAML value fit a dataclass annotation? YAML gives str/int/float/bool/list/dict/None."""
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin in (list, tuple, set):
        args = typing.get_args(tp)
        if not isinstance(value, list):  # TRL configs accept one value for a list field (e.g. loss_type: apo_zero)
            return bool(args) and _matches(value, args[0])
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return value in {m.value for m in tp} or value in {m.name for m in tp}
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _check_type(where: str, key: str, value, tp) -> None:
    if not _matches(value, tp):
        raise RecipeError(
            f"{where}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}; fix the value in the recipe or --set"
        )


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Ranges the types alone do not say: (fields, test, what the value must be). `ray.` fields are the ray section's.
VALUE_RULES: list[tuple[tuple[str, ...], Any, str]] = [
    (("learning_rate", "num_train_epochs", "beta", "adam_epsilon", "save_steps", "logging_steps", "eval_steps",
      "ray.resize_interval_s", "ray.restart_wait_s"), lambda v: _number(v) and v > 0, "a finite number > 0"),
    (("weight_decay", "max_grad_norm", "warmup_steps"), lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    (("adam_beta1", "adam_beta2", "label_smoothing_factor"), lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    (("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_length",
      "dataset_num_proc", "save_total_limit", "ray.gpus_per_node", "ray.cpus_per_worker", "ray.global_batch_size"),
     lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    (("max_steps",), lambda v: _integer(v) and (v == -1 or v >= 1), "-1 (train num_train_epochs) or an integer >= 1"),
    (("seed", "data_seed"), lambda v: _integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    (("ray.max_failures",), lambda v: _integer(v) and v >= -1, "-1 (no limit) or an integer >= 0"),
]


def _check_values(where: str, values: dict[str, Any]) -> None:
    """One error line per value out of range, non-finite numbers (YAML's .nan / .inf) included."""
    for keys, ok, what in VALUE_RULES:
        for key in keys:
            v = values.get(key)
            if v is not None and not ok(v):
                raise RecipeError(f"{where}: '{key}' must be {what}, got {v!r}; fix the value in the recipe or --set")


def _check_mixture(where: str, mixture) -> None:
    if mixture is None:
        return
    if not isinstance(mixture, dict) or "datasets" not in mixture:
        raise RecipeError(f"{where}: 'dataset_mixture' needs a 'datasets:' list of entries with id/config/split/columns/weight")
    for key in mixture:
        if key not in MIXTURE_KEYS:
            raise RecipeError(f"{where}: unknown key 'dataset_mixture.{key}'{did_you_mean(key, MIXTURE_KEYS)}")
    if not isinstance(mixture["datasets"], list) or not mixture["datasets"]:
        raise RecipeError(f"{where}: 'dataset_mixture.datasets' must be a non-empty list")
    for i, entry in enumerate(mixture["datasets"]):
        if not isinstance(entry, dict) or "id" not in entry:
            raise RecipeError(f"{where}: dataset_mixture.datasets[{i}] needs an 'id' (hub id or local path)")
        for key in entry:
            if key not in MIXTURE_ENTRY_KEYS:
                raise RecipeError(
                    f"{where}: unknown key 'dataset_mixture.datasets[{i}].{key}'{did_you_mean(key, MIXTURE_ENTRY_KEYS)}"
                )
        w = entry.get("weight", 1.0)
        if w is not None and not (_number(w) and w >= 0):
            raise RecipeError(f"{where}: dataset_mixture.datasets[{i}].weight must be a finite number >= 0, got {w!r}")
        if entry.get("test") not in (None, True, False):
            raise RecipeError(f"{where}: dataset_mixture.datasets[{i}].test must be true or false, got {entry['test']!r}")
    tests = [e for e in mixture["datasets"] if e.get("test")]
    if tests and mixture.get("test_split_size") is not None:
        raise RecipeError(f"{where}: dataset_mixture has test entries and a test_split_size; keep one way to get a test split")
    if len(tests) == len(mixture["datasets"]):
        raise RecipeError(f"{where}: every dataset_mixture entry is a test split; add one to train on")
    if mixture.get("take", "shuffled") not in ("shuffled", "first"):
        raise RecipeError(f"{where}: dataset_mixture.take must be 'shuffled' or 'first', got {mixture['take']!r}")
    seed = mixture.get("seed", 0)
    if not _integer(seed) or not 0 <= seed < 2**32:
        raise RecipeError(f"{where}: dataset_mixture.seed must be an integer in [0, 2**32), got {seed!r}")
    test = mixture.get("test_split_size")
    if test is not None and not (_integer(test) and test >= 1 or _number(test) and not _integer(test) and 0 < test < 1):
        raise RecipeError(f"{where}: dataset_mixture.test_split_size must be a fraction in (0, 1) or a row count "
                          f">= 1, got {test!r}")


# ----------------------------------------------------------------------------------------------- loading


def resolve_recipe_path(name_or_path: str) -> tuple[str, Path, str | None]:
    """A registered name or a YAML path -> (name, path, method or None)."""
    if name_or_path in RECIPES:
        rel, method = RECIPES[name_or_path]
        return name_or_path, recipes_root() / rel, method
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        if not path.is_file():
            raise RecipeError(f"recipe file '{name_or_path}' does not exist; pass a YAML path or one of: {', '.join(RECIPES)}")
        return path.stem, path, None
    raise RecipeError(
        f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, RECIPES)}; known recipes: {', '.join(RECIPES)} "
        "(or pass a path to a recipe YAML)"
    )


def config_class(method: str):
    """TRL's config class for a handbook method (the handbook's scripts/<method>.py builds the same one)."""
    import trl

    if method == "orpo":
        import warnings

        with warnings.catch_warnings():  # TRL 1.16 keeps ORPO under trl.experimental and warns once on import
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig
        return ORPOConfig
    return {"sft": trl.SFTConfig, "dpo": trl.DPOConfig}[method]


@functools.lru_cache(maxsize=1)
def _method_fields() -> dict[str, set[str]]:
    """Per handbook method, the fields its TRL config adds to transformers' TrainingArguments."""
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {m: {f.name for f in dataclasses.fields(config_class(m)) if f.init} - base for m in ("sft", "dpo", "orpo")}


def fitting_methods(keys: set[str], fields: dict[str, set[str]]) -> list[str]:
    """The methods whose config has every method-specific key the recipe sets (`beta`: dpo or orpo)."""
    specific = keys & set().union(*fields.values())
    return [m for m, f in fields.items() if specific <= f]


def decide_method(path: Path, keys: set[str], explicit: str | None, fields: dict[str, set[str]]) -> str:
    """What the recipe says it trains: `ray.method`, else the handbook folder it sits in, checked against the
    method-specific keys it sets; with neither, those keys must name exactly one method. Never a guess."""
    choices = ", ".join(fields)
    fit = fitting_methods(keys, fields)
    specific = sorted(keys & set().union(*fields.values()) - set.intersection(*fields.values()))
    if explicit is not None:
        if explicit not in fields:
            raise RecipeError(f"recipe '{path}': ray.method is '{explicit}'; use one of {choices}")
        method, why = explicit, "ray.method"
    else:
        folder = next((p for p in reversed(path.parent.parts) if p in fields), None)
        if folder is None and len(fit) != 1:
            raise RecipeError(
                f"recipe '{path}': cannot tell which method it trains (its keys fit {' or '.join(fit) or 'none of them'}); "
                f"set ray.method to one of {choices}, or keep it in a folder named after its method as the handbook does")
        method, why = (folder, f"its folder '{folder}/'") if folder else (fit[0], f"its keys ({', '.join(specific)})")
    if fit and method not in fit:
        alien = ", ".join(k for k in specific if k not in fields[method])
        raise RecipeError(
            f"recipe '{path}': {why} says {method.upper()}, but it sets {alien}, which {method.upper()} does not have "
            f"(its keys fit {' or '.join(m.upper() for m in fit)}); set ray.method to the method it trains")
    if method not in SUPPORTED_METHODS:
        raise RecipeError(f"recipe '{path}' trains {method.upper()} ({why}), which raytrain_align does not support yet; "
                          f"supported: {', '.join(SUPPORTED_METHODS)}")
    return method


EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set key=value (value parsed as YAML: numbers, bools, lists). Dotted keys reach into sections."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set '{item}' needs the form key=value, e.g. --set learning_rate=1e-5")
        key, _, value = item.partition("=")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
            parsed = value  # YAML 1.1 reads no/yes/on/off as booleans; `--save_strategy no` means the string
        if isinstance(parsed, str) and EXPONENT_FLOAT.match(parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads 1e-5 (no dot) as a string; on a command line it is a number
        out[key.strip()] = parsed
    return out


def _apply_overrides(raw: dict, overrides: dict[str, Any], known: set[str], source: str) -> None:
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head == "ray":
            if rest not in RAY_FIELDS:
                raise RecipeError(f"{source} 'ray.{rest}' is not a ray setting{did_you_mean(rest, RAY_FIELDS)}; known: {', '.join(RAY_FIELDS)}")
            raw.setdefault("ray", {})[rest] = value
        elif head == "dataset_mixture" and rest:
            if rest not in MIXTURE_KEYS - {"datasets"}:
                raise RecipeError(f"{source} 'dataset_mixture.{rest}' is unknown; only seed, test_split_size and take can be set")
            raw.setdefault("dataset_mixture", {})[rest] = value
        elif rest:
            raise RecipeError(f"{source} '{key}': only ray.* and dataset_mixture.* keys take a dot")
        else:
            if key not in known:
                raise RecipeError(f"{source} '{key}' is not a recipe key{did_you_mean(key, known)}")
            raw[key] = value


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None, accelerate_config: str | None = None) -> Recipe:
    """Read, override (--set), split and type-check a recipe and its accelerate config."""
    name, path, method = resolve_recipe_path(name_or_path)
    if not path.is_file():
        raise RecipeError(f"recipe '{name}' points at '{path}', which is missing; set RAYTRAIN_ALIGN_RECIPES to the recipes/ folder")
    raw = read_yaml_mapping(path, "recipe")
    section = raw.get("ray") if isinstance(raw.get("ray"), dict) else {}
    explicit = (overrides or {}).get("ray.method", section.get("method"))
    if method is None:  # a file: what it says it trains
        keys = (set(raw) | {k for k in overrides or {} if "." not in k}) - {"ray"}
        method = decide_method(path, keys, explicit, _method_fields())
    elif explicit not in (None, method):
        raise RecipeError(f"recipe '{name}' trains {method.upper()}; ray.method '{explicit}' cannot change that "
                          "(copy its YAML file and edit it instead)")
    model_f, script_f, train_f = _config_fields(method)
    known = set(model_f) | set(script_f) | set(train_f) | {"ray"}
    _apply_overrides(raw, overrides or {}, known, "--set")

    recipe = Recipe(name=name, path=path.resolve(), method=method)
    where = f"recipe '{path}'"
    recipe.warnings += handbook.translate(where, raw, known)
    for key, value in raw.items():
        if key == "ray":
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: 'ray:' must be a mapping of {', '.join(RAY_FIELDS)}")
            for rk, rv in value.items():
                if rk not in RAY_FIELDS:
                    raise RecipeError(f"{where}: unknown key 'ray.{rk}'{did_you_mean(rk, RAY_FIELDS)}")
                if rv is not None:
                    _check_type(where, f"ray.{rk}", rv, RAY_FIELDS[rk])
            recipe.ray = dict(value)
            continue
        if key not in known:
            raise RecipeError(f"{where}: unknown key '{key}'{did_you_mean(key, known)}")
        placed = False
        for section, fields_ in ((recipe.model, model_f), (recipe.script, script_f), (recipe.training, train_f)):
            if key in fields_:
                _check_type(where, key, value, fields_[key])
                section[key] = value
                placed = True
        assert placed
    _check_mixture(where, recipe.script.get("dataset_mixture"))
    recipe.warnings += handbook.method_limits(where, method, recipe.training)
    _check_values(where, {**recipe.model, **recipe.script, **recipe.training,
                          **{f"ray.{k}": v for k, v in recipe.ray.items()}})
    if not recipe.script.get("dataset_mixture") and not recipe.script.get("dataset_name"):
        raise RecipeError(f"{where}: needs 'dataset_name' or 'dataset_mixture' (the handbook's data keys)")
    if not recipe.model.get("model_name_or_path"):
        raise RecipeError(f"{where}: needs 'model_name_or_path' (a hub id or a local model directory)")

    acc = accelerate_config or recipe.ray.get("accelerate_config") or "recipes/accelerate_configs/zero3.yaml"
    recipe.accelerate_path = _find_accelerate_config(acc, path)
    recipe.accelerate = load_accelerate_config(recipe.accelerate_path)
    if recipe.accelerate["distributed_type"] == "FSDP":
        recipe.accelerate_argv, fsdp_warnings = fsdp2_launch_args(recipe.accelerate, recipe.accelerate_path)
        recipe.warnings += fsdp_warnings
    return recipe


def _find_accelerate_config(acc: str, recipe_path: Path) -> Path:
    p = Path(acc)
    tries = [p] if p.is_absolute() else [Path.cwd() / p, recipes_root().parent / p, recipe_path.parent / p]
    for t in tries:
        if t.is_file():
            return t.resolve()
    raise RecipeError(
        f"accelerate config '{acc}' not found; pass --accelerate-config recipes/accelerate_configs/zero3.yaml (or fsdp.yaml, ddp.yaml)"
    )
