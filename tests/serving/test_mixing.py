"""§3a log-linear mixing and §6 Personalized Soups: the oracles in float64, sets of policies,
and soups of exported checkpoints (full weights and LoRA)."""

import itertools
import math

import pytest
import torch

from serving.mixing import merge_lora, mix_logits, soup_state_dicts
from serving.offline.soup import soup_policies
from serving.policies import check_compatible, parse_policies
from tests.helpers import make_lora_policy, make_policy
from trainers.core.metadata import read_metadata
from trainers.core.models import load_causal_lm

NAMES = ("sentiment", "conciseness")


def _bandit(K=3, N=7, beta=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_ref = torch.log_softmax(torch.randn(N, generator=g, dtype=torch.float64), 0)
    rewards = torch.randn(K, N, generator=g, dtype=torch.float64)
    # π_k ∝ π_ref · exp(r_k / β)
    log_pi = torch.log_softmax(log_ref[None] + rewards / beta, dim=1)
    return log_ref, rewards, log_pi, beta


def test_log_linear_mixture_equals_reward_weighted_bandit_policy():
    log_ref, rewards, log_pi, beta = _bandit()
    for w in ([0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.1, 0.1, 0.2]):  # the last sums to 0.4: π_ref enters
        w = torch.tensor(w, dtype=torch.float64)
        mixed = torch.softmax(mix_logits(log_pi[:, None, :], w, log_ref[None]), dim=-1)[0]
        exact = torch.softmax(log_ref + (w[:, None] * rewards).sum(0) / beta, dim=0)
        assert torch.allclose(mixed, exact, rtol=0, atol=1e-12)


def test_mix_logits_per_row_weights_and_unit_vectors():
    logits = torch.randn(2, 3, 11, dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75]], dtype=torch.float64)
    out = mix_logits(logits, w)
    assert torch.equal(out[0], logits[0, 0]) and torch.equal(out[1], logits[1, 1])
    assert torch.allclose(out[2], 0.25 * logits[0, 2] + 0.75 * logits[1, 2], atol=1e-15)
    with pytest.raises(ValueError, match="reference"):
        mix_logits(logits, torch.tensor([0.2, 0.2], dtype=torch.float64))


def _states(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g),
             "steps": torch.tensor([3, 4])} for _ in range(n)]


def test_soup_unit_weight_reproduces_each_model_bitwise():
    states = _states()
    for k in range(3):
        w = [0.0] * 3
        w[k] = 1.0
        merged = soup_state_dicts(states, w)
        assert all(torch.equal(merged[key], states[k][key]) for key in states[k])


def test_soup_of_copies_is_the_model_and_permutation_changes_nothing():
    one = _states(1)[0]
    merged = soup_state_dicts([one, one, one], [0.2, 0.3, 0.5])
    assert all(torch.allclose(merged[k].double(), one[k].double(), rtol=0, atol=1e-6) for k in one)
    states, w = _states(), [0.2, 0.3, 0.5]
    ref = soup_state_dicts(states, w)
    for perm in itertools.permutations(range(3)):
        got = soup_state_dicts([states[i] for i in perm], [w[i] for i in perm])
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    expected = 0.2 * states[0]["w"].double() + 0.3 * states[1]["w"].double() + 0.5 * states[2]["w"].double()
    assert torch.allclose(ref["w"].double(), expected, atol=1e-6)


def test_soup_refuses_different_architectures():
    a, b = _states(2)
    b = dict(b, w=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="different shapes"):
        soup_state_dicts([a, b], [0.5, 0.5])
    with pytest.raises(ValueError, match="different tensors"):
        soup_state_dicts([a, {"w": a["w"]}], [0.5, 0.5])


def test_lora_soup_merges_products_not_factors():
    g = torch.Generator().manual_seed(1)
    base = {"q.weight": torch.randn(6, 5, generator=g, dtype=torch.float64),
            "k.weight": torch.randn(6, 5, generator=g, dtype=torch.float64)}
    A = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    B = [torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    adapters = [{"q.weight": (A[0], B[0], 2.0)}, {"q.weight": (A[1], B[1], 2.0)}]
    merged = merge_lora(base, adapters, [0.25, 0.75])
    expected = base["q.weight"] + 2.0 * (0.25 * B[0] @ A[0] + 0.75 * B[1] @ A[1])
    assert torch.allclose(merged["q.weight"], expected, atol=1e-12)
    factors = base["q.weight"] + 2.0 * (0.25 * B[0] + 0.75 * B[1]) @ (0.25 * A[0] + 0.75 * A[1])
    assert not torch.allclose(merged["q.weight"], factors, atol=1e-3)
    assert merged["k.weight"] is base["k.weight"]  # untouched tensors stay the base's own
    unit = merge_lora(base, adapters, [1.0, 0.0])
    assert torch.allclose(unit["q.weight"], base["q.weight"] + 2.0 * B[0] @ A[0], atol=1e-12)


def test_parse_policies():
    assert parse_policies("a=/x, b=/y") == {"a": "/x", "b": "/y"}
    for bad, msg in [("a", "NAME=DIR"), ("a=/x,a=/y", "twice"), ("", "no policies")]:
        with pytest.raises(ValueError, match=msg):
            parse_policies(bad)


def test_soup_checkpoint_unit_weights_give_the_policy_logits(tiny_model, tmp_path):

    a = make_policy(tiny_model, tmp_path / "a", 1, objective="a")
    b = make_policy(tiny_model, tmp_path / "b", 2, objective="b")
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    out = soup_policies({"a": a, "b": b}, {"b": 1.0}, str(tmp_path / "soup_b"))
    with torch.no_grad():
        assert torch.equal(load_causal_lm(out)(input_ids=ids).logits, load_causal_lm(b)(input_ids=ids).logits)
    half = soup_policies({"a": a, "b": b}, [1, 1], str(tmp_path / "soup_half"))
    sa, sb, sh = (load_causal_lm(p).state_dict() for p in (a, b, half))
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(sh[key], 0.5 * sa[key] + 0.5 * sb[key], atol=1e-6)
    assert read_metadata(half).entries["weights"] == {"a": 0.5, "b": 0.5}


def test_lora_soup_of_exported_adapters(tiny_model, tmp_path):
    dirs = {k: make_lora_policy(tiny_model, tmp_path / k, seed, k) for k, seed in (("a", 1), ("b", 2))}
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    unit = soup_policies(dirs, {"a": 1.0}, str(tmp_path / "soup_a"), lora=True)
    with torch.no_grad():
        got = load_causal_lm(unit)(input_ids=ids).logits
        torch.testing.assert_close(got, load_causal_lm(dirs["a"])(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    base, mixed = load_causal_lm(tiny_model).state_dict(), load_causal_lm(
        soup_policies(dirs, [0.5, 0.5], str(tmp_path / "soup_half"), lora=True)).state_dict()
    assert torch.equal(mixed["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(mixed["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_check_compatible_refuses_other_reference_or_beta(tiny_model, tmp_path):
    a = make_policy(tiny_model, tmp_path / "a", 1, objective="a")
    b = make_policy(tiny_model, tmp_path / "b", 2, objective="b", beta=0.5)
    c = make_policy(tiny_model, tmp_path / "c", 3, objective="c", reference_model="other/model")
    assert set(check_compatible({"a": a, "a2": a}, ref=tiny_model, allow_rename=True)) == {"a", "a2"}
    with pytest.raises(ValueError, match="different beta"):
        check_compatible({"a": a, "b": b})
    with pytest.raises(ValueError, match="trained from"):
        check_compatible({"a": a, "c": c})
    with pytest.raises(ValueError, match="is not the model the policies were trained from"):
        check_compatible({"a": a}, ref=c)
    assert check_compatible({"a": a, "c": c}, force=True)
    with pytest.raises(FileNotFoundError, match="not a Moray policy"):
        check_compatible({"a": a, "base": tiny_model})


def test_mixing_a_policy_with_itself_returns_it():
    logits = torch.randn(1, 2, 9, dtype=torch.float64).expand(2, 2, 9)
    out = mix_logits(logits, torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert torch.allclose(out, logits[0], atol=1e-15) and math.isfinite(float(out.sum()))


def test_soups_stay_on_the_models_device():
    """Merging never brings tensors to the host: tensors on another device (here ``meta``, which
    fails on any mix with CPU tensors) come back on that device."""
    from serving.mixing import soup_tensor

    a, b = torch.empty(3, 4, device="meta"), torch.empty(3, 4, device="meta")
    assert soup_tensor([a, b], [0.25, 0.75]).device.type == "meta"
    assert soup_state_dicts([{"w": a}, {"w": b}], [0.5, 0.5])["w"].device.type == "meta"
    lora = {"w": (torch.empty(2, 4, device="meta"), torch.empty(3, 2, device="meta"), 1.0)}
    assert merge_lora({"w": a}, [lora], [1.0])["w"].device.type == "meta"
