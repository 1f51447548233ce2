"""`ray.callbacks`: extra transformers TrainerCallbacks the workers install, named by import path.

A recipe adds behaviour to every worker's Trainer (a custom logger, an early stop, a fault to rehearse) without
code here knowing it: `callbacks: [pkg.mod:Name, {pkg.mod:Other: {arg: 1}}]`. The module must be importable where
the driver runs and on the workers: Ray puts the driver's working directory (or `ray job submit --working-dir`)
on the workers' path.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .errors import RecipeError

FORM = "'module.path:ClassName' or {'module.path:ClassName': {keyword: value}}"


def normalize(value: Any) -> list[dict[str, Any]]:
    """The recipe's list -> [{"name": "module:Class", "kwargs": {...}}]; a malformed entry is one error line."""
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        value = [value]
    out = []
    for entry in value:
        if isinstance(entry, dict) and len(entry) == 1:
            (name, kwargs), = entry.items()
            kwargs = {} if kwargs is None else kwargs
        else:
            name, kwargs = entry, {}
        if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")) or not isinstance(kwargs, dict):
            raise RecipeError(f"ray.callbacks entry {entry!r} is not a callback; write each as {FORM}")
        out.append({"name": name, "kwargs": kwargs})
    return out


def load(specs: list[dict[str, Any]]) -> list[tuple[type, dict[str, Any]]]:
    """Import each named class; one that is missing or is not a TrainerCallback fails before training starts."""
    from transformers import TrainerCallback

    classes = []
    for spec in specs:
        module_name, _, attr = spec["name"].partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise RecipeError(f"ray.callbacks: cannot import {spec['name']} ({e}); run from the folder that holds "
                              f"'{module_name.split('.')[0]}', or install it on every node") from None
        if not (isinstance(cls, type) and issubclass(cls, TrainerCallback)):
            raise RecipeError(f"ray.callbacks: {spec['name']} is not a transformers TrainerCallback class")
        try:
            inspect.signature(cls).bind(**spec["kwargs"])
        except TypeError as e:
            raise RecipeError(f"ray.callbacks: {spec['name']} does not take {spec['kwargs']} ({e}); "
                              f"its arguments are {inspect.signature(cls)}") from None
        classes.append((cls, spec["kwargs"]))
    return classes


def describe(specs: list[dict[str, Any]]) -> str:
    return ", ".join(s["name"] + (f"({', '.join(f'{k}={v!r}' for k, v in s['kwargs'].items())})" if s["kwargs"] else "")
                     for s in specs)
