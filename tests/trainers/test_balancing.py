"""§5 GAPO / P-GAPO balancing oracles in float64."""

import pytest
import torch

from tests.helpers import spawn_ranks
from trainers.balancing import gapo_coefficients, gapo_from_gram, min_norm_weights, pgapo_coefficients

D = torch.float64
G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D)


def _direction(grads, b, p):
    scale = (b.norms + 1e-12) ** p
    return (b.alpha[:, None] * grads / scale[:, None]).sum(0)


@pytest.mark.parametrize("p, gamma, d", [(0, 0.8, (0.8, 0.4)), (1, 0.5, None), (2, 0.2, (0.2, 0.4))])
def test_worked_cases(p, gamma, d):
    b = gapo_coefficients(G, p=p)
    assert abs(float(b.alpha[0]) - gamma) < 1e-12 and abs(float(b.alpha.sum()) - 1) < 1e-15
    if d is not None:
        torch.testing.assert_close(_direction(G, b, p), torch.tensor(d, dtype=D), rtol=0, atol=1e-12)
    # c_i = α_i / ‖g_i‖^p
    torch.testing.assert_close(b.coefficients, b.alpha / torch.tensor([1.0, 2.0], dtype=D) ** p, rtol=1e-10, atol=0)


@pytest.mark.parametrize("K, seed", [(2, 0), (3, 1), (4, 2), (6, 3)])
def test_kkt_certificate(K, seed):
    g = torch.randn(K, 10, generator=torch.Generator().manual_seed(seed), dtype=D)
    for p in (0, 1, 2):
        b = gapo_coefficients(g, p=p)
        tilde = g / ((b.norms + 1e-12) ** p)[:, None]
        d = (b.alpha[:, None] * tilde).sum(0)
        dots = tilde @ d
        dd = float(d @ d)
        assert bool((dots >= dd - 1e-6).all())
        active = b.alpha > 1e-6
        assert torch.allclose(dots[active], torch.full_like(dots[active], dd), atol=1e-6)


def test_frank_wolfe_reproduces_the_closed_form():
    for seed in range(5):
        g = torch.randn(2, 7, generator=torch.Generator().manual_seed(seed), dtype=D)
        gram = g @ g.T
        torch.testing.assert_close(min_norm_weights(gram, frank_wolfe=True), min_norm_weights(gram), rtol=0, atol=1e-9)


def test_opposed_gradients_give_no_step_and_no_nan():
    g = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=D)
    b = gapo_coefficients(g, p=1)
    assert torch.isfinite(b.coefficients).all() and b.direction_norm < 1e-12
    torch.testing.assert_close(b.alpha, torch.tensor([0.5, 0.5], dtype=D))
    same = gapo_coefficients(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=D), p=0)
    torch.testing.assert_close(same.alpha, torch.tensor([0.5, 0.5], dtype=D))


def test_p1_is_invariant_to_scaling_a_loss():
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(7), dtype=D)
    scaled = g.clone()
    scaled[1] *= 37.0
    a, b = gapo_coefficients(g, p=1), gapo_coefficients(scaled, p=1)
    torch.testing.assert_close(a.alpha, b.alpha, rtol=0, atol=1e-9)
    # the update Σ c_i g_i is the same direction and size
    torch.testing.assert_close((a.coefficients[:, None] * g).sum(0), (b.coefficients[:, None] * scaled).sum(0),
                               rtol=1e-9, atol=1e-12)


def test_pgapo_coefficients_and_validation():
    b = pgapo_coefficients(G, [0.25, 0.75])
    torch.testing.assert_close(b.coefficients, torch.tensor([0.25, 0.375], dtype=D), rtol=1e-10, atol=0)
    assert b.log(["a", "b"])["grad_cosine"] == 0.0
    for bad in ([0.5, 0.6], [-0.1, 1.1], [1.0]):
        with pytest.raises(ValueError, match="preference"):
            pgapo_coefficients(G, bad)


@pytest.mark.parametrize("seed", range(5))
def test_pgapo_at_equal_preference_is_gapo_for_two_objectives(seed):
    # p = 1, K = 2: the min-norm point of two unit vectors is their midpoint, so α = (1/2, 1/2) and
    # c_i = 1 / (2 ‖g_i‖), up to ε·max_j‖g_j‖/‖g_i‖ -- the study trains GAPO once for both
    g = torch.randn(2, 12, generator=torch.Generator().manual_seed(seed), dtype=D) * torch.tensor([[0.1], [30.0]], dtype=D)
    torch.testing.assert_close(pgapo_coefficients(g, [0.5, 0.5]).coefficients, gapo_coefficients(g, p=1).coefficients,
                               rtol=1e-8, atol=0)


def test_two_quadratics_move_to_the_pareto_segment():
    """L_i(θ) = ½‖θ − a_i‖²: the Pareto set is the segment [a_1, a_2]; GAPO steps end on it."""
    a1, a2 = torch.tensor([1.0, 0.0], dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    theta = torch.tensor([2.0, 2.5], dtype=D)
    for _ in range(400):
        grads = torch.stack([theta - a1, theta - a2])
        c = gapo_coefficients(grads, p=1).coefficients
        theta = theta - 0.05 * (c[:, None] * grads).sum(0)
    # on the segment: θ = t a1 + (1−t) a2 with t in [0, 1]
    assert abs(float(theta.sum()) - 1.0) < 1e-3 and bool((theta >= -1e-3).all())


def test_averaged_worker_gradients_pick_the_union_batch_alpha():
    """Two workers with different halves of a batch: averaging each objective's gradient across
    workers before the Gram matrix gives the α of one worker on the whole batch; averaging the
    per-worker Gram matrices (or α's) does not."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(16, 5, generator=g, dtype=D)
    targets = [torch.randn(16, generator=g, dtype=D), torch.randn(16, generator=g, dtype=D) * 3]
    w = torch.randn(5, generator=g, dtype=D, requires_grad=True)

    def grads(rows):
        out = []
        for y in targets:
            loss = ((X[rows] @ w - y[rows]) ** 2).mean()
            out.append(torch.autograd.grad(loss, w)[0])
        return torch.stack(out)

    g0, g1 = grads(slice(0, 8)), grads(slice(8, 16))
    for p in (0, 1):  # (with K = 2 and p = 1, α is always ½: the coefficients carry the difference)
        union = gapo_coefficients(grads(slice(0, 16)), p=p)
        averaged = gapo_coefficients((g0 + g1) / 2, p=p)
        torch.testing.assert_close(averaged.alpha, union.alpha, rtol=0, atol=1e-12)
        torch.testing.assert_close(averaged.coefficients, union.coefficients, rtol=1e-12, atol=0)
        per_rank = (gapo_coefficients(g0, p=p).coefficients + gapo_coefficients(g1, p=p).coefficients) / 2
        assert (per_rank - union.coefficients).abs().max() > 1e-3


def _exact_min_norm(u):
    """Exact α* = argmin_{α∈Δ} ‖Σ α_i u_i‖² by enumerating supports S: on the affine hull of S the
    minimiser is G_S⁻¹1 / 1ᵀG_S⁻¹1; keep the feasible one with the smallest norm (float64, numpy)."""
    import itertools

    import numpy as np

    u = np.asarray(u, dtype=np.float64)
    u = u / np.abs(u).max()  # the problem is scale-free; solve it at unit scale
    G = u @ u.T
    best, best_val = None, np.inf
    K = len(G)
    for r in range(1, K + 1):
        for S in itertools.combinations(range(K), r):
            x = np.linalg.solve(G[np.ix_(S, S)], np.ones(r))
            if x.sum() <= 0 or (x < 0).any():
                continue
            a = np.zeros(K)
            a[list(S)] = x / x.sum()
            val = a @ G @ a
            if val < best_val - 1e-15:
                best, best_val = a, val
    return best


@pytest.mark.parametrize("K", [3, 4])
@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_does_not_depend_on_the_gradients_scale(K, p, seed):
    """α* of s·g equals α* of g for every common scale s from 1e-8 to 1e8, and both equal the
    exact min-norm point (support enumeration) of the normalised gradients."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(K, 12, generator=gen, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0][:K], dtype=D)[:, None]
    g[1] -= 1.5 * g[0]  # conflicting objectives: an interior or face optimum, not a vertex
    tilde = g / (g.norm(dim=1, keepdim=True) ** p)
    exact = torch.tensor(_exact_min_norm(tilde.numpy()), dtype=D)
    for s in (1e-8, 1e-7, 1e-6, 1e-3, 1.0, 1e3, 1e6, 1e8):
        b = gapo_coefficients(s * g, p=p)
        torch.testing.assert_close(b.alpha, exact, rtol=0, atol=1e-9, msg=f"scale {s}")
        scaled = tilde * s ** (1 - p)  # the vectors the solver balances at this scale
        assert float(b.direction_norm) == pytest.approx(float((exact[:, None] * scaled).sum(0).norm()), rel=1e-6)


@pytest.mark.parametrize("s", [1e-8, 1e-6, 1.0, 1e8])
def test_frank_wolfe_is_scale_free_on_a_gram_matrix(s):
    u = torch.randn(4, 6, generator=torch.Generator().manual_seed(7), dtype=D)
    exact = torch.tensor(_exact_min_norm(u.numpy()), dtype=D)
    torch.testing.assert_close(min_norm_weights(s * (u @ u.T)), exact, rtol=0, atol=1e-9)
    pair = u[:2]  # K = 2: the closed form and Frank–Wolfe agree at any scale
    torch.testing.assert_close(min_norm_weights(s * (pair @ pair.T)),
                               min_norm_weights(s * (pair @ pair.T), frank_wolfe=True), rtol=0, atol=1e-9)


def _gram_worker(rank, world, port, grads, out):
    import os

    import torch.distributed as dist

    from trainers.balancing import averaged_gram

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent = []
    real = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = recording
    gram = averaged_gram(grads[rank].clone())
    dist.all_reduce = real
    torch.save({"gram": gram, "all_reduce_bytes": sent}, f"{out}.{rank}")


def test_averaged_gram_of_two_workers_reduces_only_the_k_by_k_matrix(tmp_path):
    """Two gloo ranks with different gradients: each gets the Gram matrix of their average (so the
    α of the union batch), and ``all_reduce`` carries K×K doubles, not K×D gradients."""
    K, D = 3, 1001
    grads = torch.randn(2, K, D, generator=torch.Generator().manual_seed(0))
    spawn_ranks(_gram_worker, grads, str(tmp_path / "r"))
    mean = grads.double().mean(0)
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'r'}.{rank}", weights_only=True)
        torch.testing.assert_close(got["gram"], mean @ mean.T, rtol=1e-6, atol=1e-9)
        assert got["all_reduce_bytes"] == [K * K * 8]
        torch.testing.assert_close(gapo_from_gram(got["gram"]).alpha, gapo_coefficients(mean).alpha, rtol=1e-6, atol=1e-9)


def test_coefficients_go_to_the_gradients_device():
    """The K×K arithmetic runs on the host; the coefficients come back where the gradients are
    (here ``meta``, which no CPU tensor may mix with), so a GPU job combines them without a copy."""
    from trainers.balancing import pgapo_from_gram

    gram = torch.tensor([[1.0, 0.2], [0.2, 4.0]], dtype=D)
    assert gapo_from_gram(gram, device=torch.device("meta")).coefficients.device.type == "meta"
    assert pgapo_from_gram(gram, [0.5, 0.5], device=torch.device("meta")).coefficients.device.type == "meta"
