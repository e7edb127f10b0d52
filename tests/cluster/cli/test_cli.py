"""The `moray` command line: options documented, bad input rejected before any compute."""

import json

import pytest

from cluster.cli import main
from cluster.cli.parser import build_parser, moray_command
from serving.deploy import load_serve_file
from tests.helpers import candidates as _candidates
from tests.helpers import make_policy, synthetic_pairs, write_jsonl


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


def test_mix_and_serve_refuse_mismatched_policies_before_ray_starts(tmp_path, capsys, tiny_model):
    import ray


    a = make_policy(tiny_model, tmp_path / "a", 1, objective="a")
    b = make_policy(tiny_model, tmp_path / "b", 2, objective="b", beta=0.5)
    for cmd in (["serve", "--policies", f"a={a},b={b}"],
                ["mix", "mpo", "--policies", f"a={a},b={b}", "--ref", tiny_model, "--prompts", "demo:2",
                 "--out", str(tmp_path / "w.json")],
                ["mix", "soup", "--policies", f"a={a},b={b}", "--weights", "1,1", "--out", str(tmp_path / "s")]):
        assert main(cmd) == 2
        assert "different beta" in capsys.readouterr().err
    assert main(["serve", "--policies", f"a={a}", "--set", "default_mixing=average"]) == 2
    assert "default_mixing must be 'logits' or 'soup'" in capsys.readouterr().err
    assert main(["mix", "soup", "--policies", f"a={a}", "--weights", "a=-1", "--out", str(tmp_path / "s")]) == 2
    assert "negative" in capsys.readouterr().err
    assert main(["serve"]) == 2 and "--config FILE or --policies" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


def test_serve_writes_a_config_file_that_moray_reads_back(tmp_path, tiny_model):

    a = make_policy(tiny_model, tmp_path / "a", 1, objective="a")
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--policies", f"a={a}", "--port", "8111", "--set", "max_replicas=3",
                 "--write-config", str(out)]) == 0
    doc = load_serve_file(str(out))
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 8111}
    assert doc["applications"][0]["args"]["policies"] == {"a": a}
    assert doc["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] == 3


def test_gapo_refuses_pairs_without_every_label_before_ray_starts(tmp_path, capsys, tiny_model):
    import ray

    rows = [{"prompt": "p", "response_0": "a", "response_1": "b", "better_sentiment": 0}]
    data = write_jsonl(tmp_path / "multi.jsonl", rows)
    rc = main(["train", "gapo", "--objectives", "sentiment,conciseness", "--data", data, "--model", tiny_model,
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "better_conciseness must be 0 or 1 (row 0)" in capsys.readouterr().err
    assert main(["train", "gapo", "--objectives", "sentiment,conciseness", "--data", data, "--model", tiny_model,
                 "--out", str(tmp_path / "o"), "--lora"]) == 2
    assert "set balance_params=all" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_mopo_and_wrpo_refuse_bad_input_before_ray_starts(tmp_path, capsys, tiny_model):
    import ray


    cands = write_jsonl(tmp_path / "c.jsonl", _candidates(4))
    base = ["train", "mopo", "--objective", "conciseness", "--data", cands, "--model", tiny_model,
            "--out", str(tmp_path / "o")]
    assert main(base + ["--constraints", "sentiment=0.97"]) == 2
    assert "infeasible MOPO thresholds" in capsys.readouterr().err
    assert main(base + ["--constraints", "sentiment=high"]) == 2
    assert "sentiment=high: not a number" in capsys.readouterr().err
    assert main(base) == 2
    assert "constraints must name at least one" in capsys.readouterr().err
    pairs = write_jsonl(tmp_path / "w.jsonl", [{**r, "source": r["rejected"]} for r in synthetic_pairs(3)])
    assert main(["train", "wrpo", "--objective", "sentiment", "--data", pairs, "--model", tiny_model,
                 "--out", str(tmp_path / "w")]) == 2
    assert "source == rejected (row 0, 1, 2)" in capsys.readouterr().err
    assert main(["pairs", "--wrpo", "--target", tiny_model, "--prompts", "demo:2", "--objectives", "sentiment",
                 "--out", str(tmp_path / "p")]) == 2
    assert "--wrpo needs --target (or --model) and --sources" in capsys.readouterr().err
    demo = ["--prompts", "demo:2"]
    for command in (["pairs", "--model", tiny_model, "--objectives", "sentiment", *demo],
                    ["score", "--objectives", "sentiment", "--data", cands],
                    ["eval", "--policies", f"a={tiny_model}", "--objectives", "sentiment", *demo]):
        assert main([*command, "--out", str(tmp_path / "g"), "--gpus-per-actor", "-1"]) == 2
        assert "GPUs per actor must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's choices
        main(["mix", "mpo", "--policies", f"a={tiny_model}", "--ref", tiny_model, "--prompts", "demo:2",
              "--out", str(tmp_path / "w.json"), "--dtype", "float16"])
    for job in ("mopo", "wrpo", "gapo"):
        assert main(["config", job]) == 0
    assert "alpha_max = 0.1" in capsys.readouterr().out
    assert not ray.is_initialized()


def test_eval_refuses_bad_input_before_ray_starts(tmp_path, capsys, tiny_model):
    import ray

    def run(*extra, policies=f"a={tiny_model}"):
        return main(["eval", "--policies", policies, "--prompts", "demo:4", "--out", str(tmp_path / "e"), *extra])

    assert run("--objectives", "sentiment,helpfulness") == 2
    assert "helpfulness" in capsys.readouterr().err
    assert run("--objectives", "sentiment,conciseness", policies=f"a={tmp_path / 'none'}") == 2
    assert "is not a directory" in capsys.readouterr().err
    assert run("--objectives", "sentiment,conciseness", "--reference", "sentiment=-1") == 2
    assert "one value per objective" in capsys.readouterr().err
    assert run("--objectives", "sentiment,conciseness", "--reference", "sentiment=-1,conciseness=low") == 2
    assert "conciseness=low: not a number" in capsys.readouterr().err
    assert not ray.is_initialized()


def _command_paths(parser, prefix=()):
    """Every command path of the parser (``()``, ``("train",)``, ``("train", "dpo")``, ...), found
    by walking its sub-parser actions."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, prefix + (name,))


def test_help_of_every_command_and_sub_command(capsys):
    import pytest


    paths = list(_command_paths(build_parser()))
    assert ("train", "mopo") in paths and ("jobs", "logs") in paths and ("mix", "soup") in paths
    for path in paths:
        with pytest.raises(SystemExit) as done:
            main([*path, "--help"])
        assert done.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith("usage: moray"), path


def test_moray_help_from_the_shell():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "95%" in out.stdout and "score policies on held-out prompts" in out.stdout


def test_policies_named_by_another_objective_are_refused_before_ray_starts(tmp_path, capsys, tiny_model):
    """Swapped directories (sentiment=<the conciseness policy>) are refused by serve, mix mpo and
    mix soup; --allow-rename accepts a deliberate rename."""
    import ray


    s = make_policy(tiny_model, tmp_path / "s", 1, objective="sentiment")
    c = make_policy(tiny_model, tmp_path / "c", 2, objective="conciseness")
    swapped = f"sentiment={c},conciseness={s}"
    for cmd in (["serve", "--policies", swapped],
                ["mix", "mpo", "--policies", swapped, "--ref", tiny_model, "--prompts", "demo:2",
                 "--out", str(tmp_path / "w.json")],
                ["mix", "soup", "--policies", swapped, "--weights", "1,1", "--out", str(tmp_path / "soup")]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert f"sentiment={c} was trained for 'conciseness'" in err and "--allow-rename" in err
    assert not ray.is_initialized() and not (tmp_path / "soup").exists()
    assert main(["mix", "soup", "--policies", f"positive={s},short={c}", "--weights", "1,1",
                 "--out", str(tmp_path / "soup"), "--allow-rename"]) == 0
    assert json.loads((tmp_path / "soup" / "moray.json").read_text())["weights"] == {"positive": 0.5, "short": 0.5}
    assert main(["serve", "--policies", f"sentiment={s},conciseness={c}", "--allow-rename",
                 "--write-config", str(tmp_path / "serve.yaml")]) == 0
    assert "allow_rename: true" in (tmp_path / "serve.yaml").read_text()


def test_command_is_checked_before_submitting():
    assert moray_command(["--", "moray", "train", "dpo", "--objective", "a"]) == ["train", "dpo", "--objective", "a"]
    assert moray_command(["mix", "soup", "--policies", "a=x", "--weights", "1", "--out", "o"])[:2] == ["mix", "soup"]
    with pytest.raises(ValueError, match="nothing to submit"):
        moray_command(["--"])
    with pytest.raises(ValueError, match="not a valid moray command"):
        moray_command(["--", "train", "dpo", "--no-such-flag", "1"])
    with pytest.raises(ValueError, match="runs on this machine"):
        moray_command(["jobs", "list"])


def test_every_job_runs_from_its_config_alone_and_address_is_a_config_field():
    """One ``run(config)`` for every job; ``--address`` (the flag every job keeps) lands in the config's
    ``address``, as does ``address:`` in a YAML file or ``--set address=...``."""
    import inspect

    from trainers.job import config_from
    from trainers.jobs import JOBS

    for job in JOBS.values():
        assert list(inspect.signature(job.run).parameters) == ["job"], job.name
        args = build_parser().parse_args(["train", job.name, "--address", "ray://head:10001"])
        assert config_from(job, None, args).address == "ray://head:10001"
        assert config_from(job, None, build_parser().parse_args(["train", job.name])).address == ""
        assert config_from(job, None, args, ["address=auto"]).address == "auto"
