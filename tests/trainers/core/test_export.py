"""Sharded safetensors written tensor by tensor: files and index load with safetensors and
transformers as Hugging Face writes them; sizes parse as HF's max_shard_size does; a writer fed
out of plan fails instead of writing a wrong file."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trainers.core.export import INDEX_FILE, ShardWriter, load_state, module_tensors, parse_size


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(10, 6, generator=g)), ("a.bias", torch.randn(10, generator=g)),
            ("b.weight", torch.randn(40, 10, generator=g)), ("scale", torch.tensor(3.5)),
            ("steps", torch.arange(5)), ("mask", torch.tensor([True, False, True]))]


@pytest.mark.parametrize("max_bytes, files", [(10**9, ["model.safetensors"]), (500, None)])
def test_shards_load_back_exactly_in_the_planned_dtype(tmp_path, max_bytes, files):
    tensors = _tensors()
    plan = [(n, tuple(t.shape), torch.bfloat16 if t.is_floating_point() else t.dtype) for n, t in tensors]
    writer = ShardWriter(str(tmp_path), plan, max_bytes)
    for n, t in tensors:
        writer.write(n, t)
    written = writer.close()
    if files:
        assert written == files
    else:  # b.weight (800 bytes in bf16) gets a shard of its own: 3 shards and the index
        assert written[-1] == INDEX_FILE and len(written) == 4
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == {n for n, _ in tensors}
        assert index["metadata"]["total_size"] == sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
                                                      for _, t in tensors)
        for f in written[:-1]:
            assert (tmp_path / f).stat().st_size <= 800 + 400  # header plus max_bytes of data, or the one larger tensor
    got = load_state(str(tmp_path))
    for n, t in tensors:
        want = t.bfloat16() if t.is_floating_point() else t
        assert got[n].dtype == want.dtype and torch.equal(got[n], want), n


def test_sharded_checkpoint_loads_with_from_pretrained(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    plan = [(n, tuple(t.shape), t.dtype) for n, t in module_tensors(model)]
    writer = ShardWriter(str(tmp_path), plan, 200_000)
    for n, t in module_tensors(model):
        writer.write(n, t)
    assert len(writer.close()) > 2
    model.config.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert len(load_file(str(next(tmp_path.glob("model-00001-of-*.safetensors"))))) >= 1


def test_a_writer_fed_out_of_plan_fails(tmp_path):
    writer = ShardWriter(str(tmp_path), [("a", (2,), torch.float32), ("b", (3,), torch.float32)], 10**6)
    with pytest.raises(RuntimeError, match=r"expected a \[2\], got b"):
        writer.write("b", torch.zeros(3))
    writer = ShardWriter(str(tmp_path), [("a", (2,), torch.float32), ("b", (3,), torch.float32)], 10**6)
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="'b' was planned but never written"):
        writer.close()


def test_sizes_parse_like_hugging_face():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1024") == 1024 and parse_size(" 1.5 kb ") == 1500
    for bad in ("five GB", "0MB", ""):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_lora_scaling_is_peft_s_rule():
    """The scaling the server and the soups apply to an adapter's B A is the one peft trained with."""
    from peft import LoraConfig, get_peft_model

    from trainers.core.export import lora_scaling

    for rslora in (False, True):
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                               LoraConfig(r=4, lora_alpha=6, target_modules=["0"], use_rslora=rslora))
        assert model.base_model.model[0].scaling["default"] == lora_scaling(4, 6, rslora)
    assert lora_scaling(4, 6) == 1.5 and lora_scaling(4, 6, rslora=True) == 3.0


def test_one_loader_reads_both_lora_layouts_as_peft_does(tiny_model, tmp_path):
    """A LoRA policy is merged weights plus ``adapter/``, or (a conditioned policy's vertex) an
    adapter alone whose moray.json names its base: load_causal_lm gives the latter as peft
    loads it on its base, and its tokenizer is the base's."""
    from peft import PeftModel

    from tests.helpers import make_conditioned_policy, make_lora_policy
    from trainers.core.export import ADAPTER_DIR, PolicyFiles, policy_files
    from trainers.core.models import load_causal_lm, load_tokenizer

    cond = make_conditioned_policy(tiny_model, tmp_path / "cond", shared_r=2)
    lora = make_lora_policy(tiny_model, tmp_path / "lora", 1, "a")
    vertex = str(tmp_path / "cond" / "vertices" / "b")
    assert policy_files(lora) == PolicyFiles(lora, str(tmp_path / "lora" / ADAPTER_DIR))
    assert policy_files(vertex) == PolicyFiles(str((tmp_path / "cond").resolve()), vertex, adapter_only=True)
    assert policy_files(tiny_model) == PolicyFiles(tiny_model) and policy_files("org/model") == PolicyFiles("org/model")
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    peft = PeftModel.from_pretrained(load_causal_lm(cond), vertex).eval()
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        torch.testing.assert_close(load_causal_lm(vertex)(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        assert (want - load_causal_lm(cond)(input_ids=ids).logits).abs().max() > 1e-2  # the adapter is there
    assert load_tokenizer(vertex).get_vocab() == load_tokenizer(tiny_model).get_vocab()
