"""Training throughput: raytrain_align on Ray vs the plain handbook launch, same model, data and settings.

    python benchmarks/train_throughput.py --gpus 2 --max-length 8192 --steps 10 --warmup 3 \
        --sequence ray:default,plain:default,ray:default,plain:default,plain:handbook

Each entry of --sequence is PATH:VARIANT, run one after another in this process's order (alternate them:
A B A B). PATH is
  ray    `python -m raytrain_align RECIPE.yaml --nodes 1 --gpus-per-node G --storage .. --output-dir ..`
  plain  `accelerate launch --config_file recipes/accelerate_configs/zero3.yaml --num_processes G
          benchmarks/handbook_sft.py RECIPE.yaml` (the handbook's sft.py, reduced)
VARIANT is a set of recipe overrides on top of the project's recipe (recipes/smollm3/sft/mid.yaml):
  default   the recipe as it is (the project's defaults)
  handbook  the handbook's own settings: mbs 1, grad-acc 2, activation checkpointing, sdpa
  NAME=k=v;k=v   any other set of overrides (repeat --variant)
Both paths read one generated recipe file per variant, so they train the same model on the same packed
batches: the SmolLM3-3B architecture (transformers' SmolLM3Config defaults) with random weights, and
synthetic chats of random words of a 128,256-word tokenizer, BFD-packed to --max-length.

Per run: step times from the StepTimer callback inside the trainer (raytrain_align/trainer_callbacks.py; the same
class in the plain script), tokens per step from TRL's num_tokens log, peak GPU memory of rank 0, and time
from launching the command to the end of the first step. Per (path, variant): medians over runs of
per-run medians over the steps after --warmup; tokens/s/GPU; MFU = 6 N tokens/s/GPU / peak dense bf16
FLOP/s, N = all parameters of the unpartitioned model (tied embedding counted once); the ratios.
Writes train_throughput-DATE-TAG.{json,md} to --results.

--method dpo runs the same comparison for DPO (recipes/smollm3/dpo/apo.yaml: APO-zero, policy + reference) on
synthetic preference pairs (prompt, chosen, rejected of random words), plain path benchmarks/handbook_dpo.py.
Its MFU counts 8 N per token (policy forward + backward 6 N, reference forward 2 N).
A variant may set `accelerate_config` (a path under the project root): both paths then use that accelerate
config (the Ray path through the recipe's `ray.accelerate_config`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE_RECIPES = {"sft": ROOT / "recipes" / "smollm3" / "sft" / "mid.yaml",
                "dpo": ROOT / "recipes" / "smollm3" / "dpo" / "apo.yaml"}
PLAIN_SCRIPTS = {"sft": "handbook_sft.py", "dpo": "handbook_dpo.py"}
FLOPS_PER_TOKEN_PER_PARAM = {"sft": 6, "dpo": 8}  # DPO: policy fwd+bwd (6) + reference fwd (2)
ACCELERATE_CONFIG = ROOT / "recipes" / "accelerate_configs" / "zero3.yaml"
# Dense bf16 tensor-core peak by the vendor's datasheets (SXM parts), FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
VARIANTS = {
    "default": {},
    "handbook": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
                 "attn_implementation": "sdpa"},
}
WORDS_SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "system"]


# ----------------------------------------------------------------------------------------------- assets


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly vocab_size entries: every 'w<i>' word is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(WORDS_SPECIAL)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(WORDS_SPECIAL[:4])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   unk_token="<unk>", bos_token=None)


def model_config(size: str):
    from transformers import SmolLM3Config

    if size == "3b":
        cfg = SmolLM3Config()  # defaults = SmolLM3-3B: hidden 2048, 36 layers, 16/4 heads, 11008, vocab 128256
    else:  # CPU smoke test
        cfg = SmolLM3Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, None, 2
    return cfg


def count_params(cfg) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in m.parameters())  # parameters() yields a tied weight once
    emb = m.get_input_embeddings().weight.numel()
    return {"params": n, "params_non_embedding": n - emb}


def make_model(cfg, out: Path) -> None:
    """Random-init bf16 weights (on the GPU when there is one: seconds instead of minutes) + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "DONE").exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    build_tokenizer(cfg.vocab_size).save_pretrained(tmp)
    del model
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def make_data(path: Path, tokens: int, vocab_size: int, max_length: int, seed: int = 0) -> dict:
    """Chats of random words; document lengths log-uniform in [128, min(8000, max_length - 16)] tokens."""
    rng = random.Random(seed)
    lo, hi = 128, max(256, min(8000, max_length - 16))
    total, rows = 0, 0
    first = len(WORDS_SPECIAL)
    with open(path, "w") as f:
        while total < tokens:
            n = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            n_user = max(1, n // 8)
            words = [f"w{rng.randrange(first, vocab_size)}" for _ in range(n)]
            msgs = [{"role": "user", "content": " ".join(words[:n_user])},
                    {"role": "assistant", "content": " ".join(words[n_user:])}]
            f.write(json.dumps({"messages": msgs}) + "\n")
            total, rows = total + n + 8, rows + 1
    return {"rows": rows, "approx_tokens": total, "doc_tokens": [lo, hi], "distribution": "log-uniform"}


def make_pairs(path: Path, tokens: int, vocab_size: int, max_length: int, seed: int = 0) -> dict:
    """Preference pairs of random words: a prompt of n/8 words, chosen and rejected answers of n words each,
    n log-uniform in [128, min(8000, max_length / 2)] (prompt + answer fits max_length: nothing truncated)."""
    rng = random.Random(seed)
    lo, hi = 128, max(256, min(8000, max_length // 2 - 16))
    total, rows = 0, 0
    first = len(WORDS_SPECIAL)

    def words(k):
        return " ".join(f"w{rng.randrange(first, vocab_size)}" for _ in range(k))

    with open(path, "w") as f:
        while total < tokens:
            n = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            p = max(1, n // 8)
            row = {"prompt": [{"role": "user", "content": words(p)}],
                   "chosen": [{"role": "assistant", "content": words(n)}],
                   "rejected": [{"role": "assistant", "content": words(n)}]}
            f.write(json.dumps(row) + "\n")
            total, rows = total + 2 * (p + n + 8), rows + 1
    return {"rows": rows, "approx_tokens": total, "doc_tokens": [lo, hi], "distribution": "log-uniform",
            "kind": "preference pairs (prompt n/8, chosen n, rejected n)"}


def recipe_for(variant: dict, args, model_dir: Path, data: Path, out: Path) -> dict:
    raw = yaml.safe_load(BASE_RECIPES[args.method].read_text())
    columns = ["messages"] if args.method == "sft" else ["prompt", "chosen", "rejected"]
    if args.method == "dpo":  # the word-level tokenizer has no chat template: mid.yaml's (the handbook's ChatML)
        raw["chat_template"] = yaml.safe_load(BASE_RECIPES["sft"].read_text())["chat_template"]
    raw.update(
        model_name_or_path=str(model_dir), trust_remote_code=False,
        dataset_mixture={"datasets": [{"id": str(data), "split": "train", "columns": columns, "weight": 1.0}],
                         "seed": 0},
        max_length=args.max_length, max_steps=args.steps, num_train_epochs=1, report_to=["none"],
        save_strategy="no", logging_steps=1, log_level="warning", dataset_num_proc=None,
        output_dir=str(out / "hf"),
    )
    raw.pop("save_steps", None)
    variant = dict(variant)
    acc = variant.pop("accelerate_config", None)
    raw.update(variant)
    raw["ray"] = {**raw.get("ray", {}), **({"accelerate_config": str(acc)} if acc else {}), "nodes": 1, "gpus_per_node": args.gpus,
                  "cpus_per_worker": max(1, min(8, (os.cpu_count() or 2) // max(1, args.gpus) - 1))}
    if args.cpu_smoke:
        raw.update(bf16=False, dtype="float32")
    return raw


# ----------------------------------------------------------------------------------------------- runs


def run_one(idx: int, path: str, vname: str, recipe_file: Path, args, work: Path, timeout_s: float) -> dict:
    label = f"{idx:02d}-{path}-{vname}"
    out = work / "runs" / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    if path == "ray":
        cmd = [sys.executable, "-m", "raytrain_align", str(recipe_file), "--nodes", "1", "--gpus-per-node",
               str(args.gpus), "--storage", str(work / "ray_storage"), "--output-dir", str(out / "model"),
               "--set", f"run_name=bench-{label}-{int(time.time())}"]
        if args.cpu_smoke:
            cmd.append("--tiny")
    else:
        acc = (yaml.safe_load(recipe_file.read_text()).get("ray") or {}).get("accelerate_config")
        acc_file = ROOT / acc if acc else ACCELERATE_CONFIG  # the recipe's own, like the Ray path
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_file),
               "--num_processes", str(args.gpus), "--num_machines", "1", "--main_process_port", str(29500 + idx),
               str(ROOT / "benchmarks" / PLAIN_SCRIPTS[args.method]), str(recipe_file)]
        if args.cpu_smoke:
            cmd[3:3] = ["--cpu"]
            env["BENCH_CPU"] = "1"
        env["BENCH_RESULT"] = str(out / "plain_result.json")
        if args.profile:
            env["BENCH_PROFILE"] = str(out / "profile.txt")
    log = out / "log.txt"
    print(f"[{time.strftime('%H:%M:%S')}] run {label}: {' '.join(cmd)}", flush=True)
    t_launch = time.time()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
    wall = time.time() - t_launch
    rec = {"label": label, "path": path, "variant": vname, "command": " ".join(cmd), "rc": rc,
           "launch_unix": t_launch, "wall_s": round(wall, 1), "log": str(log)}
    if path == "ray" and not args.cpu_smoke and rc != 0:
        # a killed driver can leave its local Ray cluster (and the GPUs) behind: this machine runs only us
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
    result_file = out / ("model/raytrain_align_run.json" if path == "ray" else "plain_result.json")
    if rc == 0 and result_file.exists():
        res = json.loads(result_file.read_text())
        rec.update(analyse(res, t_launch, args))
    else:
        rec["error_tail"] = log.read_text(errors="replace").splitlines()[-40:]
    if path == "ray" and (out / "model").exists():
        for f in (out / "model").glob("*.safetensors"):  # the exported weights: not needed, GBs
            f.unlink()
    print(f"[{time.strftime('%H:%M:%S')}]   -> rc {rc}, {wall:.0f}s, median step {rec.get('median_step_s')}, "
          f"tok/s/GPU {rec.get('tokens_per_s_per_gpu')}, peak {rec.get('peak_allocated_gib')} GiB", flush=True)
    return rec


def analyse(res: dict, t_launch: float, args) -> dict:
    timing = res.get("timing") or {}
    steps = timing.get("step_seconds") or []
    ends = timing.get("step_end_unix") or []
    world = int(res.get("world_size") or args.gpus)
    hist = [e for e in res.get("log_history", []) if "num_tokens" in e and "loss" in e]
    cum = [float(e["num_tokens"]) for e in hist]
    per_step = [b - a for a, b in zip([0.0] + cum[:-1], cum)]
    w = min(args.warmup, max(0, len(steps) - 1))
    meas_t, meas_tok = steps[w:], per_step[w:len(steps)]
    rec = {
        "steps": len(steps), "warmup_steps_excluded": w, "step_seconds": [round(s, 4) for s in steps],
        "tokens_per_step": per_step,
        "median_step_s": round(statistics.median(meas_t), 4) if meas_t else None,
        "losses": [e["loss"] for e in hist],
        "peak_allocated_gib": round(timing["peak_allocated_gib"], 2) if "peak_allocated_gib" in timing else None,
        "peak_reserved_gib": round(timing["peak_reserved_gib"], 2) if "peak_reserved_gib" in timing else None,
        "launch_to_first_step_s": round(ends[0] - t_launch, 1) if ends else None,
        "launch_to_train_begin_s": round(timing["train_begin_unix"] - t_launch, 1) if "train_begin_unix" in timing else None,
        # seconds from launch at which each stage was reached (the run's own milestones; train.py, handbook_sft.py)
        "milestones_s": {k: round(v - t_launch, 1) for k, v in sorted(
            {**timing.get("milestones_unix", {}), "train_begin": timing.get("train_begin_unix", t_launch),
             **({"first_step_end": ends[0]} if ends else {})}.items(), key=lambda kv: kv[1])},
    }
    if meas_t and len(meas_tok) == len(meas_t) and sum(meas_t) > 0:
        rec["tokens_per_s_per_gpu"] = round(sum(meas_tok) / sum(meas_t) / world, 1)
    return rec


def summarize(runs: list[dict], n_params: int, peak: float | None, gpus: int, flops_per: int = 6) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(f"{r['path']}:{r['variant']}", []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("median_step_s")]
        g = {"runs": len(rs), "ok": len(ok)}
        if ok:
            tps = [r["tokens_per_s_per_gpu"] for r in ok if r.get("tokens_per_s_per_gpu")]
            g["median_step_s"] = round(statistics.median(r["median_step_s"] for r in ok), 4)
            g["step_s_per_run"] = [r["median_step_s"] for r in ok]
            if tps:
                g["tokens_per_s_per_gpu"] = round(statistics.median(tps), 1)
                g["tokens_per_s_per_gpu_per_run"] = tps
                g["model_tflops_per_gpu"] = round(flops_per * n_params * g["tokens_per_s_per_gpu"] / 1e12, 1)
                if peak:
                    g["mfu"] = round(flops_per * n_params * g["tokens_per_s_per_gpu"] / peak, 4)
            peaks = [r["peak_allocated_gib"] for r in ok if r.get("peak_allocated_gib") is not None]
            g["peak_allocated_gib"] = max(peaks) if peaks else None
            firsts = [r["launch_to_first_step_s"] for r in ok if r.get("launch_to_first_step_s") is not None]
            g["launch_to_first_step_s"] = firsts
            g["mean_tokens_per_step"] = round(statistics.mean(t for r in ok for t in r["tokens_per_step"]), 1) \
                if any(r["tokens_per_step"] for r in ok) else None
        out[key] = g
    ratios = {}
    for key, g in out.items():
        path, variant = key.split(":", 1)
        if path == "ray" and f"plain:{variant}" in out and g.get("median_step_s") and out[f"plain:{variant}"].get("median_step_s"):
            ratios[f"step_time ray/plain [{variant}]"] = round(g["median_step_s"] / out[f"plain:{variant}"]["median_step_s"], 4)
    for hb in ("plain:handbook", "ray:handbook"):
        base = out.get(hb, {}).get("tokens_per_s_per_gpu")
        for key, g in out.items():
            if not key.endswith(":handbook") and base and g.get("tokens_per_s_per_gpu"):
                ratios[f"tokens/s/GPU {key} / {hb}"] = round(g["tokens_per_s_per_gpu"] / base, 3)
    return {"groups": out, "ratios": ratios}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("torch", "transformers", "trl", "deepspeed", "accelerate", "ray", "datasets", "liger-kernel"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"name": "cpu", "count": 0}
    name = torch.cuda.get_device_name(0)
    info = {"name": name, "count": torch.cuda.device_count(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def render_md(res: dict) -> str:
    a = res["args"]
    lines = [f"# Training throughput ({res['date']})", "", f"`{res['command']}`", "",
             f"GPU: {res['gpu']['count']} x {res['gpu']['name']}; peak dense bf16 {res['peak_flops'] and res['peak_flops'] / 1e12} TFLOP/s "
             f"per GPU. Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             f"Model: SmolLM3 architecture ({a['size']}), random weights, N = {res['params']['params']:,} parameters "
             f"({res['params']['params_non_embedding']:,} without the tied embedding). Data: {res['data']['rows']:,} synthetic "
             f"chats ({res['data']['distribution']} document lengths {res['data']['doc_tokens']} tokens), BFD-packed to "
             f"max_length {a['max_length']}, {a['steps']} steps per run, first {a['warmup']} excluded. ZeRO-3 "
             "(the recipe's accelerate config, recipes/accelerate_configs/zero3.yaml unless a variant names another), bf16.",
             "", f"Method: {a.get('method', 'sft')}; MFU counts {res.get('flops_per_token_per_param', 6)} N FLOPs per token.",
             "", f"Variants (overrides of {res.get('base_recipe', 'recipes/smollm3/sft/mid.yaml')}):", ""]
    for name, ov in res["variants"].items():
        lines.append(f"- `{name}`: " + (", ".join(f"{k}={v}" for k, v in ov.items()) or "the recipe as it is"))
    lines += ["", "| path:variant | runs ok | median step (s) | tokens/s/GPU | MFU | peak alloc (GiB) | launch to 1st step (s) |",
              "|---|---|---|---|---|---|---|"]
    for key, g in res["summary"]["groups"].items():
        mfu = f"{g['mfu']:.1%}" if g.get("mfu") is not None else "n/a"
        lines.append(f"| {key} | {g['ok']}/{g['runs']} | {g.get('median_step_s', 'n/a')} | {g.get('tokens_per_s_per_gpu', 'n/a')} | "
                     f"{mfu} | {g.get('peak_allocated_gib', 'n/a')} | {', '.join(str(x) for x in g.get('launch_to_first_step_s', []))} |")
    lines += ["", "Runs in order:", "", "| run | rc | wall (s) | median step (s) | tokens/s/GPU | peak alloc (GiB) | launch to 1st step (s) |",
              "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['label']} | {r['rc']} | {r['wall_s']} | {r.get('median_step_s')} | {r.get('tokens_per_s_per_gpu')} | "
                     f"{r.get('peak_allocated_gib')} | {r.get('launch_to_first_step_s')} |")
    timed = [r for r in res["runs"] if r.get("milestones_s")]
    if timed:
        lines += ["", "Where the time to the first step goes (seconds from launch at which each stage was reached):", ""]
        lines += [f"- {r['label']}: " + ", ".join(f"{k} {v}" for k, v in r["milestones_s"].items()) for r in timed]
    if res["summary"]["ratios"]:
        lines += ["", "Ratios:", ""] + [f"- {k}: **{v}**" for k, v in res["summary"]["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="GPUs (workers) on this machine; default all")
    p.add_argument("--size", choices=["3b", "tiny"], default="3b")
    p.add_argument("--max-length", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    p.add_argument("--sequence", default="ray:default,plain:default,ray:default,plain:default")
    p.add_argument("--variant", action="append", default=[], help="NAME=key=value;key=value (recipe overrides)")
    p.add_argument("--budget-s", type=float, default=540, help="launch no run that would likely end after this")
    p.add_argument("--work", default="/tmp/train_throughput")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--profile", action="store_true",
                   help="plain runs: torch.profiler tables of the second step into each run's log folder (and --logs-tar); "
                        "needs --warmup 3 or more (the tables' writing lands in the third step)")
    p.add_argument("--logs-tar", default=None, help="also pack every run's log into this .tar.gz")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU check of this script (Ray path uses --tiny)")
    p.add_argument("--method", choices=["sft", "dpo"], default="sft",
                   help="sft: recipes/smollm3/sft/mid.yaml; dpo: recipes/smollm3/dpo/apo.yaml on preference pairs")
    args = p.parse_args(argv)
    if args.profile and args.warmup < 3:
        p.error("--profile needs --warmup 3 or more: the profiled second step and the third, which holds the "
                "writing of its tables, stay out of the medians")
    t0 = time.time()
    import torch

    if args.gpus is None:
        args.gpus = torch.cuda.device_count() or 2
    if args.cpu_smoke:
        args.size = "tiny"
    variants = dict(VARIANTS)
    for v in args.variant:
        name, _, body = v.partition("=")
        variants[name] = {k: yaml.safe_load(val) for k, _, val in (kv.partition("=") for kv in body.split(";") if kv)}
    seq = [tuple(s.split(":", 1)) for s in args.sequence.split(",") if s]
    for path, vname in seq:
        if path not in ("ray", "plain") or vname not in variants:
            p.error(f"bad sequence entry {path}:{vname}")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args.size)
    params = count_params(cfg)
    model_dir = work / f"model-{args.size}"
    make_model(cfg, model_dir)
    print(f"[{time.strftime('%H:%M:%S')}] model ready ({params['params']:,} params) in {time.time() - t0:.0f}s", flush=True)

    # enough tokens for the largest variant's steps (x1.5), in one file both paths read
    need = 0
    base = yaml.safe_load(BASE_RECIPES[args.method].read_text())
    for _, vname in seq:
        v = {**base, "max_length": args.max_length, **variants[vname]}
        need = max(need, args.steps * v["per_device_train_batch_size"] * v["gradient_accumulation_steps"] * args.gpus
                   * v["max_length"])
    data_file = work / f"data-{args.method}-{args.size}-{args.max_length}-{need}.jsonl"
    if args.method == "sft":
        data = make_data(data_file, int(need * 1.5), cfg.vocab_size, args.max_length)
    else:  # a pair is one row of at most max_length per answer, not packed: far fewer tokens per step than SFT
        data = make_pairs(data_file, int(need * 0.5), cfg.vocab_size, args.max_length)
    recipes = {}
    for vname in {v for _, v in seq}:
        f = work / f"recipe-{vname}.yaml"
        f.write_text(yaml.safe_dump(recipe_for(variants[vname], args, model_dir, data_file, work / "out")))
        recipes[vname] = f

    gpu = gpu_info()
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu["name"]), None)
    runs, est = [], {}
    for i, (path, vname) in enumerate(seq):
        left = args.budget_s - (time.time() - t0)
        guess = est.get((path, vname), est.get(path, 0))  # this variant's last wall time, else this path's
        if left < max(60.0, guess):
            print(f"skip {path}:{vname}: {left:.0f}s of budget left, a run took {guess:.0f}s", flush=True)
            runs.append({"label": f"{i:02d}-{path}-{vname}", "path": path, "variant": vname, "rc": "skipped (budget)",
                         "wall_s": 0})
            continue
        rec = run_one(i, path, vname, recipes[vname], args, work, left)
        if rec["rc"] == 0:
            est[(path, vname)] = rec["wall_s"]
            est[path] = min(est.get(path, rec["wall_s"]), rec["wall_s"])
        runs.append(rec)

    now = dt.datetime.now(dt.timezone.utc)
    res = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/train_throughput.py"] + (argv if argv is not None else sys.argv[1:])),
        "args": vars(args), "gpu": gpu, "peak_flops": peak, "versions": versions(),
        "base_recipe": str(BASE_RECIPES[args.method].relative_to(ROOT)),
        "flops_per_token_per_param": FLOPS_PER_TOKEN_PER_PARAM[args.method],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model_config": cfg.to_dict(), "params": params, "data": data,
        "variants": {k: variants[k] for k in dict.fromkeys(v for _, v in seq)},
        "recipes": {k: yaml.safe_load(f.read_text()) for k, f in recipes.items()},
        "runs": runs,
    }
    res["summary"] = summarize(runs, params["params"], peak, args.gpus, FLOPS_PER_TOKEN_PER_PARAM[args.method])
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = f"train_throughput-{now:%Y-%m-%d}" + (f"-{args.tag}" if args.tag else "")
    (results / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    (results / f"{stem}.md").write_text(render_md(res))
    if args.logs_tar:
        with tarfile.open(args.logs_tar, "w:gz") as tf:
            for r in runs:
                if r.get("log") and Path(r["log"]).exists():
                    tf.add(r["log"], arcname=f"{r['label']}.log")
                profile = Path(r["log"]).with_name("profile.txt") if r.get("log") else None
                if profile and profile.exists():
                    tf.add(profile, arcname=f"{r['label']}.profile.txt")
    print(render_md(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
