"""DPO throughput: Moray (Ray Train + DeepSpeed) against TRL's DPOTrainer at its best, measured in
one run.

Same model (a small random-weight Llama built here), same pairs in the same order, same batch
size, thread count, β and learning rate, one epoch each, fp32. TRL runs with its fastest
like-for-like settings that work on this machine: ``precompute_ref_log_probs=True`` (the
reference once, as Moray does), ``bf16=False`` and ``gradient_checkpointing=False`` (TRL 1.x
turns both on by default; on a CPU without bf16 matrix units they cost ~20x). ``padding_free``
is not used: TRL 1.16 falls back to padding with a warning, and it is FlashAttention-only;
``use_liger_kernel`` needs Triton on a GPU. Neither training-loop figure counts the reference
pass (TRL precomputes it in ``DPOTrainer()``, with the tokenization; Moray in its workers before
the first step); both end-to-end figures count everything.

Printed: pairs/s of the training loop and the end-to-end wall time of each, their ratios, where
Moray's end-to-end time goes before the first step, and model-FLOPs utilisation (6 x parameters
x real tokens per second, against this machine's fp32 matmul peak measured here with the same
threads).

    pip install -c constraints-cpu.txt -e ".[bench]"
    python bench/dpo_vs_trl.py [--pairs 1024] [--batch-size 8] [--threads 2] [--repeats 2] [--no-packing]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.recipes.base_models import build_tiny_model  # noqa: E402
from reward_models.prompts import FILLERS, NEGATIVE, POSITIVE, tiny_corpus  # noqa: E402

TRL_SETTINGS = dict(precompute_ref_log_probs=True, bf16=False, gradient_checkpointing=False)


def make_pairs(n: int, seed: int = 0):
    """Pairs shaped like real preference data: a prompt with 0-8 sentences of context before the
    request (a conversation so far, an instruction), responses of 1-12 sentences."""
    rng = random.Random(seed)

    def sentences(k, words):
        return " ".join(rng.choice(FILLERS + [f"It was {rng.choice(words)}."]) for _ in range(k))

    rows = []
    for i in range(n):
        context = sentences(rng.randint(0, 8), POSITIVE + NEGATIVE)
        chosen = rejected = ""
        while chosen == rejected:
            chosen = sentences(rng.randint(1, 12), POSITIVE)
            rejected = sentences(rng.randint(1, 12), NEGATIVE)
        rows.append({"prompt": f"{context} Write a short review, number {i}.".strip(),
                     "chosen": chosen, "rejected": rejected})
    return rows


def run_trl(model_dir: str, rows, args) -> dict:
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from trainers.core.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tic = time.perf_counter()
    tok = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                        learning_rate=args.lr, beta=0.1, max_length=1024, use_cpu=True, report_to=[],
                        logging_steps=10_000, save_strategy="no", seed=0, dataloader_num_workers=0,
                        lr_scheduler_type="cosine", warmup_steps=0, **TRL_SETTINGS)
        trainer = DPOTrainer(model=load_causal_lm(model_dir), args=cfg,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
        result = trainer.train()
    return {"train_seconds": result.metrics["train_runtime"], "end_to_end_seconds": time.perf_counter() - tic}


def run_moray(model_dir: str, data: str, out: str, args) -> dict:
    from trainers.core.config import load_config
    from trainers.jobs.dpo import DPOJobConfig, run as run_dpo

    tic = time.perf_counter()
    job = load_config(DPOJobConfig, overrides={
        "objective": "bench", "out": out, "model.name_or_path": model_dir, "data.path": data,
        "data.max_prompt_length": 1024, "data.max_response_length": 1024,
        "train.workers": 1, "train.cpus_per_worker": args.threads, "train.zero_stage": args.zero_stage,
        "train.micro_batch_size": args.batch_size, "train.lr": args.lr, "train.epochs": 1,
        "train.checkpoint_every": 0, "train.log_every": 10, "train.packing": args.packing})
    metrics = run_dpo(job)
    end_to_end = time.perf_counter() - tic
    timings = metrics["timings"]
    parts = {"ray start": timings["ray_start"], "validation and shards": timings["shards"],
             "worker processes": metrics["workers_start_seconds"],
             "model and DeepSpeed": metrics["setup_seconds"], "reference pass": metrics["reference_seconds"],
             "reports in the loop": metrics["report_seconds"], "export": metrics["export_seconds"]}
    parts["rest (Ray Train shutdown, copy)"] = end_to_end - sum(parts.values()) - metrics["train_seconds"] \
        + metrics["report_seconds"]
    return {"train_seconds": metrics["train_seconds"], "pairs": metrics["rows_trained"],
            "end_to_end_seconds": end_to_end, "fixed_costs": parts}


def matmul_peak(threads: int) -> float:
    """This machine's fp32 matmul GFLOP/s with ``threads`` threads (2048² x 2048², best of 5)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048 ** 3 / best / 1e9


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def model_flops_per_token(model_dir: str) -> float:
    """6 x the parameters a token's forward and backward multiply through (every weight but the
    input embedding lookup)."""
    from trainers.core.models import load_causal_lm

    model = load_causal_lm(model_dir)
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    params = sum(p.numel() for p in model.parameters()) - (0 if tied else embed.numel())
    return 6.0 * params


def real_tokens(model_dir: str, rows) -> int:
    """Prompt + response tokens of every chosen and rejected sequence (no padding)."""
    from trainers.core.models import load_tokenizer
    from trainers.data import tokenize_pair

    tok = load_tokenizer(model_dir)
    total = 0
    for r in rows:
        t = tokenize_pair(tok, r["prompt"], r["chosen"], r["rejected"], False, 1024, 1024)
        total += len(t["chosen_ids"]) + len(t["rejected_ids"])
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--zero-stage", type=int, default=0,
                   help="one worker has nothing to partition; 2 or 3 measure ZeRO's own overhead")
    p.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--no-packing", dest="packing", action="store_false", help="Moray with right-padded rows")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="moray-bench-"))
    model = build_tiny_model(str(work / "model"), tiny_corpus(2000, seed=0), vocab_size=2048,
                             hidden=args.hidden, layers=args.layers, heads=4, max_positions=2048)
    rows = make_pairs(args.pairs)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    peak = matmul_peak(args.threads)
    flops_per_pair = model_flops_per_token(model) * real_tokens(model, rows) / args.pairs

    # alternate the two, best of --repeats each: this machine's timings drift between runs
    moray_runs, trl_runs = [], []
    for r in range(args.repeats):
        moray_runs.append(run_moray(model, str(data), str(work / f"policy{r}"), args))
        trl_runs.append(run_trl(model, rows, args))
    print("runs (train seconds): moray", [round(m["train_seconds"], 1) for m in moray_runs],
          "trl", [round(m["train_seconds"], 1) for m in trl_runs])
    print("runs (end-to-end seconds): moray", [round(m["end_to_end_seconds"], 1) for m in moray_runs],
          "trl", [round(m["end_to_end_seconds"], 1) for m in trl_runs])
    moray = min(moray_runs, key=lambda m: m["train_seconds"])
    trl = min(trl_runs, key=lambda m: m["train_seconds"])
    moray_e2e = min(m["end_to_end_seconds"] for m in moray_runs)
    trl_e2e = min(m["end_to_end_seconds"] for m in trl_runs)
    moray_rate = args.pairs / moray["train_seconds"]
    trl_rate = args.pairs / trl["train_seconds"]
    mfu = lambda rate: rate * flops_per_pair / 1e9 / peak  # noqa: E731
    print(f"\nDPO, {args.pairs} pairs, batch {args.batch_size}, {args.threads} threads, Llama {args.layers}x{args.hidden}, "
          f"one epoch, fp32, Moray ZeRO-{args.zero_stage} {'packed' if args.packing else 'padded'}, best of {args.repeats}; "
          f"TRL {TRL_SETTINGS}")
    print(f"matmul peak here: {peak:.1f} GFLOP/s; model FLOPs per pair {flops_per_pair / 1e9:.3f} GFLOP")
    print(f"{'':<8} {'train pairs/s':>14} {'end-to-end s':>13} {'MFU':>6}")
    print(f"{'moray':<8} {moray_rate:>14.1f} {moray_e2e:>13.1f} {mfu(moray_rate):>6.0%}")
    print(f"{'trl':<8} {trl_rate:>14.1f} {trl_e2e:>13.1f} {mfu(trl_rate):>6.0%}")
    print(f"ratio moray/trl, training pairs/s: {moray_rate / trl_rate:.2f}x; end-to-end time trl/moray: "
          f"{trl_e2e / moray_e2e:.2f}x")
    print("Moray's end-to-end time outside the training loop (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in moray["fixed_costs"].items()))


if __name__ == "__main__":
    main()
