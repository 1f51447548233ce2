"""Time to first step of the tiny recipe on a warm local Ray cluster (issue 16's goal: <= 15 s), and where it goes.

    python benchmarks/time_to_first_step.py [--runs 3] [--recipe sft_mid]

Starts one local Ray head (`ray start --head`, this machine's CPUs), runs `python -m raytrain_align RECIPE
--tiny` against it once to warm it (the prepared-data cache, the tiny assets, Ray's worker pool), then --runs
more times, each a new driver process with its own run name, as a user re-launching a job would. Per run,
from the driver's launch: the end of the first optimizer step (StepTimer's `step_end_unix[0]` in the run's
raytrain_align_run.json), and the stages in between as the run recorded them (`timing.milestones_unix`: plan
built, Ray ready, data ready, trainer submitted, worker loop entered, model loaded, trainer built, training begins). Writes
benchmarks/results/time_to_first_step-DATE.{json,md}; quotes the median.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args):
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True,
                          timeout=300)


def one_run(recipe: str, address: str, storage: Path, name: str, steps: int) -> dict:
    out = storage.parent / f"out-{name}"
    cmd = [sys.executable, "-m", "raytrain_align", recipe, "--tiny", "--storage", str(storage), "--output-dir", str(out),
           "--set", f"run_name={name}", "--set", f"max_steps={steps}", "--set", "save_strategy=no"]
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed (rc {proc.returncode}):\n" + "\n".join(proc.stdout.splitlines()[-60:]))
    run = json.loads((out / "raytrain_align_run.json").read_text())
    timing = run["timing"]
    # the stages the run itself recorded (driver and rank 0: timing.milestones_unix), seconds from launch
    reached = {**timing["milestones_unix"], "train_begin": timing["train_begin_unix"], "first_step_end": timing["step_end_unix"][0]}
    return {"name": name, "command": " ".join(cmd), "wall_s": round(time.time() - t0, 2),
            "first_step_end_s": round(timing["step_end_unix"][0] - t0, 2),
            "train_begin_s": round(timing["train_begin_unix"] - t0, 2),
            "first_step_s": round(timing["step_seconds"][0], 3),
            "prepared_reused": run["prepared"]["reused"],
            "milestones_s": {k: round(v - t0, 2) for k, v in sorted(reached.items(), key=lambda kv: kv[1])}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="sft_mid")
    p.add_argument("--runs", type=int, default=3, help="measured runs after the warm-up run")
    p.add_argument("--steps", type=int, default=3, help="max_steps per run")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ttfs-"))
    storage = work / "storage"
    port = _free_port()
    r = _ray("start", "--head", f"--port={port}", f"--num-cpus={os.cpu_count()}", "--num-gpus=0",
             "--disable-usage-stats", f"--temp-dir={work / 'ray'}", f"--dashboard-port={_free_port()}")
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr)
    address = f"127.0.0.1:{port}"
    try:
        warm = one_run(args.recipe, address, storage, "warmup", args.steps)
        print(f"warm-up run: first step ended {warm['first_step_end_s']}s after launch (data prepared in it)", flush=True)
        runs = []
        for i in range(args.runs):
            rec = one_run(args.recipe, address, storage, f"ttfs{i}", args.steps)
            if not rec["prepared_reused"]:
                raise SystemExit(f"run {i} prepared its data again: not the warm case this script measures")
            runs.append(rec)
            print(f"run {i}: first step ended {rec['first_step_end_s']}s after launch; {rec['milestones_s']}", flush=True)
    finally:
        _ray("stop", "--force")
    import torch

    med = statistics.median(r["first_step_end_s"] for r in runs)
    milestones = {k: statistics.median(r["milestones_s"][k] for r in runs)
                  for k in runs[0]["milestones_s"] if all(k in r["milestones_s"] for r in runs)}
    date = dt.date.today().isoformat()
    res = {"command": "python benchmarks/time_to_first_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": date, "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})",
           "torch": torch.__version__, "recipe": args.recipe, "warmup_run": warm, "runs": runs,
           "median_first_step_end_s": med, "median_milestones_s": milestones}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"time_to_first_step-{date}.json").write_text(json.dumps(res, indent=2))
    md = [f"Command: `{res['command']}`  ", f"Machine: {res['machine']}, torch {res['torch']}  ", f"Date: {date}", "",
          f"Tiny `{args.recipe}` on a warm local Ray cluster (2 CPU workers, ZeRO-3 over gloo, prepared data cached), "
          f"{len(runs)} runs after one warm-up run; seconds from launching the driver:", "",
          "| milestone | median s | per run |", "|---|---|---|"]
    for k, v in milestones.items():
        md.append(f"| {k} | {v} | {', '.join(str(r['milestones_s'][k]) for r in runs)} |")
    md.append(f"| **first optimizer step done** | **{med}** | {', '.join(str(r['first_step_end_s']) for r in runs)} |")
    text = "\n".join(md) + "\n"
    (out / f"time_to_first_step-{date}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
