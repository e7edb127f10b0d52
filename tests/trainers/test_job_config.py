"""Config dataclasses: YAML + dotted overrides, type checks, fail-fast validation."""

import pytest

from trainers.core.config import load_config, parse_dotted
from trainers.job_config import DataConfig, ModelConfig, TrainConfig, one_of
from trainers.jobs.dpo import DPOJobConfig
from trainers.losses import LOSSES

BASE = {"objective": "sentiment", "out": "o", "model.name_or_path": "m", "data.path": "d.jsonl"}


def test_yaml_then_cli_overrides(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n  zero_stage: 3\ndata:\n  columns: {prompt: question}\n")
    cfg = load_config(DPOJobConfig, str(f), {**BASE, **parse_dotted(["train.lr=2e-5", "model.lora=true"])})
    assert cfg.train.lr == 2e-5 and cfg.train.zero_stage == 3 and cfg.model.lora is True
    assert cfg.data.columns == {"prompt": "question"}
    cfg.validate()


def test_every_field_is_documented():
    import dataclasses


    for cls in (ModelConfig, DataConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize("override,match", [
    ({"train.betta": 1}, "unknown config key 'train.betta'"),
    ({"train.epochs": "two"}, "train.epochs: expected an integer"),
    ({"train.epochs": 1.5}, "train.epochs: expected an integer"),
    ({"model.lora": "maybe"}, "model.lora: expected a boolean"),
    ({"train": 3}, "train: expected a mapping"),
])
def test_bad_overrides_raise(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(DPOJobConfig, None, {**BASE, **override})


@pytest.mark.parametrize("override,match", [
    ({"train.beta": 0.0}, "train.beta must be a positive"),
    ({"train.beta": float("nan")}, "train.beta must be a positive"),
    ({"train.zero_stage": 4}, "zero_stage must be 0-3"),
    ({"train.loss": "kto"}, f"train.loss must be {one_of(LOSSES)}, got 'kto'"),
    ({"train.workers": 0}, "train.workers must be >= 1"),
    ({"objective": ""}, "objective is required"),
    ({"data.objective_labels": {"helpful": "better"}}, "needs data.response_columns"),
    ({"model.export_dtype": "fp8"}, "model.export_dtype must be auto, float32, bfloat16 or float16, got 'fp8'"),
    ({"model.export_shard_size": "lots"}, "model.export_shard_size: 'lots' is not a size"),
    ({"train.placement_strategy": "spread"}, "train.placement_strategy must be PACK, SPREAD"),
    ({"data.in_memory_mb": -1}, "data.in_memory_mb must be >= 0"),
    ({"model.attn_implementation": "flex_attention"}, "model.attn_implementation must be '', 'sdpa', .*got 'flex"),
])
def test_validate_fails_fast(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(DPOJobConfig, None, {**BASE, **override}).validate()


def test_objective_must_have_a_label_column():
    cfg = load_config(DPOJobConfig, None, {**BASE, "data.response_columns": ["a", "b"],
                                           "data.objective_labels": {"helpful": "h"}})
    with pytest.raises(ValueError, match="objective 'sentiment' has no label column"):
        cfg.validate()
