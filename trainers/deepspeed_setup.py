"""The one place that sets up DeepSpeed: config, optimizer, schedule, engine, ZeRO-3 gathering.

Every training job builds its engine here, inside a Ray Train worker whose torch process group
Ray Train already created (gloo on CPU, nccl on GPU). On CPU: ``DS_ACCELERATOR=cpu``, fp32 and a plain ``torch.optim.AdamW`` (no compiled
DeepSpeed optimizer). On GPU: bf16 unless turned off, with fp32 master weights, gradients
accumulated and reduced in fp32, and the export read from the fp32 master weights. Under ZeRO-3 the
model is built partitioned from the start (``deepspeed.zero.Init`` through transformers'
``HfDeepSpeedConfig``): no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

from trainers.core.export import module_tensors
from trainers.job_config import TrainConfig

logger = logging.getLogger(__name__)


def use_bf16(cfg: TrainConfig, on_gpu: bool) -> bool:
    return cfg.bf16 == "true" or (cfg.bf16 == "auto" and on_gpu)


PERSIST_BELOW = 10_000  # ZeRO-3: parameters of at most this many elements (norms, biases) stay whole on every rank


def persistence_threshold(model: torch.nn.Module) -> int:
    """ZeRO-3's ``stage3_param_persistence_threshold`` for ``model``: :data:`PERSIST_BELOW`, raised for
    an adapter model (a frozen base: peft's LoRA, the conditioned adapters) to its largest trainable
    parameter, so every adapter factor stays whole -- partitioned, each r x d factor costs an
    all-gather of a few KB at every use (about 8 per layer per pass), and all of them together are
    small by construction."""
    if all(p.requires_grad for p in model.parameters()):
        return PERSIST_BELOW
    return max([PERSIST_BELOW] + [getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad])


def load_placement(cfg: TrainConfig) -> Tuple[torch.dtype, Optional[str]]:
    """The dtype and device a worker's policy loads in. The training dtype: DeepSpeed's bf16 casts
    every parameter to bf16 before its optimizer copies them into fp32 master weights, so a bf16
    load gives the same masters with half the host memory (fp32 buffers such as rotary frequencies
    stay fp32 either way). On a GPU under ZeRO 0-2, straight onto the worker's GPU (``device_map``);
    ZeRO-3 loads partitioned under ``zero.Init`` instead, which takes no ``device_map``."""
    dtype = torch.bfloat16 if use_bf16(cfg, cfg.use_gpu) else torch.float32
    return dtype, (str(worker_device(True)) if cfg.use_gpu and cfg.zero_stage < 3 else None)


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool, persist_below: int = PERSIST_BELOW) -> Dict[str, Any]:
    """The DeepSpeed JSON config for a TrainConfig (``persist_below``: :func:`persistence_threshold`)."""
    zero: Dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu)
    if cfg.zero_stage == 3:
        # keep small params (norms, biases, adapters) unpartitioned; gather weights for export
        zero.update(stage3_param_persistence_threshold=persist_below, stage3_gather_16bit_weights_on_model_save=True)
    bf16 = use_bf16(cfg, on_gpu)
    precision: Dict[str, Any] = {}
    if bf16:  # bf16 weights and activations; gradients accumulated and reduced in fp32 (ZeRO's fp32 master)
        precision = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    return {
        **precision,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up to ``cfg.lr``, then cosine, linear or no decay to 0 at ``total_steps``."""
    warm = max(0, cfg.warmup_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_schedule == "constant" or total_steps <= warm:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's device: its GPU, or the CPU. Asking for GPUs where CUDA sees none is an error
    (NCCL would otherwise run on CPU tensors, or the job would train on the CPU unnoticed)."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is set but this worker sees no CUDA device (torch "
                           f"{torch.__version__}, CUDA {torch.version.cuda}); install a CUDA build of torch or "
                           "drop --use-gpu")
    return torch.device("cuda", torch.cuda.current_device())


def load_shm_comm_op() -> None:
    """Build or load DeepSpeed's ``shm_comm`` op (the CPU accelerator's; DeepSpeed's communication
    set-up loads it) in this process before DeepSpeed does, one process of this machine at a time.

    torch's build lock is a file (``<build dir>/lock``) that every load creates and removes, even of
    an op already built; a process killed meanwhile leaves it behind and every later load waits on it
    forever. Here an ``flock`` beside it, which the kernel drops when its holder dies, says whether
    anyone is inside: a lock file found while holding the flock is stale and removed."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not load it either
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(builder.name, False):
        return  # built into this DeepSpeed install: loaded without torch's JIT build or its lock
    from torch.utils.cpp_extension import _get_build_directory

    directory = _get_build_directory(builder.name, verbose=False)
    with held(os.path.join(directory, "moray.flock")):
        clear_stale_lock(os.path.join(directory, "lock"))
        builder.load(verbose=False)  # cached in-process: DeepSpeed's own call returns it


@contextlib.contextmanager
def held(path: str):
    """Hold an exclusive ``flock`` on ``path`` (created if missing)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_stale_lock(lock: str) -> bool:
    """Remove torch's build lock file ``lock`` (the caller holds the flock, so no process of ours is
    building or loading); whether there was one."""
    try:
        os.remove(lock)
    except FileNotFoundError:
        return False
    logger.warning("removed %s: a process stopped while it built or loaded DeepSpeed's shm_comm op left it, "
                   "and every later load would have waited on it", lock)
    return True


def build_engine(build: Callable[[], torch.nn.Module], cfg: TrainConfig, total_steps: int, on_gpu: bool):
    """The model ``build()`` returns in a DeepSpeed engine with AdamW, the schedule and the ZeRO
    stage of ``cfg``. Under ZeRO-3 ``build`` runs inside ``deepspeed.zero.Init``: parameters are
    partitioned as they load; adapters stay whole (:func:`persistence_threshold`)."""
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if on_gpu else "gloo"
    load_shm_comm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = deepspeed_config(cfg, world, on_gpu)
    zero3 = None
    if cfg.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(config)  # while it lives, from_pretrained builds under zero.Init
    model = build()
    if zero3 is not None:  # read by deepspeed.initialize, once the model (with its adapters) exists
        config = deepspeed_config(cfg, world, on_gpu, persistence_threshold(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                           dist_init_required=False)
    engine.moray_zero3_config = zero3  # kept alive: generate() then knows ZeRO-3 is on (synced_gpus)
    return engine


def gathered_tensors(engine, rank: int) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
    """The trained weights one at a time, in :func:`trainers.core.export.module_tensors`' order:
    ``(name, tensor)`` on rank 0 (``(name, None)`` elsewhere). Trainable parameters come from the
    optimizer's fp32 master copy where there is one (bf16 training: updates smaller than a bf16
    step are kept), frozen ones and buffers as the module holds them. Every rank must run it to the
    end together (ZeRO gathers each parameter in turn, so no rank ever holds the whole model).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    zero3 = engine.zero_optimization_stage() == 3
    for name, param in module_tensors(engine.module):
        if not isinstance(param, torch.nn.Parameter):  # a buffer: every rank holds it whole
            yield name, (param.detach() if rank == 0 else None)
            continue
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        if master is not None:
            yield name, (master.detach() if rank == 0 else None)
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=zero3):
            yield name, (param.detach().clone() if rank == 0 else None)
