"""Stage 4 of 5: the Ray Train worker — one per GPU (or CPU slot in --tiny).

Each worker sets the environment `accelerate launch --config_file <recipe's accelerate config>` would set,
so accelerate builds its own DeepSpeed ZeRO-3 (or FSDP) plugin; then it loads the model the way the
handbook does (under zero.Init for ZeRO-3), builds a TRL SFTTrainer on the already-prepared shards
(TRL's own preparation skipped) and reports checkpoints and metrics to Ray Train.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import events
from .errors import RecipeError
from .trainer_callbacks import (ElasticState, checkpoint_callback, last_logs, progress_callback, timing_callback,
                               upload_checkpoint)

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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker, one start: build the trainer, resume (resharding when the world size changed), train,
    export. Ray Train calls it again on every restart, from the latest committed checkpoint."""
    # when this start reached each stage (unix seconds): where the time to the first step goes
    milestones = {**config["driver_milestones"], "worker_loop": time.time()}
    import ray.train

    plan, prepared = config["plan"], config["prepared"]
    ctx = ray.train.get_context()
    events.quiet_worker(ctx.get_world_rank())
    es = _elastic_state(plan, ctx, launch_id=config["launch_id"])
    if es.rank == 0:
        import torch.distributed as dist

        es.events.emit("workers_formed", world_size=es.world, nodes=es.nodes, process_group=dist.get_backend(),
                       collective_timeout_s=plan.collective_timeout_s, rows=prepared.rows_out, pids=es.pids)
    # Exactly the variables `accelerate launch --config_file ...` sets: accelerate builds the plugin from them.
    os.environ.update(plan.accelerate_env)
    # Node-local scratch for this fit() only (the driver's id): a folder shared with an earlier run of the same
    # name would leak its files into this run's export (e.g. a LoRA adapter beside a full model).
    scratch = Path(tempfile.gettempdir()) / "raytrain_align" / plan.run_name / config["launch_id"]

    trainer, tokenizer, timer = _build_trainer(plan, prepared, es, scratch, milestones)
    trainer.add_callback(checkpoint_callback(es))
    sampler = _exactly_once_data(trainer, es, plan)
    resume_from = _resume(trainer, es, plan, ctx, scratch, sampler)

    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - t0
    es.samples.flush(trainer.state.global_step)  # the steps after the last checkpoint
    if es.rank == 0:
        from . import elastic

        elastic.heartbeat(es.logs, es.attempt, trainer.state.global_step)
    run = {"world_size": ctx.get_world_size(), "train_seconds": train_seconds, "prepared": dataclasses.asdict(prepared),
           "timing": {**timer.stats, "checkpoint_commit_seconds": es.commit_seconds, "milestones_unix": milestones},
           "run_log_dir": es.logs,
           # the sample order of every epoch (elastic.GlobalOrderSampler): what the sample log is checked against
           "data_order": {"rows": len(trainer.train_dataset), "global_batch_size": plan.global_batch_size,
                          "seed": trainer.args.data_seed or trainer.args.seed,
                          "steps_per_epoch": len(sampler) // plan.global_batch_size}}
    _export(trainer, tokenizer, plan, result, run, es, ctx, scratch)


def _build_trainer(plan, prepared, es: ElasticState, scratch: Path, milestones: dict):
    """TRL's trainer for the method, as the handbook's script builds it, on the prepared data; the batch keeps the
    plan's global size at this start's world size."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback

    from . import callbacks, elastic
    from .attention import register as register_attention
    from .prepare import read_prepared
    from .tokenize_blocks import load_tokenizer

    grad_accum = elastic.grad_accum_for(plan.global_batch_size, plan.per_device_train_batch_size, es.world)
    trainer_cls, config_cls, skip_prepare = _trainer_and_config(plan.method)
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
    milestones["model_loaded"] = time.time()
    tokenizer = load_tokenizer(m["model_name_or_path"], plan.training, m.get("model_revision"),
                               m.get("trust_remote_code", False), method=plan.method)

    train_dataset = read_prepared(prepared.path)
    eval_dataset = None
    if prepared.eval_path and args.eval_strategy != "no":
        eval_dataset = read_prepared(prepared.eval_path)
    # DPO: with no ref_model TRL loads the reference from the same path — under zero.Init, so it is
    # partitioned like the policy — and wraps it in a DeepSpeed inference engine. With LoRA (use_peft) the
    # reference is the same model with its adapters disabled: no second copy.
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        peft_config=_peft_config(plan.model),
        # ray.callbacks come before the checkpoint callback added later: their on_save sees a checkpoint written
        # and not yet reported
        callbacks=[progress_callback(es.events), timer := timing_callback()]
        + [cls(**kwargs) for cls, kwargs in callbacks.load(plan.callbacks)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict on rank 0
    milestones["trainer_built"] = time.time()
    return trainer, tokenizer, timer


def _elastic_state(plan, ctx, launch_id: str) -> ElasticState:
    """This start's attempt id (rank 0's, shared with every rank), its node count and its share of the elastic
    machinery."""
    import torch

    rank = ctx.get_world_rank()
    attempt = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}" if rank == 0 else None
    every: list = [None] * ctx.get_world_size()
    torch.distributed.all_gather_object(every, (attempt, ctx.get_node_rank(), os.getpid()))
    return ElasticState(plan, ctx.get_world_size(), rank, every[0][0], max(node for _, node, _ in every) + 1,
                        launch_id, [pid for _, _, pid in every])


def _exactly_once_data(trainer, es: ElasticState, plan):
    """Exactly-once data: one order per epoch at every world size; the Trainer's resume skip (global_step x
    grad-accum micro-batches per rank) is then global_step x GBS samples of it. The sample log records what
    each rank trained at each step (content hashes), from the collator to the step that consumed it."""
    from . import elastic

    args = trainer.args
    sampler = elastic.GlobalOrderSampler(len(trainer.train_dataset), plan.global_batch_size,
                                         seed=args.data_seed or args.seed)
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
    return sampler


def _resume(trainer, es: ElasticState, plan, ctx, scratch: Path, sampler) -> str | None:
    """The latest whole committed checkpoint, if this is a restart: copied to the node once, converted to DeepSpeed's
    universal format when the world size changed, its data position checked. Returns the folder to resume from."""
    import torch

    from . import elastic
    from .export import FINAL_DIR

    world = ctx.get_world_size()
    checkpoint = _whole_checkpoint(es, plan)
    if not checkpoint or checkpoint.path.rstrip("/").endswith(FINAL_DIR):
        return None
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
    es.universal_load = plan.backend == "deepspeed" and bool(es.position) and es.position["world_size"] != world
    if es.universal_load:  # every rank: each loads, and repairs, its own partitions
        ds = trainer.accelerator.state.deepspeed_plugin
        for cfg in {id(c): c for c in (ds.deepspeed_config, ds.hf_ds_config.config)}.values():
            cfg.setdefault("checkpoint", {})["load_universal"] = True
    steps_per_epoch = len(sampler) // plan.global_batch_size
    sampler.set_epoch(es.position["global_step"] // steps_per_epoch if es.position else 0)
    return resume_from


def _whole_checkpoint(es: ElasticState, plan):
    """After a restart, the latest committed checkpoint if it is whole in storage, else the newest earlier one
    that is (one warning line names what was wrong); rank 0 looks, every rank gets its choice. None at a start."""
    import ray.train
    import torch

    choice = [ray.train.get_checkpoint() if es.rank == 0 else None, []]
    if choice[0] is not None and _name(choice[0]).startswith("checkpoint-"):  # not the final export
        choice[0] = _newest_whole(choice[0], es, plan)
        choice[1] = [d.split(":", 1)[0] for d in es.damaged]
    torch.distributed.broadcast_object_list(choice, src=0)
    # Ray Train still lists the skipped ones: a save under one of their names would be deleted in their place
    es.taken_names = set(choice[1])
    return choice[0]


def _newest_whole(latest, es: ElasticState, plan):
    """`latest` if whole, else the newest whole committed checkpoint before it; the skipped ones in es.damaged."""
    import ray.train

    from . import elastic

    def newest_first():  # in the order Ray Train committed them
        yield latest
        reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        paths = [r.checkpoint.path for r in reported]
        before = paths.index(latest.path) if latest.path in paths else len(paths)
        yield from (r.checkpoint for r in reversed(reported[:before]) if _name(r.checkpoint).startswith("checkpoint-"))

    for ckpt in newest_first():
        problem = elastic.checkpoint_problem(ckpt.filesystem, ckpt.path)
        if problem is None:
            if es.damaged:
                es.events.emit("checkpoints_skipped", damaged=es.damaged, resumed_from=_name(ckpt))
            return ckpt
        es.damaged.append(f"{_name(ckpt)}: {problem}")
    raise RecipeError(f"run '{plan.run_name}' has no whole checkpoint left ({'; '.join(es.damaged)}); start a new "
                      "run with --set run_name=NEW")


def _name(checkpoint) -> str:
    return checkpoint.path.rstrip("/").rsplit("/", 1)[-1]


def _export(trainer, tokenizer, plan, result, run: dict, es: ElasticState, ctx, scratch: Path) -> None:
    """The final Hugging Face model and the run summary, reported to Ray Train as the run's last checkpoint.
    ZeRO-3 (zero3_save_16bit_model) gathers the full weights to rank 0; FSDP2 gathers a full state dict
    parameter by parameter into rank 0's CPU memory only (accelerate's get_state_dict: full_state_dict,
    cpu_offload), next to the trained shards, never two full copies."""
    import ray.train
    import torch

    from . import diagnostics
    from .export import FINAL_DIR

    facts = diagnostics.fsdp_facts(trainer) if plan.backend == "fsdp" else diagnostics.zero_facts(trainer)
    facts["quantized_linear_layers"] = diagnostics.quantized_linear_layers(trainer.model)
    checksums = diagnostics.param_checksums(trainer.model) if plan.backend == "fsdp" else {}

    export = scratch / "export"
    if plan.backend == "fsdp":
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.model.generation_config.eos_token_id = tokenizer.eos_token_id
    trainer.model.config.eos_token_id = tokenizer.eos_token_id
    trainer.save_model(str(export))
    final_ckpt = None
    metrics = {"step": trainer.state.global_step, **last_logs(trainer.state.log_history), **result.metrics}
    if ctx.get_world_rank() == 0:
        tokenizer.save_pretrained(str(export))
        trainer.model.config.use_cache = True
        trainer.model.config.save_pretrained(str(export))
        summary = {
            "metrics": metrics,
            "log_history": trainer.state.log_history,
            "facts": facts,
            "trainer": next(c.__name__ for c in type(trainer).__mro__ if c.__module__.startswith("trl.")),
            "param_checksums": checksums,
            **run,
        }
        (export / "raytrain_align_run.json").write_text(json.dumps(summary, indent=2, default=str))
        final_ckpt = ray.train.Checkpoint.from_directory(str(export))
    ray.train.report({**metrics, **{f"fact_{k}": v for k, v in facts.items()}, "final": 1}, checkpoint=final_ckpt,
                     checkpoint_dir_name=FINAL_DIR,
                     checkpoint_upload_fn=functools.partial(upload_checkpoint, ctx.get_storage()))
    torch.distributed.barrier()  # the export is in storage now (report persists it before returning)
    if es.rank == 0:
        es.events.emit("exported", step=trainer.state.global_step, checkpoint=FINAL_DIR)
    if ctx.get_local_rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)  # a 3B model's checkpoints and export, off the node's disk
