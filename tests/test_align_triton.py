"""The fused Triton kernels against the PyTorch reference (interpreter on CPU, real kernels on GPU)."""

from __future__ import annotations

import os

import pytest
import torch

from unimm.align import gak_matrix, gak_matrix_triple, log_gak_matrix, triton_gak

pytestmark = pytest.mark.skipif(not triton_gak.available(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unit(*shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(
        device
    )


def run(backend, fn, *args, **kwargs):
    old = os.environ.get("UNIMM_ALIGN_BACKEND")
    os.environ["UNIMM_ALIGN_BACKEND"] = backend
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            del os.environ["UNIMM_ALIGN_BACKEND"]
        else:
            os.environ["UNIMM_ALIGN_BACKEND"] = old


def ragged(n_views=9, seed=0, longest=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n_views,), generator=g)
    s = int(lengths.sum())
    return (
        lengths,
        unit(s, 8, seed=seed + 1),
        unit(s, 6, seed=seed + 2),
        torch.randint(0, 2, (s,), generator=g),
    )


@pytest.mark.parametrize("sigma", ["length_scaled", "fixed", 0.6])
@pytest.mark.parametrize("teacher", ["triple", "clip"])
def test_forward_equals_reference(sigma, teacher):
    lengths, u, v, modality = ragged()
    want = run(
        "reference",
        gak_matrix_triple,
        u,
        v,
        modality,
        lengths,
        delta=0.8,
        sigma=sigma,
        teacher=teacher,
        single_slice="gak",
    )
    got = run(
        "triton",
        gak_matrix_triple,
        u.float().to(DEVICE),
        v.float().to(DEVICE),
        modality.to(DEVICE),
        lengths.to(DEVICE),
        delta=0.8,
        sigma=sigma,
        teacher=teacher,
        single_slice="gak",
    )
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-6, rtol=2e-5)


def test_raw_log_kernel_equals_reference():
    lengths, _, v, _ = ragged(seed=3)
    want = run("reference", log_gak_matrix, v, lengths, sigma=0.7)
    got = run("triton", log_gak_matrix, v.float().to(DEVICE), lengths.to(DEVICE), sigma=0.7)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("teacher", ["triple", "clip"])
def test_backward_equals_reference(teacher):
    lengths, u, v, modality = ragged(n_views=7, seed=5)
    weights = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def grads(backend, dtype, device):
        uu = u.detach().to(dtype).to(device).clone().requires_grad_()
        vv = v.detach().to(dtype).to(device).clone().requires_grad_()
        m = run(
            backend,
            gak_matrix_triple,
            uu,
            vv,
            modality.to(device),
            lengths.to(device),
            delta=0.7,
            teacher=teacher,
            single_slice="gak",
        )
        (m * weights.to(dtype).to(device)).sum().backward()
        return (uu.grad.double().cpu() if teacher == "triple" else None), vv.grad.double().cpu()

    want_u, want_v = grads("reference", torch.float64, "cpu")
    got_u, got_v = grads("triton", torch.float32, DEVICE)
    torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-4)
    if teacher == "triple":
        torch.testing.assert_close(got_u, want_u, atol=1e-5, rtol=1e-4)


def test_student_gradient_equals_reference():
    lengths, _, v, _ = ragged(n_views=6, seed=8)
    weights = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def grad(backend, dtype, device):
        x = v.detach().to(dtype).to(device).clone().requires_grad_()
        (
            run(backend, gak_matrix, x, lengths.to(device), delta=0.9) * weights.to(dtype).to(device)
        ).sum().backward()
        return x.grad.double().cpu()

    torch.testing.assert_close(
        grad("triton", torch.float32, DEVICE), grad("reference", torch.float64, "cpu"), atol=1e-5, rtol=1e-4
    )


def test_shared_slices_accumulate_gradients():
    """Views as prefixes of one slice array (shared slices): forward and backward equal expanded views."""
    from unimm.align.triton_gak import triton_log_gak_pairs

    sample = unit(5, 4, seed=10)
    cuts = torch.tensor([1, 3, 5])
    offsets = torch.zeros(3, dtype=torch.long)
    pair_a, pair_b = torch.triu_indices(3, 3)
    sigma2 = torch.full((pair_a.numel(),), 0.64)
    x = sample.float().to(DEVICE).requires_grad_()
    shared = triton_log_gak_pairs(
        x,
        None,
        None,
        offsets.to(DEVICE),
        cuts.to(DEVICE),
        pair_a.to(DEVICE),
        pair_b.to(DEVICE),
        sigma2.to(DEVICE),
    )
    shared.sum().backward()
    expanded = torch.cat([sample[:c] for c in cuts.tolist()]).requires_grad_()
    log_k = run("reference", log_gak_matrix, expanded, cuts, sigma=0.8)
    torch.testing.assert_close(shared.double().cpu(), log_k[pair_a, pair_b].detach(), atol=1e-5, rtol=1e-5)
    log_k[pair_a, pair_b].sum().backward()
    folded = torch.zeros_like(sample)
    start = 0
    for c in cuts.tolist():
        folded[:c] += expanded.grad[start : start + c]
        start += c
    torch.testing.assert_close(x.grad.double().cpu(), folded, atol=1e-5, rtol=1e-4)


def test_too_long_views_fail_clearly():
    lengths = torch.tensor([triton_gak.MAX_SLICES + 1])
    x = unit(int(lengths.sum()), 3)
    with pytest.raises(ValueError, match="up to 128 slices"):
        run("triton", log_gak_matrix, x.float().to(DEVICE), lengths.to(DEVICE), sigma=1.0)


def test_backend_choice():
    from unimm.align.gak import backend_for

    x = torch.zeros(2)
    assert run("reference", backend_for, x) == "reference"
    with pytest.raises(ValueError, match="use one of reference, triton"):
        run("cuda-magic", backend_for, x)
    if not torch.cuda.is_available():
        assert backend_for(x) == "reference"  # CPU tensors default to the reference


@pytest.mark.gpu
def test_gpu_larger_batch_against_reference():
    """Real kernels on CUDA: many programs at once (races and missing barriers would show here)."""
    lengths, u, v, modality = ragged(n_views=300, seed=11, longest=64)
    want = run(
        "reference",
        gak_matrix_triple,
        u.cuda(),
        v.cuda(),
        modality.cuda(),
        lengths.cuda(),
        delta=1.0,
        single_slice="gak",
    )
    for _ in range(3):
        got = run(
            "triton",
            gak_matrix_triple,
            u.float().cuda(),
            v.float().cuda(),
            modality.cuda(),
            lengths.cuda(),
            delta=1.0,
            single_slice="gak",
        )
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
