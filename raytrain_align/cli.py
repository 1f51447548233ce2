"""`python -m raytrain_align RECIPE | plan RECIPE | prepare RECIPE | recipes` — a thin entry point.

Handbook-style `--key value` flags after the recipe (e.g. `--gradient_accumulation_steps 16`) are
recipe overrides, like `--set key=value`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import RecipeError

COMMANDS = ("plan", "prepare", "recipes", "train", "pipeline")


def _parser(prog: str, stages: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train alignment-handbook recipes on a Ray cluster.")
    if stages:
        p.add_argument("recipes", nargs="+", help="recipes to run in order, each from the previous one's model")
    else:
        p.add_argument("recipe", help="registered recipe name (see `recipes`) or path to a recipe YAML")
    p.add_argument("--tiny", action="store_true", help="embedded default: tiny model + synthetic data, 2 CPU workers")
    p.add_argument("--cpu", action="store_true", help="the recipe's own model and data on CPU workers over gloo "
                   "(2 on one node unless --nodes/--gpus-per-node say otherwise)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--nodes", help="number of nodes, or MIN:MAX for an elastic run (default: recipe ray.nodes)")
    p.add_argument("--num-workers", help="Ray workers (GPUs), or MIN:MAX for an elastic run; the global batch is kept "
                                         "at every size (default: nodes x gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, help="workers per node (default: recipe ray.gpus_per_node)")
    p.add_argument("--storage", help="Ray Train storage path: local dir, NFS or s3:// (default ~/ray_results)")
    p.add_argument("--output-dir", help="where the final Hugging Face model goes (default: recipe output_dir)")
    p.add_argument("--accelerate-config", "--config_file", dest="accelerate_config",
                   help="accelerate config file (recipes/accelerate_configs/zero3.yaml, fsdp.yaml, ddp.yaml)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts allowed before the run fails")
    p.add_argument("--json", action="store_true", help="(plan, prepare) print the result as JSON")
    return p


def _handbook_overrides(extra: list[str]) -> list[str]:
    """`--gradient_accumulation_steps 16` / `--packing` -> ['gradient_accumulation_steps=16', 'packing=true']."""
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise RecipeError(f"unexpected argument '{tok}'; recipe overrides look like --key value or --set key=value")
        key = tok[2:]
        if "=" in key:
            out.append(key)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{key}={extra[i + 1]}")
            i += 2
        else:
            out.append(f"{key}=true")
            i += 1
    return out


def _load(args, extra, recipe_name: str | None = None, stage_overrides: dict | None = None, output_dir: str | None = None,
          quiet: bool = False):
    from .plan import build_plan
    from .recipe import load_recipe, parse_set

    overrides = {**parse_set(args.sets + _handbook_overrides(extra)), **(stage_overrides or {})}
    recipe = load_recipe(recipe_name or args.recipe, overrides, args.accelerate_config)
    for w in [] if quiet else recipe.warnings:
        print(w, file=sys.stderr)
    return build_plan(
        recipe, tiny=args.tiny, nodes=args.nodes, gpus_per_node=args.gpus_per_node, storage=args.storage,
        output_dir=output_dir or args.output_dir, max_failures=args.max_failures, num_workers=args.num_workers, explicit=frozenset(overrides),
        cpu=args.cpu,
    )


def _pipeline(argv: list[str], prog: str) -> int:
    from . import pipeline

    args, extra = _parser(f"{prog} pipeline", stages=True).parse_known_args(argv)
    shown: set[str] = set()

    def build(name, stage_overrides, output_dir):
        plan = _load(args, extra, name, stage_overrides, output_dir, quiet=name in shown)  # warnings once per recipe
        shown.add(name)
        return plan

    plans = pipeline.chain_plans(args.recipes, build, output_base=args.output_dir)
    results = pipeline.run(plans)
    print(pipeline.render(results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m raytrain_align"
    try:
        if not argv or argv[0] in ("-h", "--help"):
            _parser(prog).print_help()
            print("\ncommands: RECIPE (train) | plan RECIPE | prepare RECIPE | pipeline RECIPE [RECIPE ...] | recipes")
            return 0
        if argv[0] == "recipes":
            from .recipe import RECIPES, recipes_root

            for name, (rel, method) in RECIPES.items():
                print(f"{name:16s} {method.upper():4s} {recipes_root() / rel}")
            return 0
        if argv[0] == "pipeline":
            return _pipeline(argv[1:], prog)
        command = "train"
        if argv[0] in ("plan", "prepare", "train"):
            command, argv = argv[0], argv[1:]
        args, extra = _parser(f"{prog} {command}").parse_known_args(argv)
        plan = _load(args, extra)
        if command == "plan":
            from .plan import describe

            print(plan.to_json() if args.json else describe(plan))
            return 0
        if command == "prepare":
            from . import launch, prepare, tiny

            launch.check_storage(plan, output=False)  # prepare exports nothing
            launch.init_ray()
            if plan.tiny:
                tiny.materialize(tiny.assets_dir(plan.storage_path), plan.recipe_model)
            p = prepare.prepare(plan, log=(lambda _: None) if args.json else print)
            if args.json:
                from dataclasses import asdict

                print(json.dumps(asdict(p), indent=2))
            else:
                print(p.render(), flush=True)
            return 0
        from . import launch
        from .plan import describe

        print(describe(plan), flush=True)
        summary = launch.run(plan)
        print(summary.render(), flush=True)
        return 0
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last committed checkpoint in storage stays valid; rerun the same command to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
