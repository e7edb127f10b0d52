"""The one place that launches Ray Train, and the Ray Data pipeline that feeds it.

:func:`train_on_rows` is every job's tail once its config and rows were checked on the driver:
start (or join) Ray, tokenize on Ray Data, add reference log-probs in one Ray Data pass, split
the rows deterministically into one shard per worker, train the job's task with
:func:`trainers.loop.train_loop` on a ``TorchTrainer`` (each worker one DeepSpeed engine), and
copy the export to ``job.out``.
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
from trainers.reference import ReferenceLogps

log = logging.getLogger(__name__)


@dataclass
class PreparedRows:
    shards: List[Any]  # one materialized Ray Dataset per worker
    rows_per_rank: int
    rows: int
    dropped_for_balance: int
    skipped_invalid: int
    pad_id: int


def prepare_rows(job, table, report, tokenize: Optional[type] = None, with_reference: bool = True) -> PreparedRows:
    """Tokenize validated rows (``tokenize``: a map_batches class, default causal-LM
    :class:`~trainers.data.Tokenize`) and, for preference losses, add reference log-probs -- on Ray
    Data; one shard per worker."""
    import ray
    import ray.data

    tok = load_tokenizer(job.model.name_or_path, job.model.trust_remote_code)
    t = job.train
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    blocks = max(1, min(report.kept // 64, 4 * t.workers))
    step = -(-table.num_rows // blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    # tokenizing is light: a quarter CPU leaves the cores to the reference model
    ds = ds.map_batches(tokenize or Tokenize,
                        fn_constructor_args=(job.model.name_or_path, job.data.max_prompt_length,
                                             job.data.max_response_length, job.model.trust_remote_code),
                        batch_size=256, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
    ref_kwargs: Dict[str, Any] = {"num_gpus": 1} if t.use_gpu else {"num_cpus": t.cpus_per_worker}
    if with_reference:
        ds = ds.map_batches(ReferenceLogps, fn_constructor_args=(job.model.name_or_path, tok.pad_token_id),
                            fn_constructor_kwargs={"micro_batch_size": t.ref_batch_size,
                                                   "threads": t.cpus_per_worker,
                                                   "trust_remote_code": job.model.trust_remote_code,
                                                   "device": "cuda" if t.use_gpu else "cpu"},
                            batch_size=t.ref_batch_size * 4,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=t.workers), **ref_kwargs)
    tic = time.perf_counter()
    ds = ds.materialize()
    log.info("tokenized %d rows%s in %.1fs", report.kept,
             " and computed their reference log-probs" if with_reference else "", time.perf_counter() - tic)
    shards = ds.split(t.workers, equal=True) if t.workers > 1 else [ds]
    rows_per_rank = shards[0].count()
    dropped = report.kept - rows_per_rank * t.workers
    if dropped:
        log.warning("dropped %d rows so that each of the %d workers gets %d", dropped, t.workers, rows_per_rank)
    return PreparedRows(shards, rows_per_rank, report.kept, dropped, report.skipped, tok.pad_token_id)


def train_on_rows(make_task: Callable[[Any], Any], job, table, report, metadata: Dict[str, Any], name: str,
                  address: Optional[str] = None, failure_marker: str = "", with_reference: bool = True,
                  tokenize: Optional[type] = None, unit: str = "pairs") -> Dict[str, Any]:
    """Start Ray, tokenize (+ reference log-probs), train ``make_task(job)`` on Ray Train, export to
    ``job.out``. ``metadata`` (the job's own ``moray.json`` entries) gains the run's: data, rows,
    epochs, ZeRO stage, workers, seed."""
    check_enough_rows(report.kept, job.train.workers)
    init_ray(address)
    prepared = prepare_rows(job, table, report, tokenize=tokenize, with_reference=with_reference)
    t = job.train
    metadata = {**metadata, "data": job.data.path, "pairs": prepared.rows, "epochs": t.epochs,
                "zero_stage": t.zero_stage, "workers": t.workers, "seed": t.seed}
    metrics = fit(make_task, job, prepared, metadata, name, failure_marker)
    what = ("a reward model" if metadata.get("kind") == "reward_model"
            else f"a {(metadata.get('method') or metadata.get('loss', '')).upper()} policy")
    log.info("trained %s for %r on %d %s in %.0fs; exported to %s", what, job.objective, prepared.rows, unit,
             metrics["seconds"], job.out)
    return metrics


def check_enough_rows(kept: int, workers: int) -> None:
    if kept < workers:
        raise ValueError(f"{kept} valid pairs cannot feed {workers} workers")


def fit(make_task: Callable[[Any], Any], job, prepared: PreparedRows, metadata: Dict[str, Any], name: str,
        failure_marker: str = "") -> Dict[str, Any]:
    """Run :func:`trainers.loop.train_loop` on a TorchTrainer; copy the export to ``job.out``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = job.train
    out = Path(job.out).resolve()
    storage = Path(t.storage_path or out / "ray_storage").resolve()
    run = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"make_task": make_task, "job": job, "rows_per_rank": prepared.rows_per_rank,
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
    tic = time.perf_counter()
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
    metrics.update(seconds=time.perf_counter() - tic, pairs=prepared.rows,
                   skipped_invalid=prepared.skipped_invalid, dropped_for_balance=prepared.dropped_for_balance)
    return metrics
