"""Stage 3 of 5: build the training data with Ray Data, before any process group exists.

The handbook tokenizes on rank 0 behind a barrier and raises `ddp_timeout` to survive it. Here the
mixture is tokenized (and packed) by a pool of Ray Data actors across the cluster's CPUs, each running
TRL's own `SFTTrainer._prepare_dataset` / `DPOTrainer._prepare_dataset` on its block, and written as
Parquet shards to the run storage under a content-addressed key. Training workers only read those
shards, so no collective ever waits on data, and a later run with the same data, tokenizer and settings
reuses them. Rows TRL would crash on are dropped and counted per reason instead (or refused, `ray.strict_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError

ROWS_PER_BLOCK = 1000  # TRL tokenizes and packs in batches of 1000 rows (datasets.map default); so do we, per block.
FORMAT_VERSION = 2  # bump when the prepared layout changes, so old caches are not reused

# Config fields that change what preparation produces, per method.
DATA_FIELDS = {
    "sft": ("max_length", "packing", "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss",
            "dataset_text_field", "eos_token", "pad_token", "truncation_mode"),
    "dpo": ("max_length", "truncation_mode", "eos_token", "pad_token"),
}
# What the trainers read from a prepared row (TRL's signature columns).
OUTPUT_COLUMNS = {"sft": ("input_ids", "labels", "seq_lengths"), "dpo": ("prompt_ids", "chosen_ids", "rejected_ids")}
ROLES = {"system", "developer", "user", "assistant", "tool"}
EXAMPLES_PER_REASON = 3


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
        """Summary lines for the log."""
        fill = f", packing fill {self.fill_ratio:.1%}" if self.fill_ratio else ""
        how = "reused" if self.reused else (f"in {self.seconds:.1f}s ({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s, {self.nodes} node(s)), "
                                               f"finished at {self.finished_at}")
        lines = [f"data          {self.rows_in:,} rows -> {self.rows_out:,} {'sequences' if self.method == 'sft' else 'pairs'}, "
                 f"{self.tokens:,} tokens ({self.loss_tokens:,} in the loss){fill}, {how}",
                 f"data cache    {self.path.rsplit('/', 1)[0]} (key {self.key})"]
        for reason, n in sorted(self.drops.items(), key=lambda kv: -kv[1]):
            example = (self.drop_examples.get(reason) or [""])[0]
            lines.append(f"data dropped  {n:,} rows: {reason}" + (f"  e.g. {example}" if example else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ sources


def _is_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith((".json", ".jsonl", ".parquet", ".csv"))


def check_sources(script: dict[str, Any]) -> None:
    """Fail fast, before anything is written, on a local data path that does not exist."""
    for entry in _entries(script):
        src = entry["id"]
        if _is_local(src) and not Path(src).expanduser().exists():
            raise RecipeError(f"dataset '{src}' does not exist; fix the path in dataset_mixture (or dataset_name)")


def _entries(script: dict[str, Any]) -> list[dict]:
    mix = script.get("dataset_mixture")
    if mix:
        return mix["datasets"]
    return [{"id": script["dataset_name"], "config": script.get("dataset_config"),
             "split": script.get("dataset_train_split", "train"), "weight": None}]


BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _first_bad_json_line(files: list[Path]) -> str | None:
    """'file line N: reason' for the first line of a JSON Lines file that does not parse."""
    for f in files:
        if f.suffix != ".jsonl":
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"{f} line {n}: {e}"
    return None


def _load_one(entry: dict):
    import datasets

    src, split = entry["id"], entry.get("split") or "train"
    p = Path(src).expanduser()
    try:
        if p.is_file():
            builder = BUILDERS.get(p.suffix)
            if builder is None:
                raise RecipeError(f"dataset file '{src}' has an unknown type; use .jsonl, .json, .parquet or .csv")
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        # A local directory or a Hub id: the handbook's own call.
        return datasets.load_dataset(str(p) if p.is_dir() else src, entry.get("config"), split=split)
    except RecipeError:
        raise
    except Exception as e:  # a malformed file: say which, and where
        files = [p] if p.is_file() else sorted(p.rglob("*.jsonl")) if p.is_dir() else []
        where = _first_bad_json_line(files)
        if where:
            raise RecipeError(f"dataset '{src}' is malformed at {where}; fix or remove that line") from None
        raise RecipeError(f"dataset '{src}' could not be loaded ({str(e).splitlines()[0][:200]}); fix the id/path, "
                          "config or split in dataset_mixture") from None


def weighted(ds, weight: float | None, seed: int):
    """The handbook's subsampling (shuffle with the mixture seed, keep int(len x weight) rows) for weight <= 1;
    our extension for weight > 1: whole copies plus a seeded remainder, int(len x weight) rows in all."""
    import datasets

    if weight is None:
        return ds
    n = int(len(ds) * weight)
    if weight <= 1:
        return ds.shuffle(seed=seed).select(range(n))
    copies = int(weight)
    remainder = ds.shuffle(seed=seed).select(range(n - copies * len(ds)))
    return datasets.concatenate_datasets([ds] * copies + [remainder])


def load_mixture(script: dict[str, Any]):
    """The handbook's `get_dataset` semantics: per entry select columns, shuffle(seed) and keep
    int(len x weight) rows; concatenate; shuffle again; optional train/test split (fraction or count).
    Returns (train, test or None, fingerprints of the loaded sources)."""
    import datasets

    mix = script.get("dataset_mixture") or {"datasets": _entries(script), "seed": 0}
    seed = mix.get("seed", 0)
    parts, sources = [], []
    for entry in mix["datasets"]:
        ds = _load_one(entry)
        sources.append(ds._fingerprint)
        if entry.get("columns"):
            missing = [c for c in entry["columns"] if c not in ds.column_names]
            if missing:
                raise RecipeError(f"dataset '{entry['id']}' has no column(s) {missing}; it has {ds.column_names}; "
                                  "fix 'columns' in dataset_mixture")
            ds = ds.select_columns(entry["columns"])
        parts.append(weighted(ds, entry.get("weight"), seed))
    try:
        combined = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    except ValueError as e:
        raise RecipeError(f"the mixture's datasets have different columns ({str(e).splitlines()[0][:160]}); "
                          "select the same 'columns' for every entry") from None
    test = None
    size = mix.get("test_split_size")
    if size is not None:
        split = combined.train_test_split(test_size=size, seed=seed)
        combined, test = split["train"], split["test"]
    return combined, test, sources


# ------------------------------------------------------------------------------------------------ bad rows


def _message_problem(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "empty_messages"
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            return "malformed_message"
        if m["role"] not in ROLES:
            return "unknown_role"
        content = m.get("content")
        if content is None and (m.get("tool_calls") or m["role"] == "assistant"):
            continue  # an assistant turn that only calls tools
        if not isinstance(content, str):
            return "non_string_content"
    return None


def _text_problem(value, name: str) -> str | None:
    if value is None or value == "" or value == []:
        return f"missing_{name}"
    if isinstance(value, list):
        return _message_problem(value)
    if not isinstance(value, str):
        return "non_string_content"
    return None


def row_problem(row: dict, method: str, assistant_only_loss: bool = False, text_field: str = "text") -> str | None:
    """Why TRL would crash on (or learn nothing from) this row, or None if it is fine."""
    if method == "dpo":
        if "prompt" in row:  # explicit prompt; without one TRL extracts the shared prefix of chosen/rejected
            if (p := _text_problem(row["prompt"], "prompt")):
                return p
        return _text_problem(row.get("chosen"), "chosen") or _text_problem(row.get("rejected"), "rejected")
    if "messages" in row:
        problem = _message_problem(row["messages"])
        if problem is None and assistant_only_loss and not any(m["role"] == "assistant" for m in row["messages"]):
            problem = "no_assistant_turn"
        return problem
    if "prompt" in row and "completion" in row:
        return _text_problem(row["prompt"], "prompt") or _text_problem(row["completion"], "completion")
    if text_field in row:
        return _text_problem(row[text_field], "text")
    return "no_known_columns"


def _short(row: dict) -> str:
    s = json.dumps(row, ensure_ascii=False, default=str)
    return s if len(s) <= 160 else s[:157] + "..."


# ------------------------------------------------------------------------------------------------ tokenize


class TokenizeActor:
    """Ray Data actor: loads the tokenizer once, then runs TRL's own dataset preparation on each block.

    Per block: drop rows TRL would crash on (counted by reason), tokenize and build labels with TRL
    (no truncation yet), optionally drop over-long rows (`ray.long_samples: drop`), then let TRL truncate
    or pack them exactly as its trainer would. With `out_dir`, each block is written there as
    `part-<block>.parquet` by the actor itself (no separate write tasks to start on a busy node) and only a
    one-row summary goes back; without it (in-process use) the prepared rows are returned.
    """

    def __init__(self, method: str, tokenizer_path: str, training: dict[str, Any], options: dict[str, Any],
                 out_dir: str | None = None):
        import logging
        import types
        import warnings

        import datasets
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        # One actor per CPU already: the tokenizer's own thread pool would only oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        logging.getLogger("trl").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' field renames, once per actor
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        self.method, self.options, self.out_dir = method, options, out_dir
        self.local_stats = PrepareStats()
        self.tok = load_tokenizer(tokenizer_path, training)
        fields = {k: training[k] for k in DATA_FIELDS[method] if training.get(k) is not None}
        common = dict(output_dir="/tmp/raytrain_align_prepare", report_to="none", bf16=False, dataset_num_proc=None)
        if method == "sft":
            from trl import SFTConfig

            self.args = SFTConfig(shuffle_dataset=False, **common, **fields)
            self.args_untruncated = SFTConfig(shuffle_dataset=False, **common, **{**fields, "max_length": None, "packing": False})
            template = None
            if self.args.assistant_only_loss and not has_generation_markers(self.tok.chat_template):
                template = get_training_chat_template(self.tok)
            # SFTTrainer._prepare_dataset reads these three trainer attributes and nothing else.
            self.trainer_view = types.SimpleNamespace(_tokenizer=self.tok, chat_template=template, completion_only_loss=None)
        else:
            from trl import DPOConfig

            self.args = DPOConfig(**common, **fields)
            self.args_untruncated = DPOConfig(**common, **{**fields, "max_length": None})
            self.trainer_view = types.SimpleNamespace(_tokenizer=self.tok)  # all DPOTrainer._prepare_dataset reads

    # -- TRL's own preparation, in two halves so over-long rows can be seen before TRL truncates them
    def _tokenize(self, ds):
        if self.method == "sft":
            from trl import SFTTrainer

            return SFTTrainer._prepare_dataset(self.trainer_view, ds, self.tok, self.args_untruncated, False, None, "train")
        from trl import DPOTrainer

        return DPOTrainer._prepare_dataset(self.trainer_view, ds, self.tok, self.args_untruncated, "train")

    def _finish(self, ds):
        if self.method == "sft":
            from trl import SFTTrainer

            return SFTTrainer._prepare_dataset(self.trainer_view, ds, self.tok, self.args, self.args.packing, None, "train")
        if self.args.max_length is not None and self.args.truncation_mode == "keep_start":
            return ds.filter(lambda ex: len(ex["prompt_ids"]) < self.args.max_length)  # TRL's own filter, same rule
        return ds

    def _length(self, ex) -> int:
        if self.method == "sft":
            return len(ex["input_ids"])
        return len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))

    def __call__(self, batch):
        import datasets
        import pyarrow as pa

        drops: Counter = Counter()
        examples: dict[str, list[str]] = {}
        block = None
        if "_block" in batch.column_names:  # set by tokenize_split: this block's place in the order
            block = batch.column("_block")[0].as_py()
            batch = batch.drop_columns(["_block"])

        def drop(reason: str, row: dict | None) -> None:
            drops[reason] += 1
            if row is not None and len(examples.setdefault(reason, [])) < EXAMPLES_PER_REASON:
                examples[reason].append(_short(row))

        rows = batch.to_pylist()
        aol = bool(getattr(self.args, "assistant_only_loss", False))
        text_field = getattr(self.args, "dataset_text_field", "text")
        keep = []
        for row in rows:
            problem = row_problem(row, self.method, aol, text_field)
            keep.append(problem is None)
            if problem:
                drop(problem, row)
        table = batch.filter(pa.array(keep, pa.bool_())) if not all(keep) else batch
        out = None
        if table.num_rows:
            if self.method == "sft":
                completion_only = self.args.completion_only_loss
                if completion_only is None:
                    completion_only = "prompt" in table.column_names and "completion" in table.column_names
                self.trainer_view.completion_only_loss = completion_only
            try:
                tokenized = self._tokenize(datasets.Dataset(table))
            except Exception:  # one bad row fails TRL's whole map: find it, keep the rest
                parts = []
                for i in range(table.num_rows):
                    try:
                        parts.append(self._tokenize(datasets.Dataset(table.slice(i, 1))))
                    except Exception as e:
                        reason = "no_assistant_tokens" if "assistant tokens" in str(e) else "template_error"
                        drop(reason, {**table.slice(i, 1).to_pylist()[0], "error": str(e).splitlines()[0][:120]})
                tokenized = datasets.concatenate_datasets(parts) if parts else None
            if tokenized is not None and len(tokenized):
                if self.options.get("long_samples") == "drop" and self.args.max_length:
                    lengths = [self._length(ex) for ex in tokenized]
                    for n in lengths:
                        if n > self.args.max_length:
                            drop("too_long", {"tokens": n})
                    if max(lengths) > self.args.max_length:
                        tokenized = tokenized.select([i for i, n in enumerate(lengths) if n <= self.args.max_length])
                n_before = len(tokenized)
                finished = self._finish(tokenized) if len(tokenized) else tokenized
                if not getattr(self.args, "packing", False) and len(finished) < n_before:
                    drops["no_loss_tokens_after_truncation"] += n_before - len(finished)
                columns = [c for c in OUTPUT_COLUMNS[self.method] if c in finished.column_names]
                out = _int32(finished.with_format("arrow")[:].select(columns))
        if out is None:
            out = _empty_output(self.method, bool(getattr(self.args, "packing", False)))
        if self.out_dir is None:  # called in-process (tests, notebooks): keep the counts here
            self.local_stats.add(len(rows), drops, examples, "local")
            return out
        import pyarrow.parquet as pq
        import ray

        fs, out_dir = storage_fs(self.out_dir)
        pq.write_table(out, f"{out_dir}/part-{block:06d}.parquet", filesystem=fs)
        _, tokens, loss_tokens = _stats(out, self.method)
        return pa.table({"rows": [len(rows)], "rows_out": [out.num_rows], "tokens": [tokens], "loss_tokens": [loss_tokens],
                         "drops": [json.dumps(drops)],
                         "examples": [json.dumps(examples)], "node": [ray.get_runtime_context().get_node_id()]})


def _int32(table):
    """Token ids, labels and lengths as int32: half the bytes to move, store and hold in each worker."""
    import pyarrow as pa

    return table.cast(pa.schema([pa.field(name, pa.list_(pa.int32())) for name in table.column_names]))


def _empty_output(method: str, packing: bool):
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    names = [c for c in OUTPUT_COLUMNS[method] if c != "seq_lengths" or packing]
    return pa.table({c: pa.array([], ids) for c in names})


class PrepareStats:
    """Adds up the per-block counts of the tokenize actors (rows, tokens, drops by reason, nodes used)."""

    def __init__(self):
        self.rows = 0
        self.out = {"rows_out": 0, "tokens": 0, "loss_tokens": 0}
        self.drops: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.nodes: set[str] = set()

    def add(self, rows: int, drops: dict, examples: dict, node: str, **out: int) -> None:
        self.rows += rows
        for k, v in out.items():
            self.out[k] += v
        self.drops.update(drops)
        self.nodes.add(node)
        for reason, rows_ in examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(rows_[: EXAMPLES_PER_REASON - len(kept)])

    def get(self) -> dict:
        return {"rows": self.rows, **self.out, "drops": dict(self.drops), "examples": self.examples,
                "nodes": sorted(self.nodes)}


def load_tokenizer(path: str, training: dict[str, Any], revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer as the handbook's `get_tokenizer` + TRL's trainers set it up (chat_template, eos/pad token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if training.get("chat_template"):
        tok.chat_template = training["chat_template"]
    for name in ("eos_token", "pad_token"):
        value = training.get(name)
        if value:
            if value not in tok.get_vocab():
                raise RecipeError(f"{name} '{value}' is not in the tokenizer's vocabulary; fix {name} in the recipe")
            setattr(tok, name, value)
    if tok.chat_template is None:
        raise RecipeError(f"tokenizer '{path}' has no chat template; set chat_template in the recipe")
    return tok


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


def cache_spec(plan, sources: list[str], train_fingerprint: str) -> dict[str, Any]:
    """Everything that determines the prepared bytes; its hash is the cache key."""
    import trl

    mix = plan.script.get("dataset_mixture") or {"datasets": _entries(plan.script), "seed": 0}
    return {
        "method": plan.method,
        "mixture": {"datasets": [{k: e.get(k) for k in ("id", "config", "split", "columns", "weight")} for e in mix["datasets"]],
                    "seed": mix.get("seed", 0), "test_split_size": mix.get("test_split_size")},
        "sources": sources,
        "rows": train_fingerprint,
        "tokenizer": {"files": _files_hash(plan.model["model_name_or_path"]), "revision": plan.model.get("model_revision")},
        "chat_template": plan.training.get("chat_template"),
        "fields": {k: plan.training.get(k) for k in DATA_FIELDS[plan.method]},
        "long_samples": plan.data.get("long_samples", "truncate"),
        "trl": trl.__version__,
        "format": FORMAT_VERSION,
    }


def cache_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _stats(table, method: str) -> tuple[int, int, int]:
    import pyarrow.compute as pc

    def total(col):
        return int(pc.sum(pc.list_value_length(table[col])).as_py() or 0)

    if method == "dpo":
        prompt, chosen, rejected = total("prompt_ids"), total("chosen_ids"), total("rejected_ids")
        return table.num_rows, 2 * prompt + chosen + rejected, chosen + rejected
    labels = pc.list_flatten(table["labels"])
    return table.num_rows, total("input_ids"), int(pc.sum(pc.not_equal(labels, -100).cast("int64")).as_py() or 0)


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


def tokenize_split(ds, out_dir: str, method: str, tokenizer_path: str, training: dict[str, Any],
                   options: dict[str, Any], log=print) -> dict:
    """Run the Ray Data pipeline on one split, writing Parquet shards to `out_dir`; returns the counts.
    Prints a progress line about every 10% (Ray Data's own bars are off: they flood non-tty logs)."""
    import logging

    import pyarrow as pa
    import ray

    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_blocks = -(-len(ds) // ROWS_PER_BLOCK)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled" notice
    fs, path = storage_fs(out_dir)
    fs.create_dir(path, recursive=True)
    # Blocks of exactly ROWS_PER_BLOCK rows, numbered in order: the batches TRL's own datasets.map would pack.
    table = ds.with_format("arrow")[:]
    blocks = []
    for b in range(n_blocks):
        part = table.slice(b * ROWS_PER_BLOCK, ROWS_PER_BLOCK)
        blocks.append(part.append_column("_block", pa.array([b] * part.num_rows, pa.int32())))
    rd = ray.data.from_arrow(blocks).map_batches(
        TokenizeActor,
        fn_constructor_kwargs={"method": method, "tokenizer_path": tokenizer_path, "training": training,
                               "options": options, "out_dir": out_dir},
        batch_size=None,  # one block, one batch
        batch_format="pyarrow",
        # A fixed pool spread over the cluster's nodes, one actor per CPU (at most one per block).
        compute=ray.data.ActorPoolStrategy(size=max(1, min(n_cpus, n_blocks))),
        num_cpus=1,
    )
    totals, t0, shown = PrepareStats(), time.time(), 0.0
    for summary in rd.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in summary.to_pylist():
            totals.add(row["rows"], json.loads(row["drops"]), json.loads(row["examples"]), row["node"],
                       rows_out=row["rows_out"], tokens=row["tokens"], loss_tokens=row["loss_tokens"])
        frac = totals.rows / max(len(ds), 1)
        if frac - shown >= 0.1 and frac < 1:
            shown = frac
            rate = totals.rows / (time.time() - t0)
            log(f"data          {frac:4.0%} {totals.rows:,}/{len(ds):,} rows  {rate:,.0f} rows/s  "
                f"eta {(len(ds) - totals.rows) / rate:,.0f}s")
    return totals.get()


def storage_fs(path: str):
    """(pyarrow filesystem, path in it) for a local path or a URI (s3://, gs://, file://): the prepared cache
    lives in the run storage, which on a cluster without a shared folder is an object store."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def prepare(plan, log=print) -> Prepared:
    """Mixture -> Ray Data actors (TRL tokenization + packing) -> Parquet shards at a content key.

    Nothing half-written is ever read: in a local or shared folder the shards go to a temp folder renamed
    to the key when complete; in an object store (no rename) to `<key>/attempt-<id>/`, committed by writing
    `<key>/manifest.json` (one object, written whole) last."""
    check_sources(plan.script)
    train, test, sources = load_mixture(plan.script)
    spec = cache_spec(plan, sources, train._fingerprint)
    key = cache_key(spec)
    if "://" in plan.storage_path:
        return _prepare_in_object_store(plan, train, test, spec, key, log)
    root = Path(plan.storage_path) / "prepared"
    final = root / key
    manifest = final / "manifest.json"
    if root.exists():
        _remove_abandoned(root, log)
    if manifest.exists():
        return _reuse(manifest.read_text(), log)

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    (tmp / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        prepared = _tokenize(plan, train, test, spec, key, str(tmp), str(final), log)
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
    log(prepared.render())
    return prepared


def _prepare_in_object_store(plan, train, test, spec, key, log) -> Prepared:
    import pyarrow.fs

    base = f"{plan.storage_path.rstrip('/')}/prepared/{key}"
    fs, base_path = storage_fs(base)
    manifest = f"{base_path}/manifest.json"

    def committed() -> str | None:
        if fs.get_file_info(manifest).type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(manifest) as f:
            return f.read().decode()

    if (text := committed()) is not None:
        return _reuse(text, log)
    attempt = f"attempt-{uuid.uuid4().hex[:8]}"
    done = False
    try:
        prepared = _tokenize(plan, train, test, spec, key, f"{base}/{attempt}", f"{base}/{attempt}", log)
        if (text := committed()) is not None:  # a concurrent preparation of the same key finished first
            return _reuse(text, log)
        with fs.open_output_stream(manifest) as f:
            f.write(json.dumps(asdict(prepared), indent=2).encode())
        done = True
    finally:  # a failed attempt removes its shards; one killed outright leaves a folder no manifest names
        if not done and fs.get_file_info(f"{base_path}/{attempt}").type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(f"{base_path}/{attempt}")
    log(prepared.render())
    return prepared


def _reuse(manifest_text: str, log) -> Prepared:
    prepared = Prepared(**json.loads(manifest_text))
    prepared.reused = True
    log(prepared.render())
    return prepared


def _tokenize(plan, train, test, spec, key, out: str, final: str, log) -> Prepared:
    """Both splits through the Ray Data pipeline into `out`; the returned paths point at `final`, where the
    shards will be once committed."""
    t0 = time.time()
    tokenizer_path = plan.model["model_name_or_path"]
    log(f"data          tokenizing {len(train):,} rows with Ray Data ({plan.method.upper()}, TRL {spec['trl']}) ...")
    stats = tokenize_split(train, f"{out}/train", plan.method, tokenizer_path, plan.training, plan.data, log)
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
    eval_path = None
    if test is not None:
        tokenize_split(test, f"{out}/test", plan.method, tokenizer_path, plan.training, plan.data, lambda _: None)
        eval_path = f"{final}/test"
    return Prepared(
        path=f"{final}/train", key=key, method=plan.method, rows_in=len(train), rows_out=rows_out,
        tokens=tokens, loss_tokens=loss_tokens,
        fill_ratio=round(tokens / (rows_out * plan.training["max_length"]), 6) if packing else None,
        seconds=round(time.time() - t0, 2), drops=stats["drops"], drop_examples=stats["examples"],
        nodes=len(stats["nodes"]), eval_path=eval_path, spec=spec, finished_at=time.strftime("%H:%M:%S"),
    )


def read_prepared(path: str):
    """The prepared shards as a map-style `datasets.Dataset` (what the Trainer's sampler expects)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pyarrow.fs

    fs, root = storage_fs(path)
    files = sorted(f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(root)) if f.path.endswith(".parquet"))
    return datasets.Dataset(pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files]))
