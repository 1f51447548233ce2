"""The driver: connect to (or start) Ray, prepare data, run the TorchTrainer, export and summarize.

Runs wherever `python -m raytrain_align` runs — a laptop (starts a local Ray), the head node, or a
`ray job submit` entrypoint (finds the cluster through RAY_ADDRESS).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from .errors import RecipeError
from .plan import Plan
from .recipe import QUANTIZATION_KEYS


def check_gpus(plan: Plan) -> None:
    """A GPU recipe on a laptop without a cluster: refuse before anything is written."""
    if plan.use_gpu and not os.environ.get("RAY_ADDRESS"):
        import torch

        have = torch.cuda.device_count()
        if have < plan.gpus_per_node or plan.nodes > 1:
            raise RecipeError(
                f"recipe '{plan.recipe}' needs {plan.world_size} GPUs ({plan.nodes} node(s) x {plan.gpus_per_node}) and this "
                f"machine has {have} with no Ray cluster (RAY_ADDRESS unset); add --tiny for the CPU demo, "
                "set RAY_ADDRESS to a GPU cluster, or lower --nodes/--gpus-per-node"
            )


def check_quantization(plan: Plan) -> None:
    """QLoRA runs on data-parallel workers, as the handbook runs it (multi_gpu.yaml); bitsandbytes' quantized
    weights cannot be sharded by ZeRO-3 or FSDP here, so those are refused rather than trained another way."""
    quantized = [k for k in QUANTIZATION_KEYS if plan.model.get(k)]
    if quantized and plan.backend != "ddp":
        raise RecipeError(
            f"recipe '{plan.recipe}' sets {quantized[0]}: true (QLoRA), which runs on data-parallel workers only; pass "
            f"--accelerate-config recipes/accelerate_configs/ddp.yaml (or --set {quantized[0]}=false for {plan.backend})")


def check_gpu_packages(plan: Plan) -> None:
    """liger-kernel and bitsandbytes are the optional `gpu` extra (CUDA kernels); a GPU recipe that asks for one
    fails here, not after the workers have loaded the model. The driver's environment stands for the cluster's image."""
    import importlib.util

    if not plan.use_gpu:
        return
    if plan.training.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        raise RecipeError(
            f"recipe '{plan.recipe}' sets use_liger_kernel: true and liger-kernel is not installed; "
            "pip install 'raytrain_align[gpu]' on every node, or --set use_liger_kernel=false")
    optim = str(plan.training.get("optim") or "")
    wants = [f"optim: {optim}"] if "bnb" in optim else []
    wants += [f"{k}: true" for k in QUANTIZATION_KEYS if plan.model.get(k)]
    if wants and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            f"recipe '{plan.recipe}' sets {wants[0]} and bitsandbytes is not installed; "
            "pip install 'raytrain_align[gpu]' on every node")


def check_storage(plan: Plan, output: bool = True) -> None:
    """Storage (and, for a run that exports, the output folder) that cannot be written fails here, before anything
    is prepared or trained."""
    from . import storage

    paths = [("--storage", plan.storage_path)] + ([("--output-dir", plan.output_dir)] if output else [])
    for flag, path in paths:
        why = storage.unwritable(path)
        if why:
            raise RecipeError(f"{flag} {path} cannot be written: {why}; pick a folder this user can write")
    if storage.is_remote(plan.storage_path):
        try:
            storage.filesystem(plan.storage_path)
        except (ValueError, ImportError) as e:
            raise RecipeError(f"--storage {plan.storage_path}: {e}; use a folder, s3://, gs:// or a scheme fsspec "
                              "knows") from None
    elif output:
        check_storage_space(plan)


PYARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "file", "abfs", "abfss")  # storage.filesystem opens these itself


def check_storage_on_nodes(plan: Plan) -> None:
    """A storage scheme that only an fsspec plugin provides must open on every node, where Ray Data's and Ray
    Train's workers write: one small task per node tries, before anything runs there (a node that joins later
    is not checked)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from . import storage

    scheme = plan.storage_path.split("://", 1)[0] if storage.is_remote(plan.storage_path) else None
    if scheme is None or scheme in PYARROW_SCHEMES:
        return

    @ray.remote(num_cpus=0, max_retries=0)
    def problem(path: str) -> str | None:
        try:
            storage.filesystem(path)
        except Exception as e:  # whatever the missing plugin makes fsspec raise
            return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        return None

    tries = {n["NodeManagerAddress"]: problem.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(plan.storage_path) for n in ray.nodes() if n["Alive"]}
    for ip, ref in tries.items():
        if why := ray.get(ref, timeout=300):
            raise RecipeError(f"--storage {plan.storage_path}: '{scheme}://' does not open on node {ip} ({why}); "
                              "install the fsspec plugin that provides it on every node (the cluster's setup commands "
                              "or image), or use a folder, s3:// or gs://")


# A full-parameter checkpoint: 16-bit weights (2 bytes) + fp32 master weights and Adam's two moments (12 bytes)
CHECKPOINT_BYTES_PER_PARAM = 14


def checkpoints_kept(training: dict) -> int:
    """Checkpoints in storage at once: save_total_limit, plus the next one written before the oldest goes;
    none when the recipe saves none (save_strategy: no)."""
    if training.get("save_strategy", "steps") == "no":
        return 0
    return (training.get("save_total_limit") or 1) + 1


def check_storage_space(plan: Plan) -> None:
    """A local storage folder without room for the checkpoints Ray keeps (save_total_limit, plus the next one,
    written before the oldest goes) and the exported model fails here, not at the first save hours in."""
    import shutil

    from . import storage

    params = model_params(plan.model["model_name_or_path"], plan.model.get("model_revision"))
    if params is None or plan.model.get("use_peft"):  # not on this machine yet / adapters only: small
        return
    copies = checkpoints_kept(plan.training)
    need = params * (CHECKPOINT_BYTES_PER_PARAM * copies + 2)
    free = shutil.disk_usage(storage.nearest_existing(plan.storage_path)).free
    if free < need:
        raise RecipeError(
            f"--storage {plan.storage_path} has {free / 1e9:,.1f} GB free and this run writes at least "
            f"{need / 1e9:,.1f} GB there ({copies} checkpoints of a {params / 1e9:,.2f}B-parameter model at "
            f"{CHECKPOINT_BYTES_PER_PARAM} bytes per parameter, and the exported model); free space there or "
            "pick another --storage")


def model_params(name_or_path: str, revision: str | None = None) -> int | None:
    """Parameters of a model, from its safetensors headers alone: a local folder, or the Hub's files already in
    this machine's cache; None when neither has them."""
    from safetensors import safe_open

    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=["*.safetensors"],
                                            local_files_only=True))
        except Exception:  # not in the cache (or not a Hub id): the download at training time decides
            return None
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total or None


def check_checkpoints(plan: Plan) -> None:
    """A relaunch whose committed checkpoints (Ray Train's own list of them) are all damaged, or one of them gone,
    fails here in one line. A damaged latest one with a whole earlier one is the workers' fallback
    (train._whole_checkpoint); a fresh start is a new run name, never a silent one."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from . import elastic, storage

    run_dir = storage.join(plan.storage_path, plan.run_name)
    snapshot = storage.read_text(storage.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME))
    if snapshot is None:
        return
    committed = json.loads(snapshot)["checkpoint_results"]  # in the order Ray Train committed them
    names = [r["checkpoint_dir_name"] for r in reversed(committed) if r["checkpoint_dir_name"].startswith("checkpoint-")]
    fresh = "start a new run with --set run_name=NEW, or delete that folder to train this one from the start"
    gone = [n for n in names if not storage.is_dir(storage.join(run_dir, n))]
    if gone:
        raise RecipeError(f"run '{plan.run_name}' in {run_dir}: its committed {gone[0]} is gone, and Ray Train "
                          f"resumes only with all of them; restore it, or {fresh}")
    fs, root = storage.filesystem(run_dir)
    problems = []
    for name in names:  # newest first
        problem = elastic.checkpoint_problem(fs, f"{root}/{name}")
        if problem is None:
            return
        problems.append(f"{name}: {problem}")
    if problems:
        raise RecipeError(f"run '{plan.run_name}' in {run_dir} has no whole checkpoint to resume from "
                          f"({'; '.join(problems)}); {fresh}")


def token_available() -> bool:
    """A Ray auth token where Ray looks for one (its environment variables, then ~/.ray/auth_token)."""
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists())


def cluster_wants_token(address: str) -> bool:
    """Ask the cluster's GCS, without a token, whether it requires one. A driver in the wrong mode breaks either
    way: without a token it is refused; with one against a head without auth it refuses the raylet's calls and
    Ray reports its objects lost (OwnerDiedError)."""
    import ray
    from ray._raylet import GcsClient

    stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)  # the refused probe logs a C++ warning line that is not the user's concern
        GcsClient(address=address)
        return False
    except ray.exceptions.AuthenticationError:
        return True
    except ray.exceptions.RpcError:
        raise RecipeError(f"no Ray cluster answers at {address}; start one (`ray start --head`) or unset "
                          "RAY_ADDRESS to run on a local one") from None
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(devnull)


def join_auth_mode(address: str) -> None:
    """Use the auth mode of the cluster at `address` unless RAY_AUTH_MODE says which (Ray itself only guesses, from
    whether a token file exists, and only for a cluster it finds on its own)."""
    if "RAY_AUTH_MODE" in os.environ or not cluster_wants_token(address):
        return
    if not token_available():
        raise RecipeError(f"the Ray cluster at {address} requires token authentication; set RAY_AUTH_TOKEN to its "
                          "token (`ray get-auth-token` on the head) or copy it to ~/.ray/auth_token")
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")  # re-read RAY_AUTH_MODE (ray was imported before it was set)


# Ray's node health checks (its defaults: every 3 s, 10 s timeout, 5 misses) declare a killed node dead in ~16 s,
# these in ~7 s (benchmarks/node_death.py); a silent node at most 5 x (period + timeout). Set on the local cluster below,
# and as RAY_<name> variables on the heads of cluster/aws.yaml and cluster/kuberay/rayjob.yaml.
NODE_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_timeout_ms": 3000, "health_check_failure_threshold": 5}


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (a `ray job submit` entrypoint, a head node), else start a local one."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    if ray.is_initialized():
        return
    # No runtime_env here: under `ray job submit` it would replace the job's own (its --working-dir).
    # As ray.init resolves it (RAY_ADDRESS, any form, else the latest `ray start` on this machine), once; none: start one
    address = os.environ.get("RAY_ADDRESS") or canonicalize_bootstrap_address(None)
    if address and not address.startswith("ray://") and (gcs := canonicalize_bootstrap_address(address)):
        join_auth_mode(gcs)
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=True,
             **({} if address else {"_system_config": dict(NODE_HEALTH_CHECKS)}))  # a copy: Ray adds its own keys to it
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # prepare.py prints its own progress lines
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run(plan: Plan):
    """Train one recipe end to end and return its RunSummary."""
    from accelerate.utils import patch_environment
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from . import callbacks, export, prepare, storage, tiny
    from .events import EventLog, job_id
    from .train import train_loop_per_worker

    milestones = {"driver_run": time.time()}  # the plan is built: imports and recipe checks are behind
    callbacks.load(plan.callbacks)  # importable here, where the workers' path starts
    check_quantization(plan)
    check_gpus(plan)
    check_gpu_packages(plan)
    check_storage(plan)
    launch_id = uuid.uuid4().hex[:12]  # this driver's: tells a relaunch from a restart, names its scratch folders
    events = EventLog(plan.storage_path, plan.run_name, f"driver-{launch_id}", launch_id=launch_id)
    identity = {"run": plan.run_name, "storage": plan.storage_path, "recipe": plan.recipe, "job": job_id()}
    done = export.final_checkpoint(plan)
    if done is not None:
        events.emit("launch", **identity)
        events.emit("already_finished", run=plan.run_name, storage=plan.storage_path)
        return _finish(plan, done, events)
    check_checkpoints(plan)
    init_ray()
    check_storage_on_nodes(plan)
    events.emit("launch", **identity)  # the input is checked: from here on the run exists in storage
    milestones["ray_ready"] = time.time()
    if plan.tiny:
        assets = tiny.assets_dir(plan.storage_path)
        tiny.materialize(assets, plan.recipe_model)
    prepared = prepare.prepare(plan)
    milestones["data_ready"] = time.time()
    events.emit("data_prepared", **{k: v for k, v in asdict(prepared).items() if k != "spec"})  # the key says it

    resources = {"CPU": plan.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = 1
    # a URI through storage.filesystem, so that Ray's checkpoint uploads are retried as our own writes are
    storage_fs, storage_root = (storage.filesystem(plan.storage_path) if storage.is_remote(plan.storage_path)
                                else (None, plan.storage_path))
    milestones["trainer_submitted"] = time.time()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "prepared": prepared, "launch_id": launch_id, "driver_milestones": milestones},
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo", timeout_s=plan.collective_timeout_s),
        # elastic: Ray Train starts with what the cluster has (>= min), restarts smaller when workers are lost and
        # larger when resources come back, each time from the latest committed checkpoint (train.py reshards it)
        scaling_config=ScalingConfig(num_workers=(plan.min_workers, plan.world_size) if plan.min_workers else plan.world_size,
                                     use_gpu=plan.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=plan.resize_interval_s),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=storage_root,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=plan.training.get("save_total_limit") or None),
            failure_config=FailureConfig(max_failures=plan.max_failures),
        ),
    )
    events.emit("train_submitted", run=plan.run_name, storage=plan.storage_path, backend=plan.backend,
                workers=f"{plan.min_workers}..{plan.world_size}" if plan.min_workers else str(plan.world_size))
    with patch_environment(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=plan.restart_wait_s):  # read by the controller
        result = trainer.fit()
    return _finish(plan, result.checkpoint, events)


def _finish(plan: Plan, checkpoint, events):
    from . import export

    summary = export.summarize(plan, checkpoint)
    (Path(plan.output_dir) / "summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str))
    events.emit("finished", **{k: v for k, v in asdict(summary).items() if k != "facts"})
    return summary
