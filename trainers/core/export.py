"""Hugging Face checkpoints on disk: safetensors weights, the tokenizer and ``moray.json``.

``moray.json`` (:mod:`trainers.core.metadata`) says what the checkpoint is. Weights are read from
safetensors only (never a pickle). :class:`ShardWriter` writes a model tensor by tensor into
safetensors shards planned ahead from the shapes, so a writer never holds more than one tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from trainers.core import storage
from trainers.core.metadata import METADATA_FILE, PolicyMetadata, read_metadata, write_metadata
ADAPTER_DIR = "adapter"  # a LoRA policy's adapter, beside its merged weights
VERTICES_DIR = "vertices"  # a conditioned policy's per-objective adapters, one directory each
ADAPTER_CONFIG = "adapter_config.json"
# a LoRA policy's factors by base weight name: (A (r, in), B (out, r), scaling s); the update is s B A
LoraFactors = Mapping[str, Tuple[torch.Tensor, torch.Tensor, float]]
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def save_hf(model: torch.nn.Module, tokenizer, out_dir: str, metadata: PolicyMetadata) -> str:
    """safetensors weights, the tokenizer and ``moray.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_metadata(str(out), metadata)
    return str(out)


def parse_size(size: str) -> int:
    """Bytes in ``"500MB"``, ``"5GB"``, ``"2GiB"`` or a plain number (Hugging Face's
    ``max_shard_size`` convention: KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    text = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            number = text[:-len(unit)].strip()
            break
    else:
        number, factor = text, 1
    try:
        value = float(number) * factor
    except ValueError:
        raise ValueError(f"{size!r} is not a size such as 500MB or 5GB") from None
    if value < 1:
        raise ValueError(f"a size must be at least one byte, got {size!r}")
    return int(value)


class ShardWriter:
    """A model's tensors into safetensors shards of at most ``max_shard_bytes`` (one bigger tensor
    gets a shard of its own), written as they arrive, straight to ``out_dir`` (a directory or a storage URI): the shards and every header are planned from
    ``plan`` (``(name, shape, dtype)`` in the order :meth:`write` will be called), so each tensor's
    bytes go straight to its file and nothing is buffered. One shard is ``model.safetensors``;
    more are ``model-0000i-of-0000n.safetensors`` with Hugging Face's index."""

    def __init__(self, out_dir: str, plan: List[Tuple[str, Tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out = out_dir  # a local directory or a storage URI: each shard is written there, once
        self.fs, self.root = storage.filesystem(out_dir)
        self.fs.create_dir(self.root, recursive=True)
        shards: List[List[Tuple[str, Tuple[int, ...], torch.dtype, int]]] = [[]]
        used = 0
        for name, shape, dtype in plan:
            size = math.prod(shape) * dtype.itemsize
            if shards[-1] and used + size > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), dtype, size))
            used += size
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards, self.total_size = shards, sum(e[3] for s in shards for e in s)
        self.expected: Iterator[Tuple[int, int]] = iter([(i, j) for i, s in enumerate(shards) for j in range(len(s))])
        self.handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next planned tensor (cast to its planned dtype)."""
        shard, j = next(self.expected, (None, None))
        if shard is None:
            raise RuntimeError(f"tensor {name!r} was not planned")
        planned, shape, dtype, size = self.shards[shard][j]
        if name != planned or tuple(tensor.shape) != shape:
            raise RuntimeError(f"expected {planned} {list(shape)}, got {name} {list(tensor.shape)}")
        if j == 0:
            self._open(shard)
        data = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
        self.handle.write(memoryview(data.view(torch.uint8).numpy()) if size else b"")
        if j == len(self.shards[shard]) - 1:
            self.handle.close()
            self.handle = None

    def close(self) -> List[str]:
        """Check that every planned tensor came; write the index. Returns the files written."""
        left = next(self.expected, None)
        if left is not None:
            raise RuntimeError(f"tensor {self.shards[left[0]][left[1]][0]!r} was planned but never written")
        if len(self.files) > 1:
            weight_map = {e[0]: f for f, s in zip(self.files, self.shards) for e in s}
            storage.write_text(storage.join(self.out, INDEX_FILE), json.dumps(
                {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, indent=2))
            return self.files + [INDEX_FILE]
        return list(self.files)

    def _open(self, shard: int) -> None:
        header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, size in self.shards[shard]:
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.handle = self.fs.open_output_stream(f"{self.root.rstrip('/')}/{self.files[shard]}")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)


def module_tensors(module: torch.nn.Module) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
    """A whole module's parameters, then its persistent buffers, in the order a gathered engine
    yields them (:func:`trainers.deepspeed_setup.gathered_tensors`)."""
    yield from module.named_parameters()
    persistent = set(module.state_dict().keys())  # non-persistent buffers (rotary tables) stay out
    yield from ((n, b) for n, b in module.named_buffers() if n in persistent)


def load_state(path: str) -> Dict[str, torch.Tensor]:
    """A checkpoint's tensors from its safetensors files."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))  # one file or every shard
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_matching_state(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a full state dict; every parameter must be there (tied duplicates may be absent)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    params = {name for name, _ in model.named_parameters()}  # tied duplicates are not listed
    missing = [k for k in missing if k in params]
    if unexpected or missing:
        raise RuntimeError(f"state dict does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """peft's LoRA scaling ``s`` (the update is ``s B A``): ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def load_lora_factors(adapter_dir: str) -> LoraFactors:
    """A peft adapter directory -> ``{base weight name: (A, B, scaling)}``."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    scaling = lora_scaling(cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora")))
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        factors[module + ".weight"] = (A, B, scaling)
    if not factors:
        raise ValueError(f"{adapter_dir} holds no LoRA factors")
    return factors


@dataclass(frozen=True)
class PolicyFiles:
    """Where a local policy's parts are. Two layouts: merged weights with their adapter in
    ``adapter/`` (LoRA training's export), or an adapter alone whose ``moray.json`` names its
    ``base`` checkpoint relative to it (a conditioned policy's vertex)."""

    weights: str  # a full HF checkpoint: the policy's own weights, or the base its adapter goes on
    adapter: Optional[str] = None  # its peft adapter directory (None: not a LoRA policy)
    adapter_only: bool = False  # the adapter is not in ``weights`` yet (the vertex layout)


def policy_files(path: str) -> PolicyFiles:
    """The layout of ``path`` (a hub name or a storage URI is its own weights)."""
    p = Path(path)
    if not p.is_dir():
        return PolicyFiles(path)
    if (p / ADAPTER_DIR / ADAPTER_CONFIG).exists():
        return PolicyFiles(path, str(p / ADAPTER_DIR))
    if (p / ADAPTER_CONFIG).exists() and not (p / "config.json").exists():
        base = read_metadata(path).get("base") if (p / METADATA_FILE).exists() else None
        if not base:
            raise ValueError(f"{path} holds an adapter but no weights, and its {METADATA_FILE} names no base")
        return PolicyFiles(str((p / base).resolve()), path, adapter_only=True)
    return PolicyFiles(path)


def add_lora(weight: torch.Tensor, terms: Sequence[Tuple[float, Tuple[torch.Tensor, torch.Tensor, float]]]) -> torch.Tensor:
    """``W + Σ_i w_i s_i B_i A_i`` (LoRA products, never the factors; docs/algorithms.md §6), summed in
    float64 on ``weight``'s device and returned in its dtype."""
    delta = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    for w, (A, B, s) in terms:
        if w != 0:
            delta += w * s * (B.to(delta.device, torch.float64) @ A.to(delta.device, torch.float64))
    return (weight.double() + delta).to(weight.dtype)


def merge_adapters(model: torch.nn.Module, adapters: Sequence[LoraFactors], weights: Sequence[float]) -> torch.nn.Module:
    """``model`` with ``Σ_k w_k s_k B_k A_k`` added to its adapted weights, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(set().union(*[set(a) for a in adapters])):
            if name not in params:
                raise ValueError(f"adapter targets {name}, which the base model does not have")
            if params[name].device.type == "meta":
                raise ValueError(f"{name} is offloaded: an adapter cannot be added to it")
            terms = [(w, a[name]) for w, a in zip(weights, adapters) if name in a]
            params[name].copy_(add_lora(params[name], terms))
    return model
