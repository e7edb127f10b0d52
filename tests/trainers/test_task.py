"""HF export: metadata, LoRA merged into full weights, plain from_pretrained reload."""

import json
from pathlib import Path

import torch

from trainers.core.metadata import PolicyMetadata, read_metadata
from trainers.core.models import load_causal_lm
from trainers.job_config import ModelConfig
from trainers.task import build_policy, export_policy


def test_lora_export_merges_adapters_and_reloads(tiny_model, tmp_path):
    cfg = ModelConfig(name_or_path=tiny_model, lora=True, lora_r=4, lora_alpha=8)
    policy = build_policy(cfg)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # a non-zero adapter (B starts at zero)
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
    out = export_policy(policy, cfg, str(tmp_path / "p"), PolicyMetadata(None, "sentiment", beta=0.1))
    reloaded = load_causal_lm(out).eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base = load_causal_lm(tiny_model).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - got).abs().max() > 1e-3  # the adapter really moved it
    assert read_metadata(out).to_json() == {"objective": "sentiment", "beta": 0.1}
    assert json.loads((tmp_path / "p" / "config.json").read_text())["model_type"] == "llama"


def test_dropout_is_off_while_training_unless_kept(tmp_path, tiny_model):
    """A checkpoint with dropout: the policy trains without it (its reference pass has none), unless
    model.keep_dropout; the attention kernel is the one asked for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.attention_dropout = 0.3
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer_config.json").write_text((Path(tiny_model) / "tokenizer_config.json").read_text())
    off = build_policy(ModelConfig(name_or_path=str(tmp_path / "m"), attn_implementation="eager"))
    assert off.config.attention_dropout == 0.0 and off.config._attn_implementation == "eager"
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in off.model.layers)
    kept = build_policy(ModelConfig(name_or_path=str(tmp_path / "m"), keep_dropout=True))
    assert all(layer.self_attn.attention_dropout == 0.3 for layer in kept.model.layers)


def test_gradient_checkpointing_keeps_lora_gradients_exact(tiny_model):
    """With checkpointing the adapters get the same gradients as without (the frozen embeddings
    give checkpointed blocks inputs without grad, where reentrant checkpointing would drop them)."""
    ids = torch.tensor([[5, 9, 17, 33, 2, 8], [7, 7, 40, 3, 11, 12]])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = build_policy(ModelConfig(name_or_path=tiny_model, lora=True, lora_r=4,
                                          gradient_checkpointing=checkpointing))
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
        policy.train()
        policy(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
    assert grads[1] and all(g is not None for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)
