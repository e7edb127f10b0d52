"""moray.json: one type, kinds from one table, the JSON on disk unchanged."""

import json

import pytest

from trainers.core.metadata import KINDS, METADATA_FILE, PolicyMetadata, has_kind, read_metadata, write_metadata


def test_policy_metadata_round_trips_the_flat_json(tmp_path):
    on_disk = {"kind": "policy", "objective": "sentiment", "reference_model": "/m", "beta": 0.1,
               "lora_merged": False, "loss": "dpo", "pairs": 12}
    (tmp_path / METADATA_FILE).write_text(json.dumps(on_disk))
    meta = read_metadata(str(tmp_path))
    assert (meta.kind, meta.objective, meta.reference_model, meta.beta) == ("policy", "sentiment", "/m", 0.1)
    assert meta.entries == {"lora_merged": False, "loss": "dpo", "pairs": 12} and meta.get("loss") == "dpo"
    assert meta.mixable and meta.describe() == "a DPO policy"
    (tmp_path / "again").mkdir()
    write_metadata(str(tmp_path / "again"), meta)
    assert json.loads((tmp_path / "again" / METADATA_FILE).read_text()) == on_disk


def test_kinds_table_says_what_mixes():
    assert {k for k, kind in KINDS.items() if kind.mixable} == {"policy", "soup", "conditioned"}
    soup = PolicyMetadata("policy", "a", "/m", 0.1).with_entries(kind="soup", objective="a+b", weights={"a": 1.0})
    assert (soup.kind, soup.objective, soup.reference_model, soup.entries) == ("soup", "a+b", "/m", {"weights": {"a": 1.0}})
    assert soup.mixable and not PolicyMetadata("reward_model", "x").mixable and not PolicyMetadata(None).mixable
    assert PolicyMetadata("reward_model", "x").describe() == "a reward model"


def test_unknown_kind_is_read_but_never_written(tmp_path):
    (tmp_path / METADATA_FILE).write_text(json.dumps({"kind": "a_newer_kind", "objective": "a"}))
    meta = read_metadata(str(tmp_path))
    assert meta.kind == "a_newer_kind" and not meta.mixable and not has_kind(str(tmp_path), "policy")
    with pytest.raises(ValueError, match="unknown moray.json kind 'a_newer_kind'"):
        write_metadata(str(tmp_path), meta)
    with pytest.raises(FileNotFoundError, match="not a Moray policy"):
        read_metadata(str(tmp_path / "missing"))
