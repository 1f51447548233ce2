"""The embedded default (`--tiny`): the same recipe on a laptop, with nothing downloaded.

Builds, offline and deterministically: a character-level tokenizer with a ChatML chat template, a tiny
random-init model of the recipe's architecture family (from a config, saved with `save_pretrained` so the
real `from_pretrained` path loads it), and small synthetic chat datasets written as JSONL so the real
`datasets.load_dataset` path reads them. The data is learnable — two-digit addition and a lookup table of
invented capitals — so training can be shown to improve held-out answers.
"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

from .recipe import QUANTIZATION_KEYS, gpu_only_settings

TINY_WORKERS = 2
PREFERENCE_METHODS = ("dpo", "orpo")  # trained on chosen/rejected pairs
TINY_VERSION = "v3"  # bump when the generators change, so cached assets are rebuilt
MODEL_KEYS = {"model_name_or_path", "dtype", "attn_implementation", "trust_remote_code", "model_revision",
              *QUANTIZATION_KEYS}
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<unk>"]

# ChatML with {% generation %} markers, so assistant_only_loss works with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- else -%}{{- message['content'] + '<|im_end|>' + '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Invented countries and capitals for the lookup task (made up for this project).
_SYLLABLES = ["zor", "vel", "quin", "dra", "mel", "tov", "rix", "sal", "bru", "nep", "kal", "fen", "oru", "lim"]


def _family(model_id: str) -> str:
    s = model_id.lower()
    if "smollm3" in s:
        return "smollm3"
    if "mixtral" in s:
        return "mixtral"
    if "zephyr" in s or "mistral" in s:
        return "mistral"
    if "qwen" in s:
        return "qwen2"
    return "llama"


def tiny_overrides(recipe) -> dict[str, Any]:
    """What --tiny changes in a recipe; everything else (schedule, packing, loss settings) is kept."""
    t = recipe.training
    out: dict[str, Any] = {
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "bf16": False,
        "fp16": False,
        "max_length": min(int(t.get("max_length") or 512), 512),
        # A from-scratch 100k-parameter model needs a far larger step than a 3B fine-tune.
        "learning_rate": 1e-3,
        "num_train_epochs": min(float(t.get("num_train_epochs", 3)), 5),
        "report_to": "none",
        "dataset_num_proc": None,
        "save_steps": 0.25 if t.get("save_strategy", "steps") == "steps" else t.get("save_steps", 500),
        "push_to_hub": False,
        "log_level": "warning",
    }
    if recipe.method == "dpo":
        out["padding_free"] = False  # needs flash-attention kernels the CPU does not have
        out["num_train_epochs"] = max(2.0, out["num_train_epochs"])  # one pass is 113 steps: too few from scratch
    if recipe.model.get("model_revision"):
        out["model_revision"] = "main"  # the tiny model is a local folder without the recipe's revisions
    out.update(gpu_only_settings(recipe.model, t))  # the tiny run is on CPU workers
    return out


def assets_dir(storage_path: str) -> Path:
    """Beside the runs in a local or shared storage folder; under remote storage (s3://...) in this machine's
    cache, since `from_pretrained` and `load_dataset` need files (the tiny demo runs on one machine)."""
    if "://" in storage_path:
        return Path.home() / ".cache" / "raytrain_align" / "tiny_assets" / TINY_VERSION
    return Path(storage_path) / "_tiny_assets" / TINY_VERSION


TINY_MAX_COPIES = 2.0  # synthetic rows per run: at most 2 x a task file (1,200 rows), a few minutes on 2 cores


def tiny_script(recipe, assets: Path) -> dict[str, Any]:
    """The recipe's mixture with each Hub entry pointed at a local synthetic file (weights and columns kept);
    entries that already are local files stay, so --tiny runs a user's own data on the tiny model."""
    from .sources import is_local

    mix = recipe.script.get("dataset_mixture")
    entries = mix["datasets"] if mix else [{"id": recipe.script.get("dataset_name"), "weight": 1.0}]
    tasks = ["preferences"] if recipe.method in PREFERENCE_METHODS else ["addition", "capitals"]
    datasets_ = []
    for i, e in enumerate(entries):
        if is_local(e["id"]):
            datasets_.append(dict(e))
            continue
        columns = e.get("columns")
        if e.get("test"):  # a named test split: the held-out file of the same kind
            held_out = "eval_pairs.jsonl" if recipe.method in PREFERENCE_METHODS else "eval.jsonl"
            datasets_.append({"id": str(assets / held_out), "split": "train", "columns": columns, "test": True})
            continue
        if recipe.method in PREFERENCE_METHODS and columns and "prompt" not in columns:
            # e.g. ultrafeedback_binarized keeps the user turn inside chosen/rejected; the synthetic pairs
            # have an explicit prompt column, which TRL's DPO preparation needs then
            columns = ["prompt", *columns]
        datasets_.append(
            {"id": str(assets / "data" / f"{tasks[i % len(tasks)]}.jsonl"), "split": "train",
             "columns": columns, "weight": e.get("weight", 1.0)}
        )
    synthetic = [d for d, e in zip(datasets_, entries) if not is_local(e["id"]) and not e.get("test")]
    total = sum(d["weight"] or 1.0 for d in synthetic)
    if total > TINY_MAX_COPIES:  # e.g. the 25-split multi-task mixture: keep its proportions, not its size
        for d in synthetic:
            d["weight"] = round((d["weight"] or 1.0) * TINY_MAX_COPIES / total, 6)
    seed = mix.get("seed", 0) if mix else 0
    test = mix.get("test_split_size") if mix else None
    if isinstance(test, int) and not isinstance(test, bool) and test >= 1:
        test = 0.05  # an absolute count sized for the real data (e.g. 2000) would exceed the tiny files
    out = {"datasets": datasets_, "seed": seed, "test_split_size": test}
    if mix and mix.get("take"):
        out["take"] = mix["take"]
    return {"dataset_mixture": out}


# --------------------------------------------------------------------------------------------- generators


def _capitals(rng: random.Random, n: int = 24) -> dict[str, str]:
    names: dict[str, str] = {}
    while len(names) < n:
        country = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize() + "ia"
        city = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize() + rng.choice(["port", "ton", "grad"])
        names.setdefault(country, city)
    return names


def _addition(a: int, b: int, rng: random.Random) -> list[dict]:
    q = rng.choice(["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."]).format(a=a, b=b)
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": "You are a careful calculator."})
    return msgs


def _preference(a: int, b: int, rng: random.Random) -> dict:
    """A DPO pair: the worked, right sum is chosen; a hedged wrong guess is rejected."""
    wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    guess = rng.choice(["I think it is {w}.", "Maybe {w}?", "Probably {w}, not sure."]).format(w=wrong)
    prompt = [{"role": "user", "content": rng.choice(["What is {a} + {b}?", "Add {a} and {b}."]).format(a=a, b=b)}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
            "rejected": [{"role": "assistant", "content": guess}]}


def _capital(country: str, city: str, rng: random.Random, held_out: bool) -> list[dict]:
    forms = ["Which city is the capital of {c}?"] if held_out else ["What is the capital of {c}?", "Name the capital of {c}."]
    q = rng.choice(forms).format(c=country)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": f"The capital of {country} is {city}."}]


def generate_data(out: Path, n_train: int = 600, n_eval: int = 60, seed: int = 1234) -> None:
    """Train files per task plus a held-out eval file (unseen sums, unseen question wording)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    eval_pairs, train_pairs = pairs[: n_eval // 2], pairs[n_eval // 2 : n_eval // 2 + n_train]
    caps = _capitals(rng)
    countries = sorted(caps)
    (out / "data").mkdir(parents=True)
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}  # the column smoltalk2 carries
    with open(out / "data" / "addition.jsonl", "w") as f:
        for a, b in train_pairs:
            f.write(json.dumps({"messages": _addition(a, b, rng), **kwargs}) + "\n")
    with open(out / "data" / "capitals.jsonl", "w") as f:
        for i in range(n_train):
            c = countries[i % len(countries)]
            f.write(json.dumps({"messages": _capital(c, caps[c], rng, False), **kwargs}) + "\n")
    with open(out / "data" / "preferences.jsonl", "w") as f:
        for a, b in train_pairs:
            f.write(json.dumps({**_preference(a, b, rng), **kwargs}) + "\n")
    with open(out / "eval_pairs.jsonl", "w") as f:
        for a, b in eval_pairs:
            f.write(json.dumps(_preference(a, b, rng)) + "\n")
    with open(out / "eval.jsonl", "w") as f:
        for a, b in eval_pairs:
            f.write(json.dumps({"messages": _addition(a, b, rng)}) + "\n")
        for i in range(n_eval - len(eval_pairs)):
            c = countries[i % len(countries)]
            f.write(json.dumps({"messages": _capital(c, caps[c], rng, True)}) + "\n")


def _reasoning(a: int, b: int, steps: int, rng: random.Random) -> list[dict]:
    """A long worked answer in a thinking block, the shape of smoltalk2's Mid rows (a question, a long trace)."""
    lines, total = [], a
    for k in range(steps):
        c = rng.randrange(10, 100)
        lines.append(f"Step {k + 1}: {total} + {c} = {total + c}.")
        total += c
    answer = f"<think>\nStart from {a} and keep adding.\n" + "\n".join(lines) + f"\n</think>\nThe total is {total}."
    return [{"role": "user", "content": f"Start at {a}, add {steps} numbers of your choice (seed {b}), and show each step."},
            {"role": "assistant", "content": answer}]


def write_hub_chats(root: Path, splits: dict[str, int], config: str = "Mid", files_per_split: int = 4,
                    steps: int = 100, seed: int = 0) -> Path:
    """Generated long-reasoning chats in smoltalk2's schema (`messages`, `source`), laid out as the Hub serves a
    dataset: data/<config>/<split>-0000i-of-0000n.parquet, written file by file (never whole in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    for split, n in splits.items():
        per = -(-n // files_per_split)
        for k in range(files_per_split):
            rows = [{"messages": _reasoning(rng.randrange(100, 1000), rng.randrange(1000), steps, rng), "source": split}
                    for _ in range(min(per, n - k * per))]
            path = root / "data" / config / f"{split}-{k:05d}-of-{files_per_split:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=200)
    return root


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<unk>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_config(family: str, vocab_size: int, max_positions: int = 1024):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    if family == "mixtral":  # a mixture of experts, as Mixtral-8x22B (the handbook's ORPO recipe) is
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    cls = {"smollm3": "SmolLM3Config", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "llama": "LlamaConfig"}[family]
    return getattr(transformers, cls)(**common)


def materialize(assets: Path, model_id: str) -> Path:
    """Build tokenizer + model + data under `assets` once (temp dir, then rename). Returns `assets`."""
    if (assets / "DONE").exists() and (assets / f"model-{_family(model_id)}").exists():
        return assets
    import torch
    from transformers import AutoModelForCausalLM

    family = _family(model_id)
    tmp = assets.parent / f".{assets.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        if (assets / "DONE").exists():  # data exists, another family's model is missing: add it next to it
            shutil.copytree(assets, tmp, dirs_exist_ok=True)
        else:
            generate_data(tmp)
        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_model_config(family, len(tokenizer)))
        model.save_pretrained(tmp / f"model-{family}")
        tokenizer.save_pretrained(tmp / f"model-{family}")
        (tmp / "DONE").write_text("ok\n")
        if assets.exists():
            shutil.rmtree(assets)
        tmp.rename(assets)
    except FileExistsError:  # someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return assets


def model_dir(assets: Path, model_id: str) -> Path:
    return assets / f"model-{_family(model_id)}"


# --------------------------------------------------------------------------------------------- scoring


def _answer_logprob(model, tok, template, prompt: list[dict], answer: list[dict],
                    template_kwargs: dict | None = None) -> tuple[float, int]:
    """Sum of log-probabilities of the answer's content tokens after the prompt, and their count."""
    import torch

    kw = template_kwargs or {}
    text = tok.apply_chat_template(prompt, chat_template=template, add_generation_prompt=True, tokenize=False, **kw)
    full = tok.apply_chat_template(prompt + answer, chat_template=template, tokenize=False, **kw)
    p_ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    a_len = len(tok(answer[-1]["content"], add_special_tokens=False)["input_ids"])
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
    start = len(p_ids) - 1  # the position predicting the first answer token
    picked = logp[start : start + a_len].gather(1, x[0, 1:][start : start + a_len, None])
    return float(picked.sum()), a_len


def _load(model_path):
    """A model folder, or a LoRA export (adapter + tokenizer): its base model with the adapter applied by PEFT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(model_path) / "adapter_config.json"
    if adapter.exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(json.loads(adapter.read_text())["base_model_name_or_path"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_path)


def answer_nll(model_path: str | Path, eval_file: str | Path, chat_template: str | None = None,
               template_kwargs: dict | None = None) -> float:
    """Mean negative log-likelihood per token of the assistant answers in `eval_file` (lower is better), with the
    prompts rendered by `chat_template` (default: the model's own) and its `template_kwargs` (e.g. the
    `enable_thinking: false` the synthetic rows train with)."""
    model, tok = _load(model_path)
    total, count = 0.0, 0
    for line in Path(eval_file).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        logp, n = _answer_logprob(model, tok, chat_template or tok.chat_template, msgs[:-1], msgs[-1:], template_kwargs)
        total, count = total - logp, count + n
    return total / max(count, 1)


def preference_accuracy(model_path: str | Path, pairs_file: str | Path) -> float:
    """Share of held-out pairs where the model gives the chosen answer a higher log-probability."""
    model, tok = _load(model_path)
    wins, pairs = 0, 0
    for line in Path(pairs_file).read_text().splitlines():
        row = json.loads(line)
        chosen, _ = _answer_logprob(model, tok, tok.chat_template, row["prompt"], row["chosen"])
        rejected, _ = _answer_logprob(model, tok, tok.chat_template, row["prompt"], row["rejected"])
        wins, pairs = wins + (chosen > rejected), pairs + 1
    return wins / max(pairs, 1)
