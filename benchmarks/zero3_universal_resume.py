"""Does a ZeRO-3 resume through DeepSpeed's universal checkpoint continue exactly? A minimal reproduction.

Without Ray, the Trainer or TRL: a tiny Llama, torch AdamW with the Trainer's two parameter groups (decay /
no decay), gradient clipping, fp32, gloo on CPU. WORLD ranks train STEPS steps, save, and go on (the
uninterrupted run); then the same checkpoint is loaded into fresh engines at the same world size, once the
ordinary way and once through `ds_to_universal` + `checkpoint.load_universal`, and each trains the same
steps. Without and then with `raytrain_align.elastic.repair_universal_load` after the universal load: the loss
differences against the uninterrupted run, and which optimizer-state entries differ after the load. Writes
benchmarks/results/zero3_universal_resume-<date>.{json,md}:

    python -m benchmarks.zero3_universal_resume [--world 2] [--weight-decay 0.1] [--no-results]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import torch
import torch.multiprocessing as mp

SAVED_AT, MORE = 3, 6


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _engine(world: int, weight_decay: float, universal: bool = False):
    import deepspeed

    model = _model(0)
    decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
              "gradient_clipping": 0.2, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "checkpoint": {"load_universal": universal}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 64, (2, 16), generator=g)
    return ids


def _train(engine, first: int, last: int, rank: int) -> list[float]:
    import torch.distributed as dist

    losses = []
    for step in range(first, last + 1):
        ids = _batch(step, rank)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return losses


def _state(engine) -> dict:
    """Per sub-group: optimizer hyperparameters and state sums, as the engine holds them after a load."""
    opt = engine.optimizer
    out = {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.optimizer.param_groups]}
    for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
        st = opt.optimizer.state.get(flat, {})
        out[f"sub_group_{i}"] = {k: (float(v.detach().double().sum()) if torch.is_tensor(v) else v) for k, v in st.items()}
        out[f"sub_group_{i}"]["fp32"] = float(flat.detach().double().sum())
    return out


def _worker(rank: int, world: int, port: int, root: str, weight_decay: float, fix: bool, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    ckpt = os.path.join(root, "ckpt")
    engine = _engine(world, weight_decay)
    _train(engine, 1, SAVED_AT, rank)
    engine.save_checkpoint(ckpt, tag="saved")
    saved_groups = json.loads(json.dumps(_state(engine)["param_groups"]))  # as the position file carries them
    ref = _train(engine, SAVED_AT + 1, SAVED_AT + MORE, rank)

    plain = _engine(world, weight_decay)
    plain.load_checkpoint(ckpt, tag="saved")
    plain_state = _state(plain)
    plain_losses = _train(plain, SAVED_AT + 1, SAVED_AT + MORE, rank)

    if rank == 0:
        from deepspeed.checkpoint import ds_to_universal

        args = Namespace(input_folder=os.path.join(ckpt, "saved"), output_folder=os.path.join(ckpt, "saved_universal"),
                         num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                         inject_missing_state=False)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
    dist.barrier()
    uni = _engine(world, weight_decay, universal=True)
    uni.load_checkpoint(ckpt, tag="saved_universal")
    if fix:
        from raytrain_align import elastic

        repaired = elastic.repair_universal_load(uni.optimizer, saved_groups)
        if rank == 0:
            print(f"repaired: {'; '.join(repaired)}", flush=True)
    uni_state = _state(uni)
    uni_losses = _train(uni, SAVED_AT + 1, SAVED_AT + MORE, rank)
    if rank == 0:
        differs = {k: (plain_state[k], uni_state[k]) for k in plain_state if plain_state[k] != uni_state.get(k)}
        q.put({"reference": ref, "plain_load": plain_losses, "universal_load": uni_losses, "state_differs": differs})
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, weight_decay: float, fix: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_worker, args=(world, port, root, weight_decay, fix, q), nprocs=world)
        r = q.get()
    for name in ("plain_load", "universal_load"):
        r[f"{name}_max_diff"] = max(abs(a - b) for a, b in zip(r[name], r["reference"]))
    return r


def main(argv=None) -> int:
    import datetime
    import platform
    import warnings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--no-results", action="store_true", help="print only; write no results file")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = []
    for fix in (False, True):
        r = _run(args.world, args.weight_decay, fix)
        rows.append({"repaired": fix, **r})
        print(f"repairs {'on ' if fix else 'off'}: plain load {r['plain_load_max_diff']:.2e}, universal load "
              f"{r['universal_load_max_diff']:.2e} (max |loss - uninterrupted| over {MORE} steps)")
        for key, (plain, universal) in r["state_differs"].items():
            print(f"  after the universal load, {key}: {universal} (plain load: {plain})")
    if args.no_results:
        return 0
    date = datetime.date.today().isoformat()
    meta = {"command": "python -m benchmarks.zero3_universal_resume " + " ".join(argv or sys.argv[1:]), "date": date,
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "torch": torch.__version__,
            "deepspeed": __import__("deepspeed").__version__, "world": args.world, "weight_decay": args.weight_decay}
    out = Path(__file__).resolve().parent / "results"
    (out / f"zero3_universal_resume-{date}.json").write_text(json.dumps({**meta, "runs": rows}, indent=2, default=str))
    md = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, torch {meta['torch']}, deepspeed "
          f"{meta['deepspeed']}  ", f"Date: {date}", "",
          f"ZeRO-3, world {args.world}, fp32 on CPU, AdamW with a decay ({args.weight_decay}) and a no-decay group; "
          f"saved after {SAVED_AT} steps, {MORE} steps after the load, same world size.", "",
          "| elastic.repair_universal_load | max loss diff, ordinary load | max loss diff, universal load |",
          "|---|---|---|"]
    md += [f"| {'on' if r['repaired'] else 'off'} | {r['plain_load_max_diff']:.2e} | {r['universal_load_max_diff']:.2e} |"
           for r in rows]
    (out / f"zero3_universal_resume-{date}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
