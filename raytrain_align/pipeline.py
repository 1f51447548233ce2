"""`python -m raytrain_align pipeline sft_mid sft_multi_task dpo_apo_zero`: the handbook's stages as one command.

Each stage is an ordinary run (the same plan, preparation, training and export as `python -m raytrain_align
STAGE`) whose `model_name_or_path` is the previous stage's exported model. All plans are built and checked
before the first stage trains, so a typo in stage 3 fails in seconds, not hours. Stage names are derived
from the chain (stage 1 keeps the recipe's own run name), so re-running the command skips every stage that
already finished in the same storage and continues an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import RecipeError
from .plan import Plan


@dataclass
class StageResult:
    plan: Plan
    skipped: bool
    summary: object  # export.RunSummary


def chain_plans(stages: list[str], build: Callable[[str, dict, str | None], Plan], output_base: str | None) -> list[Plan]:
    """One plan per stage. `build(recipe, extra_overrides, output_dir)` makes a stage's plan the way the CLI
    makes a single run's; later stages get the previous export as their model and a run name/output that
    says which chain they continue."""
    if not stages:
        raise RecipeError("pipeline needs at least one recipe, e.g. `pipeline sft_mid sft_multi_task dpo_apo_zero`")
    plans: list[Plan] = []
    for i, stage in enumerate(stages):
        extra: dict = {}
        out = None
        if plans:
            after = hashlib.sha1(plans[-1].run_name.encode()).hexdigest()[:6]  # that name encodes its own chain
            own = build(stage, {}, None)  # the stage's own names, to derive the chained ones from
            extra = {"model_name_or_path": plans[-1].output_dir,
                     "run_name": f"{own.run_name.removesuffix('-tiny')}-after-{after}"}
            out = f"{own.output_dir}-after-{after}"
        plan = build(stage, extra, out)
        if output_base:
            plan = build(stage, extra, str(Path(output_base).expanduser().resolve() / plan.run_name))
        if any(p.run_name == plan.run_name for p in plans):
            raise RecipeError(f"stage {i + 1} ({stage}) has the same run name as an earlier stage; give each stage its own recipe")
        plans.append(plan)
    return plans


def run(plans: list[Plan], log=print) -> list[StageResult]:
    from . import export, launch
    from .plan import describe

    results = []
    for i, plan in enumerate(plans, 1):
        done = export.final_checkpoint(plan) is not None
        log(f"\n══ stage {i}/{len(plans)}: {plan.recipe} ({plan.run_name}) "
            + ("already finished in this storage: skipped" if done else f"from {plan.model['model_name_or_path']}"))
        if not done:
            log(describe(plan))
        results.append(StageResult(plan, done, launch.run(plan)))
    return results


def render(results: list[StageResult]) -> str:
    lines = ["", f"── pipeline done ({len(results)} stages) " + "─" * 40]
    for i, r in enumerate(results, 1):
        s = r.summary
        loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "n/a"
        how = "skipped (already done)" if r.skipped else f"trained in {s.seconds:,.0f}s"
        lines.append(f"  {i}. {r.plan.recipe:<16} {how:<24} {s.steps:>6} steps  {s.tokens:>12,} tokens  loss {loss}")
        lines.append(f"     model {s.output_dir}")
    lines.append(f"  final model  {results[-1].summary.output_dir}")
    return "\n".join(lines)
