"""What a trained model really is, read from the live trainer: engine, sharding and checksums. Goes into each run's
summary (`facts`), so tests and users see what ZeRO-3, FSDP2 or LoRA actually did rather than what was asked."""

from __future__ import annotations

from typing import Any


def zero_facts(trainer) -> dict[str, Any]:
    """What the model really is after the Trainer prepared it: ZeRO stage and whether params are partitioned."""
    engine = trainer.model_wrapped
    facts: dict[str, Any] = {"engine": type(engine).__name__}
    if hasattr(engine, "zero_optimization_stage"):
        facts["zero_stage"] = int(engine.zero_optimization_stage())
        params = list(trainer.model.parameters())
        # Under ZeRO-3 every parameter has a ds_tensor holding this rank's 1/world share of it.
        facts["params_partitioned"] = bool(params) and all(hasattr(p, "ds_tensor") for p in params)
        facts["local_partition_numel"] = int(sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")))
        facts["full_param_numel"] = int(sum(getattr(p, "ds_numel", p.numel()) for p in params))
    if hasattr(trainer.model, "peft_config"):  # LoRA: only the adapters train (ZeRO-3 partitions them too)
        facts["peft"] = type(trainer.model).__name__
        facts["trainable_numel"] = int(sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters()
                                           if p.requires_grad))
    if getattr(trainer, "precompute_ref_logps", False):  # DPO: reference log-probs computed once, before step 1
        facts["ref_log_probs"] = "precomputed"
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:  # DPO's reference model: a DeepSpeed engine of its own, partitioned like the policy
        ref_params = list(getattr(ref, "module", ref).parameters())
        facts["ref_engine"] = type(ref).__name__
        facts["ref_params_partitioned"] = bool(ref_params) and all(hasattr(p, "ds_tensor") for p in ref_params)
        # ZeRO-3 gives it only its parameter-gathering coordinator (DeepSpeedZeRoOffload), no optimizer step
        facts["ref_optimizer"] = type(getattr(ref, "optimizer", None)).__name__
    return facts


def fsdp_facts(trainer) -> dict[str, Any]:
    """What FSDP2 made of the policy (and DPO's reference model): DTensor parameters, their placements and device
    mesh, the FSDP units auto-wrap created, and the plugin settings accelerate resolved from the environment."""
    plugin = trainer.accelerator.state.fsdp_plugin
    facts: dict[str, Any] = {
        "fsdp_version": plugin.fsdp_version,
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_params": type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
        "state_dict_type": plugin.state_dict_type.name,
        "cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading),
        **sharding(trainer.model),
    }
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:  # TRL's prepare_fsdp: fully_shard over the same world mesh, no optimizer
        facts.update({f"ref_{k}": v for k, v in sharding(ref).items()})
        trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        facts["ref_in_optimizer"] = any(id(p) in trained for p in ref.parameters())
    return facts


def sharding(model) -> dict[str, Any]:
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    dtensors = [p for p in params if isinstance(p, DTensor)]
    mesh = dtensors[0].device_mesh if dtensors else None
    return {
        "engine": type(model).__name__,
        "params_dtensor": bool(params) and len(dtensors) == len(params),
        "placements": sorted({str(tuple(p.placements)) for p in dtensors}),
        "mesh": {"ranks": mesh.mesh.flatten().tolist(), "device": mesh.device_type} if mesh is not None else None,
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        # fully_shard turns a module's class into FSDP<class>: what auto-wrap made a unit, by class
        "fsdp_unit_types": dict(Counter(type(m).__name__.removeprefix("FSDP") for m in model.modules()
                                        if isinstance(m, FSDPModule))),
        "local_numel": int(sum(p.to_local().numel() for p in dtensors)),
        "full_param_numel": int(sum(p.numel() for p in params)),
    }


def param_checksums(model) -> dict[str, list[float]]:
    """(sum, sum of squares) of every trained parameter, from the shards without gathering them (Shard
    placements: a full tensor's sums are the sums over its shards); the exported model must match them."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    names, parts = [], []
    for name, p in model.named_parameters():
        if not (isinstance(p, DTensor) and all(isinstance(pl, Shard) for pl in p.placements)):
            return {}
        local = p.to_local().detach().double()
        names.append(name)
        parts.append(torch.stack([local.sum(), (local * local).sum()]))
    sums = torch.stack(parts)
    dist.all_reduce(sums)
    return dict(zip(names, sums.cpu().tolist()))


def quantized_linear_layers(model) -> int:
    """QLoRA: how many bitsandbytes layers the model holds (0 when the load was not quantized)."""
    return sum("Linear4bit" in type(m).__name__ or "Linear8bitLt" in type(m).__name__ for m in model.modules())
