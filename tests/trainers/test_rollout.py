"""Online rollouts' scorers inside ZeRO-3 training workers: built whole, not partitioned by the
training engine's zero.Init (two gloo ranks, DeepSpeed's CPU accelerator)."""

import os

import pytest
import torch

from tests.helpers import spawn_ranks

PROMPTS = ["Tell me about the park.", "How was the movie?", "What should I cook tonight?"]
RESPONSES = ["The park is green and quiet.", "I liked the film a lot.", "Pasta with tomatoes."]


def _worker(rank, world, port, model_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from trainers.deepspeed_setup import build_engine
    from trainers.job_config import TrainConfig
    from trainers.jobs.gapo import GAPOJobConfig, OnlineGAPOTask

    cfg = GAPOJobConfig(objectives=["relevance", "conciseness"], online=True, samples_per_prompt=2, max_new_tokens=4)
    cfg.model.name_or_path = model_dir
    task = OnlineGAPOTask(cfg)
    engine = build_engine(task.build, TrainConfig(zero_stage=3, lr=1e-4, micro_batch_size=2), total_steps=1,
                          on_gpu=False)
    assert engine.zero_optimization_stage() == 3 and engine.moray_zero3_config is not None  # ZeRO-3 still on
    policy = [p for p in engine.module.parameters() if hasattr(p, "ds_id")]
    scorer = task.rollout.scorers["relevance"]
    params = list(scorer.model.parameters())
    result = {"policy_partitioned": bool(policy) and all(p.numel() == 0 for p in policy),
              "scorer_partitioned": any(hasattr(p, "ds_id") or p.numel() == 0 for p in params),
              "scorer_numel": sum(p.numel() for p in params),
              "scores": torch.as_tensor(scorer.score(PROMPTS, RESPONSES))}
    torch.save(result, f"{out}.{rank}")


@pytest.mark.slow
def test_relevance_scorer_is_whole_inside_zero3_workers(tiny_model, tmp_path):
    from reward_models.objectives import RelevanceScorer

    out = tmp_path / "rank"
    spawn_ranks(_worker, tiny_model, str(out))
    outside = RelevanceScorer()
    want = torch.as_tensor(outside.score(PROMPTS, RESPONSES))
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["policy_partitioned"]  # the policy itself is built under zero.Init
        assert not got["scorer_partitioned"]
        assert got["scorer_numel"] == sum(p.numel() for p in outside.model.parameters())
        torch.testing.assert_close(got["scores"], want, rtol=0, atol=1e-6)
