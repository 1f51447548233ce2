"""What makes a source row unusable for TRL's preparation: checked before tokenizing, so a bad row is dropped and
counted (or refused, `ray.strict_data`) instead of failing a whole block."""

from __future__ import annotations

import json

ROLES = {"system", "developer", "user", "assistant", "tool"}


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
    if method in ("dpo", "orpo"):
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


def short(row: dict) -> str:
    s = json.dumps(row, ensure_ascii=False, default=str)
    return s if len(s) <= 160 else s[:157] + "..."
