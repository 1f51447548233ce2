"""Stage 3 of 5, on the cluster: TRL's own dataset preparation of every 1000-row block, in a pool of Ray Data actors.

The rows are read where the files are (sources.py), sorted into their blocks through the object store, and each
block is tokenized (and packed) by a TokenizeActor running `SFTTrainer._prepare_dataset` /
`DPOTrainer._prepare_dataset` (ORPO: its three maps) and written as one Arrow shard by the actor itself. Rows TRL
would crash on are dropped and counted per reason. prepare.py decides what to prepare and where, and commits it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import Any

from . import sources, storage
from .errors import RecipeError
from .rows import row_problem, short

DATA_FIELDS = {
    "sft": ("max_length", "packing", "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss",
            "dataset_text_field", "eos_token", "pad_token", "truncation_mode"),
    "dpo": ("max_length", "truncation_mode", "eos_token", "pad_token"),
    "orpo": ("max_length", "max_completion_length", "padding_value"),
}
# What the trainers read from a prepared row (TRL's signature columns).
OUTPUT_COLUMNS = {
    "sft": ("input_ids", "labels", "seq_lengths"),
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "orpo": ("prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask", "chosen_labels",
             "rejected_input_ids", "rejected_attention_mask", "rejected_labels"),
}
EXAMPLES_PER_REASON = 3
SPLITS = {0: "train", 1: "test"}
# ------------------------------------------------------------------------------------------------ tokenize


class TokenizeActor:
    """Ray Data actor: loads the tokenizer once, then runs TRL's own dataset preparation on each block.

    Per block: drop rows TRL would crash on (counted by reason), tokenize and build labels with TRL
    (no truncation yet), optionally drop over-long rows (`ray.long_samples: drop`), then let TRL truncate
    or pack them exactly as its trainer would. With `out_dir`, each block is written there as
    `<split>/part-<block>.arrow` by the actor itself (no separate write tasks to start on a busy node) and
    only a one-row summary goes back; without it (in-process use) the prepared rows are returned.
    """

    def __init__(self, method: str, tokenizer_path: str, training: dict[str, Any], options: dict[str, Any],
                 out_dir: str | None = None, split_rows: dict[int, int] | None = None):
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
        self.method, self.options, self.out_dir, self.split_rows = method, options, out_dir, split_rows or {}
        self.local_stats = PrepareStats()
        self.tok = load_tokenizer(tokenizer_path, training, method=method)
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
        elif method == "dpo":
            from trl import DPOConfig

            self.args = DPOConfig(**common, **fields)
            self.args_untruncated = DPOConfig(**common, **{**fields, "max_length": None})
            self.trainer_view = types.SimpleNamespace(_tokenizer=self.tok)  # all DPOTrainer._prepare_dataset reads
        else:
            from .recipe import config_class

            self.args = config_class("orpo")(**common, **fields)
            self.trainer_view = _orpo_view(self.tok, self.args.max_length, self.args)
            self.view_untruncated = _orpo_view(self.tok, sys.maxsize, self.args)

    # -- TRL's own preparation, in two halves so over-long rows can be seen before TRL truncates them
    def _tokenize(self, ds):
        if self.method == "sft":
            from trl import SFTTrainer

            return SFTTrainer._prepare_dataset(self.trainer_view, ds, self.tok, self.args_untruncated, False, None, "train")
        if self.method == "orpo":  # its truncation is inside tokenize_row: untruncated only to see lengths
            return _orpo_prepare(ds, self.view_untruncated if self._drops_long() else self.trainer_view)
        from trl import DPOTrainer

        return DPOTrainer._prepare_dataset(self.trainer_view, ds, self.tok, self.args_untruncated, "train")

    def _drops_long(self) -> bool:
        return self.options.get("long_samples") == "drop" and bool(self.args.max_length)

    def _finish(self, ds):
        if self.method == "sft":
            from trl import SFTTrainer

            return SFTTrainer._prepare_dataset(self.trainer_view, ds, self.tok, self.args, self.args.packing, None, "train")
        if self.method == "orpo":  # the chat-templated text is still in the rows: TRL's tokenize_row again, truncating
            ds = ds.map(self.trainer_view.tokenize_row) if self._drops_long() else ds
            # TRL keeps a pair whose prompt alone fills max_length, with an empty answer: its log-odds is NaN, and
            # one such pair turns the weights to NaN at the first step. Dropped, counted like other empty rows.
            return ds.filter(lambda ex: _has_loss_tokens(ex["chosen_labels"]) and _has_loss_tokens(ex["rejected_labels"]))
        if self.args.max_length is not None and self.args.truncation_mode == "keep_start":
            return ds.filter(lambda ex: len(ex["prompt_ids"]) < self.args.max_length)  # TRL's own filter, same rule
        return ds

    def _length(self, ex) -> int:
        if self.method == "sft":
            return len(ex["input_ids"])
        if self.method == "orpo":  # prompt + completion, each
            return max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))
        return len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))

    def __call__(self, batch):
        """Blocks from the Ray Data pipeline (`_row` JSON texts tagged with split, block and position, sorted by
        block): each block tokenized and written, one summary row each. In-process: a table of raw rows."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if "_row" not in batch.column_names:
            return self._block(batch)
        summaries = []
        train_blocks = sources.blocks(self.split_rows.get(0, 0))
        for key in pc.unique(batch.column("_block")).to_pylist():
            group = batch.filter(pc.equal(batch.column("_block"), key)).sort_by("_pos")
            split, block = (0, key) if key < train_blocks else (1, key - train_blocks)
            expected = min(sources.ROWS_PER_BLOCK, self.split_rows.get(split, 0) - block * sources.ROWS_PER_BLOCK)
            if group.num_rows != expected:  # Ray Data must never cut a block: its packing would differ from TRL's
                raise RuntimeError(f"{SPLITS[split]} block {block} arrived with {group.num_rows} of {expected} rows")
            summaries.append(self._block(_rows_table([json.loads(t) for t in group.column("_row").to_pylist()]),
                                         split, block))
        return pa.concat_tables(summaries)

    def _block(self, batch, split: int | None = None, block: int | None = None):
        import datasets
        import pyarrow as pa

        drops: Counter = Counter()
        examples: dict[str, list[str]] = {}

        def drop(reason: str, row: dict | None) -> None:
            drops[reason] += 1
            if row is not None and len(examples.setdefault(reason, [])) < EXAMPLES_PER_REASON:
                examples[reason].append(short(row))

        if self.method == "orpo" and "messages" in batch.column_names:
            batch = batch.drop_columns(["messages"])  # the handbook's scripts/orpo.py drops it before ORPOTrainer
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
                if self._drops_long():
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
        import ray

        write_shard(out, storage.join(self.out_dir, SPLITS[split], f"part-{block:06d}.arrow"))
        _, tokens, loss_tokens = _stats(out, self.method)
        return pa.table({"split": [split], "rows": [len(rows)], "rows_out": [out.num_rows], "tokens": [tokens],
                         "loss_tokens": [loss_tokens], "drops": [json.dumps(drops)], "examples": [json.dumps(examples)],
                         "node": [ray.get_runtime_context().get_node_id()]})


def _has_loss_tokens(labels: list[int]) -> bool:
    return any(t != -100 for t in labels)


def _orpo_view(tok, max_length: int, args):
    """What ORPOTrainer.tokenize_row reads of its trainer (a decoder-only model), with TRL's own two methods bound
    to it. The trainer falls back to 512 when max_length is None, and so does this."""
    import types

    from trl.experimental.orpo import ORPOTrainer

    view = types.SimpleNamespace(
        processing_class=tok, is_encoder_decoder=False, max_length=max_length if max_length is not None else 512,
        max_completion_length=args.max_completion_length,
        padding_value=args.padding_value if args.padding_value is not None else tok.pad_token_id)
    view.build_tokenized_answer = types.MethodType(ORPOTrainer.build_tokenized_answer, view)
    view.tokenize_row = types.MethodType(ORPOTrainer.tokenize_row, view)
    return view


def _orpo_prepare(ds, view):
    """ORPOTrainer.__init__'s own three maps (prompt extraction, chat template, tokenize_row), on one block."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    ds = ds.map(maybe_extract_prompt)
    ds = ds.map(maybe_apply_chat_template, fn_kwargs={"processing_class": view.processing_class})
    return ds.map(view.tokenize_row)


def _rows_table(rows: list[dict]):
    """Rows as one Arrow table; every column any row has (a row without it gets null, as in `datasets`)."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: pa.array([r.get(k) for r in rows]) for k in names})


def write_shard(table, path: str) -> None:
    """An Arrow IPC stream file, the format of the `datasets` cache: training workers memory-map it."""
    import pyarrow as pa

    fs, p = storage.filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


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


def load_tokenizer(path: str, training: dict[str, Any], revision: str | None = None, trust_remote_code: bool = False,
                   method: str | None = None):
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
    if method == "orpo" and tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as the handbook's scripts/orpo.py does: its collator pads with it
    if tok.chat_template is None:
        raise RecipeError(f"tokenizer '{path}' has no chat template; set chat_template in the recipe")
    return tok


def _stats(table, method: str) -> tuple[int, int, int]:
    import pyarrow.compute as pc

    def total(col):
        return int(pc.sum(pc.list_value_length(table[col])).as_py() or 0)

    def in_loss(col):
        return int(pc.sum(pc.not_equal(pc.list_flatten(table[col]), -100).cast("int64")).as_py() or 0)

    if method == "dpo":
        prompt, chosen, rejected = total("prompt_ids"), total("chosen_ids"), total("rejected_ids")
        return table.num_rows, 2 * prompt + chosen + rejected, chosen + rejected
    if method == "orpo":  # each side holds the prompt too
        return (table.num_rows, total("chosen_input_ids") + total("rejected_input_ids"),
                in_loss("chosen_labels") + in_loss("rejected_labels"))
    return table.num_rows, total("input_ids"), in_loss("labels")


def tokenize(frags: list[dict], split_rows: dict[int, int], out_dir: str, method: str, tokenizer_path: str,
             training: dict[str, Any], options: dict[str, Any], log=print) -> dict[int, dict]:
    """Read the fragments' rows on the cluster (sources.read_rows), sort them into their 1000-row blocks, and run
    a pool of TokenizeActors over the blocks, each writing its block's shard under `out_dir/<split>/`. Returns
    the counts per split (0 train, 1 test). Prints a progress line about every 10% (Ray Data's bars flood logs)."""
    import logging

    import ray

    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled" notice
    n_rows = sum(split_rows.values())
    n_blocks = sum(sources.blocks(n) for n in split_rows.values())
    totals, t0, shown = {0: PrepareStats(), 1: PrepareStats()}, time.time(), 0.0
    # Ray Data logs a failed task's traceback before raising it; the error is reported below, once, in one line.
    data_log = logging.getLogger("ray.data")
    level, data_log.level = data_log.level, logging.CRITICAL
    try:
        # Sorted into their blocks and kept in the object store, so the reads had every CPU and the actors below get
        # every CPU: a fixed pool, one actor per CPU of the cluster, spread over its nodes.
        blocks = sources.in_blocks(sources.read_rows(frags), n_blocks).materialize()
        log(f"data          {n_rows:,} rows read by {len(frags)} read task(s) and sorted into {n_blocks} blocks in "
            f"{time.time() - t0:.1f}s; tokenizing ...")
        t0 = time.time()
        rd = blocks.map_batches(
            TokenizeActor,
            fn_constructor_kwargs={"method": method, "tokenizer_path": tokenizer_path, "training": training,
                                   "options": options, "out_dir": out_dir, "split_rows": split_rows},
            batch_size=None,  # one sorted output block: one whole 1000-row block (checked by the actor)
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(n_cpus, n_blocks))),
            num_cpus=1,
        )
        for summary in rd.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in summary.to_pylist():
                totals[row["split"]].add(row["rows"], json.loads(row["drops"]), json.loads(row["examples"]), row["node"],
                                         rows_out=row["rows_out"], tokens=row["tokens"], loss_tokens=row["loss_tokens"])
            done = totals[0].rows + totals[1].rows
            frac = done / max(n_rows, 1)
            if frac - shown >= 0.1 and frac < 1:
                shown = frac
                rate = done / (time.time() - t0)
                log(f"data          {frac:4.0%} {done:,}/{n_rows:,} rows  {rate:,.0f} rows/s  eta {(n_rows - done) / rate:,.0f}s")
    except Exception as e:
        raise _read_error(e) or e
    finally:
        data_log.setLevel(level)
    return {split: stats.get() for split, stats in totals.items()}


def _causes(e: BaseException | None):
    """`e` and what it wraps: Ray's task errors (`.cause`), then Python's explicit and implicit chains."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__


def _read_error(e: BaseException) -> RecipeError | None:
    """A source file that failed in a read task (wrapped by Ray), as the one-line error naming it."""
    for c in _causes(e):
        if isinstance(c, sources.SourceReadError):  # Ray's wrapper puts the task's name before the message
            cause = getattr(c, "cause", None)
            text = str(cause if isinstance(cause, sources.SourceReadError) else c)
            line = [t for t in text.splitlines() if "dataset file " in t][-1]  # the message, after any traceback
            return RecipeError(f"{line[line.find('dataset file'):].strip()}; download it again or remove it from the dataset")
    return None


