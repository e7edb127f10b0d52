"""Per-row soups in one forward: each row's logits are those of the model merged with its own vector."""

import copy

import pytest
import torch

from serving.mixing import soup_state_dicts
from serving.rowsoup import RowSoup
from trainers.core.models import load_causal_lm

PROMPTS = [[5, 9, 17, 33, 2, 8, 11], [7, 40, 3, 12, 6, 6, 19], [21, 4, 4, 30, 8, 2, 15]]


@pytest.fixture(scope="module")
def three(two_policies, tiny_model):
    return [load_causal_lm(p).eval() for p in (*two_policies.values(), tiny_model)]


def _merged(models, w):
    model = copy.deepcopy(models[0])
    model.load_state_dict(soup_state_dicts([m.state_dict() for m in models], w))
    return model


def test_each_row_gets_the_logits_of_its_own_merged_model(three):
    weights = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.6, 0.4]])
    soup = RowSoup(three)
    soup.select_rows(weights)
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        got = soup.model(input_ids=ids).logits
        for b, w in enumerate(weights.tolist()):
            want = _merged(three, w)(input_ids=ids[b:b + 1]).logits[0]
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
    # the policies are untouched and nothing was copied: every parameter is one of theirs
    own = {id(p) for m in three for p in m.parameters()}
    assert all(id(p) in own for p in soup.model.parameters())
    assert not any(isinstance(m, type(soup.model.model.embed_tokens)) for m in three[0].modules())


def test_policies_with_zero_weight_in_every_row_are_skipped(three, monkeypatch):
    soup = RowSoup(three)
    soup.select_rows(torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]]))
    assert soup.active == [0, 1]
    calls = []
    monkeypatch.setattr(type(three[2].lm_head), "forward",
                        lambda self, x, _f=type(three[2].lm_head).forward: (calls.append(self), _f(self, x))[1])
    with torch.no_grad():
        soup.model(input_ids=torch.tensor(PROMPTS[:2]))
    assert calls and all(c is not three[2].lm_head for c in calls)


def test_a_batch_of_per_row_soups_decodes_each_row_as_its_merged_model(three):
    """Through the decoder (KV caches, left padding, rows leaving at different lengths): each row's
    greedy tokens are those of its own merged model decoding alone."""
    from serving.decode import LockstepDecoder, Row, Sampling

    weights = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    soup = RowSoup(three)
    dec = LockstepDecoder([soup.model], 0, [], on_rows=lambda live: soup.select_rows(weights[live]))
    prompts = [PROMPTS[0], PROMPTS[1][:4], PROMPTS[2][:6]]
    rows = [Row(p, (1.0,), Sampling(max_tokens=n, temperature=0)) for p, n in zip(prompts, [12, 5, 9])]
    got = dec.generate(rows)
    for r, w in zip(rows, weights.tolist()):
        alone = LockstepDecoder([_merged(three, w)], 0, []).generate([r])[0]
        assert got[rows.index(r)] == alone


def test_rows_with_their_own_vectors_join_a_running_per_row_soup(three):
    """Continuous batching on the per-row soup: joining rows are prefilled with their own vectors
    and every row decodes as its merged model alone."""
    from serving.decode import LockstepDecoder, Row, Sampling

    vectors = [[0.2, 0.3, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
    soup = RowSoup(three)
    dec = LockstepDecoder([soup.model], 0, [], on_rows=lambda live: soup.select_rows(torch.tensor([vectors[i] for i in live])))
    rows = [Row(p, (1.0,), Sampling(max_tokens=n, temperature=0)) for p, n in zip(PROMPTS, [10, 4, 6])]
    calls = []

    def more(n):
        calls.append(n)
        return rows[1:] if len(calls) == 2 else []

    got = dec.generate(rows[:1], more=more)
    for r, w, g in zip(rows, vectors, got):
        assert g == LockstepDecoder([_merged(three, w)], 0, []).generate([r])[0]
