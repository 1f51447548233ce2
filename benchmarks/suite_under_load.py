"""The slow test modules (the ones that start clusters and subprocesses) run PASSES times in a row while a
CPU-heavy neighbour keeps one core busy, as on a shared CI machine. Writes
benchmarks/results/suite_under_load-<date>.md with the command, the machine, and each pass's counts and time.

    python -m benchmarks.suite_under_load [--passes 3] [--modules tests/test_elastic.py ...] [--all]

`--all` runs the whole suite instead (pytest's testpaths: what the README's test command runs). The results file
is rewritten after every pass, so a pass cut short leaves the ones before it on record.
"""

import argparse
import datetime
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLOW_MODULES = ["tests/test_fidelity.py", "tests/test_fault_tolerance.py", "tests/test_elastic.py",
                "tests/test_fsdp.py", "tests/test_jobs.py", "tests/test_pipeline.py"]


def neighbour(stop) -> None:
    """A tokenizer's worth of pure-Python work (split, count, join) over generated text, until told to stop."""
    words = [f"w{i % 977}x{i % 13}" for i in range(200_000)]
    while not stop.is_set():
        text = " ".join(words)
        counts: dict[str, int] = {}
        for token in re.findall(r"\w+", text):
            counts[token] = counts.get(token, 0) + 1


def one_pass(modules: list[str]) -> tuple[str, float, int]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules], cwd=REPO,
                          capture_output=True, text=True)
    summary = next((line for line in reversed(proc.stdout.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", line) and re.search(r" in [\d.]+s", line)), "no summary")
    if proc.returncode:
        sys.stderr.write(proc.stdout[-6000:])
    return summary.strip("= "), time.time() - t0, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--modules", nargs="+", default=SLOW_MODULES)
    ap.add_argument("--all", action="store_true", help="the whole suite (pytest's testpaths)")
    args = ap.parse_args()
    if args.all:
        args.modules = []
    stop = multiprocessing.Event()
    hog = multiprocessing.Process(target=neighbour, args=(stop,), daemon=True)
    hog.start()
    rows, started = [], datetime.datetime.now(datetime.timezone.utc)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    out = REPO / "benchmarks" / "results" / f"suite_under_load-{started:%Y-%m-%d}{'-all' if args.all else ''}.md"
    try:
        for i in range(1, args.passes + 1):
            summary, seconds, rc = one_pass(args.modules)
            rows.append(f"| {i} | {summary} | {seconds / 60:.1f} | {rc} |")
            print(rows[-1], flush=True)
            out.write_text("\n".join([
                f"# {'The whole test suite' if args.all else 'The slow test modules'}, run beside a CPU-heavy neighbour",
                "",
                f"- command: `{' '.join(['python -m benchmarks.suite_under_load', *sys.argv[1:]])}`",
                f"- commit: {commit.strip()}; started {started:%Y-%m-%d %H:%M} UTC",
                f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
                "- neighbour: one process of pure-Python tokenizing work for the whole time (one core busy)",
                f"- modules: {' '.join(args.modules) or 'all (testpaths)'}",
                "",
                "| pass | pytest summary | minutes | exit code |",
                "|---|---|---|---|",
                *rows, ""]))
    finally:
        stop.set()
        hog.join(timeout=30)
    print(f"written {out.relative_to(REPO)}")
    return max(int(row.rsplit("|", 2)[-2]) for row in rows)


if __name__ == "__main__":
    sys.exit(main())
