"""Ray Data preparation vs TRL's own preparation, on the same generated chat dataset and the same cores.

(a) raytrain_align: `prepare.tokenize_split` — Ray Data actors (one per core) running TRL's preparation per
    1000-row block, writing Parquet shards.
(b) TRL: `SFTTrainer._prepare_dataset` of a real trainer with `dataset_num_proc` = the same cores (what the
    handbook runs on rank 0 behind its barrier).
Both tokenize with the chat template, build assistant-only labels and pack (BFD) to max_length. The runs
alternate A B A B; the result is the median tokens/s per core of each path and their ratio.

    python benchmarks/prepare_throughput.py [--rows 40000] [--cores 2] [--repeats 2]

Writes benchmarks/results/prepare_throughput-<date>.json and .md (command, machine, versions, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn arithmetic chats of varied length (written for this benchmark)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": "You are a careful calculator. Show the sum."})
        for _ in range(rng.randint(1, 4)):
            a, b = rng.randrange(10, 10_000), rng.randrange(10, 10_000)
            msgs.append({"role": "user", "content": f"What is {a} + {b}?" + " Please be exact." * rng.randint(0, 3)})
            msgs.append({"role": "assistant", "content": f"{a} + {b} = {a + b}."})
        rows.append({"messages": msgs})
    return rows


def token_count(table_or_ds) -> int:
    col = table_or_ds["input_ids"]
    return sum(len(x) for x in col)


def one_run(path: str, rows: int, cores: int, max_length: int, work: Path) -> dict:
    """One timed preparation in this (fresh) process; prints nothing but its JSON result."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytrain_align import prepare, tiny

    datasets.disable_progress_bars()
    assets = tiny.materialize(work / "assets", "HuggingFaceTB/SmolLM3-3B")
    tok_dir = str(tiny.model_dir(assets, "HuggingFaceTB/SmolLM3-3B"))
    ds = datasets.Dataset.from_list(make_rows(rows))
    training = {"assistant_only_loss": True, "packing": True, "max_length": max_length}
    if path == "ray_data":
        import ray

        ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        out = tempfile.mkdtemp(dir=work)
        t0 = time.perf_counter()
        prepare.tokenize_split(ds, out, "sft", tok_dir, training, {}, log=lambda _: None)
        seconds = time.perf_counter() - t0
        tokens = token_count(prepare.read_prepared(out))
        ray.shutdown()
    else:  # TRL's own preparation, as a real SFTTrainer runs it, with dataset_num_proc = cores
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(tok_dir),
            args=SFTConfig(output_dir=str(work / "trl"), report_to="none", bf16=False, use_cpu=True,
                           shuffle_dataset=False, dataset_num_proc=cores, **training),
            train_dataset=ds.select(range(10)), processing_class=AutoTokenizer.from_pretrained(tok_dir),
        )
        t0 = time.perf_counter()
        out = trainer._prepare_dataset(ds, trainer.processing_class, trainer.args, True, None, "bench")
        seconds = time.perf_counter() - t0
        tokens = token_count(out)
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s_per_core": round(tokens / seconds / cores, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--one", choices=["ray_data", "trl"], help=argparse.SUPPRESS)  # internal: one timed run
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.rows, args.cores, args.max_length, Path(args.work))))
        return 0

    import datasets
    import ray
    import trl

    work = Path(tempfile.mkdtemp(prefix="prep_bench_"))
    runs = {"ray_data": [], "trl": []}
    for i in range(args.repeats):
        for path in ("ray_data", "trl"):  # alternate A B A B, each run in a fresh process
            cmd = [sys.executable, __file__, "--one", path, "--rows", str(args.rows), "--cores", str(args.cores),
                   "--max-length", str(args.max_length), "--work", str(work)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[path].append(r)
            print(f"repeat {i + 1} {path:8s} {r['seconds']:7.1f}s  {r['tokens']:,} tokens  "
                  f"{r['tokens_per_s_per_core']:,.0f} tokens/s/core", flush=True)
    assert runs["ray_data"][0]["tokens"] == runs["trl"][0]["tokens"], "both paths must produce the same tokens"
    training = {"assistant_only_loss": True, "packing": True, "max_length": args.max_length}

    med = {p: statistics.median(r["tokens_per_s_per_core"] for r in runs[p]) for p in runs}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "cores_used": args.cores},
        "versions": {"ray": ray.__version__, "trl": trl.__version__, "datasets": datasets.__version__,
                     "python": platform.python_version()},
        "setting": {"rows": args.rows, **training, "tokenizer": "tiny char-level (raytrain_align.tiny)"},
        "runs": runs,
        "median_tokens_per_s_per_core": med,
        "ratio_ray_over_trl": round(med["ray_data"] / med["trl"], 3),
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"prepare_throughput-{datetime.date.today().isoformat()}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(
        f"# Preparation throughput ({result['date']})\n\n`{result['command']}`\n\n"
        f"Machine: {result['machine']['platform']}, {args.cores} of {os.cpu_count()} cores. "
        f"ray {ray.__version__}, trl {trl.__version__}, datasets {datasets.__version__}.\n\n"
        f"{args.rows:,} generated multi-turn chats, assistant-only labels, BFD packing to {args.max_length}; "
        f"runs alternated, {args.repeats} each.\n\n"
        "| path | median tokens/s/core | runs (s) |\n|---|---|---|\n"
        f"| Ray Data actors (raytrain_align) | {med['ray_data']:,.0f} | {', '.join(str(r['seconds']) for r in runs['ray_data'])} |\n"
        f"| TRL `_prepare_dataset`, dataset_num_proc={args.cores} | {med['trl']:,.0f} | {', '.join(str(r['seconds']) for r in runs['trl'])} |\n\n"
        f"Ratio Ray Data / TRL: **{result['ratio_ray_over_trl']}**\n"
    )
    print(f"ratio ray_data/trl = {result['ratio_ray_over_trl']}  -> {out / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
