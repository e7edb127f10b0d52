"""The one place that launches Ray Train jobs, and the Ray Data pipeline that feeds them.

``run_dpo(job)``: validate the config and the data (before any compute), tokenize on Ray Data,
add reference log-probs in one Ray Data pass, split the pairs deterministically into one shard
per worker, train on a ``TorchTrainer`` (each worker one DeepSpeed engine), and copy the
exported HF policy to ``job.out``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainers.config import DPOJobConfig, to_dict

log = logging.getLogger(__name__)


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) or start an embedded local Ray on loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # the Train controller polls workers at this interval; each report waits for a poll
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=True,
                 logging_level=logging.WARNING)


@dataclass
class PreparedPairs:
    shards: List[Any]  # one materialized Ray Dataset per worker
    rows_per_rank: int
    pairs: int
    dropped_for_balance: int
    skipped_invalid: int
    pad_id: int


def prepare_pairs(job: DPOJobConfig, table, report, tokenize: Optional[type] = None,
                  with_reference: bool = True) -> PreparedPairs:
    """Tokenize validated pairs (``tokenize``: a map_batches class, default causal-LM
    :class:`~trainers.data.Tokenize`) and, for preference losses, add reference log-probs -- on Ray
    Data; one shard per worker."""
    import ray
    import ray.data

    from trainers.data import Tokenize
    from trainers.models import load_tokenizer
    from trainers.reference import ReferenceLogps

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
        log.warning("dropped %d pairs so that each of the %d workers gets %d", dropped, t.workers, rows_per_rank)
    return PreparedPairs(shards, rows_per_rank, report.kept, dropped, report.skipped, tok.pad_token_id)


def run_dpo(job: DPOJobConfig, address: Optional[str] = None, run_name: Optional[str] = None,
            failure_marker: str = "") -> Dict[str, Any]:
    """Train one per-objective policy and export it to ``job.out``. Returns the final metrics."""
    from trainers.data import load_pairs

    job.validate()
    table, report = load_pairs(job.data, job.objective)  # fail fast: before Ray starts
    t = job.train
    metadata = {"kind": "policy", "objective": job.objective, "loss": t.loss}
    return train_on_rows("dpo", job, table, report, metadata, run_name or f"{t.loss}-{job.objective}",
                         address, failure_marker)


def train_on_rows(task: str, job, table, report, metadata: Dict[str, Any], name: str,
                  address: Optional[str] = None, failure_marker: str = "", with_reference: bool = True,
                  tokenize: Optional[type] = None) -> Dict[str, Any]:
    """The common tail of every policy job, after its config and data were checked on the driver:
    start Ray, tokenize (+ reference log-probs), train ``task`` on Ray Train, export to ``job.out``.
    ``metadata`` (the job's own ``moray.json`` entries) gains the entries every policy carries."""
    check_enough_pairs(report.kept, job.train.workers)
    init_ray(address)
    prepared = prepare_pairs(job, table, report, tokenize=tokenize, with_reference=with_reference)
    t = job.train
    metadata = {
        **metadata, "reference_model": job.model.name_or_path, "beta": t.beta, "data": job.data.path,
        "pairs": prepared.pairs, "epochs": t.epochs, "lora_merged": job.model.lora, "zero_stage": t.zero_stage,
        "workers": t.workers, "seed": t.seed,
    }
    metrics = fit(task, job, prepared, metadata, name, failure_marker)
    log.info("trained a %s policy for %r on %d %s in %.0fs; exported to %s", metadata.get("method", task).upper(),
             job.objective, prepared.pairs, "prompts" if task == "mopo" else "pairs", metrics["seconds"], job.out)
    return metrics


def check_enough_pairs(kept: int, workers: int) -> None:
    if kept < workers:
        raise ValueError(f"{kept} valid pairs cannot feed {workers} workers")


def fit(task: str, job, prepared: PreparedPairs, metadata: Dict[str, Any], name: str,
        failure_marker: str = "") -> Dict[str, Any]:
    """Run ``trainers.dpo.train_loop`` for ``task`` on a TorchTrainer; copy the export to ``job.out``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainers.dpo import train_loop

    t = job.train
    out = Path(job.out).resolve()
    storage = Path(t.storage_path or out / "ray_storage").resolve()
    run = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"task": task, "job": to_dict(job), "rows_per_rank": prepared.rows_per_rank,
                           "pad_id": prepared.pad_id, "metadata": metadata, "failure_marker": failure_marker, "run": run},
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
    metrics.update(seconds=time.perf_counter() - tic, pairs=prepared.pairs,
                   skipped_invalid=prepared.skipped_invalid, dropped_for_balance=prepared.dropped_for_balance)
    return metrics
