"""Shared test helpers: synthetic preference data, policy-shaped directories without training,
and the DeepSpeed engine's calling surface over a bare module."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from serving.decode import Sampling, row_probs, sample_rows
from serving.app import serving_specs
from trainers.batches import pad_pairs, pair_logps
from trainers.core.export import save_hf
from trainers.core.metadata import PolicyMetadata, write_metadata
from trainers.core.metrics import MetricSpec
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.data import tokenize_responses
from trainers.job_config import ModelConfig
from trainers.task import build_policy, export_policy
from trainers.training_metrics import training_specs


EXPORT_FILES = ("config.json", "generation_config.json", "moray.json", "model.safetensors.index.json",
                "special_tokens_map.json", "chat_template.jinja")


def assert_only_policy_files(out, lora: bool = False) -> None:
    """An export directory holds the HF checkpoint (weights, config, tokenizer), ``moray.json`` and,
    for LoRA, ``adapter/``: no training checkpoints or run files."""
    from pathlib import Path

    entries = {p.name for p in Path(out).iterdir()}
    assert "moray.json" in entries and "config.json" in entries, entries
    other = {e for e in entries if not (e in EXPORT_FILES or e.startswith("tokenizer") or
                                        (e.startswith("model") and e.endswith(".safetensors")))}
    assert other == ({"adapter"} if lora else set()), other


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def synthetic_pairs(n: int, seed: int = 0):
    """Pairs labelled by a known rule: the chosen response is positive, the rejected negative."""
    rng = random.Random(seed)
    pos = ["great", "lovely", "wonderful", "happy", "good"]
    neg = ["awful", "terrible", "sad", "bad", "boring"]
    rows = []
    for i in range(n):
        topic = rng.choice(["coffee", "movie", "book", "park", "song"])
        k = 1 + i % 4
        rows.append({"prompt": f"Write about the {topic}.",
                     "chosen": f"The {topic} is " + " and ".join(rng.choices(pos, k=k)) + ".",
                     "rejected": f"The {topic} is " + " and ".join(rng.choices(neg, k=1 + (i + 1) % 4)) + "."})
    return rows


def multi_rows(n, seed=5):
    """Pairs labelled by two objectives (``response_0/1``, ``better_sentiment``, ``better_conciseness``)."""
    rows = []
    for i, r in enumerate(synthetic_pairs(n, seed)):
        a, b = (r["chosen"], r["rejected"]) if i % 2 == 0 else (r["rejected"], r["chosen"])
        rows.append({"prompt": r["prompt"], "response_0": a, "response_1": b,
                     "better_sentiment": 0 if a == r["chosen"] else 1,
                     "better_conciseness": 0 if len(a.split()) <= len(b.split()) else 1})
    return rows


POS = ["great", "lovely", "wonderful", "happy", "good", "fine"]


def candidates(n_prompts, seed=0):
    """MOPO candidate rows. Each prompt: 4 candidates where longer means more positive -- conciseness
    and sentiment conflict. Scores: conciseness = -words, sentiment = positive words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_prompts):
        topic = ["coffee", "movie", "book", "park"][i % 4]
        texts = [f"The {topic}." if k == 0 else f"The {topic} is " + " and ".join(rng.choice(POS, k)) + "."
                 for k in range(4)]
        rows.append({"prompt": f"Write about the {topic}.", "responses": texts,
                     "scores": {"conciseness": [-len(t.split()) for t in texts],
                                "sentiment": [sum(w.strip(".") in POS for w in t.split()) for t in texts]}})
    return rows


def make_policy(src: str, out, seed: int, noise: float = 0.05, metadata: Optional[dict] = None, **meta) -> str:
    """A policy-shaped directory without training: ``src`` with every weight plus ``noise`` times
    seeded standard-normal noise (0 keeps ``src``), saved with its tokenizer and ``moray.json``
    saying it was trained from ``src`` with β = 0.1 unless ``meta`` says otherwise."""
    model = load_causal_lm(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    meta = dict({"kind": "policy", "reference_model": src, "beta": 0.1}, **(metadata or {}), **meta)
    return save_hf(model, load_tokenizer(src), str(out), PolicyMetadata.from_json(meta))


def make_lora_policy(src: str, out, seed: int, objective: str, r: int = 4, std: float = 0.3) -> str:
    """A LoRA policy of ``src`` without training: adapters (r, alpha 2r, attention projections) set
    to seeded normal noise of ``std``, exported as training exports it (merged weights + ``adapter/``)."""
    cfg = ModelConfig(name_or_path=src, lora=True, lora_r=r, lora_alpha=2 * r)
    policy = build_policy(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_" in n:
                p.normal_(std=std)
    return export_policy(policy, cfg, str(out), PolicyMetadata("policy", objective, src, 0.1))


def make_conditioned_policy(src: str, out, objectives=("a", "b"), r: int = 4, shared_r: int = 0, scale: float = 2.0,
                            std: float = 0.3, seed: int = 0, targets=("q_proj", "v_proj", "down_proj")) -> str:
    """A conditioned policy's directory as ``moray train conditioned`` writes it, without training:
    ``src`` as the base (kind "conditioned"), and per objective ``vertices/<k>/`` a peft adapter
    ``A = [A0; Ak]``, ``B = [B0, Bk]`` (seeded normal, non-zero B; the shared pair only with
    ``shared_r``) whose peft scaling is ``scale``, with a ``moray.json`` whose base is ``../..``."""
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(src)
    meta = {"kind": "conditioned", "reference_model": src, "beta": 0.1, "method": "conditioned",
            "objectives": list(objectives), "lora_r": r, "shared_r": shared_r, "lora_alpha": scale * r,
            "target_modules": list(targets)}
    save_hf(base, load_tokenizer(src), str(out), PolicyMetadata.from_json(meta))
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    shapes = {n: (base.get_submodule(n).in_features, base.get_submodule(n).out_features) for n in names}
    pairs = {k: {n: (std * torch.randn(rank, i, generator=g), std * torch.randn(o, rank, generator=g))
                 for n, (i, o) in shapes.items()} for k, rank in [("", shared_r)] + [(k, r) for k in objectives]}
    for k in objectives:
        model = get_peft_model(load_causal_lm(src), LoraConfig(r=shared_r + r, lora_alpha=scale * (shared_r + r),
                                                               target_modules=list(targets)))
        with torch.no_grad():
            for n in names:
                layer = model.base_model.model.get_submodule(n)
                layer.lora_A["default"].weight.copy_(torch.cat([pairs[""][n][0], pairs[k][n][0]]))
                layer.lora_B["default"].weight.copy_(torch.cat([pairs[""][n][1], pairs[k][n][1]], dim=1))
        vertex = os.path.join(str(out), "vertices", k)
        model.save_pretrained(vertex)
        write_metadata(vertex, PolicyMetadata("policy", k, src, 0.1, {"method": "conditioned", "lora": True,
                                                                      "base": "../.."}))
    return str(out)


def conditioned_model(src: str, objectives: int, rank: int, shared_rank: int, randomize: bool = True,
                      seed: int = 0, dtype: torch.dtype = torch.float64):
    """``src`` in ``dtype`` with conditioned adapters on the attention projections (scale 2); the
    ``B`` factors set to seeded normal noise unless ``randomize`` is off (then the model is its base)."""
    from trainers.conditioned_lora import install

    model = load_causal_lm(src, dtype=dtype)
    torch.manual_seed(seed)
    install(model, objectives, rank, shared_rank, 2.0 * rank, ModelConfig().lora_target_modules)
    if randomize:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B") or n.endswith("shared_B"):
                    p.normal_(std=0.3)
    return model


def preference_batch(tok, rows, ref_model, names=("chosen", "rejected"), columns=None, max_length=64):
    """A padded micro-batch of plain-string rows: the responses ``names`` (read from ``columns`` of
    each row, default the same names) after each row's prompt, with the reference log-probs of
    ``ref_model`` as the reference pass would add them."""
    columns = columns or names
    cols = {f"{k}_{p}": [] for k in names for p in ("ids", "start")}
    for r in rows:
        t = tokenize_responses(tok, r["prompt"], {k: r[c] for k, c in zip(names, columns)}, False, max_length,
                               max_length)
        for k in cols:
            cols[k].append(t[k])
    batch = pad_pairs(cols, tok.pad_token_id)
    with torch.no_grad():
        for k, lp in zip(names, pair_logps(ref_model, batch, len(names))):
            batch[f"ref_{k}_logps"] = lp.double()
    return batch


def multi_batch(tok, rows, ref_model):
    """:func:`preference_batch` of :func:`multi_rows` rows (response_0 as chosen) with the second
    objective's sign."""
    batch = preference_batch(tok, rows, ref_model, columns=("response_0", "response_1"))
    batch["sign_conciseness"] = torch.tensor([1.0 if r["better_conciseness"] == 0 else -1.0 for r in rows],
                                             dtype=torch.float64)
    return batch


class BareEngine(torch.nn.Module):
    """The DeepSpeed engine's calling surface (``engine(**batch)``, ``engine.module``) over a plain
    module, without DeepSpeed: unit tests of tasks, and measuring a task's own cost."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


class RayNode:
    """``ray start --block`` on loopback in its own process group (its raylet, object store, agents
    and workers), so that stopping or killing it touches this node's processes alone."""

    def __init__(self, temp: str, name: str, args, env: Optional[dict] = None):
        self.log_path = os.path.join(temp, f"{name}.log")
        env = dict(os.environ if env is None else env)
        env.pop("RAY_ADDRESS", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                 "--disable-usage-stats", *args], start_new_session=True, stdout=log, stderr=subprocess.STDOUT, env=env)

    def check_alive(self) -> None:
        assert self.proc.poll() is None, open(self.log_path).read()[-3000:]

    def kill(self) -> None:
        """Lose the node at once, as a machine that dies."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                continue
            time.sleep(2)  # let the group's other processes exit on the first signal


def running_replicas() -> int:
    """RUNNING replicas of the Moray Serve deployment."""
    from ray import serve

    from serving.deploy import APP_NAME, DEPLOYMENT

    states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def wait_for(predicate, seconds: float) -> bool:
    """Poll ``predicate`` every half second; whether it came true within ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def head_logps(model, batch, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sequence log-probs ``(R, B)`` of a padded batch from ``model``'s own final hidden states (in its
    dtype), with the LM head and the log-softmax in ``dtype``: float64 is the reference the training
    path's float32 head is held to; the model's own dtype is what a bf16 head gave before."""
    from trainers.core.logps import sequence_logps

    keep = int(batch["logits_to_keep"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                logits_to_keep=1, output_hidden_states=True)
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.to(dtype)
    logits = torch.nn.functional.linear(out.hidden_states[-1][:, -keep:].to(dtype), head.weight.to(dtype), bias)
    return sequence_logps(logits, batch["input_ids"], batch["response_mask"]).double().view(len(batch["responses"]), -1)


def response_columns(tok, rows, names, max_length: int = 64):
    """Rows of text as the tokenized columns the loop collates (``<name>_ids``, ``<name>_start``), with
    ``idx`` and a float rider ``sign_x``."""
    cols = {f"{k}_{p}": [] for k in names for p in ("ids", "start")}
    for r in rows:
        t = tokenize_responses(tok, r["prompt"], {k: r[k] for k in names}, False, max_length, max_length)
        for k in cols:
            cols[k].append(t[k])
    cols["idx"] = np.arange(len(rows))
    cols["sign_x"] = np.where(np.arange(len(rows)) % 2 == 0, 1.0, -1.0)
    return cols


@torch.no_grad()
def packing_gap(model, cols, pad_id: int, index, one_row: bool) -> float:
    """Largest |packed - padded| sequence log-prob of ``model`` over the rows ``index`` of ``cols``
    (packed in rows, or in one row as under flash attention), on the model's device."""
    from trainers.batches import pack_pairs, to_device

    device = next(model.parameters()).device
    padded, packed = pad_pairs(cols, pad_id, index), pack_pairs(cols, pad_id, index, one_row)
    want = torch.stack(pair_logps(model, to_device(padded, device))).double()
    got = torch.stack(pair_logps(model, to_device(packed, device))).double()
    return float((got - want).abs().max())


HEAD_BOUND = 1e-3  # nat per sequence: a float32 head and log-softmax against float64, on the same hidden states


@torch.no_grad()
def bf16_head_errors(model_path: str, device: str = "cpu", scale: float = 30.0):
    """``(now, before)``: the largest gap per sequence between a bf16 model's log-probs and float64's
    on its own hidden states, through the training path (float32 head) and through a bf16 head. The
    head is scaled so the logits are about 20, as trained LMs' are."""
    tok = load_tokenizer(model_path)
    cols = response_columns(tok, synthetic_pairs(8, seed=1), ["chosen", "rejected"])
    model = load_causal_lm(model_path, dtype=torch.bfloat16).to(device).eval()
    model.get_output_embeddings().weight.mul_(scale)
    from trainers.batches import to_device

    batch = to_device(pad_pairs(cols, tok.pad_token_id, list(range(8))), torch.device(device))
    want = head_logps(model, batch)
    got = torch.stack(pair_logps(model, batch)).double()
    return float((got - want).abs().max()), float((head_logps(model, batch, torch.bfloat16) - want).abs().max())


def spawn_ranks(worker, *args, world: int = 2) -> None:
    """Runs ``worker(rank, world, port, *args)`` on ``world`` spawned processes that meet on a free
    loopback port; each rank then waits for the others and closes its process group, because a rank
    that exits with its gloo group open can abort (``terminate called without an active exception``)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(worker, world, port, args), nprocs=world, join=True)


def _rank_main(rank, worker, world, port, args) -> None:
    worker(rank, world, port, *args)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def lora_zero3_worker(rank, world, port, model_dir, out, on_gpu: bool = False):
    """One rank of a ZeRO-3 engine over a LoRA (r = 200) policy after one forward: rank 0 saves each
    parameter's ``(persistent, elements held, elements whole)`` and the engine's last-position logits
    on fixed ids to ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    from trainers.checkpoints import probe_input_ids
    from trainers.deepspeed_setup import build_engine, load_placement
    from trainers.job_config import TrainConfig

    cfg = TrainConfig(zero_stage=3, micro_batch_size=1, use_gpu=on_gpu)
    lora = ModelConfig(name_or_path=model_dir, lora=True, lora_r=200)
    engine = build_engine(lambda: build_policy(lora, *load_placement(cfg)), cfg, total_steps=1, on_gpu=on_gpu)
    ids = probe_input_ids(engine.module.config.vocab_size).to(engine.device)
    with torch.no_grad():  # persistent parameters are gathered once, at the first forward
        logits = engine(input_ids=ids).logits[0, -1].float().cpu()
    state = {n: (getattr(p, "ds_persist", False), p.data.numel(), p.ds_numel) for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"state": state, "logits": logits}, out)


def next_token_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """``(V,)`` float64 distribution of the next token for ``logits (V,)`` at ``s.temperature > 0``:
    one row of :func:`serving.decode.row_probs`."""
    return row_probs(logits[None], [s])[0]


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """One token from ``logits (V,)``: one row of :func:`serving.decode.sample_rows`."""
    return int(sample_rows(logits[None], [s], [generator])[0])


def all_specs() -> list[MetricSpec]:
    """Every Moray metric: training's (:mod:`trainers.training_metrics`) and serving's (:mod:`serving.app`)."""
    return training_specs() + serving_specs()


FAIL_ONCE, FAILED_ONCE = "fail-once.json", "failed-once"  # in a run's Ray Train storage: the plan; its record


def fail_once(monkeypatch, storage_dir, step: int) -> Path:
    """Recovery tests: the next training run whose Ray Train storage is ``storage_dir`` (local)
    loses one worker process (rank 1, or 0 alone) right after optimizer step ``step``, once. Ray Train
    then runs :func:`train_loop_failing_once`, the real loop whose task dies there. Returns the file
    the dying worker writes first (a restarted worker that finds it trains on)."""
    import trainers.launch

    Path(storage_dir).mkdir(parents=True, exist_ok=True)
    (Path(storage_dir) / FAIL_ONCE).write_text(json.dumps({"step": step}))
    monkeypatch.setattr(trainers.launch, "train_loop", train_loop_failing_once)
    return Path(storage_dir) / FAILED_ONCE


def train_loop_failing_once(config) -> None:
    """:func:`trainers.loop.train_loop` on a Ray Train worker, with the failure :func:`fail_once`
    planned in the run's storage."""
    import ray.train
    from pyarrow.fs import FileType

    from trainers.loop import train_loop

    ctx = ray.train.get_context()
    fs, root = ctx.get_storage().storage_filesystem, ctx.get_storage().storage_fs_path
    plan, done = f"{root}/{FAIL_ONCE}", f"{root}/{FAILED_ONCE}"
    loop = config["loop"]
    if (ctx.get_world_rank() == min(1, ctx.get_world_size() - 1) and fs.get_file_info(plan).type == FileType.File
            and fs.get_file_info(done).type == FileType.NotFound):
        with fs.open_input_stream(plan) as f:
            step = json.loads(f.read())["step"]
        loop = dataclasses.replace(loop, make_task=functools.partial(_task_failing_after, loop.make_task, step, done))
    train_loop({**config, "loop": loop})


def _task_failing_after(make_task, step: int, done: str, job):
    """``make_task(job)`` whose process exits right after optimizer step ``step`` (before that step's
    report), writing ``done`` first."""
    task = make_task(job)
    start_step, end_step = task.start_step, task.end_step
    current = [0]

    def started(index: int, total: int) -> None:
        current[0] = index + 1
        return start_step(index, total)

    def ended():
        if current[0] == step:
            Path(done).write_text(f"worker killed after optimizer step {step}\n")
            os._exit(1)
        return end_step()

    task.start_step, task.end_step = started, ended
    return task
