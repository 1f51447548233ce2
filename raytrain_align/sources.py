"""The mixture without its rows: which files each dataset entry is, how many rows they hold (their order is
`mixture_order.py`'s), and a Ray Data pipeline that reads those rows on the cluster's
nodes and delivers them grouped into the 1000-row blocks TRL tokenizes and packs. The driver holds file lists,
row counts and row-id arrays (about 70 bytes a row at peak), never the text."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import storage
from .errors import RecipeError
from .mixture_order import Order

ROWS_PER_BLOCK = 1000  # TRL tokenizes and packs in batches of 1000 rows (datasets.map default); so do we, per block.
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
JSON_CHUNK_BYTES = 16 << 20  # a JSON read task parses this much text at a time
FRAGMENT_BYTES = 256 << 20  # a parquet read task reads consecutive row groups up to this much uncompressed data
SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.\w+$")  # the Hub's data/<config>/<split>-00000-of-00004.parquet


class SourceReadError(RuntimeError):
    """A source file that cannot be read; the message starts with the file."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # local path or URI, as storage.filesystem opens it
    format: str  # parquet | json
    rows: int
    row_groups: tuple[tuple[int, int], ...] = ()  # parquet: (rows, uncompressed bytes) of each row group


@dataclass
class Source:
    """One mixture entry resolved to files."""

    entry: dict
    files: list[SourceFile]
    columns: list[str]  # the columns its rows have (after the entry's `columns` selection)
    read_columns: list[str] | None = None  # what to read (None: all)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


# ------------------------------------------------------------------------------------------------ files


def entries(script: dict[str, Any]) -> list[dict]:
    mix = script.get("dataset_mixture")
    if mix:
        return mix["datasets"]
    return [{"id": script["dataset_name"], "config": script.get("dataset_config"),
             "split": script.get("dataset_train_split", "train"), "weight": None}]


def mixture(script: dict[str, Any]) -> dict:
    return script.get("dataset_mixture") or {"datasets": entries(script), "seed": 0}


def is_local(src: str) -> bool:
    return src.startswith(("/", "./", "../", "~")) or src.endswith(tuple(FORMATS)) or src.endswith(".csv")


def check_local(script: dict[str, Any]) -> None:
    """Fail fast, before anything is written, on a local data path that does not exist."""
    from pathlib import Path

    for entry in entries(script):
        src = entry["id"]
        if "://" not in src and is_local(src) and not Path(src).expanduser().exists():
            raise RecipeError(f"dataset '{src}' does not exist; fix the path in dataset_mixture (or dataset_name)")


def _root(src: str) -> str:
    """Where a dataset id lives: a local path or URI as given; a Hub id in the local Hub cache when offline
    (HF_HUB_OFFLINE=1, as `huggingface-cli download` left it), else on the Hub through hf://."""
    from pathlib import Path

    if "://" in src or is_local(src) or Path(src).expanduser().exists():
        return src
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        try:
            return snapshot_download(src, repo_type="dataset", local_files_only=True)
        except Exception:
            raise RecipeError(f"dataset '{src}' is not in the local Hub cache ({constants.HF_HUB_CACHE}) and "
                              "HF_HUB_OFFLINE is set; download it first (huggingface-cli download --repo-type "
                              f"dataset {src}) or unset HF_HUB_OFFLINE") from None
    return f"hf://datasets/{src}"


def data_files(entry: dict) -> list[str]:
    """The entry's files in the order `datasets` reads them: a file; or, in a folder laid out as the Hub serves
    a dataset, `data/<config>/<split>-*` (or `<config>/<split>-*`, `data/<split>-*`); or every data file of a
    plain folder for split 'train'."""
    src, config, split = entry["id"], entry.get("config"), entry.get("split") or "train"
    root = _root(src)
    try:
        kind = storage.info(root).type.name
        files = storage.list_files(root) if kind == "Directory" else []
    except Exception as e:  # no network, no credentials, a bucket that does not exist
        raise RecipeError(f"dataset '{src}' could not be listed at {root} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}); check the id, the network and credentials, or download it "
                          "and set HF_HUB_OFFLINE=1") from None
    if kind == "File":
        return [root]
    if kind != "Directory":
        raise RecipeError(f"dataset '{src}' was not found ({root}); fix the id or path in dataset_mixture")
    files = [f for f in files if f.endswith(tuple(FORMATS)) and "/." not in f[len(root):]]
    rel = {f: f[len(root):].lstrip("/") for f in files}
    prefixes = [f"data/{config}/", f"{config}/"] if config else ["data/", ""]
    for prefix in prefixes:
        chosen = [f for f in files if fnmatch.fnmatch(rel[f], f"{prefix}{split}-*") and "/" not in rel[f][len(prefix):]]
        if chosen:
            return chosen
    if split == "train" and not config and files:
        return files
    where = f"config '{config}', " if config else ""
    raise RecipeError(f"dataset '{src}' has no files for {where}split '{split}' (looked for "
                      f"{' or '.join(p + split + '-*' for p in prefixes)} under {root}); fix config/split in dataset_mixture")


def check_shards(paths: list[str], src: str) -> None:
    """Hub shard names say how many there are: a missing one is an error, not a smaller dataset."""
    groups: dict[tuple[str, str], set[int]] = {}
    for p in paths:
        if m := SHARD_NAME.search(p):
            groups.setdefault((p[: m.start()], m.group(2)), set()).add(int(m.group(1)))
    for (stem, total), seen in groups.items():
        missing = sorted(set(range(int(total))) - seen)
        if missing:
            name = f"{stem}-{missing[0]:05d}-of-{total}"
            raise RecipeError(f"dataset '{src}' is missing shard {name}.* ({len(missing)} of {int(total)} missing); "
                              "download it again or remove the partial shard set")


def parquet_file(path: str) -> tuple[SourceFile, list[str]]:
    """Row count, row groups and column names from the footer alone."""
    import pyarrow.parquet as pq

    fs, p = storage.filesystem(path)
    try:
        meta = pq.ParquetFile(fs.open_input_file(p)).metadata
    except Exception as e:
        raise RecipeError(f"dataset file {path} is not a readable parquet file ({str(e).splitlines()[0][:160]}); "
                          "download it again or remove it") from None
    groups = tuple((meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups))
    return SourceFile(path, "parquet", meta.num_rows, groups), meta.schema.to_arrow_schema().names


def _json_lines(path: str):
    """(line number, text) of the file's non-blank lines, streamed."""
    import io

    fs, p = storage.filesystem(path)
    with fs.open_input_stream(p) as raw:
        for n, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), 1):
            if line.strip():
                yield n, line


def json_file(path: str) -> tuple[SourceFile, list[str]]:
    """Row count and column names of a JSON Lines file, checking every line parses (one streamed pass)."""
    keys: dict[str, None] = {}
    rows = 0
    for n, line in _json_lines(path):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise RecipeError(f"dataset file {path} is malformed at line {n}: {e}; fix or remove that line") from None
        if not isinstance(row, dict):
            raise RecipeError(f"dataset file {path} line {n} is not a JSON object; write one object per line")
        keys.update(dict.fromkeys(row))
        rows += 1
    return SourceFile(path, "json", rows), list(keys)


def locate(entries_: list[dict]) -> list[list[str]]:
    """Each entry's files (listing only: nothing is opened)."""
    per_entry = []
    for entry in entries_:
        paths = data_files(entry)
        check_shards(paths, entry["id"])
        for p in paths:
            if not p.endswith(tuple(FORMATS)):
                raise RecipeError(f"dataset file {p} has an unknown type; use .parquet, .jsonl or .json (JSON Lines)")
        per_entry.append(paths)
    return per_entry


def fingerprint(per_entry: list[list[str]]) -> list:
    """What identifies the files' contents without reading them: path, size and modification time."""
    out = []
    for paths in per_entry:
        stats = [storage.info(p) for p in paths]
        out.append([[p, st.size, st.mtime.timestamp() if st.mtime else None] for p, st in zip(paths, stats)])
    return out


def resolve(entries_: list[dict], per_entry: list[list[str]] | None = None) -> list[Source]:
    """Every entry's files, row counts and columns. Parquet footers are read here; JSON files are counted by
    Ray tasks on the cluster when Ray is up (a full pass over each file), else in this process."""
    import ray

    if ray.is_initialized():
        count_json = ray.remote(num_cpus=1)(json_file).remote
    else:
        count_json = json_file
    per_entry = per_entry if per_entry is not None else locate(entries_)
    pending = {p: count_json(p) for paths in per_entry for p in paths if FORMATS[_suffix(p)] == "json"}
    counted = {}
    for p, ref in pending.items():
        try:
            counted[p] = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        except RecipeError:
            raise
        except Exception as e:  # the task's RecipeError arrives wrapped
            cause = getattr(e, "cause", None)
            if isinstance(cause, RecipeError):
                raise RecipeError(str(cause)) from None
            raise
    sources = []
    for entry, paths in zip(entries_, per_entry):
        files, columns = [], None
        for p in paths:
            f, cols = counted[p] if p in counted else parquet_file(p)
            if columns is not None and set(cols) != set(columns) and not entry.get("columns"):
                raise RecipeError(f"dataset file {p} has columns {sorted(cols)} but the files before it have "
                                  f"{sorted(columns)}; make the files' columns agree or select 'columns' in dataset_mixture")
            if entry.get("columns"):
                missing = [c for c in entry["columns"] if c not in cols]
                if missing:
                    raise RecipeError(f"dataset '{entry['id']}' has no column(s) {missing} (file {p}); it has {cols}; "
                                      "fix 'columns' in dataset_mixture")
            columns = columns if columns is not None else cols
            files.append(f)
        selected = list(entry.get("columns") or columns or [])
        sources.append(Source(entry, files, selected, list(entry["columns"]) if entry.get("columns") else None))
    names = [sorted(s.columns) for s in sources]
    if any(n != names[0] for n in names):
        raise RecipeError(f"the mixture's datasets have different columns ({names}); select the same 'columns' for "
                          "every entry")
    return sources


def _suffix(path: str) -> str:
    return "." + path.rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------------ reading


def _spans(f: SourceFile) -> list[tuple[int, int, list[int]]]:
    """(first row, rows, row groups) of each read task over a file: runs of row groups up to FRAGMENT_BYTES, or
    the whole of a JSON file (read streamed)."""
    if f.format == "json":
        return [(0, f.rows, [])]
    spans, start, groups, rows, size = [], 0, [], 0, 0
    for i, (n, nbytes) in enumerate(f.row_groups):
        if groups and size + nbytes > FRAGMENT_BYTES:
            spans.append((start, rows, groups))
            start, groups, rows, size = start + rows, [], 0, 0
        groups.append(i)
        rows += n
        size += nbytes
    if groups:
        spans.append((start, rows, groups))
    return spans


def blocks(rows: int) -> int:
    return -(-rows // ROWS_PER_BLOCK)


def fragments(sources: list[Source], order_: Order) -> list[dict]:
    """Read tasks: one per run of parquet row groups or JSON file that holds a row of the mixture, each carrying
    which of its rows go where (split, position). Built from a sort of the row ids: O(rows) on the driver."""
    splits = [(0, order_.train)] + ([(1, order_.test)] if order_.test is not None else [])
    ids = np.concatenate([ids for _, ids in splits])
    split_of = np.concatenate([np.full(len(ids_), s, np.int8) for s, ids_ in splits])
    pos = np.concatenate([np.arange(len(ids_)) for _, ids_ in splits])
    block = pos // ROWS_PER_BLOCK + np.where(split_of == 1, blocks(len(order_.train)), 0)  # test blocks follow train's
    by_id = np.argsort(ids, kind="stable")
    ids, split_of, pos, block = ids[by_id], split_of[by_id], pos[by_id], block[by_id]
    out = []
    for source, offset in zip(sources, order_.offsets):
        start = offset
        for f in source.files:
            for first, n, groups in _spans(f):
                a, b = np.searchsorted(ids, [start + first, start + first + n])
                if a < b:
                    where = {"path": f.path, "format": f.format, "row_groups": groups, "columns": source.read_columns}
                    out.append({"file": json.dumps(where), "rows": (ids[a:b] - start - first).astype(np.int64),
                                "split": split_of[a:b], "pos": pos[a:b].astype(np.int64),
                                "block": block[a:b].astype(np.int64)})
            start += f.rows
    return out


def read_fragment(batch: dict):
    """Ray Data read task: one fragment's wanted rows, each as JSON text with its split, position and block
    (numbered across the splits: the test split's blocks follow the train split's),
    yielded a row group (or JSON chunk) at a time. Rows keep every column of their file's schema (missing
    values as null), as `datasets` would give them."""
    import pyarrow as pa

    where = json.loads(batch["file"][0])
    path, fmt, groups, columns = where["path"], where["format"], where["row_groups"], where["columns"]
    rows, split, pos, block = batch["rows"][0], batch["split"][0], batch["pos"][0], batch["block"][0]
    by_row = np.argsort(rows, kind="stable")
    rows, split, pos, block = rows[by_row], split[by_row], pos[by_row], block[by_row]
    try:
        chunks = _parquet_rows(path, groups, columns, rows) if fmt == "parquet" else _json_rows(path, columns, rows)
        for lo, hi, texts in chunks:
            yield pa.table({"_split": pa.array(split[lo:hi], pa.int8()),
                            "_block": pa.array(block[lo:hi], pa.int64()),
                            "_pos": pa.array(pos[lo:hi], pa.int64()), "_row": pa.array(texts, pa.large_string())})
    except Exception as e:
        raise SourceReadError(f"dataset file {path} could not be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]})") from None


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


def _parquet_rows(path: str, groups: list[int], columns: list[str] | None, rows: np.ndarray):
    """(lo, hi, JSON texts) for the wanted rows (sorted, relative to the first group), one row group at a time."""
    import pyarrow.parquet as pq

    fs, p = storage.filesystem(path)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        start = lo = 0
        for g in groups:
            n = pf.metadata.row_group(g).num_rows
            hi = int(np.searchsorted(rows, start + n))
            if hi > lo:
                table = pf.read_row_group(g, columns=columns)
                yield lo, hi, [_dumps(r) for r in table.take(rows[lo:hi] - start).to_pylist()]
            start, lo = start + n, hi


def _json_rows(path: str, columns: list[str] | None, rows: np.ndarray):
    """(lo, hi, JSON texts) for the wanted rows (sorted) of a JSON Lines file, parsed in chunks with pyarrow as
    `datasets`' JSON builder does, so each row has its chunk's full schema."""
    import io

    import pyarrow.json as pj

    chunk: list[str] = []
    first = size = lo = 0

    def parse():
        hi = int(np.searchsorted(rows, first + len(chunk)))
        if hi == lo:
            return hi, []
        table = pj.read_json(io.BytesIO("".join(chunk).encode()))
        if columns is not None:
            table = table.select(columns)
        return hi, [_dumps(r) for r in table.take(rows[lo:hi] - first).to_pylist()]

    for _, line in _json_lines(path):
        chunk.append(line if line.endswith("\n") else line + "\n")
        size += len(line)
        if size >= JSON_CHUNK_BYTES:
            hi, texts = parse()
            if texts:
                yield lo, hi, texts
            first, lo, chunk, size = first + len(chunk), hi, [], 0
    if chunk:
        hi, texts = parse()
        if texts:
            yield lo, hi, texts


def read_rows(frags: list[dict]):
    """A Ray Data dataset of the mixture's rows (`_split`, `_block`, `_pos`, `_row`), read by tasks spread over
    the cluster: one task per fragment."""
    import ray

    ds = ray.data.from_items(frags, override_num_blocks=max(1, len(frags)))
    return ds.map_batches(read_fragment, batch_size=1, batch_format="numpy", num_cpus=1)


def in_blocks(rows, n_blocks: int):
    """The rows sorted into their blocks, one output block per 1000-row block (boundaries known, so Ray Data does not
    sample), through the object store: what one actor call holds does not grow with the data."""
    # Push-based: its merge stage keeps the object count near inputs + outputs, where the pull-based sort makes
    # inputs x outputs objects (millions at sft_mid's size). This dataset's context only.
    rows.context.shuffle_strategy = "sort_shuffle_push_based"
    return rows.sort("_block", boundaries=list(range(1, n_blocks)) or None)
