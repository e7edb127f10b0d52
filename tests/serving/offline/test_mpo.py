"""§3b MPO max-min weights: F, its gradient and BSMD against exact solutions on bandits (float64),
and the Ray Data pipeline's log-ratios against a direct computation."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cluster.cli import main
from serving.offline.mpo import bsmd, bsmd_direction, mpo_objective, sample_log_ratios
from tests.helpers import make_policy


def _bandit(K=2, N=6, beta=0.5, seed=0, uniform_ref=True):
    """π_k ∝ π_ref exp(r_k/β); returns π_ref (N,) and ℓ (N, K) = log π_k − log π_ref."""
    rng = np.random.default_rng(seed)
    log_ref = np.full(N, -math.log(N)) if uniform_ref else np.log(rng.dirichlet(np.ones(N) * 2))
    r = rng.normal(size=(K, N))
    if K == 2:
        r[1] = -r[0] + 0.3 * rng.normal(size=N)  # objectives that conflict: λ* is interior
    logits = log_ref[None] + r / beta
    log_pi = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return np.exp(log_ref), (log_pi - log_ref[None]).T


def _exact_F(lam, ref, ell):
    return float(np.log((ref * np.exp(ell @ lam)).sum()))


def _exact_argmin(ref, ell):
    K = ell.shape[1]
    res = minimize(lambda l: _exact_F(l, ref, ell), np.full(K, 1 / K), method="SLSQP", bounds=[(0, 1)] * K,
                   constraints=[{"type": "eq", "fun": lambda l: l.sum() - 1}], options={"ftol": 1e-14, "maxiter": 500})
    return res.x


def test_F_is_zero_at_vertices_and_nonpositive_inside():
    ref, ell = _bandit(K=3, N=6)
    enumerated = ell[None]  # uniform π_ref: the N actions once each are an exact sample
    for k in range(3):
        e = np.eye(3)[k]
        assert abs(mpo_objective(e, enumerated)) < 1e-12
        assert abs(_exact_F(e, ref, ell)) < 1e-12
    rng = np.random.default_rng(1)
    for lam in rng.dirichlet(np.ones(3), size=20):
        assert mpo_objective(lam, enumerated) <= 1e-12


def test_identical_policies_give_F_identically_zero():
    ref, ell = _bandit(K=1, N=6)
    same = np.repeat(ell, 3, axis=1)[None]
    for lam in np.random.default_rng(2).dirichlet(np.ones(3), size=5):
        assert abs(mpo_objective(lam, same)) < 1e-12


def test_direction_is_the_gradient_of_F_and_ess_bounds():
    _, ell = _bandit(K=2, N=6)
    lam = np.array([0.3, 0.7])
    v, ess = bsmd_direction(lam, ell[None])
    h = 1e-6
    for k in range(2):
        d = np.eye(2)[k] * h
        numeric = (mpo_objective(lam + d, ell[None]) - mpo_objective(lam - d, ell[None])) / (2 * h)
        assert abs(v[k] - numeric) < 1e-8
    assert 1 <= ess[0] <= 6
    v0, ess0 = bsmd_direction(np.array([0.5, 0.5]), np.zeros((1, 6, 2)))
    assert ess0[0] == pytest.approx(6.0) and np.all(v0 == 0)


def test_bsmd_reaches_the_exact_minimiser_and_equalises_the_objectives():
    ref, ell = _bandit(K=2, N=6)
    lam_star = _exact_argmin(ref, ell)
    assert 0.05 < lam_star[0] < 0.95  # the objectives conflict: both weights are used
    result = bsmd([ell[None]], steps=20000, c=2.0)
    assert np.abs(result.weights - lam_star).max() < 2e-3
    # at λ*, both objectives have the same expected log-ratio under the mixture (the max-min point)
    v, _ = bsmd_direction(lam_star, ell[None])
    assert abs(v[0] - v[1]) < 1e-5


def test_bsmd_with_sampled_responses_approaches_the_exact_minimiser():
    ref, ell = _bandit(K=3, N=8, seed=3, uniform_ref=False)
    lam_star = _exact_argmin(ref, ell)
    rng = np.random.default_rng(4)
    batches = [ell[rng.choice(8, size=(4, 512), p=ref)] for _ in range(40)]  # (prompts, m, K)
    result = bsmd(batches, steps=3000, c=2.0)
    assert np.abs(result.weights - lam_star).max() < 0.03
    gap = _exact_F(result.weights, ref, ell) - _exact_F(lam_star, ref, ell)
    assert 0 <= gap < 5e-3
    short = bsmd(batches, steps=100, c=2.0)  # fewer steps: further from λ*
    assert _exact_F(short.weights, ref, ell) - _exact_F(lam_star, ref, ell) > gap
    assert all(abs(sum(h["lambda"]) - 1) < 1e-12 for h in result.history)


def test_one_objective_gets_weight_one():
    _, ell = _bandit(K=1, N=5)
    assert bsmd([ell[None]], steps=10).weights.tolist() == [1.0]


def test_non_finite_log_ratios_are_refused():
    bad = np.zeros((1, 3, 2))
    bad[0, 1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        mpo_objective([0.5, 0.5], bad)


@pytest.mark.slow
def test_moray_mix_mpo_end_to_end(ray_local, tiny_model, tmp_path):
    """Ray Data stages sample from the reference and teacher-force K+1 models: a policy equal to
    the reference has log-ratio 0 on every sample; the CLI writes weights on the simplex."""

    same = make_policy(tiny_model, tmp_path / "same", 0, noise=0.0, objective="same")
    other = make_policy(tiny_model, tmp_path / "other", 1, noise=0.1, objective="other")
    prompts = ["Write about the coffee.", "Tell me about the park.", "Describe a song.", "Hi"]
    ell = sample_log_ratios({"same": same, "other": other}, tiny_model, prompts, m=3, max_new_tokens=12)
    assert ell.shape == (4, 3, 2)
    assert np.abs(ell[..., 0]).max() < 1e-4 and np.abs(ell[..., 1]).max() > 1e-2
    out = tmp_path / "weights.json"
    assert main(["mix", "mpo", "--policies", f"same={same},other={other}", "--ref", tiny_model,
                 "--prompts", "demo:8", "--samples-per-prompt", "4", "--prompt-batch", "4",
                 "--max-new-tokens", "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["weights"]) == {"same", "other"} and sum(result["weights"].values()) == pytest.approx(1.0)
    assert result["F"] <= 1e-9 and 1 <= result["ess_mean"] <= 4 and len(result["history"]) == result["steps"]
    bad = main(["mix", "mpo", "--policies", f"same={same}", "--ref", str(tmp_path / "other"),
                "--prompts", "demo:2", "--out", str(tmp_path / "w2.json")])
    assert bad == 2 and not (tmp_path / "w2.json").exists()


def test_teacher_forced_stage_matches_float64_full_vocabulary_log_probs(tiny_model):
    """MPO's scorer runs the LM head on response positions only with an fp32 log-softmax; its
    sums equal the float64 full-vocabulary log-probs of the same tokens. In bf16 it still
    returns float64 sums close to them."""
    from serving.offline.mpo import SequenceLogps
    from trainers.core.logps import pad_sequences, sequence_logps
    from trainers.core.models import Placement, load_causal_lm

    prompts, responses = [[5, 6, 7, 8, 9], [11, 12]], [[[20, 21, 22], [23]], [[30, 31, 32, 33], [34, 35]]]
    batch = {"prompt_ids": np.array([json.dumps(p) for p in prompts], dtype=object),
             "response_ids": np.array([json.dumps(r) for r in responses], dtype=object)}
    got = [json.loads(v) for v in SequenceLogps(tiny_model, "p", micro_batch_size=3)(batch)["logp_p"]]
    model = load_causal_lm(tiny_model, dtype=torch.float64).eval()
    seqs = [p + r for p, rs in zip(prompts, responses) for r in rs]
    b = pad_sequences(seqs, [len(p) for p, rs in zip(prompts, responses) for _ in rs], 0)
    with torch.no_grad():
        want = sequence_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["input_ids"], b["response_mask"]).tolist()
    np.testing.assert_allclose(sum(got, []), want, rtol=1e-5, atol=1e-5)
    half = SequenceLogps(tiny_model, "p", placement=Placement(dtype="bfloat16"))(batch)["logp_p"]
    np.testing.assert_allclose(sum((json.loads(v) for v in half), []), want, rtol=0.05, atol=0.3)
