"""The training loop, run by every Ray Train worker. It knows no method: a task
(:class:`trainers.task.Task`) builds the model, turns a micro-batch into per-row losses and
statistics, and exports the result; the loop feeds it, steps the DeepSpeed engine, checkpoints,
reports, and exports at the end.

Each worker reads its own shard (``get_dataset_shard(f"rank{r}")``, split deterministically on the
driver); a window of ``bucket_batches`` batches is grouped by length before being cut into
micro-batches. Before the first step, a task that trains against a reference gets its rows'
reference log-probs from one pass of the untrained policy (:mod:`trainers.reference`). The data position is the count of micro-batches done, which with the seeded order
makes a resumed run see exactly the rows an uninterrupted run would. Losses and statistics stay
on the device and are read once per optimizer step (one all-reduce, one copy to the host).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import numpy as np
import torch

from trainers.batches import length_buckets, to_device
from trainers.checkpoints import (ExportTarget, export_final, load_engine_state, quiet_report_logs, report,
                                  resume_state)
from trainers.core.metadata import PolicyMetadata
from trainers.core.runtime import quiet_ray_data
from trainers.deepspeed_setup import build_engine, worker_device
from trainers.reference import ReferenceTable
from trainers.training_metrics import TrainingMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker's :func:`train_loop` (through Ray Train's
    ``train_loop_config``, as ``{"loop": LoopConfig(...)}``)."""

    make_task: Callable[[Any], Any]  # the job's config -> its task
    job: Any  # the job's config, as the workers see it
    tokenize: type  # rows of text -> token ids, e.g. trainers.data.Tokenize
    rows_per_rank: int  # the rows of each rank's shard (every rank the same)
    pad_id: int
    metadata: PolicyMetadata  # the export's moray.json
    export: ExportTarget  # where rank 0 writes the export
    run: str  # the run's name (its metrics are published under it)
    progress: bool = True  # draw a progress bar: the driver is on a terminal


def train_loop(config: Dict[str, Any]) -> None:
    """Ray Train entry point: ``config["loop"]`` is the :class:`LoopConfig`."""
    loop: LoopConfig = config["loop"]
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    entered, entered_at = time.perf_counter(), time.time()  # entered_at: the driver's clock, for worker start-up
    quiet_report_logs()
    quiet_ray_data(progress=False)  # the training bar is the progress; Ray Data's would be forwarded per batch
    # DeepSpeed's ZeRO all-gathers call torch's deprecated name: nothing a user can act on, twice per worker
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    task = loop.make_task(loop.job)
    t = task.cfg.train
    torch.set_num_threads(t.cpus_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(t.use_gpu)
    torch.manual_seed(t.seed)

    sched = Schedule.of(loop.rows_per_rank, t.micro_batch_size, t.grad_accum, t.epochs)
    resumed, reference = resume_state(rank)
    micro = int(resumed.get("micro_batches_done", 0))
    task.load_state(resumed.get("task") or {})
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    m, d = task.cfg.model, task.cfg.data
    tokenize = loop.tokenize(m.name_or_path, d.max_prompt_length, d.max_response_length, m.trust_remote_code)
    batches_of = lambda epoch: epoch_batches(shard, epoch, t, loop.pad_id, tokenize, task.collate)  # noqa: E731
    first_epoch = micro // sched.micro_per_epoch
    ahead = Ahead(batches_of(0 if task.needs_reference and reference is None else first_epoch))
    engine = build_engine(task.build, t, sched.total_steps, device.type == "cuda")  # Ray Data starts while the model loads
    load_engine_state(engine)
    engine.train()  # from_pretrained leaves a model in eval mode: dropout (train.keep_dropout) needs train mode
    built = time.perf_counter()
    if task.needs_reference and reference is None:  # before the first step, the policy is the reference
        reference = ReferenceTable.compute(engine.module, ahead, device)
        ahead = batches_of(first_epoch)
    timings = {"setup_seconds": built - entered, "reference_seconds": time.perf_counter() - built,
               "report_seconds": 0.0, "entered_at": entered_at}

    step = math.ceil(micro / t.grad_accum)
    if rank == 0 and micro:
        log.warning("resuming from the checkpoint at optimizer step %d of %d", step, sched.total_steps)
    drawn = rank == 0 and loop.progress
    bar = tqdm(total=sched.total_steps, desc=f"{task.name} {task.cfg.objective}") if drawn else None
    if bar is not None:
        bar.update(step)
    published = TrainingMetrics(loop.run, task.name, task.cfg.objective) if rank == 0 else None
    sums = StepSums(device)
    history: List[Dict[str, Any]] = []
    metrics: Dict[str, Any] = {}
    loop_start = tic = time.perf_counter()
    rows_trained = 0
    for epoch in range(first_epoch, t.epochs):
        skip = micro - epoch * sched.micro_per_epoch
        for i, batch in enumerate(ahead if epoch == first_epoch else batches_of(epoch)):
            if i < skip:
                continue
            if micro % t.grad_accum == 0:
                task.start_step(step, sched.total_steps)
            boundary = (micro + 1) % t.grad_accum == 0 or micro + 1 == sched.total_micro
            engine.set_gradient_accumulation_boundary(boundary)
            batch = to_device(reference.attach(batch) if reference is not None else batch, device)
            losses, stats = task.losses(engine, batch)
            engine.backward(losses.mean())
            sums.add(losses, stats, batch["attention_mask"])
            rows_trained += losses.numel()
            micro += 1
            if not boundary:
                continue

            engine.step()
            step += 1
            now = time.perf_counter()
            metrics = sums.reduce(now - tic, world)
            metrics.update(step=step, epoch=epoch, lr=engine.get_lr()[0], **task.end_step())
            tic = now
            history.append(metrics)
            if published is not None:
                published.record(metrics)
            last = micro == sched.total_micro
            save = not last and t.checkpoint_every > 0 and step % t.checkpoint_every == 0
            if save or last or step % t.log_every == 0:
                # one report per window: Ray Train's report is a barrier polled every few hundred ms
                sent = time.perf_counter()
                report({**metrics, "history": history}, engine, rank, save,
                       {"micro_batches_done": micro, "step": step, "epoch": epoch, "task": task.state()}, reference)
                timings["report_seconds"] += time.perf_counter() - sent
                history = []
            if bar is not None:
                bar.set_description(f"{task.name} {task.cfg.objective} loss={metrics['loss']:.4f} "
                                    f"{metrics['rows_per_s']:.1f} rows/s")
                bar.update(1)
    if bar is not None:
        bar.close()

    # this attempt's training-loop throughput (all ranks' rows; rank 0's clock)
    metrics.update(train_seconds=time.perf_counter() - loop_start, rows_trained=rows_trained * world, step=step,
                   **timings)
    if published is not None:
        published.close(metrics)  # its gauges leave the endpoint; the last values stay in Ray's KV store
    export_final(task, engine, rank, loop.metadata, metrics, loop.export)


@dataclass(frozen=True)
class Schedule:
    """Counts every rank agrees on: micro-batches per epoch and in all, optimizer steps."""

    micro_per_epoch: int
    total_micro: int
    total_steps: int

    @classmethod
    def of(cls, rows_per_rank: int, micro_batch_size: int, grad_accum: int, epochs: int) -> "Schedule":
        per_epoch = math.ceil(rows_per_rank / micro_batch_size)
        return cls(per_epoch, per_epoch * epochs, math.ceil(per_epoch * epochs / grad_accum))


def cut_window(t, epoch: int, pad_id: int, tokenize: Callable, collate: Callable):
    """Ray Data collate step (numpy rows in): a window of rows is tokenized (``tokenize``), grouped
    by length with a seed of ``(seed, epoch, first row)`` and cut into micro-batches (``collate``:
    rows -> tensors, the task's)."""
    # imported here: importing ray fixes its config for the process, and the CLI must still be able to
    # turn token auth on for `moray submit` / `moray jobs` after importing this module
    from ray.data.collate_fn import NumpyBatchCollateFn

    class CutWindow(NumpyBatchCollateFn):
        def __call__(self, rows: Dict[str, np.ndarray]) -> List[Dict[str, torch.Tensor]]:
            rows = tokenize(rows)
            seed = (t.seed, epoch, int(rows["idx"][0]))
            return [collate(rows, pad_id, index) for index in length_buckets(rows, t.micro_batch_size, seed, t.shuffle)]

    return CutWindow()


def epoch_batches(shard, epoch: int, t, pad_id: int, tokenize: Callable, collate: Callable):
    """Yield the micro-batches of one epoch, in a deterministic, seeded order (:func:`cut_window`,
    run on Ray Data's prefetch thread)."""
    window = t.micro_batch_size * t.bucket_batches
    kwargs: Dict[str, Any] = {}
    if t.shuffle:
        kwargs = {"local_shuffle_buffer_size": window, "local_shuffle_seed": t.seed * 100_003 + epoch}
    cut = cut_window(t, epoch, pad_id, tokenize, collate)
    for batches in shard.iter_torch_batches(batch_size=window, collate_fn=cut, prefetch_batches=1, **kwargs):
        yield from batches


class Ahead:
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


class StepSums:
    """An optimizer step's sums on the device -- loss, each task statistic, tokens -- and the rows
    counted on the host; their means over every worker's rows, read once per step."""

    def __init__(self, device: torch.device):
        self.device, self.names, self.total, self.rows = device, [], None, 0

    def add(self, losses: torch.Tensor, stats: Dict[str, torch.Tensor], attention_mask: torch.Tensor) -> None:
        if self.total is None:
            self.names = list(stats)
            self.total = torch.zeros(len(self.names) + 2, dtype=torch.float64, device=self.device)
        parts = [losses.detach().sum()] + [stats[k].detach().sum() for k in self.names] + [attention_mask.sum()]
        self.total += torch.stack([p.to(torch.float64) for p in parts])
        self.rows += losses.numel()

    def reduce(self, seconds: float, world: int) -> Dict[str, float]:
        """Means per row over all ranks; throughput for the whole group. Resets the sums."""
        import torch.distributed as dist

        total = torch.cat([self.total, torch.tensor([float(self.rows)], dtype=torch.float64).to(self.device)])
        if world > 1:
            dist.all_reduce(total)
        values = total.cpu().tolist()
        self.total, self.rows = None, 0
        rows = max(values[-1], 1.0)
        out = {"loss": values[0] / rows, **{k: v / rows for k, v in zip(self.names, values[1:-2])}}
        out.update(step_rows=values[-1], rows_per_s=values[-1] / max(seconds, 1e-9),
                   tokens_per_s=values[-2] / max(seconds, 1e-9))
        return out
