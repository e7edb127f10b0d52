"""The preference-conditioned LoRA's oracles (docs/algorithms.md §9), float64 on the tiny model:
the step-0 loss, exact zero gradients at a vertex and the single-adapter DPO gradient, the model at
λ equal to its vertices' LoRA soup row by row, the fixed-λ batch loss, packed rows."""

import math

import numpy as np
import pytest
import torch

from tests.helpers import BareEngine, conditioned_model, multi_batch, multi_rows, response_columns
from trainers.batches import pack_pairs, pad_pairs, pair_logps
from trainers.conditioned_lora import adapters, row_preferences, set_preference, token_preferences
from trainers.job_config import ModelConfig
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.jobs.conditioned import ConditionedJobConfig, ConditionedTask
from trainers.losses import dpo_loss
from trainers.task import build_policy

OBJECTIVES = ["sentiment", "conciseness"]


def _task(tiny_model, **over):
    cfg = ConditionedJobConfig(objectives=OBJECTIVES, **over)
    cfg.model.name_or_path, cfg.train.beta = tiny_model, 0.1
    return ConditionedTask(cfg)


def _batch(tiny_model, rows, lam):
    tok, ref = load_tokenizer(tiny_model), load_causal_lm(tiny_model, dtype=torch.float64)
    batch = multi_batch(tok, rows, ref)
    batch["preference"] = torch.as_tensor(lam, dtype=torch.float64)
    return batch


def test_at_step_0_the_loss_is_log_2_times_the_weights_of_the_labelled_objectives(tiny_model):
    """Every B = 0: π_λ = π_ref for every λ, z_k = 0, L_row = log 2 · Σ_k λ_k m_k (every row labelled)."""
    rows = multi_rows(6)
    lam = row_preferences(range(6), 3, 2, 1.0, "dirichlet")
    model = conditioned_model(tiny_model, 2, rank=4, shared_rank=2, randomize=False)
    losses, stats = _task(tiny_model).losses(BareEngine(model), _batch(tiny_model, rows, lam))
    torch.testing.assert_close(losses, torch.full((6,), math.log(2), dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(stats["lambda/sentiment"], torch.as_tensor(lam[:, 0]))


@pytest.mark.parametrize("j", [0, 1])
def test_at_a_vertex_only_its_pair_moves_and_its_gradient_is_single_adapter_dpo(tiny_model, j):
    """λ = e_j without a shared pair: the other pair's gradients are exactly 0; (A_j, B_j)'s equal
    the DPO gradient of the model W + s B_j A_j (a peft LoRA) on objective j's ordering."""
    rows = multi_rows(6)
    batch = _batch(tiny_model, rows, np.eye(2)[[j] * 6])
    model = conditioned_model(tiny_model, 2, rank=4, shared_rank=0)
    _task(tiny_model).losses(BareEngine(model), batch)[0].mean().backward()
    lora = build_policy(ModelConfig(name_or_path=tiny_model, lora=True, lora_r=4, lora_alpha=8), torch.float64)
    for name, a in adapters(model):
        layer = lora.get_submodule("base_model.model." + name)
        A, B = a.pair(j)
        layer.lora_A["default"].weight.data.copy_(A.detach())
        layer.lora_B["default"].weight.data.copy_(B.detach())
        other = 1 - j
        assert torch.count_nonzero(a.lora_A.grad[other * 4:(other + 1) * 4]) == 0
        assert torch.count_nonzero(a.lora_B.grad[:, other * 4:(other + 1) * 4]) == 0
    pc, pr = pair_logps(lora, batch)
    rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    same = torch.ones(6, dtype=torch.bool) if j == 0 else batch["sign_conciseness"] > 0
    flip = lambda a, b: torch.where(same, a, b)  # noqa: E731
    dpo_loss(flip(pc, pr), flip(pr, pc), flip(rc, rr), flip(rr, rc), 0.1)[0].mean().backward()
    moved = 0
    for name, a in adapters(model):
        layer = lora.get_submodule("base_model.model." + name)
        gA, gB = a.lora_A.grad[j * 4:(j + 1) * 4], a.lora_B.grad[:, j * 4:(j + 1) * 4]
        torch.testing.assert_close(gA, layer.lora_A["default"].weight.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gB, layer.lora_B["default"].weight.grad, rtol=1e-9, atol=1e-12)
        moved += int(gA.abs().max() > 0)
    assert moved > 0


def test_fixed_lambda_batch_loss_is_the_weighted_mean_of_per_objective_dpo(tiny_model):
    """Every row at the same λ: L = Σ_k λ_k · mean over rows of m_k L_DPO,k (policy log-probs at λ)."""
    rows, lam = multi_rows(8), np.array([0.3, 0.7])
    batch = _batch(tiny_model, rows, np.tile(lam, (8, 1)))
    model = conditioned_model(tiny_model, 2, rank=4, shared_rank=2)
    loss = _task(tiny_model).losses(BareEngine(model), batch)[0].mean()
    pc, pr = pair_logps(model, batch)  # λ is still set: the policy at λ
    rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    want = 0.0
    for k, same in enumerate([torch.ones(8, dtype=torch.bool), batch["sign_conciseness"] > 0]):
        flip = lambda a, b: torch.where(same, a, b)  # noqa: E731
        want = want + lam[k] * dpo_loss(flip(pc, pr), flip(pr, pc), flip(rc, rr), flip(rr, rc), 0.1)[0].mean()
    assert abs(float(loss) - float(want)) < 1e-12 and float(loss) != pytest.approx(math.log(2), abs=1e-6)


def test_rows_with_different_lambda_each_equal_their_merged_model(tiny_model):
    """One forward of rows with different λ: each row's logits equal those of the merged model
    W + s B_0 A_0 + s Σ_k λ_k B_k A_k (the LoRA soup of the vertices) to 1e-6; λ = None is the base."""
    tok = load_tokenizer(tiny_model)
    model = conditioned_model(tiny_model, 3, rank=2, shared_rank=3)
    lam = torch.as_tensor(row_preferences(range(4), 0, 3, 0.5, "dirichlet"))
    ids = tok(["The coffee is great.", "A movie", "The park and the song are lovely", "Sad"], padding=True,
              return_tensors="pt")
    set_preference(model, lam[:, None, :])
    with torch.no_grad():
        logits = model(**ids).logits
    for b in range(4):
        merged = load_causal_lm(tiny_model, dtype=torch.float64)
        with torch.no_grad():
            for name, a in adapters(model):
                delta = a.shared_B @ a.shared_A + sum(lam[b, k] * (a.pair(k)[1] @ a.pair(k)[0]) for k in range(3))
                merged.get_submodule(name).weight.add_(a.scaling * delta)
            want = merged(input_ids=ids["input_ids"][b:b + 1], attention_mask=ids["attention_mask"][b:b + 1]).logits
        n = int(ids["attention_mask"][b].sum())
        torch.testing.assert_close(logits[b, :n], want[0, :n], rtol=0, atol=1e-6)
        assert (logits[b] - logits[(b + 1) % 4]).abs().max() > 1e-3
    set_preference(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, load_causal_lm(tiny_model, dtype=torch.float64)(**ids).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("one_row", [False, True])
def test_packed_rows_carry_lambda_per_token(tiny_model, one_row):
    """Packed sequences (several in a row; all in one row as under flash attention) get their own
    row's λ on every token: their log-probs equal the padded batch's."""
    tok = load_tokenizer(tiny_model)
    model = conditioned_model(tiny_model, 2, rank=4, shared_rank=0)
    rows = [{"prompt": r["prompt"], "chosen": r["response_0"], "rejected": r["response_1"]} for r in multi_rows(6)]
    cols = response_columns(tok, rows, ["chosen", "rejected"])
    lam = torch.as_tensor(row_preferences(range(6), 1, 2, 1.0, "dirichlet"))
    index = np.arange(6)
    got = []
    for batch in (pad_pairs(cols, tok.pad_token_id, index), pack_pairs(cols, tok.pad_token_id, index, one_row)):
        set_preference(model, token_preferences(batch, lam))
        with torch.no_grad():
            got.append(torch.stack(pair_logps(model, batch)))
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=1e-9)


def test_each_rows_lambda_is_a_function_of_the_seed_and_row_only():
    a = row_preferences([5, 9, 5], 7, 3, 1.0, "dirichlet")
    assert np.array_equal(a[0], a[2]) and not np.array_equal(a[0], a[1])
    assert np.allclose(a.sum(1), 1) and (a > 0).all()
    assert not np.array_equal(a, row_preferences([5, 9, 5], 8, 3, 1.0, "dirichlet"))
    v = row_preferences(range(400), 0, 2, 1.0, "vertices")
    assert set(map(tuple, v)) == {(1.0, 0.0), (0.0, 1.0)} and 150 < v[:, 0].sum() < 250
