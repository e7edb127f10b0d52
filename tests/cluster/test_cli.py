"""The `moray` command line: options documented, bad input rejected before any compute."""

from cluster.cli import main
from tests.conftest import synthetic_pairs, write_jsonl


def test_config_lists_every_option(capsys):
    assert main(["config", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "train.zero_stage = 2" in out and "data.skip_invalid = False" in out


def test_missing_data_fails_before_ray_starts(tmp_path, capsys, tiny_model):
    import ray

    rc = main(["train", "dpo", "--objective", "s", "--data", str(tmp_path / "none.jsonl"),
               "--model", tiny_model, "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_invalid_rows_fail_with_row_numbers(tmp_path, capsys, tiny_model):
    rows = synthetic_pairs(5)
    rows[3]["rejected"] = "   "
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    rc = main(["train", "dpo", "--objective", "s", "--data", data, "--model", tiny_model,
               "--out", str(tmp_path / "o"), "--zero-stage", "3"])
    assert rc == 2
    assert "rejected empty (row 3)" in capsys.readouterr().err


def test_unknown_override_is_rejected(tmp_path, capsys):
    rc = main(["train", "dpo", "--objective", "s", "--data", "d", "--model", "m", "--out", "o",
               "--set", "train.lrr=1"])
    assert rc == 2 and "unknown config key 'train.lrr'" in capsys.readouterr().err


def test_unknown_objective_fails_before_ray_starts(tmp_path, capsys):
    import ray

    for cmd in (["score", "--objectives", "sentiment,humor", "--data", "x.jsonl", "--out", "y.jsonl"],
                ["pairs", "--model", "m", "--prompts", "demo:3", "--objectives", "humor", "--out", str(tmp_path)]):
        assert main(cmd) == 2
        assert "unknown objective 'humor'" in capsys.readouterr().err
    assert not ray.is_initialized()
