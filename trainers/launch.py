"""The one place that launches Ray Train, and the Ray Data pipeline that feeds it.

:func:`train_on_rows` is every job's tail once its config and rows were checked on the driver:
start (or join) Ray, split the rows deterministically into one Ray Dataset per worker (each
worker tokenizes its own rows as it reads them), train the job's task with :func:`trainers.loop.train_loop` on a ``TorchTrainer`` (each
worker one DeepSpeed engine; reference log-probs are the workers' own first pass), and copy the
export to ``job.out``. The seconds each stage took are in the returned metrics (``timings``).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from trainers.core.models import load_tokenizer
from trainers.core.runtime import init_ray
from trainers.data import Tokenize
from trainers.loop import train_loop

log = logging.getLogger(__name__)


@dataclass
class PreparedRows:
    shards: List[Any]  # one materialized Ray Dataset per worker
    rows_per_rank: int
    rows: int
    dropped_for_balance: int
    skipped_invalid: int
    pad_id: int


def shard_rows(job, table, report) -> PreparedRows:
    """One Ray Dataset of validated rows per worker: equal contiguous parts of the table (the last
    rows that do not divide evenly are dropped). The workers tokenize their own rows as they read
    them, so nothing runs here and no data stage starts before training."""
    import ray.data

    workers = job.train.workers
    per_rank = table.num_rows // workers
    shards = [ray.data.from_arrow(table.slice(r * per_rank, per_rank)) for r in range(workers)]
    for shard in shards:  # the training bar reports progress; Ray Data's own bars would be forwarded every batch
        shard.context.enable_progress_bars = shard.context.enable_operator_progress_bars = False
    dropped = report.kept - per_rank * workers
    if dropped:
        log.warning("dropped %d rows so that each of the %d workers gets %d", dropped, workers, per_rank)
    pad_id = load_tokenizer(job.model.name_or_path, job.model.trust_remote_code).pad_token_id
    return PreparedRows(shards, per_rank, report.kept, dropped, report.skipped, pad_id)


def train_on_rows(make_task: Callable[[Any], Any], job, table, report, metadata: Dict[str, Any], name: str,
                  address: Optional[str] = None, failure_marker: str = "", tokenize: Optional[type] = None,
                  unit: str = "pairs") -> Dict[str, Any]:
    """Start Ray, shard the rows, train ``make_task(job)`` on Ray Train (the workers tokenize with
    ``tokenize``, a class like :class:`~trainers.data.Tokenize`, its default), export to
    ``job.out``. ``metadata`` (the job's own ``moray.json`` entries) gains the run's: data, rows,
    epochs, ZeRO stage, workers, seed."""
    check_enough_rows(report.kept, job.train.workers)
    tic = time.perf_counter()
    init_ray(address)
    ray_start = time.perf_counter() - tic
    prepared = shard_rows(job, table, report)
    shard_s = time.perf_counter() - tic - ray_start
    t = job.train
    metadata = {**metadata, "data": job.data.path, "pairs": prepared.rows, "epochs": t.epochs,
                "zero_stage": t.zero_stage, "workers": t.workers, "seed": t.seed}
    metrics = fit(make_task, job, prepared, metadata, name, failure_marker, tokenize or Tokenize)
    metrics["timings"] = {"ray_start": ray_start, "shards": shard_s, "fit": metrics["seconds"]}
    what = ("a reward model" if metadata.get("kind") == "reward_model"
            else f"a {(metadata.get('method') or metadata.get('loss', '')).upper()} policy")
    log.info("trained %s for %r on %d %s in %.0fs; exported to %s", what, job.objective, prepared.rows, unit,
             metrics["seconds"], job.out)
    return metrics


def check_enough_rows(kept: int, workers: int) -> None:
    if kept < workers:
        raise ValueError(f"{kept} valid pairs cannot feed {workers} workers")


def fit(make_task: Callable[[Any], Any], job, prepared: PreparedRows, metadata: Dict[str, Any], name: str,
        failure_marker: str = "", tokenize: type = Tokenize) -> Dict[str, Any]:
    """Run :func:`trainers.loop.train_loop` on a TorchTrainer; copy the export to ``job.out``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = job.train
    out = Path(job.out).resolve()
    storage = Path(t.storage_path or out / "ray_storage").resolve()
    run = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"make_task": make_task, "job": job, "tokenize": tokenize,
                           "rows_per_rank": prepared.rows_per_rank,
                           "pad_id": prepared.pad_id, "metadata": metadata, "failure_marker": failure_marker,
                           "run": run},
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # Ray Train's per-report INFO lines drown the progress bar; its warnings still show
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets={f"rank{r}": shard for r, shard in enumerate(prepared.shards)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    tic, started_at = time.perf_counter(), time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without an exported policy")
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for f in Path(d).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
            elif f.is_dir():  # a LoRA policy's adapter/
                shutil.copytree(f, out / f.name, dirs_exist_ok=True)
    metrics = dict(result.metrics or {})
    if "entered_at" in metrics:  # controller, placement group, worker processes and their imports
        metrics["workers_start_seconds"] = metrics.pop("entered_at") - started_at
    metrics.update(seconds=time.perf_counter() - tic, pairs=prepared.rows,
                   skipped_invalid=prepared.skipped_invalid, dropped_for_balance=prepared.dropped_for_balance)
    return metrics
