"""Accelerate configs in the handbook's format (zero3.yaml, fsdp.yaml, ddp.yaml), in one place: checked against
accelerate's own fields, FSDP1-era keys mapped onto FSDP2, and turned into exactly the environment, DeepSpeed config
and FSDP2 settings `accelerate launch --config_file` would give each process (computed by accelerate itself)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

from .errors import RecipeError, did_you_mean, read_yaml_mapping


ACCELERATE_BACKENDS = {"DEEPSPEED": "deepspeed", "FSDP": "fsdp", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "NO": "ddp"}


def load(path: Path) -> dict:
    """An accelerate config file, checked against accelerate's own ClusterConfig fields."""
    from accelerate.commands.config.config_args import ClusterConfig

    data = read_yaml_mapping(path, "accelerate config")
    known = {f.name for f in dataclasses.fields(ClusterConfig)}
    for key in data:
        if key not in known:
            raise RecipeError(f"accelerate config '{path}': unknown key '{key}'{did_you_mean(key, known)}")
    dt = data.get("distributed_type")
    if dt not in ACCELERATE_BACKENDS:
        raise RecipeError(
            f"accelerate config '{path}': distributed_type must be one of {', '.join(ACCELERATE_BACKENDS)}, got {dt!r}"
        )
    ds = data.get("deepspeed_config") or {}
    if dt == "DEEPSPEED":
        stage = ds.get("zero_stage")
        if stage not in (0, 1, 2, 3):
            raise RecipeError(f"accelerate config '{path}': deepspeed_config.zero_stage must be 0-3, got {stage!r}")
        if ds.get("deepspeed_config_file"):
            raise RecipeError(
                f"accelerate config '{path}': deepspeed_config_file is not supported yet; put zero_stage/offload_* keys in deepspeed_config"
            )
    from accelerate.utils import PrecisionType

    mp = data.get("mixed_precision")
    if mp is not None and str(mp) not in PrecisionType.list():
        raise RecipeError(f"accelerate config '{path}': mixed_precision must be one of {', '.join(PrecisionType.list())}, "
                          f"got {mp!r}")
    for key in ("num_machines", "num_processes"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise RecipeError(f"accelerate config '{path}': {key} must be a positive int, got {v!r}")
    return data


# ----------------------------------------------------------------------------------------------- FSDP2

# fsdp_config keys of FSDP1-era configs (the handbook's fsdp.yaml) that FSDP2 in accelerate 1.15 no longer reads
# (FullyShardedDataParallelPlugin reads them only for fsdp_version 1), and what FSDP2 does instead.
FSDP2_NOT_HONOURED = {
    "fsdp_backward_prefetch": "FSDP2 always prefetches the next layer's all-gather in backward (accelerate drops "
                              "backward_prefetch)",
    "fsdp_forward_prefetch": "FSDP2 has no explicit forward prefetch (accelerate refuses it); its implicit "
                             "prefetching overlaps the all-gathers",
    "fsdp_use_orig_params": "FSDP2 always trains the original parameters, as DTensors",
    "fsdp_sync_module_states": "FSDP2 needs no sync; with fsdp_cpu_ram_efficient_loading rank 0's weights are "
                               "broadcast into the shards",
}
# The environment variables accelerate's launcher derives from those keys; the FSDP2 plugin reads none of them.
FSDP2_UNREAD_ENV = ("FSDP_SHARDING_STRATEGY", "FSDP_BACKWARD_PREFETCH", "FSDP_FORWARD_PREFETCH",
                    "FSDP_USE_ORIG_PARAMS", "FSDP_SYNC_MODULE_STATES")
# FSDP1 sharding strategies FSDP2 expresses as reshard_after_forward; the others need a 2-D mesh or no sharding.
FSDP2_RESHARD = {"FULL_SHARD": "true", "SHARD_GRAD_OP": "false"}


def fsdp2_launch_args(data: dict, path: Path) -> tuple[list[str], list[str]]:
    """An FSDP accelerate config mapped onto FSDP2: the `accelerate launch` flags to add (fsdp_version 2 and
    reshard_after_forward from the FSDP1 sharding strategy) and one warning line per key FSDP2 does not honour."""
    from accelerate.commands.launch import launch_command_parser

    where = f"accelerate config '{path}'"
    fsdp = {(k if k.startswith("fsdp_") else f"fsdp_{k}"): v for k, v in (data.get("fsdp_config") or {}).items()}
    known = {a.dest for a in launch_command_parser()._actions if a.dest.startswith("fsdp_")}
    for key in fsdp:
        if key not in known:
            raise RecipeError(f"{where}: unknown key 'fsdp_config.{key}'{did_you_mean(key, known)}")
    warnings_: list[str] = []
    if str(fsdp.get("fsdp_version", 2)) != "2":
        warnings_.append(f"warning: {Path(path).name} says fsdp_version {fsdp['fsdp_version']}; raytrain_align runs FSDP2 "
                         "(fsdp_version 2); FSDP1 is deprecated in torch and accelerate")
    state = str(fsdp.get("fsdp_state_dict_type") or "SHARDED_STATE_DICT").upper()
    if state not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        raise RecipeError(f"{where}: fsdp_state_dict_type {state} does not exist in FSDP2; use SHARDED_STATE_DICT "
                          "(torch distributed checkpoint) or FULL_STATE_DICT")
    reshard = fsdp.get("fsdp_reshard_after_forward")
    strategy = fsdp.get("fsdp_sharding_strategy")
    if isinstance(strategy, int) and not isinstance(strategy, bool) and 1 <= strategy <= 5:
        strategy = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"][strategy - 1]
    if reshard is None and strategy is not None:
        if str(strategy).upper() not in FSDP2_RESHARD:
            raise RecipeError(
                f"{where}: fsdp_sharding_strategy {strategy} has no FSDP2 equivalent here; use FULL_SHARD "
                "(reshard after forward) or SHARD_GRAD_OP (keep gathered until backward), or ddp.yaml for no sharding"
            )
        reshard = FSDP2_RESHARD[str(strategy).upper()]
    elif reshard is not None and strategy is not None:
        warnings_.append(f"warning: {Path(path).name}: fsdp_sharding_strategy {strategy} ignored: fsdp_reshard_after_forward "
                         "is set and FSDP2 reads only that")
    reshard = FSDP2_RESHARD.get(str(reshard).upper(), reshard)
    if reshard is not None and str(reshard).lower() not in ("true", "false"):
        raise RecipeError(f"{where}: fsdp_reshard_after_forward must be true or false under FSDP2, got {reshard!r}")
    for key, why in FSDP2_NOT_HONOURED.items():
        if key in fsdp:
            warnings_.append(f"warning: {Path(path).name}: '{key}: {fsdp[key]}' not honoured by FSDP2: {why}")
    argv = ["--fsdp_version", "2"]
    if reshard is not None:
        argv += ["--fsdp_reshard_after_forward", str(reshard).lower()]
    return argv, warnings_


def launch_env(config_path: Path, num_machines: int, num_processes: int, mixed_precision: str | None,
                   extra_argv: list[str] = ()) -> dict[str, str]:
    """The ACCELERATE_*/FSDP_* variables `accelerate launch --config_file` sets, computed by accelerate itself."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(config_path), "--num_machines", str(num_machines), "--num_processes", str(num_processes)]
    argv += list(extra_argv)
    # Ray Train forms the process group itself; the port only has to satisfy accelerate's in-use check
    # (a busy 29500, e.g. a torchrun job on this machine, would make it refuse a multi-node plan).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv += ["--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    if mixed_precision:
        argv += ["--mixed_precision", mixed_precision]
    args = launch_command_parser().parse_args(argv + ["train.py"])
    with _quiet():
        args, defaults, mp_from_flag = _validate_launch_command(args)
    if args.use_deepspeed:
        fields_ = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields_ + (["mixed_precision"] if mp_from_flag else []))
        with _quiet():
            _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    env = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    if env.get("FSDP_VERSION") == "2":  # the FSDP1 knobs FSDP2 does not read (recipe.py warned about each)
        env = {k: v for k, v in env.items() if k not in FSDP2_UNREAD_ENV}
    return env


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def deepspeed_config_for(env: dict[str, str], training: dict[str, Any], world_size: int, gbs: int) -> dict[str, Any]:
    """The DeepSpeed config accelerate's DeepSpeedPlugin builds from that environment, with the Trainer's
    'auto' values filled in the way transformers fills them."""
    from accelerate.utils import DeepSpeedPlugin, patch_environment

    with patch_environment(**env), _quiet():
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(env.get("ACCELERATE_MIXED_PRECISION", "no"))
    cfg = json.loads(json.dumps(plugin.deepspeed_config, default=str))
    fill = {
        "train_micro_batch_size_per_gpu": training.get("per_device_train_batch_size", 8),
        "gradient_accumulation_steps": training.get("gradient_accumulation_steps", 1),
        "train_batch_size": gbs,
        "gradient_clipping": training.get("max_grad_norm", 1.0),
    }
    for k, v in fill.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    cfg.pop("steps_per_print", None)
    return cfg


def fsdp_config_for(env: dict[str, str]) -> dict[str, Any]:
    """The FSDP2 settings accelerate's FullyShardedDataParallelPlugin resolves from that environment (and the
    Accelerator's mixed precision), as plain values: what each worker's `fully_shard` calls will get."""
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    with patch_environment(**env), _quiet():
        plugin = FullyShardedDataParallelPlugin()
        mixed = env.get("ACCELERATE_MIXED_PRECISION", "no")
        if mixed != "no":
            plugin.set_mixed_precision(mixed)
    wrap = getattr(plugin.auto_wrap_policy, "__name__", None)
    if wrap == "transformer_auto_wrap_policy":
        wrap = f"each {', '.join(plugin.transformer_cls_names_to_wrap or ['model._no_split_modules'])} module"
    elif wrap == "size_based_auto_wrap_policy":
        wrap = f"each module over {plugin.min_num_params:,} parameters"
    mp = plugin.mixed_precision_policy
    return {
        "fsdp_version": plugin.fsdp_version,
        "auto_wrap": wrap or "no wrap (one unit for the whole model)",
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_params": type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
        "mixed_precision": {k: str(getattr(mp, k)).replace("torch.", "") for k in ("param_dtype", "reduce_dtype")}
        if mp is not None else "no (parameters, compute and gradient reduction in the model's dtype)",
        "state_dict_type": plugin.state_dict_type.name,
        "cpu_ram_efficient_loading": plugin.cpu_ram_efficient_loading,
        "activation_checkpointing": plugin.activation_checkpointing,
    }
