"""Stage 3 of 5: build the training data with Ray Data, before any process group exists.

The handbook tokenizes on rank 0 behind a barrier and raises `ddp_timeout` to survive it. Here the
mixture is tokenized (and packed) by a pool of Ray Data actors across the cluster's CPUs, each running
TRL's own `SFTTrainer._prepare_dataset` / `DPOTrainer._prepare_dataset` on its block, and written as
Arrow shards to the run storage under a content-addressed key. The rows never pass through the driver:
read tasks on the cluster's nodes read the source files (sources.py). Training workers memory-map the
shards, so no collective ever waits on data, no process holds the dataset, and a later run with the same
data, tokenizer and settings reuses them. Rows TRL would crash on are dropped and counted per reason instead (or refused, `ray.strict_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import mixture_order, sources, storage, tokenize_blocks
from .errors import RecipeError

FORMAT_VERSION = 3  # bump when the prepared layout changes, so old caches are not reused

# Config fields that change what preparation produces, per method.


@dataclass
class Prepared:
    """What training needs to know about the prepared data (also written as manifest.json)."""

    path: str
    key: str
    method: str
    rows_in: int
    rows_out: int
    tokens: int
    loss_tokens: int
    fill_ratio: float | None
    seconds: float
    drops: dict[str, int] = field(default_factory=dict)
    drop_examples: dict[str, list[str]] = field(default_factory=dict)
    nodes: int = 0
    reused: bool = False
    eval_path: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""

    @property
    def rows_dropped(self) -> int:
        return sum(self.drops.values())

    def render(self) -> str:
        """Summary lines for the log (the same as the data_prepared event's)."""
        from .events import render_data

        return render_data(asdict(self))


def _files_hash(path: str) -> str:
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt"):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    else:
        h.update(path.encode())  # a Hub id: its revision is part of the spec
    return h.hexdigest()[:16]


def cache_spec(plan, fingerprints: list) -> dict[str, Any]:
    """Everything that determines the prepared bytes; its hash is the cache key. The row order follows from the
    mixture and the source files (path, size, modification time), so no file is opened to compute it."""
    import trl

    mix = sources.mixture(plan.script)
    return {
        "method": plan.method,
        "mixture": {"datasets": [{k: e.get(k) for k in ("id", "config", "split", "columns", "weight", "test")}
                                 for e in mix["datasets"]],
                    "seed": mix.get("seed", 0), "test_split_size": mix.get("test_split_size"),
                    "take": mix.get("take", "shuffled")},
        "sources": fingerprints,
        "tokenizer": {"files": _files_hash(plan.model["model_name_or_path"]), "revision": plan.model.get("model_revision")},
        "chat_template": plan.training.get("chat_template"),
        "fields": {k: plan.training.get(k) for k in tokenize_blocks.DATA_FIELDS[plan.method]},
        "long_samples": plan.data.get("long_samples", "truncate"),
        "trl": trl.__version__,
        "format": FORMAT_VERSION,
    }


def cache_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _remove_abandoned(root: Path, log) -> None:
    """Delete temp dirs left by preparations that were killed on this host (their owner process is gone)."""
    for tmp in root.glob(".*.tmp-*"):
        try:
            owner = json.loads((tmp / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") != socket.gethostname():
            continue
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"data          removed {tmp.name}, left half-written by a preparation that was killed")
        except PermissionError:
            pass


def prepare(plan, log=print) -> Prepared:
    """Mixture -> Ray Data (read tasks, block grouping, TokenizeActors running TRL) -> Arrow shards at a content key.

    Nothing half-written is ever read: in a local or shared folder the shards go to a temp folder renamed
    to the key when complete; in an object store (no rename) to `<key>/attempt-<id>/`, committed by writing
    `<key>/manifest.json` (one object, written whole) last. `log` gets the progress lines; the caller reports
    the result (`Prepared.render`)."""
    sources.check_local(plan.script)
    located = sources.locate(sources.mixture(plan.script)["datasets"])
    spec = cache_spec(plan, sources.fingerprint(located))  # from file listings: a cached run reads no data file
    key = cache_key(spec)
    if storage.is_remote(plan.storage_path):
        return _prepare_in_object_store(plan, located, spec, key, log)
    root = Path(plan.storage_path) / "prepared"
    final = root / key
    manifest = final / "manifest.json"
    if root.exists():
        _remove_abandoned(root, log)
    if manifest.exists():
        return _reuse(manifest.read_text())

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    (tmp / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        prepared = _tokenize(plan, located, spec, key, str(tmp), str(final), log)
        (tmp / "owner.json").unlink()
        (tmp / "manifest.json").write_text(json.dumps(asdict(prepared), indent=2))
        try:
            os.rename(tmp, final)  # atomic: a half-written cache never has the final name
        except OSError:  # a concurrent preparation of the same key finished first: use it
            if not manifest.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return prepared


def _prepare_in_object_store(plan, located, spec, key, log) -> Prepared:
    base = storage.join(plan.storage_path, "prepared", key)
    manifest = storage.join(base, "manifest.json")
    if (text := storage.read_text(manifest)) is not None:
        return _reuse(text)
    attempt = storage.join(base, f"attempt-{uuid.uuid4().hex[:8]}")
    done = False
    try:
        prepared = _tokenize(plan, located, spec, key, attempt, attempt, log)
        if (text := storage.read_text(manifest)) is not None:  # a concurrent preparation of the same key finished first
            return _reuse(text)
        storage.write_text(manifest, json.dumps(asdict(prepared), indent=2))
        done = True
    finally:  # a failed attempt removes its shards; one killed outright leaves a folder no manifest names
        if not done:
            storage.delete_dir(attempt)
    return prepared


def _reuse(manifest_text: str) -> Prepared:
    prepared = Prepared(**json.loads(manifest_text))
    prepared.reused = True
    return prepared


def _tokenize(plan, located, spec, key, out: str, final: str, log) -> Prepared:
    """Row counts, the mixture order, then both splits through the Ray Data pipeline into `out`; the returned
    paths point at `final`, where the shards will be once committed."""
    t0 = time.time()
    mix = sources.mixture(plan.script)
    srcs = sources.resolve(mix["datasets"], located)
    order = mixture_order.mixture_order(srcs, mix)
    tokenizer_path = plan.model["model_name_or_path"]
    n_test = 0 if order.test is None else len(order.test)
    log(f"data          tokenizing {len(order.train):,} rows with Ray Data ({plan.method.upper()}, TRL {spec['trl']}) "
        f"from {sum(len(s.files) for s in srcs)} file(s) ...")
    frags = sources.fragments(srcs, order)
    by_split = tokenize_blocks.tokenize(frags, {0: len(order.train), 1: n_test}, out, plan.method, tokenizer_path,
                                        plan.training, plan.data, log)
    stats = by_split[0]
    rows_out, tokens, loss_tokens = stats["rows_out"], stats["tokens"], stats["loss_tokens"]
    if rows_out == 0:
        top = max(stats["drops"], key=stats["drops"].get) if stats["drops"] else None
        why = f" (every row dropped, mostly '{top}', e.g. {stats['examples'].get(top, [''])[0]})" if top else ""
        raise RecipeError(f"data preparation produced no rows{why}; check the dataset columns, chat template and max_length")
    if plan.data.get("strict") and stats["drops"]:
        reason = max(stats["drops"], key=stats["drops"].get)
        raise RecipeError(
            f"{sum(stats['drops'].values())} bad rows ({', '.join(f'{k}: {v}' for k, v in stats['drops'].items())}), "
            f"e.g. {stats['examples'].get(reason, [''])[0]}; fix the data or unset ray.strict_data to drop them"
        )
    packing = plan.method == "sft" and plan.training.get("packing")
    return Prepared(
        path=storage.join(final, "train"), key=key, method=plan.method, rows_in=len(order.train), rows_out=rows_out,
        tokens=tokens, loss_tokens=loss_tokens,
        fill_ratio=round(tokens / (rows_out * plan.training["max_length"]), 6) if packing else None,
        seconds=round(time.time() - t0, 2), drops=stats["drops"], drop_examples=stats["examples"],
        nodes=len(set(stats["nodes"]) | set(by_split[1]["nodes"])),
        eval_path=storage.join(final, "test") if n_test else None, spec=spec, finished_at=time.strftime("%H:%M:%S"),
    )


def read_prepared(path: str):
    """The prepared shards as a map-style `datasets.Dataset`, memory-mapped: a worker's memory holds only the
    pages it reads, whatever the dataset's size. Shards in an object store are first copied to this node's disk,
    once per node (the first process to take the lock copies, the others wait for it)."""
    import datasets

    if storage.is_remote(path):
        path = _node_local_copy(path)
    files = [f for f in storage.list_files(path, recursive=False) if f.endswith(".arrow")]
    if not files:
        raise RecipeError(f"prepared data at {path} has no shards; delete that cache folder and prepare again")
    return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])


def _node_local_copy(path: str) -> str:
    import tempfile

    from filelock import FileLock

    local = Path(tempfile.gettempdir()) / "raytrain_align" / "prepared" / hashlib.sha256(path.encode()).hexdigest()[:20]
    done = local / ".complete"
    local.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        if not done.exists():
            for f in storage.list_files(path, recursive=False):
                storage.copy_to_local(f, str(local / f.rsplit("/", 1)[-1]))
            done.write_text("ok\n")
    return str(local)
