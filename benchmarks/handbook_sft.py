"""The plain path: the alignment-handbook's `scripts/sft.py`, reduced to what a packed SFT run does, launched
with `accelerate launch --config_file recipes/accelerate_configs/zero3.yaml benchmarks/handbook_sft.py RECIPE.yaml`
(`benchmarks/handbook_dpo.py` and `handbook_orpo.py` run the same steps with DPOTrainer and ORPOTrainer, like the
handbook's `scripts/dpo.py` and `scripts/orpo.py`).

Same steps as the handbook: tokenizer with the recipe's chat_template, model from_pretrained (under
zero.Init with ZeRO-3, `use_cache=False` when gradient checkpointing), the dataset mixture (local JSON
files: per entry columns, seeded shuffle, `int(len x weight)` rows, concatenated and shuffled), and TRL's
SFTTrainer, which tokenizes and packs on its own (dataset_num_proc processes, rank 0 first). The
recipe's `ray:` section is ignored. The only additions are measurement: the same StepTimer callback the
Ray workers use, and a JSON of its stats written by rank 0 to $BENCH_RESULT; with $BENCH_PROFILE set, rank 0's
torch.profiler tables of one optimizer step (the second) are written to that file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

T_START = time.time()


def profile_callback(path: str, at_step: int = 1):
    """torch.profiler over optimizer step at_step+1: where a step's time goes, by op (GPU self time and CPU).
    Writing the tables takes seconds and lands in the next step's time, so both must be warm-up steps."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == at_step and state.is_world_process_zero:
                acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * torch.cuda.is_available()
                self.prof = torch.profiler.profile(activities=acts, record_shapes=False)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                ka = self.prof.key_averages()
                with open(path, "w") as f:
                    f.write(ka.table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=35) + "\n")
                    f.write(ka.table(sort_by="cpu_time_total", row_limit=35) + "\n")
                self.prof = None

    return Profile()


def main(path: str, method: str = "sft") -> None:
    import datasets
    import torch
    import trl
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import ModelConfig

    # DPO: no ref_model, so TRL loads the reference from the same path (under zero.Init with ZeRO-3)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config_cls, trainer_cls = ORPOConfig, ORPOTrainer
    else:
        config_cls, trainer_cls = (trl.SFTConfig, trl.SFTTrainer) if method == "sft" else (trl.DPOConfig, trl.DPOTrainer)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from raytrain_align.attention import register
    from raytrain_align.trainer_callbacks import timing_callback

    register()  # lets a recipe name attn_implementation: sdpa_varlen here too
    raw = yaml.safe_load(open(path))
    raw.pop("ray", None)
    mixture = raw.pop("dataset_mixture")
    chat_template = raw.pop("chat_template", None)
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(config_cls)}
    model_args = {k: v for k, v in raw.items() if k in model_keys}
    train_args = {k: v for k, v in raw.items() if k in train_keys}
    if os.environ.get("BENCH_CPU"):  # CPU smoke test of this script only
        train_args.update(use_cpu=True, bf16=False)
    args = config_cls(**train_args)

    tok = AutoTokenizer.from_pretrained(model_args["model_name_or_path"])
    if chat_template:
        tok.chat_template = chat_template
    if method == "orpo" and tok.pad_token is None:  # scripts/orpo.py
        tok.pad_token = tok.eos_token
    dtype = model_args.get("dtype")
    model = AutoModelForCausalLM.from_pretrained(
        model_args["model_name_or_path"],
        attn_implementation=model_args.get("attn_implementation"),
        dtype=getattr(torch, dtype) if dtype not in (None, "auto") else dtype,
        use_cache=not args.gradient_checkpointing,
    )
    milestones = {"process_start": T_START, "model_loaded": time.time()}

    parts = []
    seed = mixture.get("seed", 0)
    for entry in mixture["datasets"]:
        ds = datasets.load_dataset("json", data_files=entry["id"], split="train")
        if entry.get("columns"):
            ds = ds.select_columns(entry["columns"])
        ds = ds.shuffle(seed=seed)
        ds = ds.select(range(int(len(ds) * entry.get("weight", 1.0))))
        parts.append(ds)
    train = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    if method == "orpo" and "messages" in train.column_names:  # scripts/orpo.py
        train = train.remove_columns("messages")

    timer = timing_callback()
    callbacks = [timer] + ([profile_callback(os.environ["BENCH_PROFILE"])] if os.environ.get("BENCH_PROFILE") else [])
    trainer = trainer_cls(model=model, args=args, train_dataset=train, processing_class=tok, callbacks=callbacks)
    milestones["trainer_built"] = time.time()  # TRL tokenized and packed the data inside
    t0 = time.time()
    try:
        trainer.train()
        if trainer.is_world_process_zero() and os.environ.get("BENCH_RESULT"):
            out = {"timing": {**timer.stats, "milestones_unix": milestones}, "log_history": trainer.state.log_history, "train_seconds": time.time() - t0,
                   "process_start_unix": T_START, "world_size": trainer.args.world_size}
            with open(os.environ["BENCH_RESULT"], "w") as f:
                json.dump(out, f, indent=2, default=str)
    finally:
        # Tear the process group down before the interpreter does: left to exit, a rank's live communicator
        # threads can abort the process ("terminate called without an active exception") after training succeeded.
        trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
