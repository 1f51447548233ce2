"""Data preparation at growing size: rows/s, tokens/s per core and peak memory (driver, largest Ray worker) at
1x, 4x and 16x the rows, on 1 and 2 nodes (two raylets on this machine), and TRL's own preparation of the
same mixture on the same cores (the handbook's path: datasets load + shuffle, SFTTrainer._prepare_dataset with
dataset_num_proc = cores). Data: generated smoltalk2-schema reasoning chats in a local Hub-style parquet tree,
prepared with sft_mid's own recipe (local model folder, max_length 1024). Runs alternate (ours, TRL) per repeat.

    python benchmarks/prepare_scale.py [--rows 5000] [--scales 1 4 16] [--cores 2] [--repeats 2]

Writes benchmarks/results/prepare_scale-<date>.json and .md (command, machine, versions, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from raytrain_align import memory, tiny

REPO = Path(__file__).resolve().parent.parent
SMOL = "HuggingFaceTB/SmolLM3-3B"
SPLITS = ("reasoning", "chats")


def write_data(work: Path, rows: int) -> Path:
    root = work / f"smoltalk2-{rows}"
    if not root.exists():
        tiny.write_hub_chats(root, {"reasoning": rows * 3 // 4, "chats": rows - rows * 3 // 4}, steps=32)
    return root


def recipe_file(work: Path, model_dir: Path, data: Path) -> Path:
    recipe = yaml.safe_load((REPO / "recipes/smollm3/sft/mid.yaml").read_text())
    recipe["model_name_or_path"] = str(model_dir)
    for entry, split in zip(recipe["dataset_mixture"]["datasets"], SPLITS):
        entry.update(id=str(data), split=split)
    recipe["ray"]["accelerate_config"] = str(REPO / recipe["ray"]["accelerate_config"])
    recipe["max_length"] = 1024
    path = work / f"recipe-{data.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ray_cli(*args: str) -> None:
    from raytrain_align.launch import token_available

    # a head started where a token exists uses token auth; a raylet joining it must ask for it
    auth = {"RAY_AUTH_MODE": "token"} if token_available() and "RAY_AUTH_MODE" not in os.environ else {}
    proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True,
                          env={**os.environ, **auth})
    if proc.returncode:
        raise SystemExit(f"ray {' '.join(args)} failed: {proc.stderr[-2000:]}")


def ours(recipe: Path, cores: int, nodes: int, work: Path) -> dict:
    """`python -m raytrain_align prepare RECIPE --cpu` against a fresh cluster of `nodes` raylets x `cores`."""
    port = 6500 + os.getpid() % 1000
    since = time.time()
    ray_cli("start", "--head", f"--port={port}", f"--num-cpus={cores}", "--num-gpus=0", "--include-dashboard=false",
            "--disable-usage-stats")
    try:
        for _ in range(nodes - 1):
            ray_cli("start", f"--address=127.0.0.1:{port}", f"--num-cpus={cores}", "--num-gpus=0", "--disable-usage-stats")
        storage = tempfile.mkdtemp(dir=work)
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "raytrain_align", "prepare", str(recipe), "--cpu", "--storage",
                                 storage, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with memory.TreeSampler(proc.pid, since=since) as sampler:
            out, err = proc.communicate()
        wall = time.time() - t0
    finally:
        ray_cli("stop", "--force")
    if proc.returncode:
        raise SystemExit(err[-3000:])
    manifest = json.loads(out[out.index("{"):])
    peaks = memory.summary(sampler.peaks())
    workers = [v["rss"] for k, v in peaks.items() if k != "driver"]
    return {"seconds": manifest["seconds"], "wall_seconds": round(wall, 1), "rows": manifest["rows_in"],
            "tokens": manifest["tokens"], "nodes_used": manifest["nodes"],
            "rows_per_s": round(manifest["rows_in"] / manifest["seconds"], 1),
            "tokens_per_s_per_core": round(manifest["tokens"] / manifest["seconds"] / (cores * nodes), 1),
            "peak_rss_mib": {"driver": round(peaks["driver"]["rss"] / 2**20), "largest_worker": round(max(workers) / 2**20)},
            "peaks_by_kind_mib": {k: round(v["rss"] / 2**20) for k, v in peaks.items()}}


def trl_path(recipe: Path, cores: int) -> dict:
    """The handbook's path in one process: load + mix with datasets, then TRL's own preparation."""
    code = f"""
import json, sys, time, yaml, datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
datasets.disable_progress_bars()
datasets.disable_caching()  # every repeat does the whole work (a cached map would take a second)
r = yaml.safe_load(open({str(recipe)!r}))
t0 = time.perf_counter()
parts = [datasets.load_dataset("parquet", data_files={{e["split"]: e["id"] + "/data/" + e["config"] + "/" + e["split"] + "-*.parquet"}},
                               split=e["split"]).select_columns(e["columns"]) for e in r["dataset_mixture"]["datasets"]]
ds = datasets.concatenate_datasets(parts).shuffle(seed=r["dataset_mixture"]["seed"])
tok = AutoTokenizer.from_pretrained(r["model_name_or_path"]); tok.chat_template = r["chat_template"]; tok.eos_token = r["eos_token"]
args = SFTConfig(output_dir="/tmp/trl-bench", report_to="none", use_cpu=True, bf16=False, shuffle_dataset=False,
                 dataset_num_proc={cores}, packing=True, max_length=r["max_length"])
trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(r["model_name_or_path"]), args=args,
                     train_dataset=ds.select(range(10)), processing_class=tok)
t1 = time.perf_counter()
out = trainer._prepare_dataset(ds, tok, args, True, None, "bench")
t2 = time.perf_counter()
tokens = sum(len(x) for x in out["input_ids"])
print(json.dumps({{"seconds": round(t2 - t1 + t1 - t0, 2), "load_seconds": round(t1 - t0, 2), "tokens": tokens, "rows": len(ds)}}))
"""
    cache = tempfile.mkdtemp(prefix="hf_datasets_")  # nor a cached load of the parquet files
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env={**os.environ, "HF_DATASETS_CACHE": cache})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["tokens_per_s_per_core"] = round(r["tokens"] / r["seconds"] / cores, 1)
    return r


def driver_at_sft_mid() -> dict:
    """What the driver holds for the real sft_mid mixture (smoltalk2 Mid: 3,644,790 + 1,135,104 rows): the
    mixture order and the read tasks' row lists, from row counts alone (files described, not read)."""

    code = """
import json, resource, time, tracemalloc
from raytrain_align import mixture_order, sources
tracemalloc.start()  # numpy's arrays are traced too: the peak of what this work allocated, imports aside
t0 = time.perf_counter()
srcs = []
for split, n in (("Llama_Nemotron_Post_Training_Dataset_reasoning_r1", 3_644_790), ("OpenThoughts3_1.2M", 1_135_104)):
    files, left = [], n
    for k in range(-(-n // 40_000)):  # Hub shards of 40,000 rows, row groups of 1,000 rows of 25 KB
        rows = min(40_000, left); left -= rows
        groups = tuple((min(1000, rows - g), 25_000_000) for g in range(0, rows, 1000))
        files.append(sources.SourceFile(f"hf://datasets/HuggingFaceTB/smoltalk2/data/Mid/{split}-{k:05d}.parquet",
                                        "parquet", rows, groups))
    srcs.append(sources.Source({"id": "HuggingFaceTB/smoltalk2", "weight": 1.0}, files, ["messages"], ["messages"]))
order = mixture_order.mixture_order(srcs, {"seed": 0})
frags = sources.fragments(srcs, order)
seconds = time.perf_counter() - t0
print(json.dumps({"rows": len(order.train), "read_tasks": len(frags), "seconds": round(seconds, 2),
                  "peak_allocated_mib": round(tracemalloc.get_traced_memory()[1] / 2**20),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000, help="rows at 1x")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--cores", type=int, default=2, help="CPUs per node")
    ap.add_argument("--two-node-scale", type=int, default=4, help="the scale also run on 2 nodes of --cores/2 CPUs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--docs", default=str(REPO / "docs" / "data-at-scale.md"), help="page whose figures are rewritten")
    args = ap.parse_args()

    import ray
    import trl

    work = Path(tempfile.mkdtemp(prefix="prepare_scale_"))
    model_dir = tiny.model_dir(tiny.materialize(work / "assets", SMOL), SMOL)
    rows: list[dict] = []

    def record(**kw):
        rows.append(kw)
        r = kw["result"]
        print(f"{kw['path']:22s} x{kw['scale']:<3d} {r['seconds']:7.1f}s  {r['tokens_per_s_per_core']:>10,.0f} tok/s/core"
              + (f"  driver {r['peak_rss_mib']['driver']} MiB, largest worker {r['peak_rss_mib']['largest_worker']} MiB"
                 if "peak_rss_mib" in r else ""), flush=True)

    half = max(1, args.cores // 2)
    for scale in args.scales:
        recipe = recipe_file(work, model_dir, write_data(work, args.rows * scale))
        for _ in range(args.repeats):
            record(path="ours, 1 node", scale=scale, cores=args.cores, result=ours(recipe, args.cores, 1, work))
            if scale == args.two_node_scale:
                record(path=f"ours, 1 node x {half}", scale=scale, cores=half, result=ours(recipe, half, 1, work))
                record(path=f"ours, 2 nodes x {half}", scale=scale, cores=2 * half, result=ours(recipe, half, 2, work))
                record(path="TRL, 1 process pool", scale=scale, cores=args.cores, result=trl_path(recipe, args.cores))

    def med(path, scale, key="tokens_per_s_per_core"):
        vals = [r["result"][key] for r in rows if r["path"] == path and r["scale"] == scale]
        return statistics.median(vals) if vals else None

    driver = driver_at_sft_mid()
    print(f"driver at sft_mid's row count: {driver}", flush=True)
    s2 = args.two_node_scale
    one, two = med(f"ours, 1 node x {half}", s2, "rows_per_s"), med(f"ours, 2 nodes x {half}", s2, "rows_per_s")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {"ray": ray.__version__, "trl": trl.__version__, "python": platform.python_version()},
        "setting": {"rows_1x": args.rows, "recipe": "sft_mid (local model folder and data, max_length 1024)",
                    "tokenizer": "tiny char-level (raytrain_align.tiny)"},
        "runs": rows,
        "ratio_ours_over_trl_per_core": round(med("ours, 1 node", s2) / med("TRL, 1 process pool", s2), 3),
        "two_node_speedup_rows_per_s": round(two / one, 3),
        "driver_at_sft_mid": driver,
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"prepare_scale-{datetime.date.today().isoformat()}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Preparation at scale ({result['date']})", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']['platform']}, {os.cpu_count()} cores. ray {ray.__version__}, trl {trl.__version__}. "
             f"{args.rows:,} rows at 1x (generated smoltalk2-schema reasoning chats, ~950 tokens each), sft_mid's recipe "
             f"with max_length 1024. Medians of {args.repeats} alternated runs.", "",
             "| path | scale | rows | tokens | prep s | rows/s | tokens/s/core | peak RSS driver MiB | peak RSS largest worker MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen = []
    for r in rows:
        key = (r["path"], r["scale"])
        if key in seen:
            continue
        seen.append(key)
        pick = [x["result"] for x in rows if (x["path"], x["scale"]) == key]
        m = lambda k: statistics.median(x[k] for x in pick)  # noqa: E731
        peak = (lambda k: statistics.median(x["peak_rss_mib"][k] for x in pick)) if "peak_rss_mib" in pick[0] else None
        lines.append(f"| {key[0]} | {key[1]}x | {pick[0]['rows']:,} | {pick[0]['tokens']:,} | {m('seconds'):.1f} | "
                     f"{pick[0]['rows'] / m('seconds'):,.0f} | {m('tokens_per_s_per_core'):,.0f} | "
                     f"{peak('driver') if peak else '-'} | {peak('largest_worker') if peak else '-'} |")
    lines += ["", f"Ours / TRL tokens/s per core at {s2}x: **{result['ratio_ours_over_trl_per_core']}**. "
              f"2 nodes x {half} CPUs vs 1 node x {half} CPUs (rows/s): **{result['two_node_speedup_rows_per_s']}x**.", "",
              f"Driver at sft_mid's row count ({driver['rows']:,} rows, {driver['read_tasks']:,} read tasks, described not "
              f"read): mixture order and read-task row lists in {driver['seconds']} s, {driver['peak_allocated_mib']} MiB allocated at peak "
              f"(the process's peak RSS, imports included: {driver['peak_rss_mib']} MiB).", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    top = max(args.scales)
    rate = med("ours, 1 node", top)
    estimate = (f"At the per-core rate measured here at {top}x ({rate:,.0f} tokens/s per core with the tiny character-level "
                f"tokenizer, so {rate:,.0f} characters/s; SmolLM3's own tokenizer is not available offline and its "
                f"characters/s was not measured), sft_mid's 117.9e9 characters on 1,536 cores take about "
                f"{117.9e9 / (1536 * rate) / 60:.0f} minutes of tokenization, plus reading 53.7 GB from the Hub and one "
                "pass of the text through the object stores.")
    fill_docs(Path(args.docs), {"table": "\n".join(lines[2:]), "estimate": estimate})
    return 0


def fill_docs(docs: Path, parts: dict[str, str]) -> None:
    """Write the figures between `<!-- name -->` and `<!-- /name -->` in the docs page."""
    if not docs.exists():
        return
    text = docs.read_text()
    for name, body in parts.items():
        start, end = text.index(f"<!-- {name} -->"), text.index(f"<!-- /{name} -->")
        text = text[: start + len(f"<!-- {name} -->")] + "\n" + body + "\n" + text[end:]
    docs.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
