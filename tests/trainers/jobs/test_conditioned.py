"""``moray train conditioned``: its configuration checks, its export (each vertex loads with plain
transformers + peft as W + s(B_0A_0 + B_kA_k)), and two-worker runs at ZeRO-2 (a worker killed and
the run resumed: every row keeps its λ) and ZeRO-3 on PKU-SafeRLHF-shaped rows (slow)."""

import json

import numpy as np
import pytest
import torch

from cluster.cli import main
from tests.helpers import conditioned_model, fail_once, multi_rows, write_jsonl
from trainers.conditioned_lora import adapters, row_preferences, set_preference
from trainers.core.config import load_config
from trainers.core.export import module_tensors
from trainers.core.metadata import read_metadata
from trainers.core.models import load_causal_lm
from trainers.jobs.conditioned import ConditionedJobConfig, ConditionedTask, conditioned_metadata
from trainers.jobs.conditioned import run as run_conditioned

OBJECTIVES = ["sentiment", "conciseness"]


def _config(tiny_model, data, out, **over):
    return load_config(ConditionedJobConfig, overrides={
        "objectives": OBJECTIVES, "out": str(out), "model.name_or_path": tiny_model, "data.path": data, **over})


@pytest.mark.parametrize("over, says", [
    ({"objectives": ["sentiment"]}, "at least two different objectives"),
    ({"objectives": ["sentiment", "sentiment"]}, "at least two different objectives"),
    ({"rank": 0}, "rank must be >= 1"),
    ({"shared_rank": -1}, "shared_rank >= 0"),
    ({"concentration": 0.0}, "concentration must be a positive"),
    ({"sampling": "corners"}, "sampling must be dirichlet or vertices"),
    ({"model.lora": True}, "drop model.lora"),
    ({"data.response_columns": ["a", "b"], "data.objective_labels": {"sentiment": "s", "helpful": "h"}},
     "objective 'conciseness' has no label column"),
])
def test_bad_configs_fail_before_ray(tiny_model, tmp_path, over, says):
    import ray

    cfg = _config(tiny_model, write_jsonl(tmp_path / "m.jsonl", multi_rows(4)), tmp_path / "out", **over)
    with pytest.raises(ValueError, match=says):
        run_conditioned(cfg)
    assert not ray.is_initialized()


def test_cli_lists_the_job_and_its_sampling_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "conditioned", "--help"])
    text = capsys.readouterr().out
    assert "--sampling {dirichlet,vertices}" in text and "--shared-rank" in text


def test_export_writes_the_base_and_one_peft_adapter_per_vertex(tiny_model, tmp_path):
    """The export of a model with random adapters (shared rank 2, rank 3, scale 2): the base is a
    plain checkpoint equal to the model with adapters off; each vertex loads with plain
    transformers + peft and its logits equal those of W + s(B_0A_0 + B_kA_k) and of the model at e_k."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _config(tiny_model, "unused", tmp_path / "out", rank=3, shared_rank=2, **{"model.lora_alpha": 6})
    model = conditioned_model(tiny_model, 2, rank=3, shared_rank=2)
    out = str(tmp_path / "out")
    ConditionedTask(cfg).export(module_tensors(model), model, out, conditioned_metadata(cfg), torch.float64)
    meta = read_metadata(out)
    assert meta.kind == "conditioned" and meta.mixable and meta.objective is None
    assert meta.get("objectives") == OBJECTIVES and meta.get("lora_r") == 3 and meta.get("shared_r") == 2
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 8]])
    for (n, p), q in zip(base.state_dict().items(), load_causal_lm(tiny_model, dtype=torch.float64).state_dict().values()):
        assert torch.equal(p, q), n
    for k, name in enumerate(OBJECTIVES):
        vertex = f"{out}/vertices/{name}"
        vmeta = read_metadata(vertex)
        assert (vmeta.kind, vmeta.objective, vmeta.get("base"), vmeta.get("lora")) == ("policy", name, "../..", True)
        assert json.loads(open(f"{vertex}/adapter_config.json").read())["r"] == 5
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64), vertex)
        merged = load_causal_lm(tiny_model, dtype=torch.float64)
        with torch.no_grad():
            for layer, a in adapters(model):
                A, B = a.pair(k)
                merged.get_submodule(layer).weight.add_(a.scaling * (a.shared_B @ a.shared_A + B @ A))
            set_preference(model, torch.eye(2, dtype=torch.float64)[k].view(1, 1, 2))
            want = merged(input_ids=ids).logits
            torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=0, atol=1e-6)
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        assert (want - base(input_ids=ids).logits).abs().max() > 1e-3


def _pku_rows(rows):
    """The same pairs in PKU-SafeRLHF's shape: response_0/1, better_response_id, safer_response_id."""
    return [{"prompt": r["prompt"], "response_0": r["response_0"], "response_1": r["response_1"],
             "better_response_id": r["better_sentiment"], "safer_response_id": r["better_conciseness"]} for r in rows]


@pytest.mark.slow
def test_two_workers_zero2_resumed_and_zero3_train_the_same_policy(ray_local, tiny_model, tmp_path, monkeypatch):
    """ZeRO-2 loses a worker at step 3 and resumes from its checkpoint; the run's Σλ over every row
    trained equals each row's own λ (a function of seed and row id) summed over both epochs, so
    every row kept its λ across the restart. ZeRO-3 on the same pairs in PKU-SafeRLHF's shape trains
    the same adapters; the vertices load with peft."""
    rows = multi_rows(16)
    common = {"train.workers": 2, "train.micro_batch_size": 2, "train.epochs": 2, "train.lr": 5e-3,
              "train.log_every": 1, "rank": 4, "shared_rank": 2, "concentration": 0.7}
    marker = fail_once(monkeypatch, tmp_path / "ray_storage", step=3)
    z2 = run_conditioned(_config(tiny_model, write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "z2", **common, **{
        "train.zero_stage": 2, "train.checkpoint_every": 1, "train.max_failures": 1}))
    monkeypatch.undo()
    assert marker.exists() and z2["step"] == 8
    want = row_preferences(range(16), 0, 2, 0.7, "dirichlet").sum(0) * 2
    assert z2["rows_seen"] == 32
    for k, name in enumerate(OBJECTIVES):
        assert abs(z2[f"lambda_seen/{name}"] - want[k]) < 1e-9
    pku = write_jsonl(tmp_path / "pku.jsonl", _pku_rows(rows))
    z3 = run_conditioned(load_config(ConditionedJobConfig, overrides={
        "objectives": ["helpful", "harmless"], "out": str(tmp_path / "z3"), "model.name_or_path": tiny_model,
        "data.path": pku, "data.response_columns": ["response_0", "response_1"],
        "data.objective_labels": {"helpful": "better_response_id", "harmless": "safer_response_id"},
        "train.zero_stage": 3, "train.checkpoint_every": 0, **common}))
    assert abs(z3["lambda_seen/helpful"] - want[0]) < 1e-9 and z3["loss"] == pytest.approx(z2["loss"], rel=1e-4)
    from peft import PeftModel
    from safetensors.torch import load_file

    moved = 0
    for a, b in zip(OBJECTIVES, ["helpful", "harmless"]):
        t2 = load_file(str(tmp_path / "z2" / "vertices" / a / "adapter_model.safetensors"))
        t3 = load_file(str(tmp_path / "z3" / "vertices" / b / "adapter_model.safetensors"))
        assert sorted(t2) == sorted(t3)
        for key in t2:
            torch.testing.assert_close(t2[key], t3[key], rtol=1e-4, atol=1e-6, msg=key)
            moved += int(".lora_B." in key and t2[key].abs().max() > 0)
        PeftModel.from_pretrained(load_causal_lm(str(tmp_path / "z2")), str(tmp_path / "z2" / "vertices" / a))
    assert moved > 0
    base, trained_base = load_causal_lm(tiny_model), load_causal_lm(str(tmp_path / "z3"))
    for (n, p), q in zip(base.state_dict().items(), trained_base.state_dict().values()):
        assert torch.equal(p, q), n  # the base is frozen
    assert read_metadata(str(tmp_path / "z3")).get("zero_stage") == 3
    assert np.isfinite(z2["loss"]) and z2["loss"] < np.log(2)
