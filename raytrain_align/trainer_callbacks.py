"""The behaviour every worker's Trainer gets, SFT, DPO and ORPO alike, as transformers callbacks: a progress line
about every 5%, step timings, and the elastic machinery's checkpoint commits (one upload per node, committed before
training goes on), sample log, heartbeat and drain handling."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any


def progress_callback(events):
    """Rank 0 emits a progress event (one log line) about every 5% of the run instead of a dict per step;
    `events` is rank 0's EventLog, None on the other ranks."""
    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.every = time.time(), max(1, state.max_steps // 20)
            if events:
                events.emit("training", max_steps=state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            if not events or "loss" not in (logs or {}):
                return
            if step % self.every and step != state.max_steps:
                return
            elapsed = time.time() - self.t0
            tokens = logs.get("num_tokens")
            events.emit("progress", step=step, max_steps=state.max_steps, loss=logs["loss"],
                        learning_rate=logs.get("learning_rate", 0.0), tokens_per_s=tokens / elapsed if tokens else None,
                        eta_s=elapsed / max(step, 1) * (state.max_steps - step))

    return ProgressLog()


class ElasticState:
    """This attempt's share of the elastic machinery (elastic.py): the global batch, the sample log, the run log
    folder, and whether a drain notice asked for an emergency checkpoint."""

    def __init__(self, plan, world: int, rank: int, attempt: str, nodes: int, launch_id: str, pids: list[int]):
        from . import elastic
        from .events import EventLog

        self.world, self.rank, self.attempt, self.gbs = world, rank, attempt, plan.global_batch_size
        self.nodes = nodes  # of this worker group: how many file lists a whole checkpoint holds
        self.launch_id = launch_id  # one per driver (fit() call): tells a relaunch from a restart
        self.pids = pids  # the worker processes, by world rank
        self.damaged: list[str] = []  # newer checkpoints this start skipped, each with what was wrong (rank 0)
        self.taken_names: set[str] = set()  # their names, which this start's saves must not reuse (every rank)
        self.position: dict | None = None  # the resumed checkpoint's position file
        self.resharded: str | None = None  # how it was resharded (told by each node's local rank 0)
        self.universal_load = False  # every rank: loaded through DeepSpeed's universal format, repaired after
        self.logs = elastic.log_dir(plan.storage_path, plan.run_name)
        self.events = EventLog(plan.storage_path, plan.run_name, f"rank0-{attempt}", launch_id=launch_id,
                               attempt=attempt) if rank == 0 else None  # rank 0's, None on the other ranks
        self.samples = elastic.SampleLog(self.logs, attempt, rank)
        self.heartbeat_every = 0.0 if "://" not in plan.storage_path else 30.0  # rank 0's last-step file
        self.last_beat = 0.0
        self.preempted = None  # ray.train.PreemptionInfo once a node of this group drains
        self.commit_seconds: list[float] = []  # per checkpoint: report() returned -> committed by the controller
        self.async_upload = plan.checkpoint_upload == "async"


def upload_checkpoint(run_storage, checkpoint, dir_name: str):
    """Ray Train's upload of one node's checkpoint folder (into Ray's StorageContext `run_storage`), through
    storage.upload_dir: a transient storage error costs a retry of one file, not a restart and the steps since
    the previous checkpoint."""
    import ray.train

    from . import storage

    dest = run_storage.build_checkpoint_path_from_name(dir_name)
    storage.upload_dir(checkpoint.path, run_storage.storage_filesystem, dest)
    return ray.train.Checkpoint(dest, filesystem=run_storage.storage_filesystem)


def checkpoint_callback(es: ElasticState):
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
            if es.universal_load:
                repaired = elastic.repair_universal_load(kwargs["optimizer"], es.position.get("param_groups"))
                if es.resharded:  # this node's local rank 0 converted the checkpoint and tells
                    es.resharded += "".join(f"; {r}" for r in repaired)
            saved = (es.position or {}).get("optimizer_digest")
            match = None
            if saved:  # every rank (a collective), the same condition on all
                now = elastic.optimizer_digest(kwargs["model"], kwargs["optimizer"])
                match = elastic.digest_difference(saved, now)
            if es.rank == 0:
                rec = elastic.log_start(es.logs, es.attempt, world=es.world, gbs=es.gbs, grad_accum=args.gradient_accumulation_steps,
                                        position=es.position, launch_id=es.launch_id, optimizer_match=match,
                                        resharded=es.resharded, damaged=es.damaged)
                es.events.emit("start", **{k: v for k, v in rec.items() if k not in ("event", "unix")})

        def on_step_end(self, args, state, control, **kwargs):
            es.samples.step_done(state.global_step, state.epoch)
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
                    elastic.position(step, es.gbs, es.world, es.nodes, state.epoch, reason, es.attempt, digest,
                                     elastic.param_groups(kwargs["optimizer"]))))
            if dist.is_initialized():
                dist.barrier()
            ctx = ray.train.get_context()
            metrics = {"step": step, **last_logs(state.log_history)}
            ckpt = None
            if ctx.get_local_rank() == 0:
                # the folder this save just wrote (not the highest-numbered one: scratch may hold an older run's)
                if os.path.isdir(path):
                    elastic.write_file_list(path, ctx.get_node_rank())  # every rank of the node has written
                    ckpt = ray.train.Checkpoint.from_directory(path)
            # ray.checkpoint_upload: async — Ray uploads this node's folder in a background thread, reports it when
            # done and then deletes the local copy (the Trainer's own rotation is off, see below); training goes on.
            # An emergency (preemption) checkpoint is always uploaded and committed before anything else.
            background = es.async_upload and es.preempted is None
            mode = ray.train.CheckpointUploadMode.ASYNC if background else ray.train.CheckpointUploadMode.SYNC
            name = f"checkpoint-{step:07d}"
            if name in es.taken_names:  # a damaged checkpoint this start skipped still holds it
                name += f"-{es.attempt}"
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name,
                             checkpoint_upload_mode=mode,
                             checkpoint_upload_fn=functools.partial(upload_checkpoint, ctx.get_storage()))
            if background:
                if es.rank == 0:
                    es.events.emit("checkpoint_uploading", step=step, name=name)
                return
            # report() returns once this rank's part is uploaded; the checkpoint becomes the one a restart resumes
            # from only when the controller has collected every rank's report. A rank lost before that (a worker
            # killed a step later, a drained node taken away) would leave it uncommitted, and the restart would
            # go back to the previous one. So every rank waits for the commit (about one controller poll).
            t0 = time.time()
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            es.commit_seconds.append(time.time() - t0)
            if es.rank == 0:
                es.events.emit("checkpoint_committed", step=step, name=name, commit_seconds=es.commit_seconds[-1],
                               reason="preemption" if es.preempted else "save")
            if es.preempted is not None:
                self._wait_for_restart(step)

        def _wait_for_restart(self, step):
            """After the emergency checkpoint: every step trained now would be thrown away when the node goes,
            so stop stepping; Ray Train restarts the group from this checkpoint without the drained node."""
            info = es.preempted
            if es.rank == 0:
                es.events.emit("preemption", nodes=list(info.preempted_node_ids), ranks=list(info.preempted_ranks),
                               deadline_unix=info.deadline_ms / 1000 if info.deadline_ms else None, step=step)
            while True:
                time.sleep(1)

    return RayCheckpointReport()


def timing_callback():
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


def last_logs(history: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for entry in history:
        out.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return out
