"""Stage 2 of 5: turn a recipe plus CLI flags into a Plan — everything resolved, nothing started.

The plan is what `python -m raytrain_align plan` prints and what every Ray worker receives: world size,
global batch, the accelerate environment (built by accelerate's own launcher code, so each worker's
DeepSpeed/FSDP plugin is exactly what `accelerate launch --config_file ...` would build) and the data
sources. It touches no cluster, no GPU and no disk beyond reading the recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import callbacks
from .errors import RecipeError
from .accelerate_config import ACCELERATE_BACKENDS, deepspeed_config_for, fsdp_config_for, launch_env
from .recipe import RECIPES, Recipe, gpu_only_settings


@dataclass
class Plan:
    recipe: str
    recipe_path: str
    method: str
    tiny: bool
    backend: str  # deepspeed | fsdp | ddp
    nodes: int
    gpus_per_node: int  # workers per node (GPUs, or CPU workers when use_gpu is false)
    use_gpu: bool
    cpus_per_worker: int
    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    storage_path: str
    run_name: str
    output_dir: str
    max_failures: int
    collective_timeout_s: int
    model: dict[str, Any]
    script: dict[str, Any]
    training: dict[str, Any]
    accelerate_config: str
    accelerate_env: dict[str, str]
    deepspeed_config: dict[str, Any] | None
    data: dict[str, Any] = field(default_factory=dict)  # data preparation options: strict, long_samples
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    cpu_overrides: dict[str, Any] = field(default_factory=dict)  # what CPU workers cannot do as the recipe says
    recipe_model: str = ""  # the recipe's own model_name_or_path (before --tiny swapped it)
    fsdp_config: dict[str, Any] | None = None  # the FSDP2 plugin accelerate builds from accelerate_env
    # elastic: Ray Train may run anywhere from min_workers to world_size workers (the global batch is kept)
    min_workers: int = 0  # 0: a fixed world size
    resize_interval_s: float = 60.0  # how often a running elastic group checks for more resources (Ray's default)
    # How long a (re)start waits for its workers' placement before Ray Train re-plans the group size. Ray Train
    # sizes a restart from the resources it sees at once, and a node lost a second ago still counts for ~7 s:
    # Ray's 60 s wait on that stale size is most of a node-loss recovery. Elastic runs re-plan after 15 s.
    restart_wait_s: float = 60.0
    checkpoint_upload: str = "sync"  # "async": checkpoints upload in a background thread while training goes on
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # ray.callbacks: [{"name": "mod:Class", "kwargs": {}}]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)



def worker_range(name: str, value, per_node: int = 1) -> tuple[int, int] | None:
    """'N' or 'MIN:MAX' (nodes or workers; x per_node) -> (min, max) workers; None when not given."""
    if value is None:
        return None
    lo, _, hi = str(value).partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise RecipeError(f"{name} must be N or MIN:MAX, got {value!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise RecipeError(f"{name} {value!r}: need 1 <= MIN <= MAX")
    return lo_i * per_node, hi_i * per_node


def _lcm_range(mbs: int, lo: int, hi: int) -> int:
    return mbs * math.lcm(*range(lo, hi + 1))


def _given(flag, default):
    """A flag's value when the user gave one (0 included: refused by the check, never replaced), else the default."""
    return default if flag is None else flag


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{name} must be a positive integer, got {value!r}")
    return value


def default_run_name(recipe: Recipe) -> str:
    """A registered recipe's name; for a recipe file, the handbook's own name for the run: the last part of its
    output_dir (data/zephyr-7b-dpo-full), since the handbook names every file config_full.yaml or similar."""
    if recipe.name in RECIPES:
        return recipe.name
    return Path(str(recipe.training.get("output_dir") or "")).name or recipe.name


def cpu_only_overrides(model: dict, training: dict, explicit: frozenset[str]) -> dict[str, Any]:
    """What a recipe asks of a GPU that CPU workers cannot do: fp32 instead of bf16/fp16, sdpa instead of
    flash-attention kernels, and recipe.gpu_only_settings. Shown in the plan; keys the user set stay."""
    out: dict[str, Any] = {}
    if training.get("bf16") or training.get("fp16"):
        out.update(bf16=False, fp16=False)
    if model.get("dtype") in ("bfloat16", "float16"):
        out["dtype"] = "float32"
    if str(model.get("attn_implementation") or "").startswith(("flash", "kernels-")):
        out["attn_implementation"] = "sdpa"
    out.update(gpu_only_settings(model, training))
    return {k: v for k, v in out.items() if k not in explicit}


def apply_tiny(recipe: Recipe, explicit: frozenset[str], storage_path: str, model: dict, training: dict,
               ray_cfg: dict) -> tuple[dict, dict[str, Any]]:
    """--tiny, in one place: the tiny model of the recipe's family and its learnable data under storage, CPU-sized
    settings (what the user --set stays). Returns the tiny data entries and every override, for the plan to show."""
    from . import tiny as tiny_mod

    overrides = {k: v for k, v in tiny_mod.tiny_overrides(recipe).items() if k not in explicit}
    for key, value in overrides.items():
        section = model if key in recipe.model or key in tiny_mod.MODEL_KEYS else training
        section[key] = value
    if "ray.global_batch_size" not in explicit:  # the recipe's GPU-sized one
        ray_cfg.pop("global_batch_size", None)
    assets = tiny_mod.assets_dir(storage_path)
    if "model_name_or_path" not in explicit:  # e.g. a pipeline stage starting from the previous stage's export
        model["model_name_or_path"] = str(tiny_mod.model_dir(assets, recipe.model["model_name_or_path"]))
        overrides["model_name_or_path"] = f"tiny {tiny_mod._family(recipe.model['model_name_or_path'])} built from a config"
    return tiny_mod.tiny_script(recipe, assets), overrides


def build_plan(
    recipe: Recipe,
    tiny: bool = False,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    storage: str | None = None,
    output_dir: str | None = None,
    max_failures: int | None = None,
    num_workers: str | None = None,  # "MIN:MAX" Ray workers (elastic) or "N"; beats nodes x gpus_per_node
    explicit: frozenset[str] = frozenset(),  # keys the user --set: --tiny leaves them alone
    cpu: bool = False,  # --cpu: the recipe's own model and data on CPU workers
) -> Plan:
    """The recipe resolved for this launch: --tiny applied, workers placed, batch numbers derived (once), the
    accelerate environment, names and the ray: choices checked."""
    from . import storage as storage_mod
    from . import tiny as tiny_mod
    from .sources import check_local

    training, model, script, ray_cfg = dict(recipe.training), dict(recipe.model), dict(recipe.script), dict(recipe.ray)
    storage_path = storage_mod.root(storage or ray_cfg.get("storage_path"))
    check_local(script)  # local paths only (Hub ids are checked when loaded); --tiny keeps local entries
    overrides: dict[str, Any] = {}
    if tiny:
        script, overrides = apply_tiny(recipe, explicit, storage_path, model, training, ray_cfg)
    w = _workers(recipe.accelerate, ray_cfg, tiny or cpu, nodes, gpus_per_node, num_workers)
    cpu_overrides = {} if w["use_gpu"] or tiny else cpu_only_overrides(model, training, explicit)
    for key, value in cpu_overrides.items():
        (model if key in tiny_mod.MODEL_KEYS else training)[key] = value
    lo_world, world = w["min_world"], w["world"]
    pdbs, ga, gbs = _batch(training, ray_cfg, lo_world, world)

    backend = ACCELERATE_BACKENDS[recipe.accelerate["distributed_type"]]
    env = launch_env(recipe.accelerate_path, w["nodes"], world, None if w["use_gpu"] else "no", recipe.accelerate_argv)
    run_name, out = _names(recipe, training, tiny, output_dir)
    checkpoint_upload, long_samples = _ray_choices(ray_cfg)
    return Plan(
        recipe=recipe.name,
        recipe_path=str(recipe.path),
        method=recipe.method,
        tiny=tiny,
        backend=backend,
        nodes=w["nodes"],
        gpus_per_node=w["per_node"],
        use_gpu=w["use_gpu"],
        cpus_per_worker=w["cpus"],
        world_size=world,
        per_device_train_batch_size=pdbs,
        gradient_accumulation_steps=ga,
        global_batch_size=gbs,
        storage_path=storage_path,
        run_name=run_name,
        output_dir=out,
        # an elastic run expects to lose workers: a few restarts by default
        max_failures=max_failures if max_failures is not None else int(ray_cfg.get("max_failures") or (3 if lo_world < world else 0)),
        collective_timeout_s=int(training.get("ddp_timeout") or 1800),
        model=model,
        script=script,
        training=training,
        accelerate_config=str(recipe.accelerate_path),
        accelerate_env=env,
        deepspeed_config=deepspeed_config_for(env, training, world, gbs) if backend == "deepspeed" else None,
        data={"strict": bool(ray_cfg.get("strict_data")), "long_samples": long_samples},
        tiny_overrides=overrides,
        cpu_overrides=cpu_overrides,
        recipe_model=recipe.model["model_name_or_path"],
        fsdp_config=fsdp_config_for(env) if backend == "fsdp" else None,
        min_workers=lo_world if lo_world < world else 0,
        resize_interval_s=float(ray_cfg.get("resize_interval_s") or 60.0),
        restart_wait_s=float(ray_cfg.get("restart_wait_s") or (15.0 if lo_world < world else 60.0)),
        checkpoint_upload=checkpoint_upload,
        callbacks=callbacks.normalize(ray_cfg.get("callbacks")),
    )


def _workers(acc: dict, ray_cfg: dict, on_cpu: bool, nodes, gpus_per_node, num_workers) -> dict[str, Any]:
    """Where the workers go: per node, how many nodes, the world size range (min_world..world), GPU or CPU.
    CPU workers (--tiny, --cpu: a laptop) are one node of TINY_WORKERS unless told otherwise."""
    from .tiny import TINY_WORKERS

    num_machines = acc.get("num_machines", 1) or 1
    if on_cpu:
        per_node = _positive("--gpus-per-node", _given(gpus_per_node, TINY_WORKERS))
        node_range = worker_range("--nodes", _given(nodes, 1))
        use_gpu, cpus = False, 1
    else:
        per_node_default = max(1, (acc.get("num_processes", 1) or 1) // num_machines)
        per_node = _positive("--gpus-per-node" if gpus_per_node is not None else "ray.gpus_per_node",
                             _given(gpus_per_node, ray_cfg.get("gpus_per_node") or per_node_default))
        node_range = worker_range("--nodes" if nodes is not None else "ray.nodes",
                                  _given(nodes, ray_cfg.get("nodes") or num_machines))
        use_gpu = ray_cfg.get("use_gpu", True) is not False
        cpus = _positive("ray.cpus_per_worker", ray_cfg.get("cpus_per_worker") or 1)
    n_nodes, lo_world, world = node_range[1], node_range[0] * per_node, node_range[1] * per_node
    given = worker_range("--num-workers" if num_workers else "ray.num_workers", num_workers or ray_cfg.get("num_workers"))
    if given:  # workers, not nodes: the range Ray Train may use, packed onto nodes of per_node workers
        (lo_world, world), n_nodes = given, -(-given[1] // per_node)
        per_node = min(per_node, world)
    return {"per_node": per_node, "nodes": n_nodes, "min_world": lo_world, "world": world, "use_gpu": use_gpu,
            "cpus": cpus}


def _batch(training: dict, ray_cfg: dict, lo_world: int, world: int) -> tuple[int, int, int]:
    """(per-device batch, gradient accumulation, global batch): the derived numbers, computed here only.
    ray.global_batch_size fixes the global batch and sets the accumulation in `training`; an elastic range must
    keep it exact at every world size in it."""
    from .elastic import valid_world_sizes

    pdbs = _positive("per_device_train_batch_size", training.get("per_device_train_batch_size", 8))
    ga = _positive("gradient_accumulation_steps", training.get("gradient_accumulation_steps", 1))
    gbs_target = ray_cfg.get("global_batch_size")
    if gbs_target:
        if gbs_target % (pdbs * world):
            raise RecipeError(
                f"ray.global_batch_size {gbs_target} is not a multiple of per_device_train_batch_size x world size "
                f"= {pdbs} x {world}; pick a global batch divisible by {pdbs * world} or change --nodes/--gpus-per-node"
            )
        ga = gbs_target // (pdbs * world)
        training["gradient_accumulation_steps"] = ga
    gbs = pdbs * ga * world
    ok = valid_world_sizes(gbs, pdbs, lo_world, world)
    if lo_world < world and len(ok) != world - lo_world + 1:
        raise RecipeError(
            f"global batch {gbs} (per-device {pdbs}) cannot be kept at every world size in {lo_world}..{world} "
            f"(kept at {ok}); set ray.global_batch_size to a multiple of {_lcm_range(pdbs, lo_world, world)} or "
            "narrow the elastic range")
    return pdbs, ga, gbs


def _names(recipe: Recipe, training: dict, tiny: bool, output_dir: str | None) -> tuple[str, str]:
    """(run name, output dir); --tiny suffixes both so a tiny run never lands on the real one. Sets
    training["output_dir"]."""
    run_name = training.get("run_name") or default_run_name(recipe)
    if tiny:
        run_name = f"{run_name}-tiny"
    out = output_dir or training.get("output_dir") or f"data/{run_name}"
    if tiny and not output_dir:
        out = f"{out}-tiny"
    if "://" not in out:
        out = str(Path(out).expanduser().resolve())
    training["output_dir"] = out
    return run_name, out


def _ray_choices(ray_cfg: dict) -> tuple[str, str]:
    """ray.checkpoint_upload and ray.long_samples, each one of its words."""
    checkpoint_upload = ray_cfg.get("checkpoint_upload") or "sync"
    if checkpoint_upload not in ("sync", "async"):
        raise RecipeError(f"ray.checkpoint_upload is '{checkpoint_upload}'; use 'sync' (training waits until a "
                          "checkpoint is committed) or 'async' (it uploads in the background)")
    long_samples = ray_cfg.get("long_samples") or "truncate"
    if long_samples not in ("truncate", "drop"):
        raise RecipeError(f"ray.long_samples is '{long_samples}'; use 'truncate' (TRL's behaviour) or 'drop'")
    return checkpoint_upload, long_samples


def describe(plan: Plan) -> str:
    """Human-readable plan: what will run where, and with which batch and sharding."""
    lines = [
        f"recipe        {plan.recipe} ({plan.method.upper()}) {plan.recipe_path}",
        f"model         {plan.model.get('model_name_or_path')}",
        f"workers       {plan.nodes} node(s) x {plan.gpus_per_node} {'GPU' if plan.use_gpu else 'CPU'} worker(s) = world size {plan.world_size}",
        f"batch         per-device {plan.per_device_train_batch_size} x grad-acc {plan.gradient_accumulation_steps} x world {plan.world_size} = GBS {plan.global_batch_size}",
    ]
    if plan.min_workers:
        lines.append(f"elastic       {plan.min_workers}..{plan.world_size} workers; grad-acc follows the world size, GBS "
                     f"{plan.global_batch_size} kept; up to {plan.max_failures} restarts after failures, each waiting "
                     f"{plan.restart_wait_s:g}s for its workers before sizing again")
    if plan.checkpoint_upload == "async":
        lines.append("checkpoints   uploaded in the background (ray.checkpoint_upload: async); training does not wait")
    if plan.callbacks:
        lines.append(f"callbacks     {callbacks.describe(plan.callbacks)} (ray.callbacks, on every worker)")
    lines += [
        f"backend       {plan.backend} (from {plan.accelerate_config})",
    ]
    mix = plan.script.get("dataset_mixture")
    if mix:
        for d in mix["datasets"]:
            where = d["id"] + (f" [{d.get('config')}]" if d.get("config") else "") + f" split={d.get('split', 'train')}"
            use = "test split (whole)" if d.get("test") else f"weight={d.get('weight', 1.0)}" + \
                (" (first rows)" if mix.get("take") == "first" else "")
            lines.append(f"data          {where} {use}")
    elif plan.script.get("dataset_name"):
        lines.append(f"data          {plan.script['dataset_name']}")
    t = plan.training
    lines += [
        f"optimizer     lr {t.get('learning_rate')} {t.get('lr_scheduler_type', 'linear')} warmup {t.get('warmup_steps', 0)} max_grad_norm {t.get('max_grad_norm', 1.0)}",
        f"sequence      max_length {t.get('max_length', 1024)} packing {t.get('packing', False)} epochs {t.get('num_train_epochs', 3)}",
        f"storage       {plan.storage_path}/{plan.run_name}",
        f"output        {plan.output_dir}",
    ]
    if plan.tiny_overrides:
        lines.append("tiny          " + ", ".join(f"{k}={v}" for k, v in plan.tiny_overrides.items()))
    if plan.cpu_overrides:
        lines.append("cpu           " + ", ".join(f"{k}={v}" for k, v in plan.cpu_overrides.items()))
    if plan.deepspeed_config:
        lines.append("deepspeed     " + json.dumps(plan.deepspeed_config, indent=2).replace("\n", "\n              "))
    if plan.fsdp_config:
        lines.append("fsdp          " + json.dumps(plan.fsdp_config, indent=2).replace("\n", "\n              "))
    return "\n".join(lines)
