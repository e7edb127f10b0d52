import pytest

from cluster.demo import run_demo


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """`moray demo --tiny` once: its directory and table (the study test finishes the same directory)."""
    import contextlib
    import io

    import ray


    root = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            table = run_demo(tiny=True, out=str(root))
    finally:
        ray.shutdown()
    return {"dir": root, "table": table, "stdout": printed.getvalue()}
