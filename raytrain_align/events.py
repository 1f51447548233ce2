"""The run's event stream: JSON lines in storage (`<storage>/<run>/raytrain_align/events/`) that jobs.py, the
notebooks, the tests and the benchmarks read. People's log lines are rendered from the same events, here, and
the libraries' own per-step chatter is turned down on the workers (`quiet_worker`).

Each writer (the driver of one launch, rank 0 of one worker-group start) keeps files of its own, so nothing is
appended to a shared object (object stores cannot append) and a writer holds at most one file's worth of lines.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any

from . import storage

FOLDER = "raytrain_align/events"  # in the run's storage folder, beside elastic.py's run log
LINES_PER_FILE = 200  # a writer starts a new file after this many events


def folder(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}/{FOLDER}"


class EventLog:
    """One writer's events: each `emit` is stored (the writer's current file rewritten whole, atomically) and its
    line printed for the log."""

    def __init__(self, storage_path: str, run_name: str, writer: str, **stamp: Any):
        self.base = f"{folder(storage_path, run_name)}/{time.strftime('%Y%m%d-%H%M%S')}-{writer}"
        self.stamp = stamp  # fields every event of this writer carries (its launch, its attempt)
        self.lines: list[str] = []
        self.files = 0

    def emit(self, kind: str, **fields: Any) -> dict:
        event = {"event": kind, "unix": round(time.time(), 3), **self.stamp, **fields}
        if len(self.lines) == LINES_PER_FILE:
            self.lines, self.files = [], self.files + 1
        self.lines.append(json.dumps(event, default=str))
        storage.write_text(f"{self.base}-{self.files:04d}.jsonl", "\n".join(self.lines) + "\n")
        if text := render(event):
            print(text, flush=True)
        return event


def read(storage_path: str, run_name: str, kinds: set[str] | None = None) -> list[dict]:
    """Every event of the run (all writers, all launches), oldest first; only `kinds` if given."""
    out = []
    for path in storage.list_files(folder(storage_path, run_name), recursive=False):
        for line in (storage.read_text(path) or "").splitlines():
            if line.strip() and (event := json.loads(line)) and (kinds is None or event["event"] in kinds):
                out.append(event)
    return sorted(out, key=lambda e: e["unix"])


def job_id() -> str | None:
    """The Ray job's submission id when the driver runs under `ray job submit` / jobs.submit (Ray's job supervisor
    hands the driver the job's config, metadata included, as JSON in this variable)."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (config.get("metadata") or {}).get("job_submission_id")


# ----------------------------------------------------------------------------------------------- log lines
def _clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))


def _resumed(e: dict) -> str:
    lost = f", {e['steps_lost']} step(s) lost" if "steps_lost" in e else ""
    match = e.get("optimizer_state_max_rel_diff")
    state = f"; optimizer state {'kept' if match < 1e-6 else 'DIFFERS'}" if match is not None else ""
    how = f"; {e['resharded']}" if e.get("resharded") else ""
    return (f"resume        {e['cause']}: from step {e['resumed_step']} at world {e['world_size']} "
            f"(grad-acc {e['gradient_accumulation_steps']}, GBS {e['global_batch_size']}){lost}{how}{state}")


def _progress(e: dict) -> str:
    tps = f"  {e['tokens_per_s']:,.0f} tok/s" if e.get("tokens_per_s") else ""
    return (f"step {e['step']:>6}/{e['max_steps']} ({e['step'] / e['max_steps']:4.0%})  loss {e['loss']:.4f}  "
            f"lr {e['learning_rate']:.2e}{tps}  eta {e['eta_s']:,.0f}s")


def render_data(e: dict) -> str:
    """The prepared data's summary lines (a data_prepared event, or prepare.Prepared's fields)."""
    fill = f", packing fill {e['fill_ratio']:.1%}" if e.get("fill_ratio") else ""
    how = "reused" if e.get("reused") else (f"in {e['seconds']:.1f}s ({e['tokens'] / max(e['seconds'], 1e-9):,.0f} tokens/s, "
                                            f"{e['nodes']} node(s)), finished at {e['finished_at']}")
    lines = [f"data          {e['rows_in']:,} rows -> {e['rows_out']:,} {'sequences' if e['method'] == 'sft' else 'pairs'}, "
             f"{e['tokens']:,} tokens ({e['loss_tokens']:,} in the loss){fill}, {how}",
             f"data cache    {e['path'].rsplit('/', 1)[0]} (key {e['key']})"]
    for reason, n in sorted((e.get("drops") or {}).items(), key=lambda kv: -kv[1]):
        example = ((e.get("drop_examples") or {}).get(reason) or [""])[0]
        lines.append(f"data dropped  {n:,} rows: {reason}" + (f"  e.g. {example}" if example else ""))
    return "\n".join(lines)


RENDER = {
    "launch": lambda e: None,  # the plan printed above says the same
    "already_finished": lambda e: (f"done          run '{e['run']}' already finished in {e['storage']}; exporting its "
                                   "model again (pass --set run_name=NEW or delete that folder to train anew)"),
    "data_prepared": render_data,
    "train_submitted": lambda e: f"train         {e['workers']} Ray workers, {e['backend']}, run '{e['run']}' in {e['storage']}",
    "workers_formed": lambda e: (f"workers       process group formed at {_clock(e['unix'])}: world {e['world_size']}, "
                                 f"{e['process_group']}, collective timeout {e['collective_timeout_s']}s; data already "
                                 f"prepared ({e['rows']:,} rows)"),
    "checkpoints_skipped": lambda e: f"warning       {'; '.join(e['damaged'])}: damaged, skipped; resuming from {e['resumed_from']}",
    "start": lambda e: None if e["cause"] == "start" else _resumed(e),  # the run log's record of this start
    "training": lambda e: f"training      {e['max_steps']} steps",
    "progress": _progress,
    "checkpoint_committed": lambda e: None,  # one per save: in the stream, not in the log
    "checkpoint_uploading": lambda e: None,  # ray.checkpoint_upload: async; Ray commits it when uploaded
    "preemption": lambda e: (f"preemption    node(s) {', '.join(n[:8] for n in e['nodes'])} (ranks {e['ranks']}) drain by "
                             f"{_clock(e['deadline_unix']) if e.get('deadline_unix') else '?'}; checkpoint at step "
                             f"{e['step']} committed; waiting for Ray Train to restart without them"),
    "exported": lambda e: None,  # rank 0: the final model is in storage
    "finished": lambda e: None,  # the driver: the model exported to output_dir; the CLI prints its summary
}


def render(event: dict) -> str | None:
    """The event's log line, or None for events only machines read."""
    return RENDER[event["event"]](event)


# ----------------------------------------------------------------------------------------------- quiet workers
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


def quiet_worker(rank: int) -> None:
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
