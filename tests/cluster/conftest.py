import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """`moray demo --tiny` once, as a user runs it with its output going to a file (the study test
    finishes the same directory): its directory, table (results.json) and the whole console log,
    Ray's forwarded worker output included."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    log = root.parent / "demo.log"
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--tiny", "--out", str(root)],
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=repo, env=env,
                              timeout=3600)
    text = log.read_bytes().decode("utf-8", errors="replace")
    assert done.returncode == 0, text[-4000:]
    return {"dir": root, "table": json.loads((root / "results.json").read_text()), "stdout": text}
