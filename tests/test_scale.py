"""Real size as a tested property: the real CLI (`--cpu`, the recipe's own model path and data) on generated
smoltalk2-schema data laid out as the Hub serves it, at 1x and 4x the rows. Peak memory of the driver and of
every Ray worker process (tokenize actors, training workers, task workers) is sampled while it runs: at 4x
the data each kind of process peaks within 1.25x of its 1x peak, and training runs."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from raytrain_align import memory, tiny

from .conftest import REPO

pytestmark = pytest.mark.slow

ROWS = 10000  # 1x: 10M tokens of reasoning chats just under max_length (4x: 40M; 8 bytes each prepared: 320 MB)
SMOL = "HuggingFaceTB/SmolLM3-3B"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    assets = tiny.materialize(tmp_path_factory.mktemp("scale") / "assets", SMOL)
    return tiny.model_dir(assets, SMOL)


def recipe_file(tmp_path, model_dir, data_root) -> str:
    """sft_mid as shipped, pointed at a local model folder and the local Hub-style tree, 3 steps."""
    recipe = yaml.safe_load((REPO / "recipes/smollm3/sft/mid.yaml").read_text())
    recipe["model_name_or_path"] = str(model_dir)
    for entry, split in zip(recipe["dataset_mixture"]["datasets"], ("reasoning", "chats")):
        entry.update(id=str(data_root), split=split)
    recipe["ray"]["accelerate_config"] = str(REPO / recipe["ray"]["accelerate_config"])
    recipe.update(max_length=1024, max_steps=3, save_strategy="no", report_to="none")
    path = tmp_path / "mid-local.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run_at(scale: int, tmp_path, model_dir):
    data = tiny.write_hub_chats(tmp_path / "smoltalk2", {"reasoning": ROWS * scale * 3 // 4, "chats": ROWS * scale // 4},
                                steps=32)  # about 950 tokens a row: none truncated at max_length 1024
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray: the driver's process tree
    cmd = [sys.executable, "-m", "raytrain_align", recipe_file(tmp_path, model_dir, data), "--cpu",
           "--storage", str(tmp_path / "storage"), "--output-dir", str(tmp_path / "model")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    with memory.TreeSampler(proc.pid) as sampler:
        log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-5000:]
    manifest = json.loads(next((tmp_path / "storage" / "prepared").glob("*/manifest.json")).read_text())
    run = json.loads((tmp_path / "model" / "raytrain_align_run.json").read_text())
    return memory.summary(sampler.peaks()), manifest, run, log


def test_memory_flat_from_1x_to_4x(tmp_path_factory, model_dir):
    one = run_at(1, tmp_path_factory.mktemp("x1"), model_dir)
    four = run_at(4, tmp_path_factory.mktemp("x4"), model_dir)
    peaks1, manifest1, run1, log1 = one
    peaks4, manifest4, run4, _ = four
    assert manifest4["rows_in"] == 4 * manifest1["rows_in"] == 4 * ROWS
    assert manifest4["tokens"] > 3.9 * manifest1["tokens"]
    assert run1["metrics"]["step"] == run4["metrics"]["step"] == 3
    assert "cpu           bf16=False" in log1  # what --cpu changed is in the plan it printed
    mib = {k: {m: round(v / 2**20) for m, v in d.items() if m != "processes"} for k, d in peaks4.items()}
    report = f"1x {one[0]}\n4x {peaks4}\nMiB at 4x {mib}"
    grown = 8 * (manifest4["tokens"] - manifest1["tokens"])  # bytes of prepared int32 input_ids + labels added
    for kind in ("driver", "tokenize actor", "train worker"):
        assert kind in peaks1 and kind in peaks4, report
    for kind, p4 in peaks4.items():
        p1 = peaks1.get(kind)
        if p1 is None:
            continue
        assert p4["rss"] <= 1.25 * p1["rss"], f"{kind}: peak RSS grew with the data\n{report}"
        # and in bytes: a process holding the prepared data (or the text) would add about all of it
        assert p4["private"] - p1["private"] <= 0.1 * grown, f"{kind}: private memory grew with the data\n{report}"


def _corrupt_pages(path):
    """Overwrite the middle of a parquet file: the footer (row counts) still reads, the data does not."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid - 2000:mid + 2000] = b"\xff" * 4000
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _drop_column(path):
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path).drop_columns(["messages"]), path)  # the column the recipe selects


@pytest.mark.parametrize("damage,message", [
    (_corrupt_pages, r"dataset file .*reasoning-00001-of-00004.parquet could not be read"),
    (_truncate, r"dataset file .*reasoning-00001-of-00004.parquet is not a readable parquet file"),
    (lambda p: p.unlink(), r"missing shard .*reasoning-00001-of-00004"),
    (_drop_column, r"no column\(s\) \['messages'\] \(file .*reasoning-00001-of-00004.parquet\)"),
])
def test_bad_source_file_one_line_nothing_written(damage, message, tmp_path, model_dir, ray_address):
    """A damaged shard of a Hub-style tree: one `error:` line naming the file, exit 2, no traceback, and the
    prepared-data cache has no entry and no half-written folder."""
    import re

    data = tiny.write_hub_chats(tmp_path / "smoltalk2", {"reasoning": 1200, "chats": 200}, steps=60)
    damage(data / "data" / "Mid" / "reasoning-00001-of-00004.parquet")
    storage = tmp_path / "storage"
    proc = subprocess.run([sys.executable, "-m", "raytrain_align", "prepare", recipe_file(tmp_path, model_dir, data),
                           "--cpu", "--storage", str(storage)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ray_address})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (storage / "prepared").exists() or not any((storage / "prepared").iterdir())
