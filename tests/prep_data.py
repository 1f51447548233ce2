"""A deliberately awkward chat / preference dataset (written for this project) and a chat template with
system prompts, tools, tool calls and think/no_think switching — for the TRL parity tests."""

import json

# SmolLM3-style: a /think or /no_think flag in the system header, tools listed in the system turn,
# {% generation %} markers around assistant turns so assistant_only_loss works.
THINK_TEMPLATE = (
    "{%- set think = enable_thinking if enable_thinking is defined else true -%}"
    "{{- '<|im_start|>system\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}{%- endif -%}"
    "{{- '\n/think' if think else '\n/no_think' -}}"
    "{%- if tools -%}{{- '\nTools:' -}}{%- for t in tools -%}{{- ' ' + t['function']['name'] -}}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{% generation %}"
    "{%- if message['content'] -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if message['tool_calls'] -%}{%- for c in message['tool_calls'] -%}"
    "{{- '<call>' + c['function']['name'] + '(' + c['function']['arguments'] + ')</call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{% endgeneration %}{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

TOOLS = json.dumps([{"type": "function", "function": {"name": "lookup_tide", "description": "tide height",
                                                       "parameters": {"type": "object", "properties": {"port": {"type": "string"}}}}}])


def _m(role, content, tool_calls=None):
    return {"role": role, "content": content, "tool_calls": tool_calls}


def tricky_messages(n: int = 60) -> list[dict]:
    """Rows TRL accepts, covering the awkward cases; every row has the same columns."""
    rows = []
    for i in range(n):
        kind = i % 6
        a, b = 17 + i, 29 + 2 * i
        if kind == 0:  # multi-turn with a system prompt
            msgs = [_m("system", "You answer tersely."), _m("user", f"{a} plus {b}?"), _m("assistant", f"{a + b}."),
                    _m("user", "And doubled?"), _m("assistant", f"{2 * (a + b)}.")]
        elif kind == 1:  # unicode, outside the tiny tokenizer's vocabulary too
            msgs = [_m("user", f"Übersetze: {i} Äpfel — 苹果 🍎?"), _m("assistant", f"{i} pommes, naïvement ✓")]
        elif kind == 2:  # an empty user turn and an empty assistant turn mid-conversation
            msgs = [_m("user", ""), _m("assistant", ""), _m("user", f"Count to {i % 7 + 1}."),
                    _m("assistant", " ".join(str(k) for k in range(1, i % 7 + 2)))]
        elif kind == 3:  # tool call and tool answer
            msgs = [_m("user", f"Tide at port {i}?"),
                    _m("assistant", None, [{"type": "function", "function": {"name": "lookup_tide", "arguments": f'{{"port": "P{i}"}}'}}]),
                    _m("tool", f"{i % 5}.{i % 10} m"), _m("assistant", f"About {i % 5}.{i % 10} metres.")]
        elif kind == 4:  # a very long turn (longer than the max_length used in the tests)
            msgs = [_m("user", "Repeat the pattern. " + "ab-" * (150 + i % 50)), _m("assistant", "ab-" * (120 + i % 40))]
        else:  # plain single turn
            msgs = [_m("user", f"What is {a} times 3?"), _m("assistant", f"{a} times 3 is {3 * a}.")]
        rows.append({"messages": msgs, "chat_template_kwargs": {"enable_thinking": i % 2 == 0},
                     "tools": TOOLS if kind == 3 else None})
    return rows


def prompt_completion(n: int = 40, conversational: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = f"Name {i} squared, please{'!' * (i % 3)}", f"{i} squared is {i * i}."
        if conversational:
            prompt = [_m("system", "Be brief.")] if i % 4 == 0 else []
            rows.append({"prompt": prompt + [_m("user", q)], "completion": [_m("assistant", a)],
                         "chat_template_kwargs": {"enable_thinking": i % 3 == 0}})
        else:
            rows.append({"prompt": q + " Answer:", "completion": " " + a + (" padding" * (i % 30))})
    return rows


def plain_text(n: int = 40) -> list[dict]:
    return [{"text": f"Record {i}: the tide at port {i} was {i % 5}.{i % 10} m. " * (1 + i % 9)} for i in range(n)]


def preferences(n: int = 40, conversational: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 11 + i, 40 + 3 * i
        good, bad = f"{a} + {b} = {a + b}", f"{a} + {b} = {a + b + 1 + i % 3}"
        if conversational:
            prompt = ([_m("system", "Check your sums." + " really" * (i % 25))] if i % 3 == 0 else []) + [_m("user", f"Add {a} and {b}.")]
            rows.append({"prompt": prompt, "chosen": [_m("assistant", good)], "rejected": [_m("assistant", bad)],
                         "chat_template_kwargs": {"enable_thinking": i % 2 == 0}})
        else:
            rows.append({"prompt": f"Add {a} and {b}:" + " hm" * (i % 40), "chosen": " " + good, "rejected": " " + bad})
    return rows


def preferences_without_prompt(n: int = 24) -> list[dict]:
    """Pairs whose chosen and rejected are whole conversations sharing the user turn (the layout of
    ultrafeedback_binarized and capybara-dpo): the trainers extract the shared prefix as the prompt."""
    rows = []
    for r in preferences(n):
        rows.append({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
    return rows


def bad_rows() -> list[tuple[dict, str]]:
    """(row, the reason it must be dropped with) for SFT conversational data under assistant_only_loss."""
    ok_kwargs = {"enable_thinking": True}
    return [
        ({"messages": [], "chat_template_kwargs": ok_kwargs, "tools": None}, "empty_messages"),
        ({"messages": None, "chat_template_kwargs": ok_kwargs, "tools": None}, "empty_messages"),
        ({"messages": [_m("wizard", "abracadabra"), _m("assistant", "no")], "chat_template_kwargs": ok_kwargs, "tools": None}, "unknown_role"),
        ({"messages": [_m("user", "only a question")], "chat_template_kwargs": ok_kwargs, "tools": None}, "no_assistant_turn"),
        ({"messages": [_m("user", None), _m("assistant", "x")], "chat_template_kwargs": ok_kwargs, "tools": None}, "non_string_content"),
    ]
