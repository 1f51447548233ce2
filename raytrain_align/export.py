"""Stage 5 of 5: bring the trained model to `output_dir` and tell the user what happened.

The final Hugging Face export travels as the run's last Ray Train checkpoint (so it works the same for
local, NFS and S3 storage); here it is copied to `output_dir` under a temporary name and renamed, then a
summary (steps, tokens, throughput, loss, where things are) and a loss-curve plot are written.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FINAL_DIR = "final_model"  # name of the Ray checkpoint that holds the exported Hugging Face model


@dataclass
class RunSummary:
    recipe: str
    output_dir: str
    run_dir: str
    checkpoints: list[str]
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    final_loss: float | None
    world_size: int
    facts: dict[str, Any]
    loss_plot: str | None

    def render(self) -> str:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        lines = [
            "",
            f"── {self.recipe} done " + "─" * max(0, 60 - len(self.recipe)),
            f"  steps        {self.steps}  (world size {self.world_size})",
            f"  tokens       {self.tokens:,}  in {self.seconds:.1f}s  = {self.tokens_per_second:,.0f} tokens/s",
            f"  final loss   {loss}",
            f"  model        {self.output_dir}",
            f"  checkpoints  {self.run_dir}" + (f"  (latest: {Path(self.checkpoints[-1]).name})" if self.checkpoints else ""),
        ]
        if self.loss_plot:
            lines.append(f"  loss curve   {self.loss_plot}")
        return "\n".join(lines)


def materialize_checkpoint(checkpoint, output_dir: str) -> None:
    """Copy a Ray checkpoint to output_dir atomically (temp name, then rename over any old copy)."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        checkpoint.to_directory(str(tmp))
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def plot_losses(log_history: list[dict], path: Path, title: str) -> str | None:
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def final_checkpoint(plan):
    """The run's exported model in storage if this run (same storage + run name) already finished, else None."""
    from ray.train import Checkpoint

    from . import storage

    path = storage.join(plan.storage_path, plan.run_name, FINAL_DIR)
    if not storage.exists(storage.join(path, "raytrain_align_run.json")):
        return None
    fs, inner = storage.filesystem(path)
    return Checkpoint(inner, filesystem=fs)


def summarize(plan, checkpoint) -> RunSummary:
    """Export the model from the run's final checkpoint and build the end-of-run summary."""
    if checkpoint is None:
        raise RuntimeError(f"run {plan.run_name} finished without a final checkpoint; see the worker logs above")
    materialize_checkpoint(checkpoint, plan.output_dir)
    run = json.loads((Path(plan.output_dir) / "raytrain_align_run.json").read_text())
    metrics, history = run["metrics"], run["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    tokens = int(metrics.get("num_tokens") or 0)
    seconds = float(metrics.get("train_runtime") or run["train_seconds"])
    plot = plot_losses(history, Path(plan.output_dir) / "loss.png", f"{plan.recipe} ({plan.run_name})")
    return RunSummary(
        recipe=plan.recipe,
        output_dir=plan.output_dir,
        run_dir=f"{plan.storage_path}/{plan.run_name}",
        checkpoints=[checkpoint.path],
        steps=int(metrics.get("step", 0)),
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        final_loss=losses[-1] if losses else None,
        world_size=int(run["world_size"]),
        facts=run["facts"],
        loss_plot=plot,
    )
