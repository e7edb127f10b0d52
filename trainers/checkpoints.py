"""Checkpoints and recovery for the training loop, and its final export.

Every ``train.checkpoint_every`` optimizer steps each worker reports its DeepSpeed shard and its
reference log-probs, and rank 0 the trainer state (micro-batches done, step, the task's own
state); a restarted run restores them all.
At the end rank 0 exports the model through its task, gathered and written one tensor at a time
straight to the export location (:class:`ExportTarget`), and reports it with the trained engine's
logits on fixed token ids (tests compare the export with them).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from trainers.core.metadata import PolicyMetadata
from trainers.core.storage import filesystem, is_uri
from trainers.deepspeed_setup import gathered_tensors
from trainers.policy_export import export_dtype
from trainers.reference import ReferenceTable

STATE_FILE = "trainer_state.json"
FINAL_TASK_STATE = "task_state"  # the final metrics' key for the task's state at the end (Task.state)
DS_TAG = "deepspeed"


def resume_state(rank: int) -> Tuple[Dict[str, Any], Optional[ReferenceTable]]:
    """The trainer state of the run Ray Train restores and this worker's reference log-probs
    (``{}, None`` on a fresh start)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {}, None
    with ckpt.as_directory() as d:
        return json.loads((Path(d) / STATE_FILE).read_text()), ReferenceTable.load(d, rank)


def load_engine_state(engine) -> None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            # our own run's checkpoint in our storage path: DeepSpeed's torch.load of it is trusted
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)


def report(metrics: Dict[str, Any], engine, rank: int, save: bool, state: Dict[str, Any],
           reference: Optional[ReferenceTable] = None) -> None:
    """Report ``metrics`` to Ray Train, with a checkpoint (every worker's DeepSpeed shard and
    reference table) when ``save``."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False)
        if reference is not None:
            reference.save(tmp, rank)
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{state['step']:07d}")


@dataclass(frozen=True)
class ExportTarget:
    """Where the final export goes: ``out``, the job's location, written once and straight there
    when it is a storage URI or a local path on rank 0's node (the driver's node: ``driver_node``);
    else ``staging``, in Ray Train's storage (which every node reaches), for the driver to copy."""

    out: str
    staging: str
    driver_node: str

    def location(self, node: str) -> str:
        """The directory rank 0, on Ray node ``node``, writes the export to."""
        return self.out if is_uri(self.out) or node == self.driver_node else self.staging


def export_final(task, engine, rank: int, metadata: PolicyMetadata, metrics: Dict[str, Any],
                 target: ExportTarget) -> None:
    """Export the trained weights through the task on rank 0, gathered one tensor at a time and
    written straight to ``target``'s location (no local copy first), and report it:
    ``export_location``, the export's size in ``export_bytes``, and on Linux rank 0's peak resident
    memory above its level before the export in ``export_peak_extra_bytes`` and the bytes it wrote
    to its disk meanwhile in ``export_disk_write_bytes``."""
    import ray
    import ray.train
    from pyarrow.fs import FileSelector

    tic = time.perf_counter()
    metrics = {**metrics, "probe_logits": probe_logits(engine), "exported": True, FINAL_TASK_STATE: task.state()}
    dtype = export_dtype(task.cfg.model.export_dtype, engine.bfloat16_enabled())
    tensors = gathered_tensors(engine, rank)
    if rank == 0:
        where = target.location(ray.get_runtime_context().get_node_id())
        before, written = reset_peak_rss(), disk_writes()
        task.export(tensors, engine.module, where, metadata, dtype)
        if before is not None:
            metrics["export_peak_extra_bytes"] = peak_rss() - before
        if written is not None:  # what the export cost rank 0's disk (a remote URI: only the small files)
            metrics["export_disk_write_bytes"] = disk_writes() - written
        fs, root = filesystem(where)
        metrics["export_bytes"] = sum(f.size for f in fs.get_file_info(FileSelector(root, recursive=True))
                                      if f.path.endswith(".safetensors"))
        metrics["export_location"] = where
    for name, _ in tensors:  # the other ranks gather alongside rank 0; rank 0 must have used them all
        if rank == 0:
            raise RuntimeError(f"the task's export stopped before {name!r}")
    metrics["export_seconds"] = time.perf_counter() - tic
    # Ray Train returns the metrics of the last report that carried a checkpoint: a marker of a few bytes
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            (Path(tmp) / "export.json").write_text(json.dumps({"location": metrics["export_location"]}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                         checkpoint_dir_name="final")


def reset_peak_rss() -> Optional[int]:
    """Reset this process's peak resident memory (Linux ``clear_refs``); returns its current one in
    bytes, or None where that cannot be measured."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def disk_writes() -> Optional[int]:
    """Bytes this process has sent to block storage (Linux ``/proc/self/io`` ``write_bytes``), or None."""
    try:
        return _status_bytes("write_bytes", "/proc/self/io", 1)
    except OSError:
        return None


def peak_rss() -> int:
    """Peak resident memory since :func:`reset_peak_rss`, in bytes."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str, path: str = "/proc/self/status", unit: int = 1024) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * unit
    raise OSError(f"{path} has no {field}")


def quiet_report_logs() -> None:
    """Ray Train logs every report (with its whole metrics dict) at INFO under a logger named by
    its file path, outside the 'ray.train' hierarchy that LoggingConfig sets; the progress bar
    already says it."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def probe_input_ids(vocab: int) -> torch.Tensor:
    return (torch.arange(1, 17) * 7919 % vocab).unsqueeze(0)


@torch.no_grad()
def probe_logits(engine) -> List[float]:
    """Last-position logits of the trained engine on fixed token ids (every rank runs it: under
    ZeRO-3 the forward gathers parameters)."""
    module = engine.module
    device = next(module.parameters()).device
    ids = probe_input_ids(module.config.vocab_size).to(device)
    was_training = module.training
    module.eval()
    logits = module(input_ids=ids).logits[0, -1].reshape(-1)[:16].float().cpu()
    module.train(was_training)
    return logits.tolist()
