"""Local paths and storage URIs go through pyarrow's filesystems, never through Path on a URI."""

import pytest

from trainers.core import storage


def test_uris_stay_uris_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert storage.absolute("out") == str(tmp_path / "out")
    assert storage.join("s3://bucket/runs/", "a", "b") == "s3://bucket/runs/a/b"
    assert storage.parent("s3://bucket/runs/dpo/") == "s3://bucket/runs"
    assert storage.parent("runs/dpo") == str(tmp_path / "runs")


def test_file_uri_round_trip(tmp_path):
    uri = f"file://{tmp_path}/deep/moray.json"
    assert not storage.exists(uri)
    storage.write_text(uri, "{}")
    assert storage.exists(uri) and (tmp_path / "deep" / "moray.json").read_text() == "{}"
    assert storage.read_text(uri) == "{}"
    with storage.local_dir(f"file://{tmp_path}/deep") as d:
        assert d == str(tmp_path / "deep")


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="'nosuch://x/y' is not a storage location pyarrow can open"):
        storage.filesystem("nosuch://x/y")
