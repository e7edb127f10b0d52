"""GAPO on Ray Train + DeepSpeed (slow): two workers, ZeRO-2, per-objective labels on the same
pairs; plus the label plumbing from a multi-objective pair file."""

import json
import math

import numpy as np
import pytest
import torch

from cluster.cli import main
from cluster.recipes.base_models import build_tiny_model
from reward_models.objectives import get_scorer
from reward_models.prompts import tiny_corpus
from tests.helpers import BareEngine, multi_batch, multi_rows, write_jsonl
from trainers.balancing import gapo_coefficients
from trainers.core.config import load_config
from trainers.core.logps import sequence_logps
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.data import load_pairs
from trainers.job_config import DataConfig
from trainers.jobs.gapo import GAPOJobConfig, GAPOTask, OnlineGAPOTask
from trainers.jobs.gapo import run as run_gapo
from trainers.losses import policy_gradient_loss
from trainers.rollout import TokenizePrompts, fill_empty


def test_signs_say_whether_each_objective_agrees_with_the_first(tmp_path):
    rows = multi_rows(8)
    path = write_jsonl(tmp_path / "multi.jsonl", rows)
    cfg = DataConfig(path=path, response_columns=["response_0", "response_1"],
                     objective_labels={"sentiment": "better_sentiment", "conciseness": "better_conciseness"})
    table, _ = load_pairs(cfg, "sentiment", also=["conciseness"])
    for row, chosen, sign in zip(rows, table.column("chosen").to_pylist(), table.column("sign_conciseness").to_pylist()):
        assert chosen == row[f"response_{row['better_sentiment']}"]
        assert sign == (1.0 if row["better_sentiment"] == row["better_conciseness"] else -1.0)


@pytest.mark.slow
def test_gapo_two_workers_zero2_and_zero3(ray_local, tiny_model, tmp_path):
    """ZeRO-2, then ZeRO-3 (the head gathered for the balancing gradients) on the same data and
    seed: the same α and gradient norms on the last step, the same exported weights."""

    data = write_jsonl(tmp_path / "multi.jsonl", multi_rows(24))

    def run(stage):
        job = load_config(GAPOJobConfig, overrides={
            "objectives": ["sentiment", "conciseness"], "out": str(tmp_path / f"gapo{stage}"),
            "model.name_or_path": tiny_model, "data.path": data, "train.workers": 2, "train.zero_stage": stage,
            "train.lr": 2e-3, "train.epochs": 2, "train.micro_batch_size": 4, "train.checkpoint_every": 0,
            "train.log_every": 1})
        return run_gapo(job)

    metrics, z3 = run(2), run(3)
    for k in ("alpha/sentiment", "grad_norm/sentiment", "grad_norm/conciseness", "grad_cosine"):
        assert abs(z3[k] - metrics[k]) < 1e-4 * max(1.0, abs(metrics[k])), k
    w2, w3 = load_causal_lm(str(tmp_path / "gapo2")), load_causal_lm(str(tmp_path / "gapo3"))
    for (name, a), b in zip(w2.state_dict().items(), w3.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    meta = json.loads((tmp_path / "gapo2" / "moray.json").read_text())
    assert json.loads((tmp_path / "gapo3" / "moray.json").read_text())["zero_stage"] == 3
    assert meta["method"] == "gapo" and meta["objectives"] == ["sentiment", "conciseness"]
    trained, base = w2, load_causal_lm(tiny_model)
    assert (trained.lm_head.weight - base.lm_head.weight).abs().max() > 1e-4
    assert abs(metrics["alpha/sentiment"] + metrics["alpha/conciseness"] - 1) < 1e-9
    assert metrics["grad_norm/sentiment"] > 0 and -1 <= metrics["grad_cosine"] <= 1
    assert 0 <= metrics["alpha/sentiment"] <= 1 and metrics["step"] == 6
    # the labels conflict (negative gradient cosine); the balanced step still lowers the losses' sum
    assert metrics["grad_cosine"] < 0
    assert metrics["loss/sentiment"] + metrics["loss/conciseness"] < 2 * math.log(2)


def test_gapo_step_at_the_reference_head_gradients_and_pgapo(tiny_model):
    """At π = π_ref every objective's loss is log 2; the head gradients taken on the detached
    hidden states equal full autograd's head gradients; P-GAPO with preference e_1 gives
    c = (1/‖g_1‖, 0); the combined loss's gradient is Σ c_k ∇L_k."""

    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model)
    rows = [r for r in multi_rows(6)]
    for r in rows:  # response_0 is the sentiment-preferred one in this orientation
        if r["better_sentiment"] == 1:
            r["response_0"], r["response_1"] = r["response_1"], r["response_0"]
            r["better_conciseness"] = 1 - r["better_conciseness"]
    batch = multi_batch(tok, rows, load_causal_lm(tiny_model).eval())
    cfg = GAPOJobConfig(objectives=["sentiment", "conciseness"])
    cfg.train.beta = 0.1
    task = GAPOTask(cfg)
    combined, _ = task.losses(BareEngine(model), batch)
    logged = task.end_step()
    for k in ("sentiment", "conciseness"):
        assert abs(logged[f"loss/{k}"] - math.log(2)) < 1e-6
    head = model.get_output_embeddings().weight
    full = []
    for k in range(2):
        per_pair = task.objective_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)[0]
        full.append(torch.autograd.grad(per_pair[k].mean(), head)[0].reshape(-1))
    norms = [float(g.norm()) for g in full]
    assert abs(logged["grad_norm/sentiment"] - norms[0]) < 1e-5 * norms[0]
    assert abs(logged["grad_norm/conciseness"] - norms[1]) < 1e-5 * norms[1]
    grad_combined = torch.autograd.grad(combined.mean(), head)[0].reshape(-1)
    c = torch.tensor([logged["alpha/sentiment"] / norms[0], logged["alpha/conciseness"] / norms[1]])  # p = 1
    torch.testing.assert_close(grad_combined, c[0] * full[0] + c[1] * full[1], rtol=1e-4, atol=1e-7)
    pcfg = GAPOJobConfig(objectives=["sentiment", "conciseness"], preference={"sentiment": 1.0})
    pcfg.train.beta = 0.1
    ptask = GAPOTask(pcfg)
    ptask.losses(BareEngine(model), batch)
    plog = ptask.end_step()
    assert plog["alpha/sentiment"] == 1.0 and plog["alpha/conciseness"] == 0.0


def test_tied_head_balances_the_full_gradient_of_the_tied_matrix(tmp_path):
    """A model whose LM head is its input embedding (SmolLM2-style), K = 3: each objective's
    gradient norm and α* equal those of full autograd on the tied matrix (head and embedding uses
    together) to 1e-6, not the head-only part; ZeRO-3 refuses such a model before training."""

    path = build_tiny_model(str(tmp_path / "tied"), tiny_corpus(200, seed=0), tie_word_embeddings=True)
    model = load_causal_lm(path)
    tied = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is tied
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off the reference so the three objectives disagree
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = load_tokenizer(path)
    rows = multi_rows(6)
    batch = multi_batch(tok, rows, load_causal_lm(path).eval())
    batch["sign_relevance"] = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    names = ["sentiment", "conciseness", "relevance"]
    cfg = GAPOJobConfig(objectives=names)
    cfg.train.beta = 0.1
    task = GAPOTask(cfg)
    task.losses(BareEngine(model), batch)
    logged = task.end_step()
    per_pair = task.objective_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch)[0]
    full = torch.stack([torch.autograd.grad(per_pair[k].mean(), tied, retain_graph=True)[0].reshape(-1)
                        for k in range(3)])
    want = gapo_coefficients(full.double(), p=1.0)
    for k, name in enumerate(names):
        assert abs(logged[f"grad_norm/{name}"] - float(want.norms[k])) < 1e-6 * float(want.norms[k]), name
        assert abs(logged[f"alpha/{name}"] - float(want.alpha[k])) < 1e-6, name
    job = GAPOJobConfig(objectives=["sentiment", "conciseness"], out=str(tmp_path / "o"))
    job.model.name_or_path, job.data.path, job.train.zero_stage = path, "pairs.jsonl", 3
    with pytest.raises(ValueError, match="ties its LM head to the input embeddings"):
        job.validate()


def test_online_gapo_samples_scores_and_balances_policy_gradients(tiny_model):
    """One online micro-batch without Ray: n samples per prompt from the policy, each objective's
    rewards equal its scorer on the decoded samples, each objective's loss is the leave-one-out
    policy-gradient loss of those rewards, and α lands on the simplex."""

    cfg = GAPOJobConfig(objectives=["sentiment", "conciseness"], online=True, samples_per_prompt=3,
                        max_new_tokens=8, kl_coef=0.1)
    cfg.model.name_or_path = tiny_model
    task = OnlineGAPOTask(cfg)
    model = task.build()
    rows = TokenizePrompts(tiny_model, 64, 64)({"idx": np.arange(2), "prompt": np.array(["Tell me about the park.",
                                                                                        "How was the movie?"], dtype=object)})
    batch = task.collate(rows, load_tokenizer(tiny_model).pad_token_id, [0, 1])
    assert batch["attention_mask"][:, -1].all()  # left-padded prompts
    combined, stats = task.losses(BareEngine(model), batch)
    assert combined.shape == (6,) and stats["kl"].shape == (6,)  # log π_θ − log π_ref per sample
    logged = task.end_step()
    assert abs(logged["alpha/sentiment"] + logged["alpha/conciseness"] - 1) < 1e-9
    # the same rollout again, to check its contents (sampling is seeded by the prompts' row ids)
    out = task.prepare(BareEngine(model), batch)
    tok = load_tokenizer(tiny_model)
    texts = [tok.decode(ids[m], skip_special_tokens=True) for ids, m in zip(out["input_ids"], out["response_mask"])]
    empty = np.array([not t.strip() for t in texts])
    conc = np.zeros(6)
    conc[~empty] = get_scorer("conciseness", tok).score([""] * int((~empty).sum()), [t for t, e in zip(texts, empty) if not e])
    np.testing.assert_allclose(out["reward_conciseness"].numpy(), fill_empty(conc, empty))
    with torch.no_grad():
        logits = model(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits
        ref_model = load_causal_lm(tiny_model)
        ref_logits = ref_model(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits

    lp = sequence_logps(logits, out["input_ids"], out["response_mask"]).double()
    torch.testing.assert_close(out["ref_logps"], sequence_logps(ref_logits, out["input_ids"], out["response_mask"]).double())
    losses, _ = task.objective_losses(logits, out)
    expect = policy_gradient_loss(lp.view(2, 3), out["reward_conciseness"].view(2, 3), out["ref_logps"].view(2, 3), 0.1)
    torch.testing.assert_close(losses[1].double(), expect.reshape(-1), rtol=1e-5, atol=1e-5)
    assert fill_empty(np.array([3.0, 0.0, 1.0]), np.array([False, True, False])).tolist() == [3.0, 1.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_online_gapo_two_workers(ray_local, tiny_model, tmp_path, stage):
    """ZeRO-2, and ZeRO-3 with per-rank sampling seeds (the ranks' samples end at different lengths,
    and every rank must keep calling the partitioned model until all are done): it finishes within a
    deadline instead of hanging in an all-gather."""
    import threading

    out = tmp_path / "online"
    result = {}
    run = threading.Thread(target=lambda: result.setdefault("rc", main([
        "train", "gapo", "--online", "--objectives", "sentiment,conciseness", "--data", "demo:8",
        "--model", tiny_model, "--out", str(out), "--workers", "2", "--zero-stage", str(stage),
        "--samples-per-prompt", "3", "--max-new-tokens", "8", "--micro-batch-size", "2", "--lr", "1e-3",
        "--set", "train.checkpoint_every=0", "--set", "train.log_every=1"])), daemon=True)
    run.start()
    run.join(timeout=600)
    assert not run.is_alive(), f"online GAPO on ZeRO-{stage} did not finish in 10 minutes (a rank waiting on another?)"
    assert result["rc"] == 0
    meta = json.loads((out / "moray.json").read_text())
    assert meta["method"] == "gapo-online" and meta["samples_per_prompt"] == 3 and meta["pairs"] == 8
    assert meta["zero_stage"] == stage
    trained, base = load_causal_lm(str(out)), load_causal_lm(tiny_model)
    assert (trained.lm_head.weight - base.lm_head.weight).abs().max() > 1e-5


def test_online_reference_uses_the_configured_attention(tiny_model):
    """The frozen reference of online GAPO loads with the policy's attention kernel, not transformers'
    default (under flash attention it would otherwise run another kernel than the policy)."""
    from trainers.job_config import ModelConfig, TrainConfig
    from trainers.rollout import frozen_reference

    ref = frozen_reference(ModelConfig(name_or_path=tiny_model, attn_implementation="eager"), TrainConfig())
    assert ref.config._attn_implementation == "eager"


def test_balance_all_on_full_weights_is_refused_above_its_memory_estimate(tiny_model):
    """balance_params=all on full weights holds K full-model gradients: the estimate (K+1) x
    parameters x bytes (from the config alone) is checked before training, and a job above
    balance_memory_gb is refused with the estimate; LoRA is not held to it (its gradients are the adapters')."""
    job = GAPOJobConfig(objectives=["sentiment", "conciseness", "relevance"], out="o", balance_params="all")
    job.model.name_or_path, job.data.path = tiny_model, "pairs.jsonl"
    params = sum(p.numel() for p in load_causal_lm(tiny_model).parameters())
    assert job.balance_memory() == 4 * params * 4  # K = 3, fp32 on the CPU
    job.train.bf16 = "true"
    assert job.balance_memory() == 4 * params * 2
    job.balance_memory_gb = job.balance_memory() / 2**30 / 2
    with pytest.raises(ValueError, match=r"holds 3 full-model gradients at once: about 0\.0 GiB per worker.*"
                                         r"use balance_params=head, LoRA"):
        job.validate()
    job.model.lora = True
    job.validate()
    job.model.lora, job.balance_memory_gb = False, 8.0
    job.validate()
