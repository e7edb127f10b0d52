"""The one place that launches Ray Train, and the Ray Data pipeline that feeds it.

:func:`train_on_rows` is every job's tail once its config and rows were checked on the driver:
start (or join) Ray, split the rows deterministically into one Ray Dataset per worker (each
worker tokenizes its own rows as it reads them), train the job's task with :func:`trainers.loop.train_loop` on a ``TorchTrainer`` (each
worker one DeepSpeed engine; reference log-probs are the workers' own first pass), and copy the
export to ``job.out``. The seconds each stage took are in the returned metrics (``timings``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import pyarrow as pa

from trainers.checkpoints import ExportTarget
from trainers.core import storage
from trainers.core.metadata import PolicyMetadata
from trainers.core.models import load_tokenizer
from trainers.core.runtime import init_ray, interactive
from trainers.data import CHUNK_ROWS, PreferenceDataError, StagedRows, Tokenize
from trainers.loop import LoopConfig, train_loop

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
    """One Ray Dataset of validated rows per worker: equal contiguous parts of the rows (the last
    rows that do not divide evenly are dropped). An in-memory table is sliced; staged rows
    (:class:`~trainers.data.StagedRows`) are split into one parquet file per worker, a chunk at a
    time, which Ray Data reads on the cluster. The workers tokenize their own rows as they read them."""
    import ray.data

    workers = job.train.workers
    per_rank = table.num_rows // workers
    if isinstance(table, StagedRows):
        shards = [ray.data.read_parquet(path) for path in split_staged(table, workers, per_rank)]
        for shard in shards:
            shard.context.execution_options.preserve_order = True
        shards = [shard.materialize() for shard in shards]
    else:
        shards = [ray.data.from_arrow(table.slice(r * per_rank, per_rank)) for r in range(workers)]
    for shard in shards:  # the training bar reports progress; Ray Data's own bars would be forwarded every batch
        shard.context.enable_progress_bars = shard.context.enable_operator_progress_bars = False
    dropped = report.kept - per_rank * workers
    if dropped:
        log.warning("dropped %d rows so that each of the %d workers gets %d", dropped, workers, per_rank)
    pad_id = load_tokenizer(job.model.name_or_path, job.model.trust_remote_code).pad_token_id
    return PreparedRows(shards, per_rank, report.kept, dropped, report.skipped, pad_id)


def split_staged(staged: StagedRows, workers: int, per_rank: int) -> List[str]:
    """``rank<r>.parquet`` beside the staged rows: rows ``[r·per_rank, (r+1)·per_rank)``, copied a
    record batch at a time."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(staged.path)
    parent = storage.parent(staged.path)
    outs = [storage.join(parent, f"rank{r}.parquet") for r in range(workers)]
    writers: List[Any] = [None] * workers
    start = 0
    with fs.open_input_file(path) as f:
        source = pq.ParquetFile(f)
        for batch in source.iter_batches(batch_size=CHUNK_ROWS):
            end = start + batch.num_rows
            for r in range(workers):
                lo, hi = max(start, r * per_rank), min(end, (r + 1) * per_rank)
                if lo < hi:
                    if writers[r] is None:
                        rfs, rpath = storage.filesystem(outs[r])
                        writers[r] = pq.ParquetWriter(rpath, source.schema_arrow, filesystem=rfs)
                    writers[r].write_batch(batch.slice(lo - start, hi - lo))
            start = end
    for w in writers:
        w.close()
    return outs


def staging_dir(job) -> str:
    """Where a job's rows go when they are too large for the driver's memory: under its storage."""
    return storage.join(run_locations(job)[1], f"staged-{job.objective}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def train_on_rows(make_task: Callable[[Any], Any], job, table, report, metadata: PolicyMetadata, name: str,
                  tokenize: Optional[type] = None, unit: str = "pairs") -> Dict[str, Any]:
    """Start Ray, shard the rows, train ``make_task(job)`` on Ray Train (the workers tokenize with
    ``tokenize``, a class like :class:`~trainers.data.Tokenize`, its default), export to
    ``job.out``, on the Ray cluster at ``job.address`` (empty: ``RAY_ADDRESS``, else an embedded
    one). ``metadata`` (the job's own ``moray.json`` entries) gains the run's: data, rows, epochs,
    ZeRO stage, workers, seed."""
    check_enough_rows(report.kept, job.train.workers)
    if tokenize is None:
        check_rendering(job, table)
    locations = run_locations(job)
    tic = time.perf_counter()
    init_ray(job.address or None)
    ray_start = time.perf_counter() - tic
    prepared = shard_rows(job, table, report)
    shard_s = time.perf_counter() - tic - ray_start
    t = job.train
    metadata = metadata.with_entries(data=job.data.path, pairs=prepared.rows, epochs=t.epochs,
                                     zero_stage=t.zero_stage, workers=t.workers, seed=t.seed)
    try:
        metrics = fit(make_task, job, prepared, metadata, name, locations, tokenize or Tokenize)
    finally:
        if isinstance(table, StagedRows):
            storage.remove_dir(storage.parent(table.path))
    metrics["timings"] = {"ray_start": ray_start, "shards": shard_s, "fit": metrics["seconds"]}
    log.info("trained %s for %r on %d %s in %.0fs; exported to %s", metadata.describe(), job.objective, prepared.rows, unit,
             metrics["seconds"], job.out)
    return metrics


def run_locations(job) -> Tuple[str, str]:
    """``(export location, Ray Train storage)``: local paths made absolute, URIs as given. The
    storage defaults to ``ray_storage`` beside the export, so the export holds the policy alone.
    An unknown URI scheme fails here, before any compute."""
    out = storage.absolute(job.out)
    where = storage.absolute(job.train.storage_path or storage.join(storage.parent(out), "ray_storage"))
    for location in (out, where):
        storage.filesystem(location)
    return out, where


def for_workers(job):
    """The job as its workers see it: a local model directory by its absolute path (the workers do
    not run in the driver's directory, and a relative path there would be taken for a hub name)."""
    path = job.model.name_or_path
    if os.path.isabs(path) or not os.path.isdir(path):
        return job
    return dataclasses.replace(job, model=dataclasses.replace(job.model, name_or_path=os.path.abspath(path)))


def check_rendering(job, table) -> None:
    """The workers' tokenization of the first row and the first chat row, on the driver before Ray
    starts: a tokenizer that cannot render the pairs (no chat template, a template that does not
    render the prompt as a prefix of the conversation) fails here, not in every worker."""
    if not isinstance(table, pa.Table) or table.num_rows == 0:
        return
    chat = table.column("is_chat").to_pylist()
    rows = sorted({0, chat.index(True) if True in chat else 0})
    m, d = job.model, job.data
    tokenize = Tokenize(m.name_or_path, d.max_prompt_length, d.max_response_length, m.trust_remote_code)
    for i in rows:
        try:
            tokenize({k: table.column(k).slice(i, 1).to_numpy(zero_copy_only=False) for k in table.column_names})
        except (ValueError, TypeError) as e:
            raise PreferenceDataError(f"{d.path}: valid row {i} (counting kept rows) cannot be tokenized with "
                                      f"{m.name_or_path}'s tokenizer: {e}") from None


def check_enough_rows(kept: int, workers: int) -> None:
    if kept < workers:
        raise ValueError(f"{kept} valid pairs cannot feed {workers} workers")


def fit(make_task: Callable[[Any], Any], job, prepared: PreparedRows, metadata: PolicyMetadata, name: str,
        locations: Tuple[str, str], tokenize: type = Tokenize) -> Dict[str, Any]:
    """Run :func:`trainers.loop.train_loop` on a TorchTrainer with Ray Train's storage at
    ``locations[1]``; rank 0 writes the export to ``locations[0]`` (both from :func:`run_locations`),
    or into the storage for this driver to copy when it runs on another node and the location is local."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    t = job.train
    out, storage_path = locations
    run = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": LoopConfig(
            make_task=make_task, job=for_workers(job), tokenize=tokenize, rows_per_rank=prepared.rows_per_rank,
            pad_id=prepared.pad_id, metadata=metadata, run=run, progress=interactive(),
            export=ExportTarget(out, storage.join(storage_path, run, "export"), ray.get_runtime_context().get_node_id()))},
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker},
                                               placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # Ray Train's per-report INFO lines drown the progress bar; its warnings still show
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets={f"rank{r}": shard for r, shard in enumerate(prepared.shards)},
        # options of our own: Train's defaults copy DataContext's exclude_resources, a deprecated setter
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    tic, started_at = time.perf_counter(), time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    written = metrics.pop("export_location", None)
    if written is None:
        raise RuntimeError("training finished without an exported policy")
    if written != out:  # rank 0 ran on another node than a local export location: one copy from storage
        fs, path = storage.filesystem(written)
        storage.copy_dir(fs, path, out)
        storage.remove_dir(written)
    metrics["export_copied"] = written != out
    if "entered_at" in metrics:  # controller, placement group, worker processes and their imports
        metrics["workers_start_seconds"] = metrics.pop("entered_at") - started_at
    metrics.update(seconds=time.perf_counter() - tic, pairs=prepared.rows,
                   skipped_invalid=prepared.skipped_invalid, dropped_for_balance=prepared.dropped_for_balance)
    return metrics
