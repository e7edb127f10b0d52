"""Loading causal LMs and tokenizers: any Hugging Face hub name or local path, ``trust_remote_code``
off unless asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from trainers.core.export import load_lora_factors, merge_adapters, policy_files


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer, with the EOS token as padding when it has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_files(name_or_path).weights, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                   attn_implementation: Optional[str] = None, without_dropout: bool = False,
                   device_map: Optional[str] = None):
    """A causal LM; ``attn_implementation`` picks the attention kernel (transformers' default when
    None); ``without_dropout`` sets every dropout probability of its config and modules to 0;
    ``device_map="auto"`` shards it over the visible GPUs as it loads. A policy stored as an adapter
    alone (a conditioned policy's vertex) is its base with the adapter added."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = policy_files(name_or_path)
    name_or_path = files.weights

    kwargs: Dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device_map:
        kwargs["device_map"] = device_map
    if without_dropout:
        cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        kwargs.update({k: 0.0 for k, v in cfg.to_dict().items()
                       if "dropout" in k and isinstance(v, float) and not isinstance(v, bool) and v > 0})
    model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, dtype=dtype,
                                                 **kwargs)
    if without_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if files.adapter_only:
        merge_adapters(model, [load_lora_factors(files.adapter)], [1.0])
    return model


def ties_embeddings(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the model's LM head is its input embedding matrix (read from its config alone)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))


INFERENCE_DTYPES = ("auto", "float32", "bfloat16")  # auto: bf16 on a GPU, fp32 on the CPU


@dataclass(frozen=True)
class Placement:
    """Where an inference stage's models run (sampling, teacher-forced scoring, learned rewards)."""

    gpus: float = 0.0    # GPUs per Ray Data actor; 0 runs on the CPU (the default everywhere)
    dtype: str = "auto"  # float32 | bfloat16 | auto (bf16 on a GPU, fp32 on the CPU)

    def __post_init__(self):
        if self.gpus < 0:
            raise ValueError(f"GPUs per actor must be >= 0, got {self.gpus}")
        if self.dtype not in INFERENCE_DTYPES:
            raise ValueError(f"inference dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {self.dtype!r}")

    def device(self) -> torch.device:
        """This actor's GPU when it asked for one (Ray sets ``CUDA_VISIBLE_DEVICES``), else the CPU.
        Asking for a GPU where CUDA sees none is an error, not a silent CPU run."""
        if not self.gpus:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError(f"asked for {self.gpus} GPU(s) but CUDA sees none here (torch {torch.__version__}, "
                               f"CUDA {torch.version.cuda}); install a CUDA build of torch or ask for 0 GPUs")
        return torch.device("cuda", torch.cuda.current_device())

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def resources(self) -> Dict[str, float]:
        """``map_batches`` resource arguments for one actor."""
        return {"num_gpus": self.gpus} if self.gpus else {}

    def load(self, name_or_path: str, trust_remote_code: bool = False):
        """The causal LM on this placement's device and dtype, in eval mode."""
        device = self.device()
        model = load_causal_lm(name_or_path, trust_remote_code, dtype=self.torch_dtype(device))
        return model.to(device).eval()


def count_parameters(name_or_path: str, trust_remote_code: bool = False) -> int:
    """The model's parameter count, from its config alone (built on the ``meta`` device: no weights
    are read or allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())
