import pytest

from tests.helpers import make_policy


@pytest.fixture(scope="session")
def two_policies(tiny_model, tmp_path_factory):
    """Two policies from the tiny model (different seeded nudges), one reference, one β."""
    root = tmp_path_factory.mktemp("policies")
    return {"sentiment": make_policy(tiny_model, root / "sentiment", 1, objective="sentiment"),
            "conciseness": make_policy(tiny_model, root / "conciseness", 2, objective="conciseness")}
