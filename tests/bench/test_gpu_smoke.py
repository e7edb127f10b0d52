"""The GPU smoke runner on a machine without GPUs: every GPU step skipped with its reason, one
table, exit 0; a failing step is caught, reported in the table and makes the exit status 1."""

import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_smoke import main, run_steps, table

ROOT = Path(__file__).resolve().parents[2]


def _passes(out, base, gpus):
    return f"1 + 1 = {1 + 1}"


def _fails(out, base, gpus):
    assert 0.1 + 0.2 == 0.3, "0.1 + 0.2 is not 0.3 in binary floating point"
    return "unreachable"


STEPS = [("adds", 0, _passes), ("rounds", 0, _fails), ("needs four", 4, _passes)]


def test_without_gpus_every_gpu_step_is_skipped_with_its_reason(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), str(tmp_path / "smoke")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if "skipped" in line and "visible" in line]
    from bench.gpu_smoke_serving import STEPS as serving

    assert len(rows) >= len(serving)
    assert any("needs 2 GPUs, 0 visible" in r for r in rows) and any("needs 1 GPU, 0 visible" in r for r in rows)
    assert "0 passed, 0 failed" in run.stdout
    assert (tmp_path / "smoke" / "smoke_table.txt").read_text().strip() == run.stdout.split("\n\n")[-1].strip()


def test_failures_are_caught_per_step_and_fail_the_run(tmp_path, capsys):
    results = run_steps(STEPS, tmp_path, lambda: "unused", gpus=1)
    assert [(r.name, r.status) for r in results] == [("adds", "passed"), ("rounds", "failed"), ("needs four", "skipped")]
    assert results[0].detail == "1 + 1 = 2"
    assert results[1].detail == "AssertionError: 0.1 + 0.2 is not 0.3 in binary floating point"
    assert results[2].detail == "needs 4 GPUs, 1 visible"
    assert "1 passed, 1 failed, 1 skipped" in table(results)
    assert main([str(tmp_path / "run"), "--base-model", "unused"], modules=("tests.bench.test_gpu_smoke",
                                                                             "bench.no_such_steps")) == 1
    assert "bench.no_such_steps not found" in capsys.readouterr().out
