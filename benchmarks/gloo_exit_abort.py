"""Why a gloo (CPU) training process can abort after it trained everything: a minimal reproduction.

A rank that exits with collectives still queued on its gloo process group, as ZeRO-3's prefetching all-gathers
can be, leaves those works to gloo's worker threads. If the interpreter is already finalizing when a worker
thread drops a work's tensors, that thread needs the GIL and the process aborts with `terminate called without
an active exception` (exit -6); the mechanism as PyTorch's maintainers describe it in pytorch/pytorch#179291
(and #190489 for the message). This script shows the effect and the cure, not the stack.
Destroying the process group while the interpreter is alive (`torch.distributed.destroy_process_group()`,
which accelerate's `end_training()` calls) finishes and frees those works first.

Runs TRIALS two-rank jobs each way, alternated, and writes benchmarks/results/gloo_exit_abort-<date>.{json,md}:

    python benchmarks/gloo_exit_abort.py [--trials 10] [--no-results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
WORLD = 2


def _rank(rank: int, port: int, destroy: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    for _ in range(8):  # prefetch-style collectives whose handles nobody waits on
        dist.all_reduce(torch.ones(1 << 18), async_op=True)
    if destroy:
        dist.destroy_process_group()


def trial(destroy: bool) -> list[int]:
    """One job of WORLD ranks; returns their exit codes (-6 is the abort)."""
    with socket.socket() as s:  # the store binds it again at once; a clash would fail the trial, not hide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, destroy)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--no-results", action="store_true", help="print only; write no results file")
    args = ap.parse_args()
    codes = {"exit without destroy_process_group": [], "destroy_process_group before exit": []}
    for _ in range(args.trials):
        for label, destroy in (("exit without destroy_process_group", False), ("destroy_process_group before exit", True)):
            codes[label].append(trial(destroy))
    rows = {label: {"trials": len(c), "aborted_trials": sum(any(x == -6 for x in t) for t in c), "exit_codes": c}
            for label, c in codes.items()}
    for label, r in rows.items():
        print(f"{label:38s} {r['aborted_trials']}/{r['trials']} trials aborted (exit -6)")
    if args.no_results:
        return 0
    today = datetime.date.today().isoformat()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": today,
              "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})",
              "torch": torch.__version__, "world_size": WORLD, "results": rows}
    out = REPO / "benchmarks" / "results" / f"gloo_exit_abort-{today}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# gloo process exit with collectives queued ({today})", "",
             f"Command: `{result['command']}`. Machine: {result['machine']}. torch {torch.__version__}. "
             f"{WORLD} ranks per trial, trials alternated.", "", "| teardown | trials aborted (exit -6) |", "|---|---|"]
    lines += [f"| {label} | {r['aborted_trials']} of {r['trials']} |" for label, r in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
