"""DeepSpeed set-up without Ray: the GPU request fails fast without CUDA; bf16 accumulates and
reduces gradients in fp32 and exports the fp32 master weights, or bf16 when asked (DeepSpeed's
bf16 on its CPU accelerator, two gloo ranks, ZeRO-2 and ZeRO-3, sharded exports that
``from_pretrained`` loads in the dtype asked for); ZeRO-3 builds the model partitioned, before
``deepspeed.initialize``."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.helpers import lora_zero3_worker, spawn_ranks
from trainers.core.export import INDEX_FILE, load_state
from trainers.core.models import load_causal_lm
from trainers.job_config import TrainConfig
from trainers.job_config import ModelConfig
from trainers.deepspeed_setup import (PERSIST_BELOW, clear_stale_lock, deepspeed_config, held, load_placement,
                                      load_shm_comm_op, persistence_threshold, worker_device)
from trainers.jobs.dpo import DPOJobConfig
from trainers.task import build_policy

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_without_cuda_fails_fast(monkeypatch):
    assert worker_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="train.use_gpu is set but this worker sees no CUDA device"):
        worker_device(True)


def test_bf16_accumulates_and_reduces_in_fp32_and_needs_zero():
    cfg = TrainConfig(bf16="true", zero_stage=2)
    ds = deepspeed_config(cfg, world_size=2, on_gpu=False)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    assert "data_types" not in deepspeed_config(TrainConfig(), 2, on_gpu=False)  # fp32 on CPU by default
    job = DPOJobConfig(objective="s", out="o")
    job.model.name_or_path, job.data.path, job.train.bf16, job.train.zero_stage = "m", "d.jsonl", "true", 0
    with pytest.raises(ValueError, match="bf16 training needs train.zero_stage 1-3"):
        job.validate()


def _worker(rank, world, port, model_dir, stage, checkpointing, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from trainers.core.metadata import PolicyMetadata
    from trainers.core.models import load_tokenizer
    from trainers.deepspeed_setup import build_engine, gathered_tensors, load_placement
    from trainers.job_config import ModelConfig
    from trainers.policy_export import export_model
    from trainers.task import build_policy

    seen = {}
    cfg = TrainConfig(zero_stage=stage, bf16="true", lr=1e-4, micro_batch_size=2, max_grad_norm=0.0)

    def build():  # loaded in bf16 as the training tasks load it: the fp32 masters below come from it
        model = build_policy(ModelConfig(name_or_path=model_dir, gradient_checkpointing=checkpointing),
                             *load_placement(cfg))
        seen["partitioned"] = [hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()]
        return model

    engine = build_engine(build, cfg, total_steps=3, on_gpu=False)
    torch.manual_seed(rank)
    engine.train()  # gradient checkpointing recomputes only in training mode
    for _ in range(3):
        ids = torch.randint(1, 100, (2, 12))
        logits = engine(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    for dtype in (torch.float32, torch.bfloat16):  # rank 0 writes; the other rank gathers alongside
        tensors = gathered_tensors(engine, rank)
        if rank == 0:
            export_model(tensors, engine.module, load_tokenizer(model_dir), f"{out}.{str(dtype)[6:]}", PolicyMetadata(None),
                         dtype, max_shard_bytes=200_000)
        for _ in tensors:
            assert rank != 0
    import deepspeed

    rounded = {}
    for n, p in engine.module.named_parameters():  # every rank takes part in ZeRO-3's gather
        with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
            rounded[n] = p.detach().float().clone()
    if rank == 0:
        torch.save({"partitioned": seen["partitioned"], "module": rounded}, out)


@pytest.mark.slow
@pytest.mark.parametrize("stage, checkpointing", [(2, False), (3, False), (3, True)])
def test_bf16_exports_fp32_master_weights_and_zero3_builds_partitioned(tiny_model, tmp_path, stage, checkpointing):
    out = tmp_path / "result.pt"
    spawn_ranks(_worker, tiny_model, stage, checkpointing, str(out))
    got = torch.load(out, weights_only=True)
    if stage == 3:  # every weight partitioned as it loaded, before deepspeed.initialize
        assert got["partitioned"] and all(got["partitioned"])
    module = got["module"]
    state = load_state(f"{out}.float32")
    assert all(v.dtype == torch.float32 for v in state.values()) and (tmp_path / f"result.pt.float32/{INDEX_FILE}").exists()
    # the export is the fp32 master copy: bf16-rounding it gives the module's bf16 weights, and it
    # holds the updates smaller than one bf16 step that the bf16 weights lost
    moved = 0
    for name, bf16_weight in module.items():
        torch.testing.assert_close(state[name].bfloat16().float(), bf16_weight, rtol=0, atol=0)
        moved += int((state[name] != bf16_weight).any())
    assert moved > 0
    # asked for bf16: the same masters rounded once, and from_pretrained loads them as bf16
    from transformers import AutoModelForCausalLM

    half = AutoModelForCausalLM.from_pretrained(f"{out}.bfloat16", dtype="auto")
    assert half.dtype == torch.bfloat16
    for name, p in half.named_parameters():
        torch.testing.assert_close(p.detach(), state[name].bfloat16(), rtol=0, atol=0)


def test_policy_loads_in_the_training_dtype_as_deepspeed_would_cast_it(tiny_model):
    """bf16 training loads the policy in bf16 (half the host memory of fp32): every parameter equals
    the fp32 load cast to bf16, as DeepSpeed's bf16 cast before its fp32 masters; buffers (rotary
    frequencies) stay float32 and equal. fp32 training still loads fp32; the CPU loads on no device."""
    dtype, device = load_placement(TrainConfig(bf16="true", zero_stage=2))
    assert (dtype, device) == (torch.bfloat16, None)
    assert load_placement(TrainConfig()) == (torch.float32, None)
    half, full = build_policy(ModelConfig(name_or_path=tiny_model), dtype), load_causal_lm(tiny_model)
    for (n, p), (m, q) in zip(half.named_parameters(), full.named_parameters()):
        assert n == m and p.dtype == torch.bfloat16
        assert torch.equal(p, q.to(torch.bfloat16)), n
    for (n, b), (_, c) in zip(half.named_buffers(), full.named_buffers()):
        assert b.dtype == c.dtype and torch.equal(b, c), n


def test_zero3_keeps_lora_factors_whole_in_its_config(tiny_model):
    """The persistence threshold rises to the largest LoRA factor (r = 200 makes them larger than the
    10,000 elements that keep norms whole), and the generated ZeRO-3 config carries it; a full model
    keeps the default."""
    lora = build_policy(ModelConfig(name_or_path=tiny_model, lora=True, lora_r=200))
    factors = [p.numel() for n, p in lora.named_parameters() if "lora_" in n]
    assert max(factors) > PERSIST_BELOW and persistence_threshold(lora) == max(factors)
    assert persistence_threshold(load_causal_lm(tiny_model)) == PERSIST_BELOW
    zero = deepspeed_config(TrainConfig(zero_stage=3), 2, False, persistence_threshold(lora))["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == max(factors)


@pytest.mark.slow
def test_zero3_does_not_partition_lora_factors(tiny_model, tmp_path):
    """Two gloo ranks under ZeRO-3: every LoRA factor is marked persistent (gathered once, then kept
    whole on each rank instead of all-gathered at every use), the base model's large weights stay
    partitioned."""
    out = tmp_path / "state.pt"
    spawn_ranks(lora_zero3_worker, tiny_model, str(out))
    state = torch.load(out, weights_only=True)["state"]
    lora = {n: v for n, v in state.items() if "lora_" in n}
    assert lora and all(persist for persist, _, _ in lora.values())  # DeepSpeed's flag: never released after use
    big = {n: v for n, v in state.items() if "lora_" not in n and v[2] > max(w for _, _, w in lora.values())}
    assert big and all(not persist and held < whole for persist, held, whole in big.values())


def test_a_build_lock_is_cleared_only_once_its_holder_has_died(tmp_path):
    flock, lock = str(tmp_path / "moray.flock"), tmp_path / "lock"
    lock.touch()  # as torch's build left it
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", flock],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        cleared = []
        waiter = threading.Thread(target=lambda: cleared.append(_clear(flock, str(lock))))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and lock.exists(), "the lock was taken while another process held the flock"
        holder.kill()  # dies inside: the kernel drops its flock, the lock file stays
        waiter.join(30)
        assert cleared == [True] and not lock.exists()
    finally:
        holder.kill()
        holder.wait()
    with held(flock):
        assert clear_stale_lock(str(lock)) is False  # nothing left to clear


def _clear(flock, lock):
    with held(flock):
        return clear_stale_lock(lock)


@pytest.mark.slow
def test_deepspeed_set_up_goes_past_a_build_lock_a_killed_process_left():
    """A one-rank engine built as every job builds it; without the clearing, DeepSpeed's
    communication set-up waits on the planted lock file forever."""
    script = ("import os, torch, torch.utils.cpp_extension as ext\n"
              "from deepspeed.accelerator import get_accelerator\n"
              "from trainers.core.runtime import free_port\n"
              "from trainers.deepspeed_setup import build_engine\n"
              "from trainers.job_config import TrainConfig\n"
              "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), RANK='0', WORLD_SIZE='1',\n"
              "                  LOCAL_RANK='0')\n"
              "name = get_accelerator().create_op_builder('ShareMemCommBuilder').name\n"
              "lock = os.path.join(ext._get_build_directory(name, verbose=False), 'lock')\n"
              "open(lock, 'w').close()\n"
              "engine = build_engine(lambda: torch.nn.Linear(4, 4), TrainConfig(zero_stage=2), 1, on_gpu=False)\n"
              "print('engine built; lock left:', os.path.exists(lock))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine built; lock left: False" in done.stdout
    assert "removed" in done.stderr and "shm_comm" in done.stderr


def test_no_shm_op_to_load_where_the_accelerator_has_none(monkeypatch, tmp_path):
    """CUDA's accelerator has no ``ShareMemCommBuilder`` (DeepSpeed's own ``build_shm_op`` then loads
    nothing): nothing is loaded or locked."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(get_accelerator(), "create_op_builder", lambda name: None)
    assert load_shm_comm_op() is None
    assert list(tmp_path.iterdir()) == []
