"""The alignment core against independent oracles: brute force over paths, tslearn, closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unimm.align import (
    alignment_log_kernel,
    gak,
    gak_matrix,
    gak_matrix_prefix,
    gak_matrix_triple,
    log_gak,
    log_gak_matrix,
    triple_distance,
)


def unit(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def paths(n: int, m: int):
    """Every monotone alignment path from (0, 0) to (n−1, m−1), as lists of cells."""

    def walk(i, j):
        if (i, j) == (n - 1, m - 1):
            yield [(i, j)]
            return
        for di, dj in ((1, 0), (0, 1), (1, 1)):
            if i + di < n and j + dj < m:
                for rest in walk(i + di, j + dj):
                    yield [(i, j), *rest]

    return list(walk(0, 0))


def brute_log_k(logk: torch.Tensor, n: int, m: int) -> float:
    """log Σ_paths Π k over the cells of the path (Cuturi's definition, by enumeration)."""
    k = logk.exp()
    return math.log(sum(math.prod(float(k[i, j]) for i, j in p) for p in paths(n, m)))


def local_logk(phi, sigma):
    t = phi / (2 * sigma**2)
    return -t - torch.log(2 - torch.exp(-t))


def packed(views: list[torch.Tensor]):
    return torch.cat(views), torch.tensor([len(v) for v in views])


# ---------------------------------------------------------------------------------------------
# The DP against brute force


def test_path_counts_are_delannoy_numbers():
    assert [len(paths(n, n)) for n in range(1, 5)] == [1, 3, 13, 63]


@pytest.mark.parametrize("method", ["auto", "scaled", "log"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dp_equals_brute_force(method, dtype):
    g = torch.Generator().manual_seed(1)
    pairs = [(n, m) for n in range(1, 5) for m in range(1, 5)]
    logk = -3 * torch.rand(len(pairs), 4, 4, generator=g, dtype=torch.float64)
    n = torch.tensor([p[0] for p in pairs])
    m = torch.tensor([p[1] for p in pairs])
    want = torch.tensor([brute_log_k(logk[i], *pairs[i]) for i in range(len(pairs))], dtype=torch.float64)
    got = alignment_log_kernel(logk.to(dtype), n, m, method=method)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_log_gak_of_vectors_equals_brute_force():
    x, y = unit(3, 5, seed=1), unit(4, 5, seed=2)
    phi = torch.cdist(x, y) ** 2
    want = brute_log_k(local_logk(phi, 0.8), 3, 4)
    assert log_gak(x, y, sigma=0.8).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("method", ["scaled", "log"])
def test_dp_gradcheck(method):
    g = torch.Generator().manual_seed(2)
    logk = (-2 * torch.rand(7, 4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    n, m = torch.tensor([1, 2, 3, 4, 4, 2, 3]), torch.tensor([5, 1, 3, 5, 2, 4, 1])
    assert torch.autograd.gradcheck(lambda t: alignment_log_kernel(t, n, m, method=method), (logk,))


def test_expected_alignment_is_a_path_probability():
    """∂ log K/∂ log k_ij is the share of path mass through (i, j): 1 at both ends, sums match."""
    logk = (-torch.rand(1, 4, 4, dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(alignment_log_kernel(logk, torch.tensor([4]), torch.tensor([4]))[0], logk)
    k = logk.detach()[0].exp()
    weights = [math.prod(float(k[i, j]) for i, j in p) for p in paths(4, 4)]
    through = torch.zeros(4, 4, dtype=torch.float64)
    for w, p in zip(weights, paths(4, 4), strict=True):
        for i, j in p:
            through[i, j] += w / sum(weights)
    torch.testing.assert_close(grad[0], through, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# tslearn as a peer


def test_all_pairs_equal_tslearn_cdist_gak():
    from tslearn.metrics import cdist_gak

    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 8, (25,), generator=g)
    x = unit(int(lengths.sum()), 6, seed=3)
    log_k = log_gak_matrix(x, lengths, sigma=0.9)
    series = np.full((len(lengths), int(lengths.max()), 6), np.nan)
    for i, v in enumerate(torch.split(x, lengths.tolist())):
        series[i, : len(v)] = v.numpy()
    want = cdist_gak(series, sigma=0.9)
    ours = torch.exp(log_k - 0.5 * log_k.diag()[None] - 0.5 * log_k.diag()[:, None]).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-6)
    normalised = gak_matrix(x, lengths, sigma=0.9, single_slice="gak")
    np.testing.assert_allclose(normalised.numpy(), want, rtol=1e-6)


def test_reused_working_memory_never_leaks_between_calls():
    """The CPU working memory (unimm.align.scratch) is handed out again: a large call, then a
    smaller ragged one with the triple kernel, then the large again give what fresh buffers
    give, and the ragged one still equals tslearn."""
    from tslearn.metrics import cdist_gak

    from unimm.align import scratch

    g = torch.Generator().manual_seed(5)
    big = torch.full((40,), 9)
    xb = unit(int(big.sum()), 8, seed=5)
    first = gak_matrix(xb, big, sigma=1.1, single_slice="gak")
    lengths = torch.randint(1, 6, (17,), generator=g)
    x = unit(int(lengths.sum()), 8, seed=6)
    modality = torch.randint(0, 2, (int(lengths.sum()),), generator=g)
    gak_matrix_triple(x, x, modality, lengths, sigma="fixed", delta=1.0)
    small = gak_matrix(x, lengths, sigma=0.9, single_slice="gak")
    series = np.full((len(lengths), int(lengths.max()), 8), np.nan)
    for i, v in enumerate(torch.split(x, lengths.tolist())):
        series[i, : len(v)] = v.numpy()
    np.testing.assert_allclose(small.numpy(), cdist_gak(series, sigma=0.9), rtol=1e-6)
    torch.testing.assert_close(gak_matrix(xb, big, sigma=1.1, single_slice="gak"), first, rtol=0, atol=0)
    scratch.KEPT_BYTES, kept = 0, scratch.KEPT_BYTES  # nothing kept: plain allocations
    try:
        torch.testing.assert_close(gak_matrix(xb, big, sigma=1.1, single_slice="gak"), first, rtol=0, atol=0)
    finally:
        scratch.KEPT_BYTES = kept


def test_single_pair_equals_tslearn():
    from tslearn.metrics import gak as ts_gak
    from tslearn.metrics import unnormalized_gak

    x, y = unit(6, 4, seed=4), unit(9, 4, seed=5)
    assert gak(x, y, sigma=0.7).item() == pytest.approx(ts_gak(x.numpy(), y.numpy(), sigma=0.7), rel=1e-6)
    raw = unnormalized_gak(x.numpy(), y.numpy(), sigma=0.7)
    assert gak(x, y, sigma=0.7, normalize=False).item() == pytest.approx(raw, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The triple kernel


def _triple_views():
    """Two views whose expert (u) and CLIP (v) spaces disagree, so each pick is visible."""
    e = torch.eye(4, dtype=torch.float64)
    # slices: view 0 = [image A, text B], view 1 = [image C, text D]
    u = torch.stack([e[0], e[1], e[0], e[2]])  # experts: images A≡C, texts B⊥D
    v = torch.stack([e[3], e[3], e[2], e[1]])  # CLIP: A≡B (cross-modal), everything else apart
    modality = torch.tensor([1, 0, 1, 0])
    return u, v, modality, torch.tensor([2, 2])


def test_triple_distance_picks_expert_within_and_clip_across_modalities():
    u, v, modality, _ = _triple_views()
    phi = triple_distance(u, v, modality, u, v, modality)
    # image–image uses u, text–text uses u, image–text uses v (hand-computed)
    assert phi[0, 2] == 0  # images A, C: u equal (v differ)
    assert phi[1, 3] == 2  # texts B, D: u orthogonal
    assert phi[0, 1] == 0  # image A vs text B: v equal (u orthogonal)
    assert phi[0, 3] == 2  # image A vs text D: v orthogonal
    clip = triple_distance(None, v, modality, None, v, modality, teacher="clip")
    assert clip[0, 2] == 2 and clip[0, 1] == 0  # CLIP only: A, C differ in v
    torch.testing.assert_close(phi, phi.T)


def test_triple_gak_equals_manual_computation():
    u, v, modality, lengths = _triple_views()
    got = gak_matrix_triple(u, v, modality, lengths, delta=0.6)
    phi = triple_distance(u, v, modality, u, v, modality)
    sigma = 0.6 * math.sqrt(2.0)  # δ·sqrt((2 + 2)/2)
    blocks = [slice(0, 2), slice(2, 4)]
    log_k = torch.tensor(
        [[brute_log_k(local_logk(phi[a][:, b], sigma), 2, 2) for b in blocks] for a in blocks],
        dtype=torch.float64,
    )
    want = torch.exp(log_k - 0.5 * log_k.diag()[None] - 0.5 * log_k.diag()[:, None])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_normalised_targets_properties():
    g = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 9, (30,), generator=g)
    s = int(lengths.sum())
    u, v = unit(s, 16, seed=7), unit(s, 12, seed=8)
    modality = torch.randint(0, 2, (s,), generator=g)
    for teacher in ("triple", "clip"):
        for sigma in ("length_scaled", "fixed", 0.5):
            m = gak_matrix_triple(
                u, v, modality, lengths, delta=1.0, sigma=sigma, teacher=teacher, single_slice="gak"
            )
            torch.testing.assert_close(m, m.T)
            torch.testing.assert_close(m.diag(), torch.ones(30, dtype=torch.float64))
            assert bool((m > 0).all()) and bool((m <= 1 + 1e-12).all())


def test_single_slice_cosine_and_mean_teacher():
    u, v, modality, _ = _triple_views()
    singles = torch.ones(4, dtype=torch.long)
    cos = gak_matrix_triple(u, v, modality, singles, delta=1.0)
    phi = triple_distance(u, v, modality, u, v, modality)
    torch.testing.assert_close(cos, 1 - phi / 2)  # the teacher's cosine for single-slice pairs
    via_gak = gak_matrix_triple(u, v, modality, singles, delta=1.0, single_slice="gak")
    assert not torch.allclose(via_gak, cos)
    _, _, _, lengths = _triple_views()
    mean = gak_matrix_triple(u, v, modality, lengths, delta=1.0, teacher="mean")
    sim = 1 - phi / 2
    want = torch.tensor(
        [[sim[a][:, b].mean() for b in (slice(0, 2), slice(2, 4))] for a in (slice(0, 2), slice(2, 4))]
    )
    torch.testing.assert_close(mean, want.to(mean.dtype))


def test_raw_kernel_when_not_normalised():
    u, v, modality, lengths = _triple_views()
    raw = gak_matrix_triple(u, v, modality, lengths, delta=0.6, normalize=False)
    norm = gak_matrix_triple(u, v, modality, lengths, delta=0.6)
    torch.testing.assert_close(norm, raw / torch.sqrt(raw.diag()[None] * raw.diag()[:, None]))
    assert raw[0, 0] > 1  # raw K grows with length: several paths of kernel ≈ 1


def test_gradients_of_all_pairs_functions():
    x = unit(9, 3, seed=9).requires_grad_()
    lengths = torch.tensor([2, 3, 1, 3])
    assert torch.autograd.gradcheck(lambda t: log_gak_matrix(t, lengths, sigma=0.8), (x,))
    assert torch.autograd.gradcheck(lambda t: gak_matrix(t, lengths, delta=0.9), (x,))
    u, v = unit(9, 4, seed=10).requires_grad_(), unit(9, 3, seed=11).requires_grad_()
    modality = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 0])
    assert torch.autograd.gradcheck(
        lambda a, b: gak_matrix_triple(a, b, modality, lengths, delta=0.7, single_slice="gak"), (u, v)
    )


# ---------------------------------------------------------------------------------------------
# Stability


@pytest.mark.parametrize("kind", ["orthogonal", "identical", "random"])
def test_64_slices_float32_is_finite_and_accurate(kind):
    n = 64
    if kind == "orthogonal":
        x = torch.eye(128, dtype=torch.float64)[: 2 * n] + 1e-3 * unit(2 * n, 128, seed=12)
        x = torch.nn.functional.normalize(x, dim=-1)
    elif kind == "identical":
        x = unit(1, 128, seed=13).expand(2 * n, 128).clone()
    else:
        x = unit(2 * n, 128, seed=14)
    lengths = torch.tensor([n, n])
    for delta in (0.2, 1.0, 5.0):
        ref = gak_matrix(x, lengths, delta=delta)
        got = gak_matrix(x.float(), lengths, delta=delta)
        assert torch.isfinite(got).all() and bool((got > 0).all()) and bool((got <= 1 + 1e-6).all())
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
        log_ref = log_gak_matrix(x, lengths, sigma=delta)
        log_got = log_gak_matrix(x.float(), lengths, sigma=delta)
        assert torch.isfinite(log_got).all()
        # float32 distances of a slice to itself cancel to ~1e-6, not 0; at σ = 0.2 that is ~2e-5
        # in log k per cell, ~1e-3 over 64 cells: the inputs' precision, not the DP's.
        torch.testing.assert_close(log_got.double(), log_ref, rtol=1e-5, atol=5e-3)


def test_auto_falls_back_to_log_space_exactly_where_needed():
    """Half the pairs have kernels spanning e^-60: the scaled sweep must hand them to log space."""
    g = torch.Generator().manual_seed(15)
    logk = -2 * torch.rand(40, 16, 16, generator=g, dtype=torch.float64)
    logk[20:] = -60 * torch.rand(20, 16, 16, generator=g, dtype=torch.float64)
    n = torch.full((40,), 16)
    exact = logk.clone().requires_grad_()
    want = alignment_log_kernel(exact, n, n, method="log")
    (grad_want,) = torch.autograd.grad(want.sum(), exact)
    fast = logk.float().requires_grad_()
    got = alignment_log_kernel(fast, n, n)
    (grad_got,) = torch.autograd.grad(got.sum(), fast)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(grad_got.double(), grad_want, atol=5e-4, rtol=0)


def test_fallback_catches_a_route_the_scaled_sweep_would_lose():
    """Two equally good routes; one looks 1e-100 times worse on early diagonals than the other.

    Route A goes down the first column (k = e^-40) then along the last row (k = 1); route B along
    the first row (k = 1) then down the last column (k = e^-40); everything else is e^-60. Both
    carry the same mass, but route A's early cells fall below float32's range relative to route
    B's, so a sweep that dropped them would lose half of K (log 2) and route A's gradient.
    """
    n = 16
    logk = torch.full((1, n, n), -60.0, dtype=torch.float64)
    logk[0, :, 0] = -40.0
    logk[0, -1, :] = 0.0
    logk[0, 0, :] = 0.0
    logk[0, :, -1] = -40.0
    logk[0, 0, 0] = logk[0, -1, -1] = logk[0, 0, -1] = 0.0  # both corners on their route
    length = torch.tensor([n])
    exact = logk.clone().requires_grad_()
    want = alignment_log_kernel(exact, length, length, method="log")
    (grad_want,) = torch.autograd.grad(want.sum(), exact)
    assert grad_want[0, 5, 0].item() == pytest.approx(0.5, abs=1e-6)  # half the mass via route A
    fast = logk.float().requires_grad_()
    got = alignment_log_kernel(fast, length, length)
    (grad_got,) = torch.autograd.grad(got.sum(), fast)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-4)
    # float32 holds L ≈ −560 to ~3e-5, hence the gradient's tolerance
    torch.testing.assert_close(grad_got.double(), grad_want, atol=1e-4, rtol=0)
    forced = logk.float().requires_grad_()
    lost = alignment_log_kernel(forced, length, length, method="scaled")
    (grad_lost,) = torch.autograd.grad(lost.sum(), forced)
    assert (want.item() - lost.item()) == pytest.approx(math.log(2), abs=1e-3)
    assert grad_lost[0, 5, 0].item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Prefix sharing


@pytest.mark.parametrize("teacher", ["triple", "clip", "mean"])
def test_prefix_sharing_equals_pairwise(teacher):
    g = torch.Generator().manual_seed(16)
    sample_lengths = torch.randint(1, 7, (7,), generator=g)
    s = int(sample_lengths.sum())
    u, v = unit(s, 8, seed=17), unit(s, 6, seed=18)
    modality = torch.randint(0, 2, (s,), generator=g)
    view_sample, view_cut = [], []
    for i, n in enumerate(sample_lengths.tolist()):
        for c in sorted({1, n, max(1, n // 2)}):  # up to 3 cut points per sample, always the last
            view_sample.append(i)
            view_cut.append(c)
    first = torch.cumsum(sample_lengths, 0) - sample_lengths
    rows = torch.cat(
        [torch.arange(int(first[i]), int(first[i]) + c) for i, c in zip(view_sample, view_cut, strict=True)]
    )
    shared = gak_matrix_prefix(
        u,
        v,
        modality,
        sample_lengths,
        torch.tensor(view_sample),
        torch.tensor(view_cut),
        sigma=0.9,
        teacher=teacher,
    )
    pairwise = gak_matrix_triple(
        u[rows], v[rows], modality[rows], torch.tensor(view_cut), delta=0.9, sigma="fixed", teacher=teacher
    )
    torch.testing.assert_close(shared, pairwise, atol=1e-12, rtol=0)


def test_prefix_sharing_rejects_length_scaled_sigma():
    u, v, modality, lengths = _triple_views()
    with pytest.raises(ValueError, match="fixed sigma"):
        gak_matrix_prefix(
            u, v, modality, lengths, torch.tensor([0]), torch.tensor([1]), sigma="length_scaled"
        )


# ---------------------------------------------------------------------------------------------
# Errors


def test_clear_errors():
    x = unit(5, 3)
    with pytest.raises(ValueError, match="lengths sum to 4 but 5 slices"):
        log_gak_matrix(x, torch.tensor([2, 2]), sigma=1.0)
    with pytest.raises(ValueError, match="at least one slice"):
        log_gak_matrix(x, torch.tensor([5, 0]), sigma=1.0)
    with pytest.raises(ValueError, match="sigma must be one of"):
        gak_matrix(x, torch.tensor([5]), sigma="adaptive")
    with pytest.raises(ValueError, match="teacher must be one of"):
        gak_matrix_triple(x, x, torch.zeros(5), torch.tensor([5]), delta=1.0, teacher="dino")
    with pytest.raises(ValueError, match="needs expert features u"):
        gak_matrix_triple(None, x, torch.zeros(5), torch.tensor([5]), delta=1.0)
