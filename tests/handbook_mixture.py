"""The reference for the mixture order: the handbook's `get_dataset` done with `datasets` on one process
(load, select columns, shuffle(seed) + keep int(len x weight), concatenate, shuffle(seed), train_test_split),
the path raytrain_align replaced with row counts and Ray Data read tasks."""

import datasets


def load(entry: dict):
    src, config, split = entry["id"], entry.get("config"), entry.get("split") or "train"
    if src.endswith((".jsonl", ".json")):
        return datasets.load_dataset("json", data_files=src, split="train")
    if src.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=src, split="train")
    # a folder laid out as the Hub serves a dataset: data/<config>/<split>-*.parquet
    return datasets.load_dataset("parquet", data_files={split: f"{src}/data/{config}/{split}-*.parquet"}, split=split)


def weighted(ds, weight, seed):
    if weight is None:
        return ds
    n = int(len(ds) * weight)
    if weight <= 1:
        return ds.shuffle(seed=seed).select(range(n))
    copies = int(weight)
    remainder = ds.shuffle(seed=seed).select(range(n - copies * len(ds)))
    return datasets.concatenate_datasets([ds] * copies + [remainder])


def mixture(mix: dict):
    """(train, test or None) as `datasets.Dataset`s."""
    seed = mix.get("seed", 0)
    parts = []
    for entry in mix["datasets"]:
        ds = load(entry)
        if entry.get("columns"):
            ds = ds.select_columns(entry["columns"])
        parts.append(weighted(ds, entry.get("weight"), seed))
    combined = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    if mix.get("test_split_size") is None:
        return combined, None
    split = combined.train_test_split(test_size=mix["test_split_size"], seed=seed)
    return split["train"], split["test"]


def legacy_mixer(mixer: dict, splits: list[str], configs: list | None = None):
    """The handbook's older `mix_datasets` (alignment/data.py before #221), shuffle on: per dataset and split the
    first int(fraction x len) rows of each train split and the whole of each test split, each concatenated and
    shuffled with seed 42. Returns (train, test or None)."""
    configs = configs or [None] * len(mixer)
    train, test = [], []
    for (dataset, frac), config in zip(mixer.items(), configs):
        for split in splits:
            ds = load({"id": dataset, "config": config, "split": split})
            if "train" in split:
                train.append(ds.select(range(int(frac * len(ds)))))
            else:
                test.append(ds)
    train_ds = datasets.concatenate_datasets(train).shuffle(seed=42)
    return train_ds, datasets.concatenate_datasets(test).shuffle(seed=42) if test else None
