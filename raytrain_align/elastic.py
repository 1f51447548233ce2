"""What the training loop adds to Ray Train's restarts so a ZeRO-3 / FSDP2 run can lose workers, nodes or its
driver, shrink, grow and resume without repeating or skipping data and without changing the optimization.

Ray Train V2 restarts the worker group (from the latest committed checkpoint) on a failure, on a resize of an
elastic `ScalingConfig(num_workers=(min, max))` and after a node drain; this module makes such a restart safe:

- **Global batch kept**: each start derives gradient accumulation from its own world size (`grad_accum_for`).
- **Exactly-once data** (`GlobalOrderSampler`): one seeded sample order per epoch, the same at every world size,
  cut to whole global batches. accelerate deals consecutive micro-batches of it to the ranks, so optimizer step k
  of an epoch consumes samples [k*GBS, (k+1)*GBS) of that order at any world size, and the Trainer's resume skip
  (global_step x grad-accum micro-batches per rank) skips exactly global_step x GBS samples.
- **Resharding**: a ZeRO-3 checkpoint saved at another world size is converted to DeepSpeed's universal format
  and loaded with `checkpoint.load_universal` (`to_universal`); FSDP2's torch distributed checkpoint reshards
  itself. An optimizer digest saved with each checkpoint is compared after the load (`optimizer_digest`).
- **Preemption** (`preemption_callback`): on a drain notice (`ray.train.get_preemption_info`) the workers save a
  checkpoint at once and then stop stepping, so no step is trained that the restart would throw away.
- **Whole checkpoints only**: each node lists the files it wrote (`write_file_list`); a resume checks the
  listed sizes in storage (`checkpoint_problem`) and falls back to the newest earlier checkpoint that is whole.
- **Evidence** in the run's storage folder, under `raytrain_align/`: `samples/` (which rows each rank trained at
  each step, by content hash) and `run_log.jsonl` (one line per start: cause, world size before/after, step
  resumed from, steps and seconds lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from . import storage
from .errors import RecipeError

POSITION_FILE = "raytrain_align_position.json"  # in every checkpoint: data position, world size, optimizer digest
FILE_LIST = "raytrain_align_files-node{:03d}.json"  # in every checkpoint, one per node: {file: bytes} as written
LOG_DIR = "raytrain_align"  # in the run's storage folder
RUN_LOG = "run_log.jsonl"


# ----------------------------------------------------------------------------------------------- batch size
def valid_world_sizes(gbs: int, mbs: int, lo: int, hi: int) -> list[int]:
    """The world sizes in lo..hi at which the global batch `gbs` is exact (a whole grad-accum count)."""
    return [w for w in range(lo, hi + 1) if gbs % (mbs * w) == 0]


def grad_accum_for(gbs: int, mbs: int, world: int) -> int:
    """The gradient accumulation that keeps the global batch `gbs` at this world size. Exactly, or not at all:
    with another global batch the data position of a checkpoint (global samples) would not be a whole step."""
    if gbs % (mbs * world):
        raise RecipeError(
            f"global batch {gbs} is not a multiple of per_device_train_batch_size x world size = {mbs} x {world}; "
            "use an elastic range whose sizes all divide it (plan checks this), or set ray.global_batch_size")
    return gbs // (mbs * world)


# ----------------------------------------------------------------------------------------------- sampler
class GlobalOrderSampler:
    """A seeded permutation per epoch, independent of the world size, cut to a multiple of the global batch
    (the last `n % GBS` rows of each epoch's order wait for another epoch), so every optimizer step has the full
    global batch and epochs end on the same step at every world size."""

    def __init__(self, n: int, global_batch: int, seed: int):
        if n < global_batch:
            raise RecipeError(f"the prepared data has {n} rows, fewer than one global batch ({global_batch}); "
                              "lower per_device_train_batch_size or gradient_accumulation_steps")
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)[: len(self)].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.n - self.n % self.global_batch


def sample_id(example: dict[str, Any]) -> str:
    """A row's identity in the sample log: a hash of its token ids (every `*input_ids` column the collator sees)."""
    import numpy as np

    h = hashlib.blake2b(digest_size=8)
    for key in sorted(k for k in example if k.endswith("input_ids")):
        h.update(key.encode())
        h.update(np.asarray(example[key], dtype=np.int64).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- storage
def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in (storage.read_text(path) or "").splitlines() if line.strip()]


def log_dir(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}/{LOG_DIR}"


# ----------------------------------------------------------------------------------------------- sample log
class SampleLog:
    """Which rows each rank trained on at each optimizer step. The collator wrapper notes the ids of every
    training micro-batch it builds (accelerate builds one ahead), each `training_step` takes the oldest, and
    `on_step_end` files them under the step. Written as one chunk file per rank at every save and at the end
    (`samples/<attempt>/rank<r>-<step>.jsonl`): steps after the last committed checkpoint are redone by the
    next attempt anyway, so they need not be written."""

    def __init__(self, logs: str, attempt: str, rank: int):
        self.folder, self.rank = f"{logs}/samples/{attempt}", rank
        self.built: list[list[str]] = []
        self.pending: list[str] = []
        self.lines: list[str] = []

    def wrap_collator(self, collate):
        def collate_and_note(examples):
            self.built.append([sample_id(e) for e in examples])
            return collate(examples)

        return collate_and_note

    def wrap_training_step(self, step_fn):
        def training_step(*args, **kwargs):
            if self.built:
                self.pending.extend(self.built.pop(0))
            return step_fn(*args, **kwargs)

        return training_step

    def step_done(self, step: int, epoch: float) -> None:
        self.lines.append(json.dumps({"step": step, "epoch": round(epoch or 0, 6), "samples": self.pending}))
        self.pending = []

    def flush(self, step: int) -> None:
        if self.lines:
            storage.write_text(f"{self.folder}/rank{self.rank:04d}-{step:08d}.jsonl", "\n".join(self.lines) + "\n")
            self.lines = []


def trained_samples(logs: str) -> dict[int, list[str]]:
    """{optimizer step: ids of every row trained at it, all ranks} over every attempt of a run, keeping for each
    step the attempt that trained it last (a later attempt resumed from an earlier checkpoint redoes the steps
    after it; the run log's order of attempts decides)."""
    starts = [r for r in read_jsonl(f"{logs}/{RUN_LOG}") if r.get("event") == "start"]
    steps: dict[int, list[str]] = {}
    for start in starts:
        steps = {s: v for s, v in steps.items() if s <= start["resumed_step"]}  # rolled back by this attempt
        mine: dict[int, list[str]] = {}
        for path in storage.list_files(f"{logs}/samples/{start['attempt']}"):
            for row in read_jsonl(path):
                mine.setdefault(row["step"], []).extend(row["samples"])
        steps.update(mine)
    return dict(sorted(steps.items()))


# ----------------------------------------------------------------------------------------------- optimizer
def optimizer_digest(model, optimizer) -> dict[str, list[float]]:
    """Per trained parameter: sum, sum of squares and a position-weighted sum of its fp32 master weights and Adam
    moments, computed from
    each rank's shard and all-reduced (a shard's sums add up to the full tensor's, whatever the partitioning),
    so a digest taken at world size 4 can be compared with one taken after resuming at world size 2."""
    import torch
    import torch.distributed as dist

    names, rows = [], []
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper (and DeepSpeed's) around the torch optimizer
        optimizer = optimizer.optimizer
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3: the local partition of master weights and moments
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            parts = [safe_get_local_fp32_param(p)] + [safe_get_local_optimizer_state(p, k)
                                                     for k in ("exp_avg", "exp_avg_sq")]
            offset = dist.get_rank() * p.ds_tensor.numel()  # partition r holds flat elements [r*size, (r+1)*size)
        else:  # FSDP2: DTensor parameters and states; their local shards (dim-0 rows)
            state = optimizer.state.get(p, {})
            parts = [p] + [state.get(k) for k in ("exp_avg", "exp_avg_sq")]
            offset = 0
            if hasattr(p, "to_local"):
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                _, starts = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                offset = starts[0] * (p[0].numel() if p.dim() > 1 else 1)
            parts = [t.to_local() if hasattr(t, "to_local") else t for t in parts]
        device = next((t.device for t in parts if t is not None), torch.device("cpu"))
        row = []
        for t in parts:  # in float64 on the shard's device, without a float64 copy of the shard
            t = torch.zeros(1, device=device) if t is None else t.detach().reshape(-1)
            # a position-weighted sum as well: a shard put back in the wrong place changes it
            w = ((torch.arange(t.numel(), device=t.device) + offset) % 1009 + 1).to(t.dtype)
            row += [t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64).square(),
                    (t * w).sum(dtype=torch.float64)]
        names.append(name)
        rows.append(torch.stack(row))
    sums = torch.stack(rows)
    dist.all_reduce(sums)
    return dict(zip(names, sums.tolist()))


def digest_difference(saved: dict[str, list[float]], now: dict[str, list[float]]) -> float:
    """Largest relative difference between two optimizer digests (inf when the parameters differ)."""
    if set(saved) != set(now):
        return float("inf")
    worst = 0.0
    for name, a in saved.items():
        for x, y in zip(a, now[name]):
            worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-30))
    return worst


# ----------------------------------------------------------------------------------------------- resharding
def saved_world_size(checkpoint_dir: str) -> int | None:
    pos = read_position(checkpoint_dir)
    return pos.get("world_size") if pos else None


def read_position(checkpoint_dir: str) -> dict | None:
    path = Path(checkpoint_dir, POSITION_FILE)
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------------------------- whole checkpoints
def write_file_list(checkpoint_dir: str, node_rank: int) -> None:
    """This node's part of a checkpoint as written ({relative path: bytes}): a resume can then tell a whole
    checkpoint from a truncated or partly deleted one by its sizes in storage, without reading it."""
    root = Path(checkpoint_dir)
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    Path(root, FILE_LIST.format(node_rank)).write_text(json.dumps(files))


def checkpoint_problem(fs, path: str) -> str | None:
    """What makes a checkpoint in storage (pyarrow filesystem, path) unusable, in a few words, or None if it is
    whole: its position file unreadable, a node's file list missing, a listed file missing or not its size."""
    import pyarrow.fs

    def read_json(name: str):
        try:
            with fs.open_input_stream(f"{path}/{name}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            raise ValueError(f"{name} is missing") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} is unreadable ({type(e).__name__})") from None

    try:
        pos = read_json(POSITION_FILE)
        if not isinstance(pos, dict) or not isinstance(pos.get("global_step"), int):
            raise ValueError(f"{POSITION_FILE} is unreadable (no global_step)")
        listed: dict[str, int] = {}
        for node in range(pos.get("nodes", 0)):  # checkpoints from before file lists: position checked only
            listed.update(read_json(FILE_LIST.format(node)))
    except ValueError as e:
        return str(e)
    for (name, size), info in zip(listed.items(), fs.get_file_info([f"{path}/{n}" for n in listed])):
        if info.type != pyarrow.fs.FileType.File:
            return f"{name} is missing"
        if info.size != size:
            return f"{name} is {info.size:,} bytes, {size:,} when written"
    return None


def to_universal(checkpoint_dir: str) -> float:
    """Convert the ZeRO-3 checkpoint in `checkpoint_dir` (HF layout: global_stepN/ + latest) to DeepSpeed's
    universal format beside it (global_stepN_universal/ + latest_universal), which DeepSpeed loads at any world
    size with `checkpoint.load_universal`. deepspeed's own converter; its console output is swallowed.
    Returns the seconds it took."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    tag = Path(checkpoint_dir, "latest").read_text().strip()
    out = Path(checkpoint_dir, f"{tag}_universal")
    workers = max(1, min(8, len(os.sched_getaffinity(0)) // 2))
    t0 = time.time()
    args = Namespace(input_folder=str(Path(checkpoint_dir, tag)), output_folder=str(out), num_extract_workers=workers,
                     num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                     inject_missing_state=False)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        ds_to_universal.main(args)
    return time.time() - t0


def param_groups(optimizer) -> list[dict]:
    """The optimizer's parameter-group hyperparameters (no parameters), as saved beside each checkpoint."""
    return [{k: v for k, v in g.items() if k != "params"} for g in _base(optimizer).param_groups]


def repair_universal_load(optimizer, saved_groups: list[dict] | None) -> list[str]:
    """Undo what deepspeed 0.19.8's ZeRO-3 universal-checkpoint load (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`)
    gets wrong, and say what was repaired. It gives every parameter sub-group one shared Adam `step` tensor, which
    torch's Adam then advances once per sub-group per step (bias correction off from the second step), and it
    copies the first group's hyperparameters onto every group (the Trainer's no-decay group then decays).
    `benchmarks/zero3_universal_resume.py` reproduces both without Ray or the Trainer."""
    import torch

    opt, repaired = _base(optimizer), []
    seen, shared = set(), 0
    for state in opt.state.values():
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
                shared += 1
            seen.add(id(state["step"]))
    if shared:
        repaired.append(f"{shared + 1} sub-groups' shared Adam step counter split")
    if saved_groups and len(saved_groups) == len(opt.param_groups):
        changed = 0
        for group, saved in zip(opt.param_groups, saved_groups):
            for key, value in saved.items():
                value = tuple(value) if isinstance(group.get(key), tuple) else value  # betas come back as a list
                if group.get(key) != value:
                    group[key], changed = value, changed + 1
        if changed:
            repaired.append(f"{changed} parameter-group hyperparameter(s) restored")
    return repaired


def _base(optimizer):
    """The torch optimizer inside accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


# ----------------------------------------------------------------------------------------------- run log
def heartbeat(logs: str, attempt: str, step: int) -> None:
    """Rank 0's last completed step of this attempt (what a restart after a crash lost)."""
    storage.write_text(f"{logs}/attempts/{attempt}.json", json.dumps({"step": step, "unix": round(time.time(), 3)}))


def log_start(logs: str, attempt: str, *, world: int, gbs: int, grad_accum: int, position: dict | None,
              launch_id: str, optimizer_match: float | None, resharded: str | None, damaged: list[str] = ()) -> dict:
    """One run-log line per (re)start of the worker group, written once the checkpoint is loaded: why (as far
    as the workers can tell), world size before and after, the step resumed from, the steps the previous
    attempt trained past that checkpoint (lost) and the seconds since that checkpoint was saved (lost)."""
    path = f"{logs}/{RUN_LOG}"
    rows = read_jsonl(path)
    starts = [r for r in rows if r.get("event") == "start"]
    prev = starts[-1] if starts else None
    resumed = int(position["global_step"]) if position else 0
    now = time.time()
    record: dict[str, Any] = {"event": "start", "attempt": attempt, "unix": round(now, 3),
                              "clock": time.strftime("%Y-%m-%d %H:%M:%S"), "launch_id": launch_id,
                              "world_size": world, "prev_world_size": prev["world_size"] if prev else None,
                              "global_batch_size": gbs, "gradient_accumulation_steps": grad_accum,
                              "resumed_step": resumed}
    beat = json.loads(storage.read_text(f"{logs}/attempts/{prev['attempt']}.json") or "null") if prev else None
    if prev is None:
        record["cause"] = "resumed an existing run" if position else "start"
    elif prev.get("launch_id") != launch_id:
        record["cause"] = "driver relaunch"
    elif position and position.get("reason") == "preemption" and position.get("attempt") == prev["attempt"]:
        # the previous attempt's own emergency checkpoint (a later restart may resume from it too, for its own cause)
        record["cause"] = "preemption (node drain)"
    elif prev["world_size"] > world:
        record["cause"] = f"shrink {prev['world_size']} -> {world} (workers lost)"
    elif prev["world_size"] < world:
        record["cause"] = f"grow {prev['world_size']} -> {world} (resources added)"
    else:
        record["cause"] = "worker group restart after a failure"
    if prev is not None:
        last = beat["step"] if beat else prev["resumed_step"]
        record["prev_last_step"] = last
        record["steps_lost"] = max(0, last - resumed)
        if beat:
            record["recovery_seconds"] = round(now - beat["unix"], 3)  # last step done -> this start's state loaded
        if position:
            record["seconds_lost"] = round(now - position["saved_unix"], 3)  # checkpoint saved -> back at it
    if optimizer_match is not None:
        record["optimizer_state_max_rel_diff"] = optimizer_match
    if resharded:
        record["resharded"] = resharded
    if damaged:
        record["damaged_checkpoints_skipped"] = list(damaged)
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in [*rows, record]))
    return record


def position(global_step: int, gbs: int, world: int, nodes: int, epoch: float, reason: str, attempt: str,
             digest: dict | None, groups: list[dict] | None = None) -> dict:
    return {"global_step": global_step, "global_samples": global_step * gbs, "global_batch_size": gbs,
            "world_size": world, "nodes": nodes, "epoch": epoch, "reason": reason, "attempt": attempt,
            "saved_unix": time.time(), "optimizer_digest": digest, "param_groups": groups}


def check_resume(pos: dict | None, gbs: int) -> None:
    """Resuming is exactly-once only with the global batch the checkpoint was trained with."""
    if pos and pos.get("global_batch_size") not in (None, gbs):
        raise RecipeError(
            f"the checkpoint was trained with global batch {pos['global_batch_size']} and this start has {gbs}; "
            "its data position would not match: resume with the same per_device_train_batch_size x "
            "gradient_accumulation_steps x world size, or start a new run (--set run_name=NEW)")
