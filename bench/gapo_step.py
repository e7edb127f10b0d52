"""GAPO (K = 2) step time against a DPO step on the same model and the same batches, one process.

The model is the DPO benchmark's small Llama (4 layers x 256, vocabulary 2,048); batches of
``--batch-size`` pairs shaped like real preference data, each with a second objective's label
(random orientation). A step is forward + loss + backward + AdamW step; GAPO adds its per-objective
head gradients (``balance_params=head``), or a second forward with ``--balance all``. The
DeepSpeed engine is replaced by the bare module (``tests.helpers.BareEngine``): the figure is the
algorithm's own overhead. Alternating, best of ``--repeats``.

    python bench/gapo_step.py [--batch-size 8] [--steps 20] [--threads 2] [--balance head|all]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.dpo_vs_trl import make_pairs  # noqa: E402
from cluster.recipes.base_models import build_tiny_model  # noqa: E402
from reward_models.prompts import tiny_corpus  # noqa: E402
from tests.helpers import BareEngine, preference_batch  # noqa: E402
from trainers.core.models import load_causal_lm, load_tokenizer  # noqa: E402
from trainers.jobs.dpo import DPOJobConfig, DPOTask  # noqa: E402
from trainers.jobs.gapo import GAPOJobConfig, GAPOTask  # noqa: E402


def batches(tok, ref, n_batches, batch_size):
    rows = make_pairs(n_batches * batch_size, seed=1)
    out = []
    g = torch.Generator().manual_seed(0)
    for b in range(n_batches):
        batch = preference_batch(tok, rows[b * batch_size:(b + 1) * batch_size], ref, max_length=256)
        batch["sign_conciseness"] = torch.randint(0, 2, (batch_size,), generator=g).double() * 2 - 1
        out.append(batch)
    return out


def timed(task, model, data, lr=1e-5) -> float:
    engine = BareEngine(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    tic = time.perf_counter()
    for batch in data:
        losses, _ = task.losses(engine, batch)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        opt.step()
    return (time.perf_counter() - tic) / len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--balance", choices=["head", "all"], default="head")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(str(Path(tmp) / "model"), tiny_corpus(2000, seed=0), vocab_size=2048,
                                hidden=256, layers=4, heads=4, max_positions=1024)
        tok = load_tokenizer(path)
        data = batches(tok, load_causal_lm(path).eval(), args.steps, args.batch_size)
        dpo = DPOTask(DPOJobConfig())
        gapo = GAPOTask(GAPOJobConfig(objectives=["sentiment", "conciseness"], balance_params=args.balance))
        best = {"dpo": float("inf"), "gapo": float("inf")}
        for _ in range(args.repeats):
            for name, task in (("dpo", dpo), ("gapo", gapo)):
                torch.manual_seed(0)
                best[name] = min(best[name], timed(task, load_causal_lm(path), data))
    print(f"model 4x256 Llama, batch {args.batch_size} pairs, {args.steps} steps, {args.threads} threads, "
          f"best of {args.repeats}")
    print(f"DPO step  {best['dpo'] * 1000:8.1f} ms")
    print(f"GAPO step {best['gapo'] * 1000:8.1f} ms  (K=2, balance_params={args.balance})")
    print(f"GAPO / DPO step time: {best['gapo'] / best['dpo']:.3f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
