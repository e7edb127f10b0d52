import pytest

from tests.helpers import make_policy


@pytest.fixture(scope="session")
def two_policies(tiny_model, tmp_path_factory):
    """Two policies from the tiny model (different seeded nudges), one reference, one β."""
    root = tmp_path_factory.mktemp("policies")
    return {"sentiment": make_policy(tiny_model, root / "sentiment", 1, objective="sentiment"),
            "conciseness": make_policy(tiny_model, root / "conciseness", 2, objective="conciseness")}


@pytest.fixture(scope="session")
def conditioned(tiny_model, tmp_path_factory):
    """A conditioned policy of the tiny model: objectives a and b, a shared pair, random non-zero B."""
    from tests.helpers import make_conditioned_policy

    return make_conditioned_policy(tiny_model, tmp_path_factory.mktemp("conditioned") / "policy", shared_r=2)
