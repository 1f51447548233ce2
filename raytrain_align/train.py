"""Stage 4 of 5: the Ray Train worker — one per GPU (or CPU slot in --tiny).

Each worker sets the environment `accelerate launch --config_file <recipe's accelerate config>` would set,
so accelerate builds its own DeepSpeed ZeRO-3 (or FSDP) plugin; then it loads the model the way the
handbook does (under zero.Init for ZeRO-3), builds a TRL SFTTrainer on the already-prepared shards
(TRL's own preparation skipped) and reports checkpoints and metrics to Ray Train.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# Keys the handbook adds on top of TRL's configs, consumed before building them.
NOT_TRL_CONFIG = {"chat_template"}


def _trainer_and_config(method: str):
    """TRL's trainer and config class for the method. Each skips TRL's own data preparation: Ray Data ran
    it already (SFT has a flag for that; DPO and ORPO have none, so a small subclass takes the data as given)."""
    if method == "orpo":
        from .recipe import config_class

        return _prepared_orpo_trainer(), config_class("orpo"), {}
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        # assistant_only_loss: the masks are already in the prepared `labels`; TRL would refuse token ids
        # ("dataset is not conversational") and swap in a training chat template that the export would keep.
        return SFTTrainer, SFTConfig, {"dataset_kwargs": {"skip_prepare_dataset": True}, "assistant_only_loss": False}
    from trl import DPOConfig, DPOTrainer

    class PreparedDPOTrainer(DPOTrainer):
        """DPOTrainer on pairs that `DPOTrainer._prepare_dataset` already produced in Ray Data."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            """`precompute_ref_log_probs: true`: TRL's pass (its collator, inference engine and
            `compute_ref_log_probs`), with the columns attached in memory. TRL caches them in a file beside the
            dataset's Arrow cache, which the prepared shards (read into memory) lack, and which other nodes could
            not read; after `gather_for_metrics` every rank holds all of them anyway."""
            import torch
            from torch.utils.data import DataLoader
            from trl.models import prepare_deepspeed

            loader = self.accelerator.prepare(DataLoader(
                dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                num_workers=self.args.dataloader_num_workers))
            model = self.ref_model or self.model
            if self.ref_model is None and self.is_deepspeed_enabled:  # ZeRO-3 shards: gather through an engine
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            chosen, rejected = [], []
            for batch in loader:
                c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
                chosen.append(c.cpu())
                rejected.append(r.cpu())
            return (dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
                    .add_column("ref_rejected_logps", torch.cat(rejected).tolist()))

    return PreparedDPOTrainer, DPOConfig, {}


def _prepared_orpo_trainer():
    from trl.experimental.orpo import ORPOTrainer

    class PreparedORPOTrainer(ORPOTrainer):
        """ORPOTrainer on rows its own `tokenize_row` already produced in Ray Data. It tokenizes inside
        `__init__`, so it is built on an empty dataset of the raw columns and handed the prepared rows after."""

        def __init__(self, *, train_dataset, eval_dataset=None, **kwargs):
            import datasets

            raw = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
            super().__init__(train_dataset=raw, eval_dataset=raw if eval_dataset is not None else None, **kwargs)
            self.train_dataset, self.eval_dataset = train_dataset, eval_dataset

    return PreparedORPOTrainer


# Warnings that say nothing a user can act on, repeated every step by some libraries.
QUIET_WARNINGS = (
    ".*torch_dtype.*", ".*use_cache=True.*", ".*Padding-free training.*", ".*gradient checkpointing.*",
    # DeepSpeed's ZeRO-3 collectives call torch's deprecated names, once per step.
    r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
    # transformers 5.2x renames gradient_checkpointing(_kwargs), which the handbook's recipes use; it maps them itself.
    r".*`gradient_checkpointing(_kwargs)?` is deprecated.*",
    # ... and its own FSDP checkpoint saving calls the old gradient_checkpointing_* names at every save.
    r".*`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated.*",
)


def _quiet(rank: int) -> None:
    """One copy of each message: rank 0 logs warnings, other ranks only errors; no per-step noise."""
    import builtins

    import datasets
    import transformers
    from ray.train.v2._internal.execution import context as train_context
    from ray.train.v2._internal.logging import patch_print

    # Ray Train V2 patches print() into its logger and also tees it to a redirected stdout: every line
    # printed twice, and dill's stdout capture (datasets fingerprinting) leaks bytecode dumps. Plain print.
    builtins.print = patch_print._original_print
    # "Reporting training result N: TrainingReport(...)" at INFO on every rank, every checkpoint.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars at every save
    if rank != 0:
        warnings.filterwarnings("ignore")
        transformers.logging.set_verbosity_error()
    else:
        transformers.logging.set_verbosity_warning()
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "accelerate", "trl", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR if rank else logging.WARNING)
    # The Trainer leaves accelerate's accumulation plugin at 1 and lets DeepSpeed accumulate; accelerate warns.
    logging.getLogger("accelerate.accelerator").setLevel(logging.ERROR)


def _progress_callback():
    """Rank 0 prints one short line about every 5% of the run instead of a dict per step."""
    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.every = time.time(), max(1, state.max_steps // 20)
            if state.is_world_process_zero:
                print(f"training      {state.max_steps} steps", flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            if not state.is_world_process_zero or "loss" not in (logs or {}):
                return
            if step % self.every and step != state.max_steps:
                return
            elapsed = time.time() - self.t0
            eta = elapsed / max(step, 1) * (state.max_steps - step)
            tok = logs.get("num_tokens")
            tps = f"  {tok / elapsed:,.0f} tok/s" if tok else ""
            print(
                f"step {step:>6}/{state.max_steps} ({step / state.max_steps:4.0%})  loss {logs['loss']:.4f}  "
                f"lr {logs.get('learning_rate', 0):.2e}{tps}  eta {eta:,.0f}s",
                flush=True,
            )

    return ProgressLog()


class _Elastic:
    """This attempt's share of the elastic machinery (elastic.py): the global batch, the sample log, the run log
    folder, and whether a drain notice asked for an emergency checkpoint."""

    def __init__(self, plan, world: int, rank: int, attempt: str, gbs: int):
        from . import elastic

        self.world, self.rank, self.attempt, self.gbs = world, rank, attempt, gbs
        self.logs = elastic.log_dir(plan.storage_path, plan.run_name)
        self.samples = elastic.SampleLog(self.logs, attempt, rank)
        self.heartbeat_every = 0.0 if "://" not in plan.storage_path else 30.0  # rank 0's last-step file
        self.last_beat = 0.0
        self.preempted = None  # ray.train.PreemptionInfo once a node of this group drains
        self.crash_in_save = None  # testing hook: RAYTRAIN_ALIGN_FAULT=crash_in_save@STEP on the driver
        self.commit_seconds: list[float] = []  # per checkpoint: report() returned -> committed by the controller
        self.step_delay_s = 0.0  # testing hook: RAYTRAIN_ALIGN_STEP_DELAY_S on the driver
        self.async_upload = plan.checkpoint_upload == "async"


def _checkpoint_callback(es: _Elastic):
    """Commits HF checkpoints to Ray Train storage: one upload per node (its local rank 0 sends the shards
    written on that node), only after every rank finished writing. Before that: the sample log up to this
    step, and (rank 0) the checkpoint's position file (data position, world size, optimizer digest). Each step:
    the sample log, rank 0's heartbeat and Ray's drain notice; on a notice the workers save at once and stop."""
    import ray.train
    import torch.distributed as dist
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from . import elastic

    class RayCheckpointReport(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            """The checkpoint (if any) is loaded now: check its optimizer state arrived whole, log the start."""
            if es.resharded and "universal" in es.resharded:
                shared = elastic.unshare_step_counters(kwargs["optimizer"])
                if shared:
                    es.resharded += f"; {shared + 1} sub-groups' shared Adam step counter split"
            saved = (es.position or {}).get("optimizer_digest")
            match = None
            if saved:  # every rank (a collective), the same condition on all
                now = elastic.optimizer_digest(kwargs["model"], kwargs["optimizer"])
                match = elastic.digest_difference(saved, now)
            if es.rank == 0:
                rec = elastic.log_start(es.logs, es.attempt, world=es.world, gbs=es.gbs, grad_accum=args.gradient_accumulation_steps,
                                        position=es.position, launch_id=es.launch_id, optimizer_match=match,
                                        resharded=es.resharded)
                if rec["cause"] != "start":
                    lost = f", {rec['steps_lost']} step(s) lost" if "steps_lost" in rec else ""
                    state_ok = f"; optimizer state {'kept' if match is not None and match < 1e-6 else 'DIFFERS'}" \
                        if match is not None else ""
                    print(f"resume        {rec['cause']}: from step {rec['resumed_step']} at world {es.world} "
                          f"(grad-acc {args.gradient_accumulation_steps}, GBS {es.gbs}){lost}"
                          f"{'; ' + es.resharded if es.resharded else ''}{state_ok}", flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            es.samples.step_done(state.global_step, state.epoch)
            if es.step_delay_s:
                time.sleep(es.step_delay_s)
            if es.rank == 0 and time.time() - es.last_beat >= es.heartbeat_every:
                elastic.heartbeat(es.logs, es.attempt, state.global_step)
                es.last_beat = time.time()
            info = ray.train.get_preemption_info()  # every rank, every step (it is a barrier)
            if info is not None and es.preempted is None and state.global_step < state.max_steps:
                es.preempted = info
                control.should_save = True  # this step: the Trainer saves, on_save below reports it

        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            es.samples.flush(step)
            digest = elastic.optimizer_digest(kwargs["model"], kwargs["optimizer"])
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            if es.rank == 0 and os.path.isdir(path):
                reason = "preemption" if es.preempted else "save"
                Path(path, elastic.POSITION_FILE).write_text(json.dumps(
                    elastic.position(step, es.gbs, es.world, state.epoch, reason, digest)))
            if es.crash_in_save == step and es.rank == es.world - 1:
                os.kill(os.getpid(), 9)  # dies with this checkpoint written on some ranks only, not committed
            if dist.is_initialized():
                dist.barrier()
            ctx = ray.train.get_context()
            metrics = {"step": step, **_last_logs(state.log_history)}
            ckpt = None
            if ctx.get_local_rank() == 0:
                # the folder this save just wrote (not the highest-numbered one: scratch may hold an older run's)
                if os.path.isdir(path):
                    ckpt = ray.train.Checkpoint.from_directory(path)
            # ray.checkpoint_upload: async — Ray uploads this node's folder in a background thread, reports it when
            # done and then deletes the local copy (the Trainer's own rotation is off, see below); training goes on.
            # An emergency (preemption) checkpoint is always uploaded and committed before anything else.
            background = es.async_upload and es.preempted is None
            mode = ray.train.CheckpointUploadMode.ASYNC if background else ray.train.CheckpointUploadMode.SYNC
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint-{step:07d}",
                             checkpoint_upload_mode=mode)
            if background:
                return
            # report() returns once this rank's part is uploaded; the checkpoint becomes the one a restart resumes
            # from only when the controller has collected every rank's report. A rank lost before that (a worker
            # killed a step later, a drained node taken away) would leave it uncommitted, and the restart would
            # go back to the previous one. So every rank waits for the commit (about one controller poll).
            t0 = time.time()
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            es.commit_seconds.append(time.time() - t0)
            if es.preempted is not None:
                self._wait_for_restart(step)

        def _wait_for_restart(self, step):
            """After the emergency checkpoint: every step trained now would be thrown away when the node goes,
            so stop stepping; Ray Train restarts the group from this checkpoint without the drained node."""
            info = es.preempted
            if es.rank == 0:
                when = time.strftime("%H:%M:%S", time.localtime(info.deadline_ms / 1000)) if info.deadline_ms else "?"
                print(f"preemption    node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} (ranks "
                      f"{info.preempted_ranks}) drain by {when}; checkpoint at step {step} committed; waiting for "
                      "Ray Train to restart without them", flush=True)
            while True:
                time.sleep(1)

    return RayCheckpointReport()


def _timing_callback():
    """Per-step wall times (device synchronized at each step end), wall-clock time of the first step, and
    peak GPU memory of this rank; `.stats` goes into the run summary (benchmarks/train_throughput.py)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stats: dict[str, Any] = {"step_seconds": [], "step_end_unix": []}

        def _sync(self):
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, **kwargs):
            self._sync()
            self.stats["train_begin_unix"] = self._last = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            now = time.time()
            self.stats["step_seconds"].append(now - self._last)
            self.stats["step_end_unix"].append(now)
            self._last = now

        def on_train_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.stats["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                self.stats["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                self.stats["device_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30

    return StepTimer()


def _last_logs(history: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for entry in history:
        out.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return out


def _quantized_load(model_fields: dict[str, Any]) -> dict[str, Any]:
    """QLoRA (load_in_4bit / load_in_8bit, DDP workers only): TRL's own BitsAndBytesConfig from the handbook's model
    fields, the quantized weights placed on this worker's GPU as the handbook's get_model places them."""
    from .recipe import QUANTIZATION_KEYS

    if not any(model_fields.get(k) for k in QUANTIZATION_KEYS):
        return {}
    import torch
    from trl import ModelConfig, get_quantization_config

    return {"quantization_config": get_quantization_config(ModelConfig(**model_fields)),
            "device_map": {"": torch.cuda.current_device()}}


def _peft_config(model_fields: dict[str, Any]):
    """The handbook's ModelConfig LoRA fields (`use_peft`, `lora_r`, ...) -> TRL's own `get_peft_config`."""
    from dataclasses import fields

    from trl import ModelConfig, get_peft_config

    known = {f.name for f in fields(ModelConfig)}
    return get_peft_config(ModelConfig(**{k: v for k, v in model_fields.items() if k in known}))


def _zero_facts(trainer) -> dict[str, Any]:
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


def _fsdp_on_cpu() -> None:
    """accelerate 1.15 turns FSDP on only for accelerator devices: on CPU workers (--tiny, CI) its state stays
    MULTI_CPU and the Trainer would silently run plain DDP. torch's FSDP2 itself runs over gloo, so set up the
    shared accelerate state as it is on GPUs (FSDP, the plugin accelerate builds from the FSDP_* environment);
    the Trainer's Accelerator then finds it already initialized and uses it."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = Accelerator().state  # on the process group Ray Train formed; distributed_type MULTI_CPU
    if state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _fsdp_facts(trainer) -> dict[str, Any]:
    """What FSDP2 made of the policy (and DPO's reference model): DTensor parameters, their placements and device
    mesh, the FSDP units auto-wrap created, and the plugin settings accelerate resolved from the environment."""
    plugin = trainer.accelerator.state.fsdp_plugin
    facts: dict[str, Any] = {
        "fsdp_version": plugin.fsdp_version,
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_params": type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
        "state_dict_type": plugin.state_dict_type.name,
        "cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading),
        **_sharding(trainer.model),
    }
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:  # TRL's prepare_fsdp: fully_shard over the same world mesh, no optimizer
        facts.update({f"ref_{k}": v for k, v in _sharding(ref).items()})
        trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        facts["ref_in_optimizer"] = any(id(p) in trained for p in ref.parameters())
    return facts


def _sharding(model) -> dict[str, Any]:
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


def _param_checksums(model) -> dict[str, list[float]]:
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from .export import FINAL_DIR
    from .plan import Plan
    from .prepare import load_tokenizer, read_prepared

    plan = Plan.from_dict(config["plan"])
    prepared = config["prepared"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    _quiet(rank)
    if rank == 0:
        import torch.distributed as dist

        print(f"workers       process group formed at {time.strftime('%H:%M:%S')}: world {ctx.get_world_size()}, "
              f"{dist.get_backend()}, collective timeout {plan.collective_timeout_s}s; data already prepared "
              f"({prepared['rows_out']:,} rows)", flush=True)
    # Exactly the variables `accelerate launch --config_file ...` sets: accelerate builds the plugin from them.
    os.environ.update(plan.accelerate_env)

    import torch
    from transformers import AutoModelForCausalLM
    from . import elastic

    world = ctx.get_world_size()  # an elastic run may start at any size in min_workers..world_size
    grad_accum = elastic.grad_accum_for(plan.global_batch_size, plan.per_device_train_batch_size, world)
    trainer_cls, config_cls, skip_prepare = _trainer_and_config(plan.method)
    # Node-local scratch for this fit() only (the driver's id): a folder shared with an earlier run of the same
    # name would leak its files into this run's export (e.g. a LoRA adapter beside a full model).
    scratch = Path(tempfile.gettempdir()) / "raytrain_align" / plan.run_name / config["scratch_id"]
    training = {k: v for k, v in plan.training.items() if k not in NOT_TRL_CONFIG}
    training.update(
        output_dir=str(scratch / "hf"),
        **skip_prepare,  # prepared by Ray Data already
        dataset_num_proc=None,
        ddp_timeout=plan.collective_timeout_s,
        use_cpu=not plan.use_gpu,
        disable_tqdm=True,  # ProgressLog prints a line per ~5% instead
        gradient_accumulation_steps=grad_accum,  # this start's world size, the plan's global batch
        push_to_hub=False,
    )
    if plan.checkpoint_upload == "async":
        # Ray deletes each local checkpoint once it is uploaded; the Trainer's rotation (save_total_limit) could
        # delete one still being uploaded. What storage keeps is CheckpointConfig(num_to_keep) either way.
        training["save_total_limit"] = None
    if "tensorboard" in str(training.get("report_to")) and "://" not in plan.storage_path:  # events next to the checkpoints
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", f"{plan.storage_path}/{plan.run_name}/tensorboard")
    args = config_cls(**training)  # with a DeepSpeed ZeRO-3 plugin, from_pretrained below runs under zero.Init
    if plan.backend == "fsdp" and not plan.use_gpu:
        _fsdp_on_cpu()

    m = plan.model
    dtype = m.get("dtype")
    from .attention import register as register_attention

    register_attention()  # attn_implementation: sdpa_varlen
    model = AutoModelForCausalLM.from_pretrained(
        m["model_name_or_path"],
        revision=m.get("model_revision", "main"),
        trust_remote_code=m.get("trust_remote_code", False),
        attn_implementation=m.get("attn_implementation"),
        dtype=getattr(torch, dtype) if dtype not in (None, "auto") else dtype,
        use_cache=not args.gradient_checkpointing,
        **_quantized_load(m),
    )
    tokenizer = load_tokenizer(m["model_name_or_path"], plan.training, m.get("model_revision"),
                               m.get("trust_remote_code", False), method=plan.method)

    train_dataset = read_prepared(prepared["path"])
    eval_dataset = None
    if prepared.get("eval_path") and args.eval_strategy != "no":
        eval_dataset = read_prepared(prepared["eval_path"])
    # DPO: with no ref_model TRL loads the reference from the same path — under zero.Init, so it is
    # partitioned like the policy — and wraps it in a DeepSpeed inference engine. With LoRA (use_peft) the
    # reference is the same model with its adapters disabled: no second copy.
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        peft_config=_peft_config(plan.model),
        callbacks=[_progress_callback(), timer := _timing_callback()],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict on rank 0

    attempt = [f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}" if rank == 0 else None]
    torch.distributed.broadcast_object_list(attempt, src=0)
    es = _Elastic(plan, world, rank, attempt[0], plan.global_batch_size)
    es.launch_id = config["scratch_id"]  # one per driver (fit() call): tells a relaunch from a restart
    fault = config.get("fault") or ""
    if fault.startswith("crash_in_save@") and not ray.train.get_checkpoint():  # the first attempt only
        es.crash_in_save = int(fault.split("@")[1])
    es.step_delay_s = float(config.get("step_delay_s") or 0)
    trainer.add_callback(_checkpoint_callback(es))

    # Exactly-once data: one order per epoch at every world size; the Trainer's resume skip (global_step x
    # grad-accum micro-batches per rank) is then global_step x GBS samples of it. The sample log records what
    # each rank trained at each step (content hashes), from the collator to the step that consumed it.
    sampler = elastic.GlobalOrderSampler(len(train_dataset), plan.global_batch_size, seed=args.data_seed or args.seed)
    trainer._get_train_sampler = lambda *a, **k: sampler
    train_loader = trainer.get_train_dataloader

    def get_train_dataloader():  # the training loader's collator only (evaluation batches are not trained)
        collate = trainer.data_collator
        trainer.data_collator = es.samples.wrap_collator(collate)  # baked into the loader built now
        try:
            return train_loader()
        finally:
            trainer.data_collator = collate

    trainer.get_train_dataloader = get_train_dataloader
    trainer.training_step = es.samples.wrap_training_step(trainer.training_step)

    resume_from, es.position, es.resharded = None, None, None
    checkpoint = ray.train.get_checkpoint()  # the latest committed one, after a restart
    if checkpoint and not checkpoint.path.rstrip("/").endswith(FINAL_DIR):
        resume_from = str(scratch / "resume")
        saved_world = None
        if ctx.get_local_rank() == 0:  # one copy per node
            shutil.rmtree(resume_from, ignore_errors=True)
            checkpoint.to_directory(resume_from)
            saved_world = elastic.saved_world_size(resume_from)
            if plan.backend == "deepspeed" and saved_world not in (None, world):
                # deepspeed refuses a ZeRO-3 checkpoint of another world size: its universal format, per node
                es.resharded = f"ZeRO-3 {saved_world} -> {world} ranks via universal checkpoint " \
                               f"({elastic.to_universal(resume_from):.1f}s)"
            elif saved_world not in (None, world):
                es.resharded = f"{plan.backend} {saved_world} -> {world} ranks (torch distributed checkpoint)"
        torch.distributed.barrier()
        es.position = elastic.read_position(resume_from)
        elastic.check_resume(es.position, plan.global_batch_size)
        if plan.backend == "deepspeed" and es.position and es.position["world_size"] != world:
            ds = trainer.accelerator.state.deepspeed_plugin
            for cfg in {id(c): c for c in (ds.deepspeed_config, ds.hf_ds_config.config)}.values():
                cfg.setdefault("checkpoint", {})["load_universal"] = True
        steps_per_epoch = len(sampler) // plan.global_batch_size
        sampler.set_epoch(es.position["global_step"] // steps_per_epoch if es.position else 0)

    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - t0
    es.samples.flush(trainer.state.global_step)  # the steps after the last checkpoint
    if rank == 0:
        elastic.heartbeat(es.logs, es.attempt, trainer.state.global_step)
    facts = _fsdp_facts(trainer) if plan.backend == "fsdp" else _zero_facts(trainer)
    facts["quantized_linear_layers"] = sum("Linear4bit" in type(mod).__name__ or "Linear8bitLt" in type(mod).__name__
                                           for mod in trainer.model.modules())  # QLoRA: bitsandbytes layers
    checksums = _param_checksums(trainer.model) if plan.backend == "fsdp" else {}

    # Export a Hugging Face model: with zero3_save_16bit_model the full weights are gathered to rank 0. FSDP2:
    # a full state dict gathered parameter by parameter into rank 0's CPU memory only (accelerate's get_state_dict:
    # full_state_dict, cpu_offload), next to the trained shards, never two full copies.
    export = scratch / "export"
    if plan.backend == "fsdp":
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.model.generation_config.eos_token_id = tokenizer.eos_token_id
    trainer.model.config.eos_token_id = tokenizer.eos_token_id
    trainer.save_model(str(export))
    final_ckpt = None
    metrics = {"step": trainer.state.global_step, **_last_logs(trainer.state.log_history), **result.metrics}
    if rank == 0:
        tokenizer.save_pretrained(str(export))
        trainer.model.config.use_cache = True
        trainer.model.config.save_pretrained(str(export))
        summary = {
            "metrics": metrics,
            "log_history": trainer.state.log_history,
            "facts": facts,
            "trainer": next(c.__name__ for c in type(trainer).__mro__ if c.__module__.startswith("trl.")),
            "param_checksums": checksums,
            # the sample order of every epoch (elastic.GlobalOrderSampler): what the sample log is checked against
            "data_order": {"rows": len(train_dataset), "global_batch_size": plan.global_batch_size,
                           "seed": args.data_seed or args.seed, "steps_per_epoch": len(sampler) // plan.global_batch_size},
            "run_log_dir": es.logs,
            "world_size": ctx.get_world_size(),
            "train_seconds": train_seconds,
            "timing": {**timer.stats, "checkpoint_commit_seconds": es.commit_seconds},
            "prepared": prepared,
        }
        (export / "raytrain_align_run.json").write_text(json.dumps(summary, indent=2, default=str))
        final_ckpt = ray.train.Checkpoint.from_directory(str(export))
    ray.train.report({**metrics, **{f"fact_{k}": v for k, v in facts.items()}, "final": 1}, checkpoint=final_ckpt,
                     checkpoint_dir_name=FINAL_DIR)
    torch.distributed.barrier()  # the export is in storage now (report persists it before returning)
    if ctx.get_local_rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)  # a 3B model's checkpoints and export, off the node's disk
