"""A training worker's host memory while it loads its policy: in the training dtype (bf16 when
training in bf16, what the tasks do now, :func:`trainers.deepspeed_setup.load_placement`) against
fp32 (what ZeRO 0-2 workers loaded before DeepSpeed cast to bf16), measured in one run.

A random-weight Llama of about 127M parameters (hidden 1024, 12 layers), written in fp32 and then
in bf16 (as most hub checkpoints are), is loaded by ``build_policy`` in a fresh process per path and cast to bf16 as
DeepSpeed casts it; each process resets its peak resident memory (Linux ``clear_refs``) after its
imports and reports the peak above that level, per parameter. On a GPU
under ZeRO 0-2 the policy also goes straight onto the GPU (``device_map``), which this CPU run cannot show.

    python bench/load_memory.py [--hidden 1024] [--layers 12]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.recipes.base_models import build_tiny_model  # noqa: E402
from reward_models.prompts import tiny_corpus  # noqa: E402

LOAD = """
import sys, torch
from trainers.checkpoints import peak_rss, reset_peak_rss
from trainers.deepspeed_setup import load_placement
from trainers.job_config import ModelConfig, TrainConfig
from trainers.task import build_policy
torch.set_num_threads(1)
dtype, device = load_placement(TrainConfig(bf16=sys.argv[2], zero_stage=2))
before = reset_peak_rss()
model = build_policy(ModelConfig(name_or_path=sys.argv[1]), dtype, device)
model.to(torch.bfloat16)  # what DeepSpeed's bf16 does to every parameter before its fp32 masters
print(peak_rss() - before, sum(p.numel() for p in model.parameters()), model.dtype)
"""


def measure(model: str, bf16: str) -> tuple:
    out = subprocess.run([sys.executable, "-c", LOAD, model, bf16], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    peak, params, dtype = out.stdout.split()[-3:]
    return int(peak), int(params), dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moray-load-") as tmp:
        model = build_tiny_model(f"{tmp}/model", tiny_corpus(400, seed=0), vocab_size=512, hidden=args.hidden,
                                 layers=args.layers, heads=8)
        rows = []
        for stored in ("float32", "bfloat16"):  # hub checkpoints of 1B-70B models are mostly bf16
            if stored == "bfloat16":
                from transformers import AutoModelForCausalLM

                AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(model)
            rows += [(stored, "fp32 load (before)", *measure(model, "false")),
                     (stored, "bf16 load (now)", *measure(model, "true"))]
    print(f"{'checkpoint':<12}{'policy load, then cast to bf16':<32}{'peak above start (MB)':>24}{'bytes / parameter':>19}")
    for stored, name, peak, params, _ in rows:
        print(f"{stored:<12}{name:<32}{peak / 1e6:>24.0f}{peak / params:>19.2f}")
    for i in (0, 2):
        print(f"ratio fp32 / bf16 load, {rows[i][0]} checkpoint (peak host memory per parameter): "
              f"{rows[i][2] / rows[i + 1][2]:.2f}x")

if __name__ == "__main__":
    main()
