"""Soft-DTW (Cuturi & Blondel 2017) and its divergence, on the GAK's dynamic programme.

With cost ``c`` and smoothing ``γ``, ``sdtw_γ = −γ · log Σ_paths exp(−cost(path)/γ)``: the same
recursion as the global alignment kernel with ``log k = −c/γ`` (with ``c = −log k`` and ``γ = 1`` it
is ``−log K``). Costs are squared Euclidean distances; everything is differentiable.
"""

from __future__ import annotations

import torch

from unimm.align.dp import alignment_dp, alignment_log_kernel
from unimm.align.gak import _all_pairs, _check_lengths, _needs_grad, _plain_distance, pad_views
from unimm.align.kernels import squared_distance


def soft_dtw(x: torch.Tensor, y: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Soft-DTW (Cuturi & Blondel 2017) with squared Euclidean cost: the same DP in log space.

    ``sdtw_γ(x, y) = −γ · log Σ_paths exp(−cost(path)/γ)``; with ``γ = 1`` and cost ``−log k`` it
    is ``−log K``. Differentiable in ``x`` and ``y``.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    logk = (-squared_distance(x, y) / gamma).unsqueeze(0)
    n = torch.tensor([x.shape[0]])
    m = torch.tensor([y.shape[0]])
    return -gamma * alignment_log_kernel(logk, n, m)[0]


def soft_dtw_matrix(x: torch.Tensor, lengths: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Soft-DTW between all views of a packed batch of plain vectors: ``[N, N]``."""
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    lengths = _check_lengths(lengths, x.shape[0]).to(x.device)
    padded = pad_views(x, lengths)

    def reduce(phi, n, m):
        return -gamma * alignment_dp(-phi / gamma, n, m, local="log")

    return _all_pairs(_plain_distance(padded), lengths, padded.shape[1], reduce, needs_grad=_needs_grad(x))


def soft_dtw_divergence(x: torch.Tensor, y: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """``sdtw(x, y) − ½ (sdtw(x, x) + sdtw(y, y))`` (Blondel et al. 2021): ≥ 0, zero at ``x = y``."""
    return soft_dtw(x, y, gamma=gamma) - 0.5 * (soft_dtw(x, x, gamma=gamma) + soft_dtw(y, y, gamma=gamma))


def soft_dtw_divergence_matrix(x: torch.Tensor, lengths: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Soft-DTW divergence between all views of a packed batch: ``[N, N]`` with a zero diagonal."""
    s = soft_dtw_matrix(x, lengths, gamma=gamma)
    diag = torch.diagonal(s)
    return s - 0.5 * (diag.unsqueeze(0) + diag.unsqueeze(1))
