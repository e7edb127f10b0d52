"""Loading causal LMs and tokenizers: any Hugging Face hub name or local path, ``trust_remote_code``
off unless asked."""

from __future__ import annotations

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


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, dtype=dtype)


def ties_embeddings(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the model's LM head is its input embedding matrix (read from its config alone)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))
