"""Offline sampling through the serving engine: seeded per answer whatever the batch, the cap
reported per answer, a unit weight vector samples its policy exactly, several vectors in one run
answer as each alone."""

import pytest
import torch

from serving.decode import LockstepDecoder, Row, Sampling
from serving.engine_sampling import engine_sample, engine_sample_vectors
from trainers.core.models import load_causal_lm, load_tokenizer
from trainers.core.prompts import ask, encode

PROMPTS = ["Write a short review of the zoo.", "How was the ferry trip? Answer briefly.", "Rate the car."]


def test_answers_do_not_depend_on_the_batch_and_the_cap_is_reported(two_policies):
    torch.manual_seed(0)
    one = engine_sample(two_policies, {"sentiment": 1.0}, PROMPTS, 2, 12, seed=5, top_k=50, batch=1, threads=1)
    many = engine_sample(two_policies, {"sentiment": 1.0}, PROMPTS, 2, 12, seed=5, top_k=50, batch=64, threads=1)
    assert one.texts == many.texts and one.capped == many.capped and one.tokens == many.tokens
    assert [len(t) for t in one.texts] == [2, 2, 2] and one.texts[0][0] != one.texts[0][1]  # seeded per answer
    # the same rows through the bare decoder: token counts, cap flags and texts agree
    tok = load_tokenizer(two_policies["sentiment"])
    models = [load_causal_lm(p).eval() for p in two_policies.values()]
    eos = sorted({tok.eos_token_id} | {models[0].generation_config.eos_token_id} - {None})
    rows = [Row(encode(tok, ask(tok, p)), (1.0, 0.0), Sampling(max_tokens=12, temperature=1.0, top_k=50,
                                                                 seed=5 * 1_000_003 + i * 2 + j))
            for i, p in enumerate(PROMPTS) for j in range(2)]
    ids = LockstepDecoder(models, tok.pad_token_id, eos).generate(rows)
    assert one.tokens == sum(map(len, ids))
    assert [c for cs in one.capped for c in cs] == [len(t) == 12 and t[-1] not in eos for t in ids]
    assert [t for ts in one.texts for t in ts] == [tok.decode(t, skip_special_tokens=True) for t in ids]


def test_unknown_weights_are_refused(two_policies):
    with pytest.raises(ValueError, match="not among the policies"):
        engine_sample(two_policies, {"helpfulness": 1.0}, PROMPTS, 1, 4, seed=0)


def test_vectors_sampled_together_answer_as_each_alone(two_policies):
    vectors = [{"sentiment": 1.0}, {"sentiment": 0.3, "conciseness": 0.7}, {"conciseness": 1.0}]
    together = engine_sample_vectors(two_policies, vectors, PROMPTS, 2, 12, seed=5, top_k=50, batch=4, threads=1)
    alone = [engine_sample(two_policies, v, PROMPTS, 2, 12, seed=5, top_k=50, batch=4, threads=1) for v in vectors]
    for t, a in zip(together, alone):
        assert t.texts == a.texts and t.capped == a.capped and t.tokens == a.tokens
    assert together[0].texts != together[2].texts
    with pytest.raises(ValueError, match="not among the policies"):
        engine_sample_vectors(two_policies, [{"sentiment": 1.0}, {"helpfulness": 1.0}], PROMPTS, 1, 4, seed=0)
