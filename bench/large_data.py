"""The driver's memory validating and starting a job on a large preference file: rows staged to
parquet as they are validated (``data.in_memory_mb``, the default) against the same rows held in
the driver's memory, measured in one run.

Writes a jsonl file of at least ``--gb`` GB, then in a fresh process per mode: validates it
(:func:`trainers.data.load_pairs`), starts Ray and builds the two workers' Ray Datasets
(:func:`trainers.launch.shard_rows`) -- everything a job does on the driver before Ray Train
starts. Printed: the file's size, each mode's peak resident memory above the process's level after
its imports, and the time it took.

    python bench/large_data.py [--gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import json, os, sys, time
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
from trainers.checkpoints import peak_rss, reset_peak_rss
from trainers.core.config import load_config
from trainers.core.runtime import init_ray
from trainers.data import load_pairs
from trainers.jobs.dpo import DPOJobConfig
from trainers.launch import shard_rows, staging_dir
import ray.data, pyarrow, pyarrow.parquet  # noqa: F401  (imports are not the data's memory)

data, model, out, in_memory_mb = sys.argv[1:5]
job = load_config(DPOJobConfig, overrides={"objective": "s", "out": out, "model.name_or_path": model,
                                           "data.path": data, "data.in_memory_mb": int(in_memory_mb),
                                           "train.workers": 2}).validate()
before, tic = reset_peak_rss(), time.perf_counter()
table, report = load_pairs(job.data, job.objective, stage=staging_dir(job))
validated, validate_peak = time.perf_counter() - tic, peak_rss() - before
init_ray(num_cpus=2)
prepared = shard_rows(job, table, report)
print(json.dumps({"peak": peak_rss() - before, "validate_peak": validate_peak, "rows": report.kept,
                  "validate_s": validated,
                  "total_s": time.perf_counter() - tic}))
"""


def write_file(path: Path, gb: float) -> int:
    rng = random.Random(0)
    words = "the a movie book song park coffee was great awful lovely boring and then it very not".split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    paragraphs = [text(rng.randint(40, 120)) for _ in range(512)]
    with open(path, "w") as f:
        i = 0
        while f.tell() < gb * 1e9:
            f.write(json.dumps({"prompt": f"{paragraphs[i % 512]} Review number {i}.",
                                "chosen": paragraphs[(i * 7 + 1) % 512] + " great.",
                                "rejected": paragraphs[(i * 13 + 2) % 512] + " awful."}) + "\n")
            i += 1
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from cluster.recipes.base_models import build_tiny_model
    from reward_models.prompts import tiny_corpus

    with tempfile.TemporaryDirectory(prefix="moray-large-") as tmp:
        model = build_tiny_model(f"{tmp}/model", tiny_corpus(200, seed=0))
        size = write_file(Path(tmp, "pairs.jsonl"), args.gb)
        print(f"file: {size / 1e9:.2f} GB")
        results = {}
        for name, limit in (("staged (default)", 64), ("in memory", 10**6)):
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            done = subprocess.run([sys.executable, "-c", DRIVER, f"{tmp}/pairs.jsonl", model, f"{tmp}/out-{limit}",
                                   str(limit)], capture_output=True, text=True, env=env, cwd=ROOT)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{'driver':<18}{'rows':>8}{'peak GB: validating':>21}{'+ Ray and shards':>18}{'peak / file':>13}"
              f"{'validate s':>12}{'total s':>9}")
        for name, r in results.items():
            print(f"{name:<18}{r['rows']:>8}{r['validate_peak'] / 1e9:>21.2f}{r['peak'] / 1e9:>18.2f}"
                  f"{r['peak'] / size:>13.2f}{r['validate_s']:>12.0f}{r['total_s']:>9.0f}")
        staged, held = results["staged (default)"], results["in memory"]
        print(f"ratio in-memory / staged (driver's peak memory): {held['peak'] / staged['peak']:.1f}x")


if __name__ == "__main__":
    main()
