"""Stage 3 of 5: build the training data with Ray Data, before any process group exists.

The handbook tokenizes on rank 0 behind a barrier and raises `ddp_timeout` to survive it. Here the
mixture is tokenized (and packed) by a pool of Ray Data actors across the cluster's CPUs, each running
TRL's own `SFTTrainer._prepare_dataset` on its block, and written as Parquet shards to the run storage
under a content-addressed key. Training workers only read those shards, so no collective ever waits on
data, and a later run with the same data, tokenizer and settings reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError

ROWS_PER_BLOCK = 1000  # TRL packs in batches of 1000 rows (datasets.map default); so do we, per block.

# SFTConfig fields that change what preparation produces.
SFT_DATA_FIELDS = (
    "max_length", "packing", "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss",
    "dataset_text_field", "eos_token", "pad_token", "truncation_mode",
)


@dataclass
class Prepared:
    """What training needs to know about the prepared data (also written as manifest.json)."""

    path: str
    key: str
    rows_in: int
    rows_out: int
    tokens: int
    loss_tokens: int
    fill_ratio: float | None
    seconds: float
    reused: bool = False
    eval_path: str | None = None


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


def _load_one(entry: dict):
    import datasets

    src, split = entry["id"], entry.get("split", "train")
    p = Path(src).expanduser()
    if p.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
        if builder is None:
            raise RecipeError(f"dataset file '{src}' has an unknown type; use .jsonl, .json, .parquet or .csv")
        try:
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:  # a malformed file: say which
            raise RecipeError(f"dataset file '{src}' could not be read ({str(e).splitlines()[0][:160]}); fix the file") from None
    # A local directory or a Hub id: the handbook's own call.
    return datasets.load_dataset(str(p) if p.is_dir() else src, entry.get("config"), split=split)


def load_mixture(script: dict[str, Any]):
    """The handbook's `get_dataset` semantics: per entry select columns, shuffle(seed) and keep
    int(len x weight) rows; concatenate; shuffle again; optional train/test split."""
    import datasets

    mix = script.get("dataset_mixture") or {"datasets": _entries(script), "seed": 0}
    seed = mix.get("seed", 0)
    parts = []
    for entry in mix["datasets"]:
        ds = _load_one(entry)
        if entry.get("columns"):
            missing = [c for c in entry["columns"] if c not in ds.column_names]
            if missing:
                raise RecipeError(f"dataset '{entry['id']}' has no column(s) {missing}; it has {ds.column_names}")
            ds = ds.select_columns(entry["columns"])
        if entry.get("weight") is not None:
            ds = ds.shuffle(seed=seed).select(range(int(len(ds) * entry["weight"])))
        parts.append(ds)
    combined = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    test = None
    if mix.get("test_split_size") is not None:
        split = combined.train_test_split(test_size=mix["test_split_size"], seed=seed)
        combined, test = split["train"], split["test"]
    return combined, test


# ------------------------------------------------------------------------------------------------ tokenize


class SFTTokenizeActor:
    """Ray Data actor: loads the tokenizer once and runs TRL's own SFT preparation on each block."""

    def __init__(self, tokenizer_path: str, training: dict[str, Any]):
        import logging
        import types

        from trl import SFTConfig
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        logging.getLogger("trl").setLevel(logging.ERROR)
        self.tok = load_tokenizer(tokenizer_path, training)
        fields = {k: training[k] for k in SFT_DATA_FIELDS if k in training}
        self.args = SFTConfig(
            output_dir=os.path.join("/tmp", "raytrain_align_prepare"), report_to="none", shuffle_dataset=False, bf16=False,
            dataset_num_proc=None, **fields,
        )
        template = None
        if self.args.assistant_only_loss and not has_generation_markers(self.tok.chat_template):
            template = get_training_chat_template(self.tok)
        # SFTTrainer._prepare_dataset reads these three attributes of the trainer and nothing else.
        self.trainer_view = types.SimpleNamespace(_tokenizer=self.tok, chat_template=template, completion_only_loss=None)

    def __call__(self, batch):
        import datasets
        from trl import SFTTrainer

        ds = datasets.Dataset(batch)
        if self.args.completion_only_loss is None:
            self.trainer_view.completion_only_loss = "prompt" in ds.column_names and "completion" in ds.column_names
        else:
            self.trainer_view.completion_only_loss = self.args.completion_only_loss
        datasets.disable_progress_bars()
        out = SFTTrainer._prepare_dataset(self.trainer_view, ds, self.tok, self.args, self.args.packing, None, "train")
        return out.with_format("arrow")[:]


def load_tokenizer(path: str, training: dict[str, Any], revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer as the handbook's `get_tokenizer` + SFTTrainer set it up (chat_template, eos_token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if training.get("chat_template"):
        tok.chat_template = training["chat_template"]
    if training.get("eos_token"):
        if training["eos_token"] not in tok.get_vocab():
            raise RecipeError(f"eos_token '{training['eos_token']}' is not in the tokenizer's vocabulary; fix eos_token in the recipe")
        tok.eos_token = training["eos_token"]
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
        h.update(path.encode())
    return h.hexdigest()[:16]


def cache_key(train_fingerprint: str, tokenizer_path: str, training: dict[str, Any]) -> str:
    import trl

    spec = {
        "data": train_fingerprint,
        "tokenizer": _files_hash(tokenizer_path),
        "chat_template": training.get("chat_template"),
        "fields": {k: training.get(k) for k in SFT_DATA_FIELDS},
        "trl": trl.__version__,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _stats(table) -> tuple[int, int, int]:
    import pyarrow.compute as pc

    tokens = int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
    labels = pc.list_flatten(table["labels"])
    loss_tokens = int(pc.sum(pc.not_equal(labels, -100).cast("int64")).as_py() or 0)
    return table.num_rows, tokens, loss_tokens


def prepare(plan, log=print) -> Prepared:
    """Mixture -> Ray Data actors (TRL tokenization + packing) -> Parquet shards at a content key."""
    import pyarrow.parquet as pq
    import ray

    check_sources(plan.script)
    root = Path(plan.storage_path) / "prepared"
    train, test = load_mixture(plan.script)
    tokenizer_path = plan.model["model_name_or_path"]
    key = cache_key(train._fingerprint, tokenizer_path, plan.training)
    final = root / key
    manifest = final / "manifest.json"
    if manifest.exists():
        prepared = Prepared(**json.loads(manifest.read_text()))
        prepared.reused = True
        log(f"data          reusing prepared data {final} ({prepared.rows_out} rows, {prepared.tokens} tokens)")
        return prepared

    t0 = time.time()
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_blocks = max(1, -(-len(train) // ROWS_PER_BLOCK))
        ds = ray.data.from_huggingface(train).repartition(n_blocks)
        ds = ds.map_batches(
            SFTTokenizeActor,
            fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "training": plan.training},
            batch_size=ROWS_PER_BLOCK,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(n_cpus, n_blocks)),
            num_cpus=1,
        )
        ds.write_parquet(str(tmp / "train"))
        table = pq.read_table(str(tmp / "train"), columns=["input_ids", "labels"])
        rows_out, tokens, loss_tokens = _stats(table)
        if rows_out == 0:
            raise RecipeError("data preparation produced no rows; check the dataset columns and max_length")
        fill = tokens / (rows_out * plan.training["max_length"]) if plan.training.get("packing") else None
        eval_path = None
        if test is not None:
            test.to_json(str(tmp / "test.jsonl"))
            eval_path = str(final / "test.jsonl")
        prepared = Prepared(
            path=str(final / "train"), key=key, rows_in=len(train), rows_out=rows_out, tokens=tokens,
            loss_tokens=loss_tokens, fill_ratio=fill, seconds=round(time.time() - t0, 2), eval_path=eval_path,
        )
        (tmp / "manifest.json").write_text(json.dumps(asdict(prepared), indent=2))
        os.rename(tmp, final)  # atomic: a half-written cache never has the final name
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    fill_s = f", packing fill {prepared.fill_ratio:.1%}" if prepared.fill_ratio else ""
    log(
        f"data          prepared {prepared.rows_in} rows -> {prepared.rows_out} sequences, {prepared.tokens} tokens"
        f"{fill_s} in {prepared.seconds:.1f}s ({prepared.tokens / max(prepared.seconds, 1e-9):,.0f} tokens/s) -> {final}"
    )
    return prepared


def read_prepared(path: str):
    """The prepared shards as a map-style `datasets.Dataset` (what the Trainer's sampler expects)."""
    import datasets
    import pyarrow.parquet as pq

    files = sorted(str(f) for f in Path(path).glob("*.parquet"))
    return datasets.Dataset(pq.read_table(files) if len(files) == 1 else _concat(files))


def _concat(files):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in files])
