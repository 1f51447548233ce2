"""The exact row order the handbook's `datasets` calls would produce for a mixture, from row counts alone: the
driver holds row-id arrays (8 bytes a row), never the rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil

import numpy as np

from .errors import RecipeError


@dataclass
class Order:
    """The mixture's rows in training order, as global source-row ids (entry offsets + row within the entry)."""

    train: np.ndarray
    test: np.ndarray | None
    offsets: list[int] = field(default_factory=list)  # first global id of each entry


def _permutation(n: int, seed: int) -> np.ndarray:
    """`datasets.Dataset.shuffle(seed=...)`'s row order: numpy's default generator, one permutation."""
    return np.random.default_rng(seed).permutation(n)


def weighted_ids(n: int, weight: float | None, seed: int) -> np.ndarray:
    """Rows of one entry: the handbook's shuffle(seed) + first int(n x weight) for weight <= 1; for weight > 1
    whole copies in order plus a seeded remainder (int(n x weight) rows in all)."""
    if weight is None:
        return np.arange(n)
    k = int(n * weight)
    if weight <= 1:
        return _permutation(n, seed)[:k] if n else np.arange(0)
    copies = int(weight)
    remainder = _permutation(n, seed)[: k - copies * n]
    return np.concatenate([np.tile(np.arange(n), copies), remainder])


def first_ids(n: int, weight: float | None) -> np.ndarray:
    """Rows of one entry as the handbook's older `dataset_mixer` took them: the first int(n x weight), unshuffled
    (whole copies first for weight > 1)."""
    k = n if weight is None else int(n * weight)
    return np.concatenate([np.tile(np.arange(n), k // n if n else 0), np.arange(k - (k // n) * n if n else 0)])


def split_sizes(n: int, test_size) -> tuple[int, int]:
    """(n_train, n_test) as `train_test_split` computes them; bad sizes refused like it does, in one line."""
    if isinstance(test_size, float):
        if not 0 < test_size < 1:
            raise RecipeError(f"test_split_size {test_size} must be a fraction in (0, 1) or a row count")
        n_test = ceil(test_size * n)
    else:
        n_test = int(test_size)
        if not 0 < n_test < n:
            raise RecipeError(f"test_split_size {test_size} must be between 1 and the mixture's {n - 1} rows")
    if n - n_test <= 0:
        raise RecipeError(f"test_split_size {test_size} leaves no training rows out of {n}; lower it")
    return n - n_test, n_test


def order(rows_per_entry: list[int], weights: list[float | None], seed: int, test_size=None, take: str = "shuffled",
          test_entries: tuple[int, ...] = ()) -> Order:
    """The handbook's mixture order from row counts alone: per entry shuffle(seed) and keep int(len x weight)
    (`take: first`, the older dataset_mixer: the first rows, unshuffled), concatenate, shuffle(seed), then
    train_test_split(test_size, seed) — the permutations `datasets` draws. Entries in `test_entries` are the test
    split instead, whole (the older mixer's named test splits), concatenated and shuffled(seed)."""
    offsets = np.concatenate([[0], np.cumsum(rows_per_entry)]).astype(np.int64)
    pick = (lambda n, w: weighted_ids(n, w, seed)) if take == "shuffled" else first_ids
    parts = [pick(n, w) + offsets[i] for i, (n, w) in enumerate(zip(rows_per_entry, weights)) if i not in test_entries]
    combined = np.concatenate(parts) if parts else np.arange(0)
    if len(combined):
        combined = combined[_permutation(len(combined), seed)]
    test = None
    if test_entries:
        test = np.concatenate([np.arange(rows_per_entry[i]) + offsets[i] for i in test_entries])
        test = test[_permutation(len(test), seed)]
    elif test_size is not None:
        n_train, n_test = split_sizes(len(combined), test_size)
        perm = _permutation(len(combined), seed)
        combined, test = combined[perm[n_test:n_test + n_train]], combined[perm[:n_test]]
    return Order(combined, test, offsets[:-1].tolist())


def mixture_order(sources: list, mix: dict) -> Order:
    """The order of `sources` (sources.Source: only each one's row count and mixture entry are read) under the
    mixture's seed, test split and take."""
    tests = tuple(i for i, s in enumerate(sources) if s.entry.get("test"))
    return order([s.rows for s in sources], [None if s.entry.get("test") else s.entry.get("weight") for s in sources],
                 mix.get("seed", 0), mix.get("test_split_size"), mix.get("take", "shuffled"), tests)
