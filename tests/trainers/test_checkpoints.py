"""The final export: written once, straight to its location (a storage URI included), by rank 0 on
the driver's node or anywhere for a URI; into the storage only for a local location on another node."""

import tempfile

import torch

from trainers.core.export import INDEX_FILE, module_tensors
from trainers.core.metadata import PolicyMetadata



def test_an_export_to_a_storage_uri_is_written_once_straight_there(tiny_model, tmp_path, monkeypatch):
    """export_model to a ``file://`` URI: every file lands at the location, sharded weights included,
    nothing is staged in the temporary directory, and from_pretrained loads it; rank 0 writes there
    unless the location is a local path on another node than the driver's (then into the storage)."""
    from transformers import AutoModelForCausalLM

    from trainers.checkpoints import ExportTarget
    from trainers.core.models import load_causal_lm, load_tokenizer
    from trainers.policy_export import export_model

    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    model = load_causal_lm(tiny_model)
    monkeypatch.chdir(tmp_path)
    export_model(module_tensors(model), model, load_tokenizer(tiny_model), f"file://{tmp_path}/out", PolicyMetadata("policy"),
                 max_shard_bytes=300_000)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1 and (tmp_path / "out" / INDEX_FILE).exists()
    assert not list(staging.iterdir()) and not (tmp_path / "file:").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    for (n, p), (_, q) in zip(loaded.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    target = ExportTarget("/data/out", "s3://b/run/export", driver_node="a")
    assert target.location("a") == "/data/out" and target.location("b") == "s3://b/run/export"
    assert ExportTarget("s3://b/out", "s3://b/run/export", "a").location("b") == "s3://b/out"
