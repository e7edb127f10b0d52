"""The per-worker training loop (runs inside a Ray Train worker) for preference losses (DPO/IPO,
:class:`DPOTask`; GAPO, WRPO, MOPO in their own modules) and Bradley–Terry reward models
(``reward_models.learned.RewardTask``): a task
builds the model, turns a micro-batch of pairs into per-pair losses and scores, and exports.

Each worker reads its own shard (``get_dataset_shard(f"rank{r}")``, split deterministically on
the driver) with ``iter_torch_batches``; a window of ``bucket_batches`` batches is grouped by
length before being cut into micro-batches. Reference log-probs arrive with the rows (computed
once, :mod:`trainers.reference`). The data position is the count of micro-batches done, which
with the seeded order makes a resumed run see exactly the pairs an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from cluster.metrics import TrainingMetrics
from trainers.config import DPOJobConfig, from_dict
from trainers.export import PolicyTask
from trainers.logps import length_buckets, pad_pairs, pair_logps
from trainers.losses import get_loss

STATE_FILE = "trainer_state.json"
DS_TAG = "deepspeed"
METRIC_KEYS = ("loss", "reward_margin", "accuracy", "chosen_reward", "rejected_reward")


def schedule(rows_per_rank: int, micro_batch_size: int, grad_accum: int, epochs: int) -> Dict[str, int]:
    """Counts every rank agrees on: micro-batches per epoch and in all, optimizer steps."""
    per_epoch = math.ceil(rows_per_rank / micro_batch_size)
    total_micro = per_epoch * epochs
    return {"micro_per_epoch": per_epoch, "total_micro": total_micro,
            "total_steps": math.ceil(total_micro / grad_accum)}


def epoch_batches(shard, epoch: int, cfg, pad_id: int, pad=pad_pairs):
    """Yield the padded micro-batches of one epoch, in a deterministic, seeded order (``pad``: rows
    -> tensors, the task's ``collate`` where it has one)."""
    t = cfg.train
    window = t.micro_batch_size * t.bucket_batches

    def collate(rows: Dict[str, np.ndarray]) -> List[Dict[str, torch.Tensor]]:
        seed = (t.seed, epoch, int(rows["idx"][0]))
        return [pad(rows, pad_id, index) for index in length_buckets(rows, t.micro_batch_size, seed, t.shuffle)]

    kwargs: Dict[str, Any] = {}
    if t.shuffle:
        kwargs = {"local_shuffle_buffer_size": window, "local_shuffle_seed": t.seed * 100_003 + epoch}
    for batches in shard.iter_torch_batches(batch_size=window, collate_fn=collate, prefetch_batches=1, **kwargs):
        yield from batches


def _resume_state() -> Dict[str, Any]:
    """The trainer state of the run Ray Train restores (``{}`` on a fresh start): micro-batches
    done, step, and the task's own state (e.g. MOPO's multipliers)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {}
    with ckpt.as_directory() as d:
        return json.loads((Path(d) / STATE_FILE).read_text())


def _load_engine_state(engine) -> None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            # our own run's checkpoint in our storage path: DeepSpeed's torch.load of it is trusted
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)


class _Ahead:
    """Pull a generator's first item on a background thread, so that Ray Data's start-up for the
    shard overlaps with model loading and DeepSpeed set-up."""

    def __init__(self, gen):
        self.gen, self.first, self.error = gen, [], None
        self.thread = threading.Thread(target=self._pull, daemon=True)
        self.thread.start()

    def _pull(self) -> None:
        try:
            self.first.append(next(self.gen))
        except StopIteration:
            pass
        except BaseException as e:  # re-raised on the training thread
            self.error = e

    def __iter__(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        yield from self.first
        yield from self.gen


def _report(metrics: Dict[str, Any], engine, rank: int, save: bool, state: Dict[str, Any]) -> None:
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False)
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{state['step']:07d}")


def _quiet_report_logs() -> None:
    """Ray Train logs every report (with its whole metrics dict) at INFO under a logger named by
    its file path, outside the 'ray.train' hierarchy that LoggingConfig sets; the progress bar
    already says it."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _maybe_fail(cfg, step: int, rank: int, world: int, marker: str) -> None:
    """Fault injection for recovery tests: one worker process dies, once."""
    if cfg.train.fail_at_step != step or rank != min(1, world - 1) or not marker or os.path.exists(marker):
        return
    Path(marker).write_text(f"worker {rank} killed at step {step}\n")
    os._exit(1)


class DPOTask(PolicyTask):
    """What the loop needs to train a per-objective policy with a preference loss."""

    def __init__(self, cfg: DPOJobConfig):
        self.cfg, self.loss_fn, self.name = cfg, get_loss(cfg.train.loss), cfg.train.loss

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        """``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))`` for one micro-batch."""
        pc, pr = pair_logps(engine, batch)
        return self.loss_fn(pc, pr, batch["ref_chosen_logps"].to(pc.dtype),
                            batch["ref_rejected_logps"].to(pc.dtype), self.cfg.train.beta)


def load_task(name: str, job: Dict[str, Any]):
    """A task by name. Besides ``cfg``, ``name``, ``build()``, ``losses(engine, batch)`` and
    ``export(...)``, a task may define ``start_step(step, total_steps)`` (before each optimizer
    step's first micro-batch), ``end_step() -> metrics`` (after each optimizer step), and
    ``state()`` / ``load_state(d)`` (JSON saved with every checkpoint and restored on resume)."""
    if name == "dpo":
        return DPOTask(from_dict(DPOJobConfig, job))
    if name == "gapo":
        from trainers.gapo import GAPOJobConfig, GAPOTask

        cfg = from_dict(GAPOJobConfig, job)
        if cfg.online:
            from trainers.gapo_online import OnlineGAPOTask

            return OnlineGAPOTask(cfg)
        return GAPOTask(cfg)
    if name == "wrpo":
        from trainers.wrpo import WRPOJobConfig, WRPOTask

        return WRPOTask(from_dict(WRPOJobConfig, job))
    if name == "mopo":
        from trainers.mopo_job import MOPOJobConfig, MOPOTask

        return MOPOTask(from_dict(MOPOJobConfig, job))
    if name == "reward":
        from reward_models.learned import RewardTask, RewardJobConfig

        return RewardTask(from_dict(RewardJobConfig, job))
    raise ValueError(f"unknown training task {name!r}")


def train_loop(loop_config: Dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: ``task`` (dpo | gapo | reward), ``job`` (its config as a
    dict), ``rows_per_rank``, ``pad_id``, ``metadata``, ``failure_marker``."""
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    from trainers.engine import build_engine, gathered_state_dict

    _quiet_report_logs()
    task = load_task(loop_config.get("task", "dpo"), loop_config["job"])
    cfg = task.cfg
    t = cfg.train
    torch.set_num_threads(t.cpus_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = t.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(t.seed)

    sched = schedule(loop_config["rows_per_rank"], t.micro_batch_size, t.grad_accum, t.epochs)
    resumed = _resume_state()
    done = int(resumed.get("micro_batches_done", 0))
    if resumed.get("task") and hasattr(task, "load_state"):
        task.load_state(resumed["task"])
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    first_epoch = done // sched["micro_per_epoch"]
    pad = getattr(task, "collate", pad_pairs)
    ahead = _Ahead(epoch_batches(shard, first_epoch, cfg, loop_config["pad_id"], pad))
    engine = build_engine(task.build(), t, sched["total_steps"], on_gpu)
    _load_engine_state(engine)

    bar = tqdm(total=sched["total_steps"], desc=f"{task.name} {cfg.objective}") if rank == 0 else None
    published = _Publisher(loop_config.get("run", task.name), task.name, cfg.objective) if rank == 0 else None
    step = math.ceil(done / t.grad_accum)
    if bar is not None:
        bar.update(step)
    sums = torch.zeros(len(METRIC_KEYS) + 2, dtype=torch.float64)  # + pairs, tokens
    tic = time.perf_counter()
    micro = done
    history: List[Dict[str, Any]] = []
    metrics: Dict[str, Any] = {}
    loop_start, pairs_trained = time.perf_counter(), 0
    for epoch in range(first_epoch, t.epochs):
        skip = micro - epoch * sched["micro_per_epoch"]
        batches = ahead if epoch == first_epoch else epoch_batches(shard, epoch, cfg, loop_config["pad_id"], pad)
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            boundary = (micro + 1) % t.grad_accum == 0 or micro + 1 == sched["total_micro"]
            if micro % t.grad_accum == 0 and hasattr(task, "start_step"):  # e.g. WRPO's α schedule
                task.start_step(step, sched["total_steps"])
            engine.set_gradient_accumulation_boundary(boundary)
            batch = {k: v.to(device) for k, v in batch.items()}
            losses, cr, rr = task.losses(engine, batch)
            engine.backward(losses.mean())
            micro += 1
            pairs_trained += len(cr)
            sums += torch.tensor([losses.detach().sum().item(), (cr - rr).sum().item(), (cr > rr).sum().item(),
                                  cr.sum().item(), rr.sum().item(), float(len(cr)),
                                  float(batch["attention_mask"].sum().item())], dtype=torch.float64)
            if not boundary:
                continue
            engine.step()
            step += 1
            _maybe_fail(cfg, step, rank, world, loop_config.get("failure_marker", ""))
            now = time.perf_counter()
            metrics = _reduce_metrics(sums, now - tic, world, device)
            metrics.update(step=step, epoch=epoch, lr=engine.get_lr()[0])
            if hasattr(task, "end_step"):  # e.g. GAPO's α, MOPO's dual step on λ
                metrics.update(task.end_step())
            history.append(metrics)
            if published is not None:
                published.record(metrics)
            sums.zero_()
            tic = now
            last = micro == sched["total_micro"]
            save = not last and t.checkpoint_every > 0 and step % t.checkpoint_every == 0
            if save or last or step % t.log_every == 0:
                # one report per window: Ray Train's report is a barrier polled every few hundred ms
                _report({**metrics, "history": history}, engine, rank, save,
                        {"micro_batches_done": micro, "step": step, "epoch": epoch,
                         "task": task.state() if hasattr(task, "state") else {}})
                history = []
            if bar is not None:
                bar.set_description(f"{task.name} {cfg.objective} loss={metrics['loss']:.4f} "
                                    f"acc={metrics['accuracy']:.2f} {metrics['pairs_per_s']:.1f} pairs/s")
                bar.update(1)
    if bar is not None:
        bar.close()

    # this attempt's training-loop throughput (all ranks' pairs; rank 0's clock)
    metrics["train_seconds"] = time.perf_counter() - loop_start
    metrics["pairs_trained"] = pairs_trained * world
    metrics["probe_logits"] = _probe_logits(engine, device)
    state = gathered_state_dict(engine, rank)
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            task.export(state, tmp, loop_config["metadata"])
        ray.train.report({**metrics, "step": step, "exported": True},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                         checkpoint_dir_name="final")


class _Publisher:
    """Rank 0's per-step metrics to the Ray dashboard and Prometheus (:mod:`cluster.metrics`); a
    metrics failure is logged once and never stops training."""

    def __init__(self, run: str, method: str, objective: str):
        self.metrics = None
        self._guard(lambda: setattr(self, "metrics", TrainingMetrics(run, method, objective)))

    def record(self, metrics: Dict[str, Any]) -> None:
        if self.metrics is not None:
            self._guard(lambda: self.metrics.record(metrics))

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # the exporter is best effort
            logging.getLogger(__name__).warning("metrics not published (%s); training goes on", e)
            self.metrics = None


def _reduce_metrics(sums: torch.Tensor, seconds: float, world: int, device: torch.device) -> Dict[str, float]:
    """Sum the per-rank sums over all ranks; means per pair, throughput for the whole group."""
    import torch.distributed as dist

    total = sums.to(device)
    if world > 1:
        dist.all_reduce(total)
    total = total.cpu()
    pairs = max(total[-2].item(), 1.0)
    out = {k: total[i].item() / pairs for i, k in enumerate(METRIC_KEYS)}
    out["step_pairs"] = total[-2].item()
    out["pairs_per_s"] = total[-2].item() / max(seconds, 1e-9)
    out["tokens_per_s"] = total[-1].item() / max(seconds, 1e-9)
    return out


@torch.no_grad()
def _probe_logits(engine, device: torch.device) -> List[float]:
    """Last-position logits of the trained engine on fixed token ids (every rank runs it: under
    ZeRO-3 the forward gathers parameters). Tests compare them with the exported checkpoint."""
    ids = probe_input_ids(engine.module.config.vocab_size).to(device)
    was_training = engine.module.training
    engine.module.eval()
    logits = engine.module(input_ids=ids).logits[0, -1].reshape(-1)[:16].float().cpu()
    engine.module.train(was_training)
    return logits.tolist()


def probe_input_ids(vocab: int) -> torch.Tensor:
    return (torch.arange(1, 17) * 7919 % vocab).unsqueeze(0)
