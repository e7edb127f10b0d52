"""The training side's GPU smoke steps: each reaches a branch only a GPU takes and checks a number
against the CPU float64 reference (or a bound stated beside it), computed by the same helpers as the
CPU tests (tests/helpers.py).

``STEPS``: ``(name, min_gpus, fn)``; ``fn(out, base_model, gpus)`` runs on CUDA, returns a one-line
summary of the number it checked and raises AssertionError (with the numbers) when it is off.
``base_model``: a local causal LM (SmolLM2-135M-Instruct in the smoke run); steps that need an untied
head or LoRA factors above ZeRO-3's default persistence threshold build a tiny model under ``out``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.helpers import (HEAD_BOUND, BareEngine, bf16_head_errors, lora_zero3_worker, multi_batch,  # noqa: E402
                           multi_rows, packing_gap, response_columns, spawn_ranks, synthetic_pairs, write_jsonl)

PACKED_BOUND = 0.05   # nat per sequence: packed against padded, both in bf16 on the GPU
FLOAT64_BOUND = 0.5   # nat per sequence: bf16 on the GPU against float64 on the CPU (a 30-layer bf16 body)
LOGIT_BOUND = 0.05    # engine logits in bf16 against the export in float64, relative to the largest logit


def _tiny(out: Path, name: str = "tiny") -> str:
    from cluster.recipes.base_models import build_tiny_model
    from reward_models.prompts import tiny_corpus

    path = out / name
    return str(path) if path.exists() else build_tiny_model(str(path), tiny_corpus(400, seed=0))


def _probe_gap(export_dir: str, probe_logits: List[float]) -> Tuple[float, float]:
    """``(max |engine - export|, largest |logit|)`` at the fixed probe ids, the export in float64 on the CPU."""
    from trainers.checkpoints import probe_input_ids
    from trainers.core.models import load_causal_lm

    model = load_causal_lm(export_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        want = model(input_ids=probe_input_ids(model.config.vocab_size)).logits[0, -1].reshape(-1)[:16]
    got = torch.tensor(probe_logits, dtype=torch.float64)
    return float((got - want).abs().max()), float(want.abs().max())


def _check_probe(export_dir: str, metrics) -> str:
    gap, top = _probe_gap(export_dir, metrics["probe_logits"])
    assert gap <= LOGIT_BOUND * max(1.0, top), f"engine vs export logits {gap:.4f} > {LOGIT_BOUND} x {top:.1f}"
    return f"engine vs float64 export max |Δ logit| {gap:.4f} <= {LOGIT_BOUND * max(1.0, top):.3f}"


def flash_packing(out: Path, base_model: str, gpus: int) -> str:
    """flash_attention_2 with packing: the one-row layout against padded rows on the GPU, and against
    float64 on the CPU; the several-row layout (before) is reported beside them."""
    from trainers.batches import packs_one_row
    from trainers.core.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(base_model)
    cols = response_columns(tok, synthetic_pairs(8, seed=3), ["chosen", "rejected"])
    index = list(range(8))
    model = load_causal_lm(base_model, dtype=torch.bfloat16, attn_implementation="flash_attention_2").cuda().eval()
    packed = packing_gap(model, cols, tok.pad_token_id, index, packs_one_row("flash_attention_2"))
    rows = packing_gap(model, cols, tok.pad_token_id, index, one_row=False)
    from trainers.batches import pack_pairs, pair_logps, to_device

    batch = pack_pairs(cols, tok.pad_token_id, index, one_row=True)
    with torch.no_grad():
        gpu = torch.stack(pair_logps(model, to_device(batch, torch.device("cuda")))).double().cpu()
        ref = load_causal_lm(base_model, dtype=torch.bfloat16, attn_implementation="eager").double().eval()
        cpu = torch.stack(pair_logps(ref, batch))
    vs64 = float((gpu - cpu).abs().max())
    assert packed <= PACKED_BOUND and vs64 <= FLOAT64_BOUND, (
        f"packed vs padded {packed:.4f} (bound {PACKED_BOUND}), vs float64 {vs64:.4f} (bound {FLOAT64_BOUND})")
    return (f"packed vs padded max |Δ logp| {packed:.4f} <= {PACKED_BOUND}; vs CPU float64 {vs64:.3f} <= "
            f"{FLOAT64_BOUND}; rows layout (before) {rows:.3f}")


def bf16_logps(out: Path, base_model: str, gpus: int) -> str:
    """A bf16 model's sequence log-probs on the GPU against float64 on its own hidden states."""
    new, old = bf16_head_errors(base_model, "cuda", scale=1.0)
    assert new <= HEAD_BOUND, f"float32 head vs float64 {new:.2e} > {HEAD_BOUND} (bf16 head: {old:.3f})"
    return f"float32 head vs float64 max |Δ logp| {new:.1e} <= {HEAD_BOUND} (bf16 head, before: {old:.3f})"


def _dpo(out: Path, model: str, name: str, **train):
    from trainers.core.config import load_config
    from trainers.jobs.dpo import DPOJobConfig
    from trainers.jobs.dpo import run as run_dpo

    data = write_jsonl(out / f"{name}.jsonl", synthetic_pairs(16))
    overrides = {"objective": "sentiment", "out": str(out / name), "model.name_or_path": model, "data.path": data,
                 "train.use_gpu": True, "train.micro_batch_size": 2, "train.checkpoint_every": 0, "train.lr": 1e-5}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return run_dpo(load_config(DPOJobConfig, overrides=overrides))


def dpo_zero3(out: Path, base_model: str, gpus: int) -> str:
    """DPO under ZeRO-3 on 2 GPU workers (NCCL, world size 2): the engine against its export."""
    metrics = _dpo(out, base_model, "dpo_z3", workers=2, zero_stage=3)
    return _check_probe(str(out / "dpo_z3"), metrics)


def gapo_untied_zero3(out: Path, base_model: str, gpus: int) -> str:
    """Offline GAPO on an untied model under ZeRO-3 on 2 GPU workers (the gathered head's K gradients)."""
    from trainers.core.config import load_config
    from trainers.jobs.gapo import GAPOJobConfig
    from trainers.jobs.gapo import run as run_gapo

    data = write_jsonl(out / "gapo.jsonl", multi_rows(16))
    job = load_config(GAPOJobConfig, overrides={
        "objectives": ["sentiment", "conciseness"], "out": str(out / "gapo_z3"), "model.name_or_path": _tiny(out),
        "data.path": data, "train.use_gpu": True, "train.workers": 2, "train.zero_stage": 3,
        "train.micro_batch_size": 2, "train.checkpoint_every": 0, "train.lr": 1e-4})
    metrics = run_gapo(job)
    alpha = [v for k, v in metrics.items() if k.startswith("alpha/")]
    assert not alpha or abs(sum(alpha) - 1) < 1e-6, f"α {alpha} off the simplex"
    return _check_probe(str(out / "gapo_z3"), metrics)


def gapo_balance_all_memory(out: Path, base_model: str, gpus: int) -> str:
    """GAPO balance_params=all on full weights on one GPU: the memory one step takes above the model
    against the (K+1) x parameters x bytes estimate the config refuses above."""
    from trainers.core.models import load_causal_lm, load_tokenizer
    from trainers.jobs.gapo import GAPOJobConfig, GAPOTask

    cfg = GAPOJobConfig(objectives=["sentiment", "conciseness"], balance_params="all")
    cfg.model.name_or_path, cfg.train.bf16 = base_model, "true"
    estimate = cfg.balance_memory()
    tok = load_tokenizer(base_model)
    batch = multi_batch(tok, multi_rows(4), load_causal_lm(base_model).eval())
    model = load_causal_lm(base_model, dtype=torch.bfloat16).cuda()
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    GAPOTask(cfg).losses(BareEngine(model), batch)
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 1.25 * estimate, f"one step took {extra / 2**30:.2f} GiB above the model, estimate {estimate / 2**30:.2f}"
    return f"balance_params=all step {extra / 2**30:.2f} GiB <= 1.25 x estimate {estimate / 2**30:.2f} GiB"


def export_once(out: Path, base_model: str, gpus: int) -> str:
    """A GPU DPO export to a storage URI: rank 0 writes it once, straight there, and it matches the engine."""
    from trainers.core.config import load_config
    from trainers.jobs.dpo import DPOJobConfig
    from trainers.jobs.dpo import run as run_dpo

    data = write_jsonl(out / "export.jsonl", synthetic_pairs(8))
    job = load_config(DPOJobConfig, overrides={
        "objective": "sentiment", "out": f"file://{out}/export", "model.name_or_path": base_model, "data.path": data,
        "train.use_gpu": True, "train.micro_batch_size": 2, "train.checkpoint_every": 0, "model.export_shard_size": "100MB"})
    metrics = run_dpo(job)
    written, size = metrics.get("export_disk_write_bytes", 0), metrics["export_bytes"]
    assert not metrics["export_copied"] and written <= 1.05 * size + 20e6, (
        f"rank 0 wrote {written} bytes for a {size}-byte export (copied again: {metrics['export_copied']})")
    return f"export written {written / size:.2f}x its size, not copied; " + _check_probe(str(out / "export"), metrics)


def lora_zero3_persistence(out: Path, base_model: str, gpus: int) -> str:
    """2 GPU ranks under ZeRO-3 with LoRA factors above the default threshold: every factor
    persistent (DeepSpeed's ds_persist: kept whole after their first gather); the engine's logits (adapters start at zero) against the base model in float64."""
    from trainers.checkpoints import probe_input_ids
    from trainers.core.models import load_causal_lm

    model = _tiny(out)
    spawn_ranks(lora_zero3_worker, model, str(out / "lora.pt"), True)
    got = torch.load(out / "lora.pt", weights_only=True)
    lora = {n: v for n, v in got["state"].items() if "lora_" in n}
    split = [n for n, (persist, _, _) in lora.items() if not persist]
    assert lora and not split, f"{len(split)} of {len(lora)} LoRA factors partitioned: {split[:3]}"
    base = load_causal_lm(model, dtype=torch.float64).eval()
    with torch.no_grad():
        want = base(input_ids=probe_input_ids(base.config.vocab_size)).logits[0, -1].float()
    gap = float((got["logits"] - want).abs().max())
    assert gap <= LOGIT_BOUND * max(1.0, float(want.abs().max())), f"LoRA engine vs float64 base logits {gap:.4f}"
    return f"{len(lora)} LoRA factors persistent; logits vs float64 base max |Δ| {gap:.4f}"


STEPS: List[Tuple[str, int, Callable[[Path, str, int], str]]] = [
    ("flash attention with packing", 1, flash_packing),
    ("bf16 log-probs vs float64", 1, bf16_logps),
    ("GAPO balance_params=all memory", 1, gapo_balance_all_memory),
    ("export written once", 1, export_once),
    ("DPO ZeRO-3, 2 workers", 2, dpo_zero3),
    ("GAPO untied head, ZeRO-3, 2 workers", 2, gapo_untied_zero3),
    ("LoRA under ZeRO-3 persistence, 2 ranks", 2, lora_zero3_persistence),
]


if __name__ == "__main__":  # python bench/gpu_smoke_training.py OUT BASE_MODEL: every step this machine can run
    import tempfile

    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="moray-smoke-"))
    base = sys.argv[2] if len(sys.argv) > 2 else _tiny(out, "base")
    gpus = torch.cuda.device_count()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, need, fn in STEPS:
        if gpus < need:
            print(json.dumps({"step": name, "status": "skipped", "why": f"needs {need} GPUs, {gpus} here"}))
            continue
        step_out = out / fn.__name__
        step_out.mkdir(parents=True, exist_ok=True)
        try:
            print(json.dumps({"step": name, "status": "passed", "summary": fn(step_out, base, gpus)}))
        except AssertionError as e:
            print(json.dumps({"step": name, "status": "failed", "summary": str(e)}))
