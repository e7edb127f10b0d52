"""Rank 0's memory while exporting: Moray's streamed, sharded export against holding the whole
model and saving it with ``save_pretrained`` (what a gathered state dict costs), measured in one run.

A random-weight Llama of about 127M parameters (hidden 1024, 12 layers; 508 MB in fp32) trains one
step of DPO on 2 Ray Train workers under ZeRO-2 and ZeRO-3, then exports with 100 MB shards. Rank
0 resets its peak resident memory (Linux ``clear_refs``) before the export; the job reports the
peak above the level it started from. The peer: a fresh process loads the same model with
``from_pretrained`` and writes it with ``save_pretrained(max_shard_size=...)``, measured the same way.
Then the bytes rank 0 wrote to its disk for the export (``/proc/self/io``), against the export's size.

    python bench/export_memory.py [--hidden 1024] [--layers 12] [--shard-size 100MB]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dpo_vs_trl import make_pairs  # noqa: E402
from cluster.recipes.base_models import build_tiny_model  # noqa: E402
from reward_models.prompts import tiny_corpus  # noqa: E402

PEER = """
import sys, torch
from transformers import AutoModelForCausalLM
from trainers.checkpoints import peak_rss, reset_peak_rss
torch.set_num_threads(1)
before = reset_peak_rss()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model.save_pretrained(sys.argv[2], max_shard_size=sys.argv[3])
print(peak_rss() - before)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shard-size", default="100MB")
    args = ap.parse_args()

    import json

    from trainers.core.config import load_config
    from trainers.core.runtime import init_ray
    from trainers.jobs.dpo import DPOJobConfig
    from trainers.jobs.dpo import run as run_dpo

    with tempfile.TemporaryDirectory(prefix="moray-export-") as tmp:
        model = build_tiny_model(f"{tmp}/model", tiny_corpus(400, seed=0), vocab_size=512, hidden=args.hidden,
                                 layers=args.layers, heads=8)
        data = Path(tmp, "pairs.jsonl")
        data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(8)))
        init_ray(num_cpus=2)
        rows, writes = [], []
        for stage in (2, 3):
            job = load_config(DPOJobConfig, overrides={
                "objective": "sentiment", "out": f"{tmp}/z{stage}", "model.name_or_path": model, "data.path": str(data),
                "model.export_shard_size": args.shard_size, "train.workers": 2, "train.zero_stage": stage,
                "train.micro_batch_size": 2, "train.epochs": 1, "train.checkpoint_every": 0,
                "data.max_prompt_length": 32, "data.max_response_length": 32})
            m = run_dpo(job)
            rows.append((f"moray ZeRO-{stage}, streamed", m["export_peak_extra_bytes"], m["export_bytes"]))
            writes.append((stage, m["export_disk_write_bytes"], m["export_bytes"], m["export_copied"]))
        peer = subprocess.run([sys.executable, "-c", PEER, model, f"{tmp}/peer", args.shard_size], check=True,
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        size = rows[0][2]
        rows.append(("whole model + save_pretrained", int(peer.stdout.split()[-1]), size))
        print(f"{'export':<32}{'peak above start (MB)':>24}{'model (MB)':>12}{'peak / model':>14}")
        for name, peak, nbytes in rows:
            print(f"{name:<32}{peak / 1e6:>24.0f}{nbytes / 1e6:>12.0f}{peak / nbytes:>14.2f}")
        best = max(r[1] for r in rows[:2])
        print(f"ratio peer / moray (peak memory above start, the larger of ZeRO-2 and ZeRO-3): {rows[2][1] / best:.1f}x")
        # the export used to be written three times: rank 0's /tmp, Ray Train's storage, the driver's copy
        for stage, written, nbytes, copied in writes:
            print(f"ZeRO-{stage}: rank 0 wrote {written / 1e6:.0f} MB to its disk for a {nbytes / 1e6:.0f} MB export "
                  f"({written / nbytes:.2f}x; before: 3 writes, 3.00x){'; the driver copied it once' if copied else ''}")


if __name__ == "__main__":
    main()
