"""Per-row soups in one forward: each row's logits are those of the model merged with its own vector."""

import copy

import pytest
import torch

from serving.mixing import soup_state_dicts
from serving.offline.soup import soup_policies
from serving.rowsoup import LoraRowSoup, RowSoup
from tests.helpers import make_lora_policy, make_policy
from trainers.core.export import load_lora_factors
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


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_rows_with_their_own_vectors_join_a_running_per_row_soup(kind, request):
    """Continuous batching on the per-row soup (full weights, and LoRA policies on one base):
    joining rows are prefilled with their own vectors and every row decodes as its merged model alone."""
    from serving.decode import LockstepDecoder, Row, Sampling

    if kind == "full":
        models = request.getfixturevalue("three")
        soup = RowSoup(models)
    else:
        models, soup = _lora_soup(request.getfixturevalue("lora_three"))
    vectors = [[0.2, 0.3, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
    dec = LockstepDecoder([soup.model], 0, [], on_rows=lambda live: soup.select_rows(torch.tensor([vectors[i] for i in live])))
    rows = [Row(p, (1.0,), Sampling(max_tokens=n, temperature=0)) for p, n in zip(PROMPTS, [10, 4, 6])]
    calls = []

    def more(n):
        calls.append(n)
        return rows[1:] if len(calls) == 2 else []

    got = dec.generate(rows[:1], more=more)
    for r, w, g in zip(rows, vectors, got):
        assert g == LockstepDecoder([_merged(models, w)], 0, []).generate([r])[0]


@pytest.fixture(scope="module")
def lora_three(tiny_model, tmp_path_factory):
    """Three LoRA policies of the tiny model (ranks 4, 4, 2), exported as training exports them."""
    root = tmp_path_factory.mktemp("lora")
    return {k: make_lora_policy(tiny_model, root / k, seed, k, r=r)
            for k, seed, r in (("a", 1, 4), ("b", 2, 4), ("c", 3, 2))}


def _lora_soup(dirs):
    models = [load_causal_lm(d).eval() for d in dirs.values()]
    return models, LoraRowSoup(models, [load_lora_factors(f"{d}/adapter") for d in dirs.values()])


def test_lora_rows_get_the_logits_of_their_lora_soup_from_one_base_forward(lora_three, tmp_path):
    """Each row's logits are those of ``moray mix soup --lora`` for its vector (W_base + Σ w_k s_k
    B_k A_k on the reference model), while only policy 0's modules run."""
    models, soup = _lora_soup(lora_three)
    assert soup.kind == "lora"
    weights = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.6, 0.4], [0.0, 0.0, 1.0]])
    soup.select_rows(weights)
    ids = torch.tensor([*PROMPTS, PROMPTS[0][::-1]])
    with torch.no_grad():
        got = soup.model(input_ids=ids).logits
    for b, w in enumerate(weights.tolist()):
        merged = load_causal_lm(soup_policies(lora_three, w, str(tmp_path / f"soup{b}"), lora=True)).eval()
        with torch.no_grad():
            torch.testing.assert_close(got[b], merged(input_ids=ids[b:b + 1]).logits[0], rtol=1e-5, atol=1e-5)
    first = {id(p) for p in models[0].parameters()}
    assert all(id(p) in first for p in soup.model.parameters())  # no other policy's weight is read


def test_policies_that_are_not_one_base_plus_adapters_get_the_full_weight_per_row_soup(lora_three, tiny_model, tmp_path,
                                                                                      caplog):
    from serving.engine import per_row_soup

    a, b = lora_three["a"], lora_three["b"]
    assert per_row_soup([load_causal_lm(d) for d in (a, b)], [a, b]).kind == "lora"
    # another weight moved too (an MLP layer no adapter touches)
    moved = load_causal_lm(b)
    with torch.no_grad():
        moved.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    with pytest.raises(ValueError, match="mlp.up_proj.weight differs between the policies"):
        LoraRowSoup([load_causal_lm(a), moved], [load_lora_factors(f"{d}/adapter") for d in (a, b)])
    # b's weights with a's adapter: not one base
    with pytest.raises(ValueError, match="not one base"):
        LoraRowSoup([load_causal_lm(a), load_causal_lm(b)], [load_lora_factors(f"{a}/adapter")] * 2)
    # a full-weight policy beside a LoRA one: no adapter/, so the full-weight soup without a word
    full = make_policy(tiny_model, tmp_path / "full", 1, objective="full")
    assert per_row_soup([load_causal_lm(d) for d in (a, full)], [a, full]).kind == "full"
    # a LoRA policy of another base: falls back, and says why
    other = make_lora_policy(make_policy(tiny_model, tmp_path / "base2", 5), tmp_path / "other", 4, "other")
    with caplog.at_level("WARNING"):
        assert per_row_soup([load_causal_lm(d) for d in (a, other)], [a, other]).kind == "full"
    assert "not one base plus their adapters" in caplog.text


def _dispatched(path, offload=False):
    """A policy with accelerate's hooks, as a ``device_map`` spreading it over GPUs installs them
    (instance-level ``forward`` on the model and on each block); here every block on the CPU.
    ``offload``: weights on ``meta`` until each leaf's hook loads them (``cpu_offload``)."""
    from accelerate import cpu_offload, dispatch_model

    model = load_causal_lm(path).eval()
    if offload:
        model = cpu_offload(model, execution_device="cpu")
        assert "forward" in model.__dict__ and model.lm_head.weight.device.type == "meta"
        return model
    blocks = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head",
              *(f"model.layers.{i}" for i in range(len(model.model.layers)))]
    model = dispatch_model(model, device_map={b: "cpu" for b in blocks}, force_hooks=True)
    assert "forward" in model.model.layers[0].__dict__  # the hooks are there
    return model


@pytest.mark.parametrize("kind", ["full", "lora", "full-offload", "lora-offload"])
def test_per_row_soups_mix_every_row_under_accelerate_hooks(kind, request, tmp_path):
    """Under a device_map, accelerate binds each hooked module's forward to that module: the soup's
    copies must run their own (mixed) children, not policy 0's."""
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.6, 0.4]])
    ids = torch.tensor(PROMPTS[:2])
    if kind.startswith("full"):
        paths = [*request.getfixturevalue("two_policies").values(), request.getfixturevalue("tiny_model")]
        plain = [load_causal_lm(p).eval() for p in paths]
        soup = RowSoup([_dispatched(p, offload=kind == "full-offload") for p in paths])
        wants = [_merged(plain, w)(input_ids=ids[b:b + 1]).logits[0] for b, w in enumerate(weights.tolist())]
    else:
        from serving.engine import per_row_soup

        dirs = request.getfixturevalue("lora_three")
        # offloaded LoRA policies: the full-weight per-row soup (the same soup, Σ w_k = 1)
        soup = per_row_soup([_dispatched(d, offload=kind == "lora-offload") for d in dirs.values()], list(dirs.values()))
        assert soup.kind == ("full" if kind == "lora-offload" else "lora")
        wants = [load_causal_lm(soup_policies(dirs, w, str(tmp_path / f"soup{b}"), lora=True)).eval()(
            input_ids=ids[b:b + 1]).logits[0] for b, w in enumerate(weights.tolist())]
    soup.select_rows(weights)
    with torch.no_grad():
        got = soup.model(input_ids=ids).logits
    for b, want in enumerate(wants):
        torch.testing.assert_close(got[b], want.detach(), rtol=1e-5, atol=1e-5)


def test_each_policy_runs_on_its_own_device(three):
    """Policies on different devices (a replica's GPUs): each policy's leaves get their inputs on
    that policy's device. ``meta`` stands in for a second GPU: PyTorch refuses any op mixing it with
    the CPU, so a leaf fed policy 0's activations fails; moved ones run, and the result coming back
    is the one copy meta cannot give (it holds no data)."""
    other = copy.deepcopy(three[1]).to("meta")
    seen = []
    for m in other.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].device))
    soup = RowSoup([three[0], other])
    soup.select_rows(torch.tensor([[0.5, 0.5]]))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        soup.model(input_ids=torch.tensor(PROMPTS[:1]))
    assert seen and all(d.type == "meta" for d in seen)
