"""Losses against hand computations, and targets against the alignment core."""

from __future__ import annotations

import math

import pytest
import torch

from unimm.align import gak_matrix_triple
from unimm.config import AlignOptions
from unimm.errors import UnimmError
from unimm.model.targets import same_sample_mask, view_targets
from unimm.training.losses import discriminative_loss


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


VIEWS = [(0, 0), (0, 2), (1, 1), (2, 0), (2, 1)]


def test_mse_equals_the_formula():
    emb = unit(5, 4)
    targets = torch.rand(5, 5, generator=torch.Generator().manual_seed(1))
    want = sum((float(emb[i] @ emb[j]) - float(targets[i, j])) ** 2 for i in range(5) for j in range(5)) / 5
    got = discriminative_loss(emb, targets, same_sample_mask(VIEWS))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_infonce_equals_manual():
    emb = unit(5, 4, seed=2)
    same = same_sample_mask(VIEWS)
    tau = 0.1
    rows = []
    for i in range(5):
        others = [j for j in range(5) if j != i]
        pos = [j for j in others if VIEWS[j][0] == VIEWS[i][0]]
        if not pos:
            continue
        logit = {j: float(emb[i] @ emb[j]) / tau for j in others}
        rows.append(-math.log(sum(math.exp(logit[j]) for j in pos) / sum(math.exp(logit[j]) for j in others)))
    got = discriminative_loss(emb, torch.zeros(5, 5), same, kind="infonce", temperature=tau)
    assert got.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)


def test_kl_equals_manual_and_vanishes_at_the_target():
    emb = unit(5, 4, seed=3)
    targets = emb @ emb.T  # the student already matches: KL = 0
    assert discriminative_loss(emb, targets, same_sample_mask(VIEWS), kind="kl", temperature=0.2).item() == (
        pytest.approx(0.0, abs=1e-6)
    )
    other = torch.rand(5, 5, generator=torch.Generator().manual_seed(4))
    tau, total = 0.2, 0.0
    for i in range(5):
        others = [j for j in range(5) if j != i]
        p = torch.softmax(torch.tensor([float(other[i, j]) / tau for j in others]), 0)
        q = torch.softmax(torch.tensor([float(emb[i] @ emb[j]) / tau for j in others]), 0)
        total += float((p * (p.log() - q.log())).sum())
    got = discriminative_loss(emb, other, same_sample_mask(VIEWS), kind="kl", temperature=tau)
    assert got.item() == pytest.approx(total / 5, rel=1e-5)


def teachers(lengths, seed=5):
    out = []
    for k, n in enumerate(lengths):
        out.append(
            {
                "u": unit(n, 6, seed=seed + k).half(),
                "v": unit(n, 4, seed=seed + 10 + k).half(),
                "modality": torch.tensor([i % 2 for i in range(n)], dtype=torch.uint8),
            }
        )
    return out


@pytest.mark.parametrize(
    ("sigma", "teacher"),
    [("length_scaled", "triple"), ("fixed", "triple"), (0.7, "triple"), ("fixed", "clip"), ("fixed", "mean")],
)
def test_targets_equal_the_alignment_core_with_same_sample_ones(sigma, teacher):
    feats = teachers([3, 2, 4])
    align = AlignOptions(delta=0.8, sigma=sigma, teacher=teacher)
    got = view_targets(feats, VIEWS, align)
    rows = [(b, c + 1) for b, c in VIEWS]
    u = torch.cat([feats[b]["u"][:n].float() for b, n in rows])
    v = torch.cat([feats[b]["v"][:n].float() for b, n in rows])
    m = torch.cat([feats[b]["modality"][:n].long() for b, n in rows])
    lengths = torch.tensor([n for _, n in rows])
    want = gak_matrix_triple(u, v, m, lengths, delta=0.8, sigma=sigma, teacher=teacher)
    same = same_sample_mask(VIEWS)
    torch.testing.assert_close(got[~same], want[~same], atol=1e-5, rtol=1e-5)
    assert bool((got[same] == 1).all())


def test_missing_teachers_are_a_clear_error():
    with pytest.raises(UnimmError, match=r"train\.alpha=0"):
        view_targets([None, None, None], VIEWS, AlignOptions())
    clip_only = [{k: t[k] for k in ("v", "modality")} for t in teachers([3, 2, 4])]
    with pytest.raises(UnimmError, match=r"align\.teacher=clip"):
        view_targets(clip_only, VIEWS, AlignOptions())
    assert view_targets(clip_only, VIEWS, AlignOptions(teacher="clip")).shape == (5, 5)


@pytest.mark.gpu
def test_targets_are_computed_on_the_embeddings_gpu_with_the_fused_kernel(monkeypatch):
    """On CUDA the teacher features (stored on the CPU) move to the embeddings' device once and the
    alignment runs there with Triton; the targets equal the CPU reference."""
    from types import SimpleNamespace

    import unimm.align.gak as gak
    from unimm.training.losses import structure_loss

    chosen = []
    real = gak.backend_for
    monkeypatch.setattr(gak, "backend_for", lambda x: chosen.append((real(x), x.device.type)) or real(x))
    feats = teachers([3, 2, 4])
    align = AlignOptions(delta=0.8, sigma="length_scaled", teacher="triple")
    on_gpu = view_targets(feats, VIEWS, align, device="cuda")
    assert on_gpu.device.type == "cuda" and ("triton", "cuda") in chosen
    torch.testing.assert_close(on_gpu.cpu(), view_targets(feats, VIEWS, align), atol=1e-4, rtol=1e-4)
    cfg = SimpleNamespace(align=align, train=SimpleNamespace(disc_loss="mse", temperature=0.05))
    loss = structure_loss(unit(5, 4).cuda(), feats, VIEWS, cfg)
    assert loss.device.type == "cuda"
