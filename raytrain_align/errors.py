"""Bad input: the one exception users see (a one-line message that names the fix) and the helpers that word it."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml


class RecipeError(Exception):
    """Bad input (recipe, flag, path, cluster). The CLI prints `error: <message>` and exits 2, writing nothing."""


def did_you_mean(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def read_yaml_mapping(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{what} '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    except OSError as e:
        raise RecipeError(f"{what} '{path}' cannot be read ({e.strerror}); check the path and its permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{what} '{path}'{line} is not valid YAML ({getattr(e, 'problem', e)}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{what} '{path}' must be a YAML mapping of keys to values")
    return data
