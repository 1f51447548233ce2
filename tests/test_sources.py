"""Fast, Ray-free: the mixture order computed from row counts equals the one `datasets` draws (the handbook's
path), the read tasks deliver exactly those rows, and bad sources are refused in one line naming the file."""

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain_align import mixture_order, sources
from raytrain_align.errors import RecipeError

from . import handbook_mixture


def reference_ids(sizes, weights, seed, test_size):
    """Global row ids in the order the handbook's `datasets` calls produce, from index-only datasets."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for n, w, off in zip(sizes, weights, offsets):
        ds = datasets.Dataset.from_dict({"i": list(range(off, off + n))})
        parts.append(handbook_mixture.weighted(ds, w, seed))
    combined = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    if test_size is None:
        return combined["i"], None
    split = combined.train_test_split(test_size=test_size, seed=seed)
    return split["train"]["i"], split["test"]["i"]


@pytest.mark.parametrize("sizes,weights,seed,test_size", [
    ([100], [None], 0, None),
    ([100, 37, 250], [0.5, 1.0, 0.2], 42, 0.1),
    ([100, 37], [2.5, 1.0], 3, None),
    ([1000, 10], [0.9, 3.0], 7, 25),
    ([5, 0, 9], [1.0, 1.0, 0.5], 1, 0.3),
])
def test_order_equals_datasets(sizes, weights, seed, test_size):
    order = mixture_order.order(sizes, weights, seed, test_size)
    train, test = reference_ids(sizes, weights, seed, test_size)
    assert order.train.tolist() == train
    assert (order.test.tolist() if order.test is not None else None) == test


def test_bad_split_sizes():
    for size in (0, 10, 1.0, 0.0, -3):
        with pytest.raises(RecipeError, match="test_split_size"):
            mixture_order.order([10], [None], 0, size)


# ------------------------------------------------------------------------------------------------ files


def chat(i: int, source: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{source} question {i}"},
                         {"role": "assistant", "content": f"answer {i} " + "x" * (i % 17),
                          **({"tool_calls": None} if i % 3 else {})}],
            "source": source}


def hub_tree(root, config, splits: dict[str, int], files_per_split=2, row_group=7):
    """A local folder laid out as the Hub serves a dataset: data/<config>/<split>-0000i-of-0000n.parquet."""
    for split, n in splits.items():
        rows = [chat(i, split) for i in range(n)]
        per = -(-n // files_per_split)
        for k in range(files_per_split):
            path = root / "data" / config / f"{split}-{k:05d}-of-{files_per_split:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows[k * per:(k + 1) * per]), path, row_group_size=row_group)
    return str(root)


def rows_in_order(srcs, order):
    """What the Ray Data read tasks deliver, run in this process: {split: [row, ...]} by position."""
    got = {0: {}, 1: {}}
    for frag in sources.fragments(srcs, order):
        for table in sources.read_fragment({k: [v] for k, v in frag.items()}):
            for split, pos, text in zip(*(table.column(c).to_pylist() for c in ("_split", "_pos", "_row"))):
                assert pos not in got[split]
                got[split][pos] = json.loads(text)
    return [[got[s][p] for p in range(len(got[s]))] for s in (0, 1)]


@pytest.fixture
def hub(tmp_path):
    return hub_tree(tmp_path / "smoltalk-like", "Mid", {"reasoning": 60, "chats": 45})


def test_hub_layout_rows_equal_datasets(hub, tmp_path, monkeypatch):
    """Same rows in the same order as the handbook's datasets path, across files and row-group read tasks,
    with weights (down- and up-sampling) and a test split; JSON Lines entries too."""
    monkeypatch.setattr(sources, "FRAGMENT_BYTES", 1)  # one read task per row group
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text("".join(json.dumps(chat(i, "jsonl")) + "\n" + ("\n" if i % 5 == 0 else "") for i in range(30)))
    mix = {"datasets": [{"id": hub, "config": "Mid", "split": "reasoning", "columns": ["messages"], "weight": 0.5},
                        {"id": hub, "config": "Mid", "split": "chats", "columns": ["messages"], "weight": 1.5},
                        {"id": str(jsonl), "columns": ["messages"], "weight": 1.0}],
           "seed": 11, "test_split_size": 0.1}
    srcs = sources.resolve(mix["datasets"])
    assert [s.rows for s in srcs] == [60, 45, 30] and len(srcs[0].files) == 2
    assert len(sources.fragments(srcs, mixture_order.mixture_order(srcs, mix))) > 10
    train, test = rows_in_order(srcs, mixture_order.mixture_order(srcs, mix))
    ref_train, ref_test = handbook_mixture.mixture(mix)
    assert train == ref_train.to_list()
    assert test == ref_test.to_list()


def test_older_dataset_mixer_translation_keeps_its_rows_and_order(tmp_path):
    """The handbook's older `dataset_mixer` + `dataset_splits` (zephyr-7b-beta/dpo/config_qlora.yaml's format),
    translated by the recipe loader: the same train and test rows in the same order as its `mix_datasets`."""
    from raytrain_align.handbook import translate_dataset_mixer

    root = hub_tree(tmp_path / "ultrafeedback-like", "default", {"train_prefs": 50, "test_prefs": 12, "train_sft": 31})
    other = hub_tree(tmp_path / "other", "default", {"train_prefs": 20, "test_prefs": 6})
    raw = {"dataset_mixer": {root: 0.6, other: 1.0}, "dataset_splits": ["train_prefs", "test_prefs"],
           "dataset_configs": ["default", "default"]}
    mix = translate_dataset_mixer("recipe", raw)
    srcs = sources.resolve(mix["datasets"])
    train, test = rows_in_order(srcs, mixture_order.mixture_order(srcs, mix))
    ref_train, ref_test = handbook_mixture.legacy_mixer(raw["dataset_mixer"], raw["dataset_splits"], raw["dataset_configs"])
    assert len(train) == 30 + 20 and len(test) == 12 + 6
    assert train == ref_train.to_list() and test == ref_test.to_list()


def test_hub_id_from_local_hub_cache(tmp_path, monkeypatch):
    """A Hub id resolves, offline, to the snapshot the Hub cache holds (as `huggingface-cli download` leaves it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = cache / "datasets--Org--talk" / "snapshots" / "abc123"
    hub_tree(snap, "Mid", {"reasoning": 12}, files_per_split=1)
    (cache / "datasets--Org--talk" / "refs").mkdir(parents=True)
    (cache / "datasets--Org--talk" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    files = sources.data_files({"id": "Org/talk", "config": "Mid", "split": "reasoning"})
    assert files == [str(snap / "data/Mid/reasoning-00000-of-00001.parquet")]
    with pytest.raises(RecipeError, match="not in the local Hub cache.*huggingface-cli download"):
        sources.data_files({"id": "Org/other", "config": "Mid", "split": "reasoning"})
    with pytest.raises(RecipeError, match="no files for config 'Mid', split 'chats'"):
        sources.data_files({"id": "Org/talk", "config": "Mid", "split": "chats"})


def test_bad_sources_named_in_one_line(hub, tmp_path):
    entry = {"id": hub, "config": "Mid", "split": "reasoning"}
    shard = f"{hub}/data/Mid/reasoning-00001-of-00002.parquet"
    # a schema change between the files of one split
    pq.write_table(pa.table({"text": ["a"] * 3}), shard)
    with pytest.raises(RecipeError, match=r"reasoning-00001-of-00002.parquet has columns \['text'\]"):
        sources.resolve([entry])
    # an unreadable parquet file
    with open(shard, "wb") as f:
        f.write(b"PAR1 this is not parquet")
    with pytest.raises(RecipeError, match=r"reasoning-00001-of-00002.parquet is not a readable parquet file"):
        sources.resolve([entry])
    # a missing shard
    import os

    os.remove(shard)
    with pytest.raises(RecipeError, match=r"missing shard .*reasoning-00001-of-00002"):
        sources.resolve([entry])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{"messages": [}\n')
    with pytest.raises(RecipeError, match=r"broken.jsonl is malformed at line 2"):
        sources.resolve([{"id": str(broken)}])
    with pytest.raises(RecipeError, match=r"no column\(s\) \['chosen'\]"):
        sources.resolve([{**entry, "split": "chats", "columns": ["chosen"]}])


def test_unreachable_hub_id_is_one_line():
    """No network here (nor in CI): a Hub id not in the local cache is a one-line error, not a traceback."""
    with pytest.raises(RecipeError, match=r"SomeOrg/no-such-dataset.*(could not be listed|not in the local Hub cache)"):
        sources.data_files({"id": "SomeOrg/no-such-dataset", "config": "Mid", "split": "train"})
