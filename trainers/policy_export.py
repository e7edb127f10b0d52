"""A trained model as a Hugging Face checkpoint, written from its tensors as they arrive.

The weights come one at a time (gathered from the engine on rank 0, or from a module in memory)
and go straight into planned safetensors shards (:class:`trainers.core.export.ShardWriter`): the
writer never holds the model, only the tensor in hand. A LoRA policy is written merged
(``W + s·B·A`` per adapted layer, so plain ``from_pretrained`` loads it) with its adapter in
``adapter/`` beside it. The directory holds the weights, ``config.json``, the generation config,
the tokenizer and ``moray.json``: nothing else.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from trainers.core import storage
from trainers.core.export import ADAPTER_DIR, ShardWriter, module_tensors
from trainers.core.metadata import PolicyMetadata, write_metadata

Tensor = torch.Tensor
# a LoRA layer's parts as peft names them: <layer>.base_layer.weight, <layer>.lora_A.default.weight, ...
LORA_PART = re.compile(r"^(?P<layer>.+)\.(?P<part>base_layer\.weight|lora_A\.default\.weight|lora_B\.default\.weight)$")
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_dtype(name: str, trained_in_bf16: bool) -> torch.dtype:
    """``auto``: the dtype the model trained in (bf16 or fp32); otherwise the one named."""
    if name == "auto":
        return torch.bfloat16 if trained_in_bf16 else torch.float32
    return EXPORT_DTYPES[name]


def export_model(tensors: Iterable[Tuple[str, Optional[Tensor]]], module: torch.nn.Module, tokenizer, out_dir: str,
                 metadata: PolicyMetadata, dtype: torch.dtype = torch.float32,
                 max_shard_bytes: int = 5 * 10**9, aside: Optional[Callable[[str], bool]] = None,
                 kept: Optional[Dict[str, Tensor]] = None) -> List[str]:
    """Write ``module``'s trained weights (``tensors``: ``(name, tensor)`` in
    :func:`~trainers.core.export.module_tensors` order; under ZeRO-3 ``module`` holds partitions
    only, its shapes are read from them) as an HF checkpoint in ``out_dir`` (a directory or a storage
    URI, the weights written there once), floating tensors in
    ``dtype``. Consumes ``tensors`` to the end. Returns the weight files written. Tensors whose
    name ``aside`` accepts stay out of the checkpoint and go to ``kept`` (on the CPU, as
    trained): e.g. the conditioned adapters, written by their task."""
    lora = hasattr(module, "peft_config")
    aside = aside or (lambda name: False)
    plan = [(name, tuple(t.shape), dtype if t.is_floating_point() else t.dtype)
            for name, t in _export_stream(_meta_tensors(module), module, lora, None) if not aside(name)]
    writer = ShardWriter(out_dir, plan, max_shard_bytes)
    adapter: Dict[str, Tensor] = {}
    for name, t in _export_stream(tensors, module, lora, adapter):
        if aside(name):
            if kept is not None:
                kept[name] = t.detach().to("cpu")
            continue
        writer.write(name, t)
    files = writer.close()
    base = module.get_base_model() if lora else module
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.dtype = dtype
    with storage.writing_dir(out_dir) as local:  # the small files (a storage URI: staged, then copied)
        config.save_pretrained(local)
        if getattr(base, "generation_config", None) is not None and base.can_generate():
            base.generation_config.save_pretrained(local)
        if lora:
            _save_adapter(module, adapter, Path(local) / ADAPTER_DIR)
        tokenizer.save_pretrained(local)
    write_metadata(out_dir, metadata)
    return files


def _meta_tensors(module: torch.nn.Module) -> Iterator[Tuple[str, Tensor]]:
    """Shape-only stand-ins of :func:`module_tensors` (full shapes, also under ZeRO-3)."""
    for name, t in module_tensors(module):
        yield name, torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta")


def _export_stream(tensors: Iterable[Tuple[str, Optional[Tensor]]], module: torch.nn.Module, lora: bool,
                   adapter: Optional[Dict[str, Tensor]]) -> Iterator[Tuple[str, Tensor]]:
    """The exported checkpoint's ``(name, tensor)``: plain names; a LoRA layer's merged weight
    once its base weight and both factors have arrived (its factors also go to ``adapter``)."""
    pending: Dict[str, Dict[str, Tensor]] = {}
    for name, t in tensors:
        m = LORA_PART.match(name) if lora else None
        if m is None:
            yield _plain_name(name, lora), t
            continue
        layer, part = m.group("layer"), m.group("part").split(".")[0]
        if adapter is not None and part != "base_layer":
            adapter[name] = t
        parts = pending.setdefault(layer, {})
        parts[part] = t
        if len(parts) == 3:
            del pending[layer]
            scaling = module.get_submodule(layer).scaling["default"]
            merged = parts["base_layer"].float() + scaling * (parts["lora_B"].float() @ parts["lora_A"].float())
            yield _plain_name(layer + ".weight", lora), merged
    if pending:
        raise RuntimeError(f"LoRA layers {sorted(pending)[:3]} lack a factor or their base weight")


def _plain_name(name: str, lora: bool) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".") if lora else name


def _save_adapter(module: torch.nn.Module, factors: Dict[str, Tensor], out: Path) -> None:
    """peft's adapter directory from the gathered factors (peft's own names, without the adapter name)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(module, state_dict=factors)
    save_file({k: v.contiguous().float() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    module.peft_config["default"].save_pretrained(str(out))
