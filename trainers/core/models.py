"""Loading causal LMs and tokenizers: any Hugging Face hub name or local path, ``trust_remote_code``
off unless asked."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer, with the EOS token as padding when it has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                   attn_implementation: Optional[str] = None, without_dropout: bool = False):
    """A causal LM; ``attn_implementation`` picks the attention kernel (transformers' default when
    None); ``without_dropout`` sets every dropout probability of its config and modules to 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: Dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
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
    return model


def ties_embeddings(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the model's LM head is its input embedding matrix (read from its config alone)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))
