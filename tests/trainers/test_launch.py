"""Where a job writes: the export and Ray Train's storage, local paths or URIs, never one inside
the other; an unknown scheme fails before any compute."""

import pytest

from trainers.jobs.dpo import DPOJobConfig
from trainers.launch import for_workers, run_locations, staging_dir


def _job(out, storage=""):
    job = DPOJobConfig(objective="s", out=out)
    job.train.storage_path = storage
    return job


def test_storage_defaults_to_beside_the_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_locations(_job("runs/dpo")) == (str(tmp_path / "runs/dpo"), str(tmp_path / "runs/ray_storage"))
    uri = f"file://{tmp_path}/runs/dpo"
    assert run_locations(_job(uri)) == (uri, f"file://{tmp_path}/runs/ray_storage")
    assert run_locations(_job(uri, "file:///ckpt")) == (uri, "file:///ckpt")
    assert staging_dir(_job(uri)).startswith(f"file://{tmp_path}/runs/ray_storage/staged-s-")


def test_an_unknown_scheme_fails_before_compute():
    with pytest.raises(ValueError, match="'nosuch://bucket/dpo' is not a storage location pyarrow can open"):
        run_locations(_job("nosuch://bucket/dpo"))
    with pytest.raises(ValueError, match="'nosuch://ckpt' is not a storage location"):
        run_locations(_job("out", "nosuch://ckpt"))


def test_workers_get_a_local_model_directory_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    job = _job("out")
    job.model.name_or_path = "base"
    assert for_workers(job).model.name_or_path == str(tmp_path / "base") and job.model.name_or_path == "base"
    job.model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub name stays a hub name
    assert for_workers(job) is job
