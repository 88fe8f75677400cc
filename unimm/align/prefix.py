"""Prefix sharing: the kernel of every pair of prefix views from one DP table per sample pair.

Training embeds up to ``P`` views per sample, each a prefix of it. With a fixed σ the DP table of
two samples holds ``log K`` of every pair of their prefixes (``L[c_a, c_b]``), so one table per
pair of samples replaces ``P²`` tables. (With the paper's length-scaled σ the bandwidth differs
per pair of views and the tables cannot be shared.)
"""

from __future__ import annotations

import torch

from unimm.align.dp import read_log_kernels
from unimm.align.gak import (
    _check_lengths,
    _check_options,
    _first_slice_cosine,
    _normalise,
    _pairs_of_tile,
    _tiles,
    _triple_distance,
    pad_views,
)


def _checked_views(v, sample_lengths, view_sample, view_cut, sigma, single_slice: str, teacher: str):
    """The view description as long tensors on ``v``'s device, after checking it and the options."""
    if isinstance(sigma, str):
        raise ValueError(
            "prefix sharing needs a fixed sigma (a number); length-scaled tables differ per pair"
        )
    _check_options(float(sigma), single_slice, teacher)
    sample_lengths = _check_lengths(sample_lengths, v.shape[0]).to(v.device)
    view_sample = torch.as_tensor(view_sample, device=v.device, dtype=torch.long)
    view_cut = torch.as_tensor(view_cut, device=v.device, dtype=torch.long)
    if bool((view_cut < 1).any()) or bool((view_cut > sample_lengths[view_sample]).any()):
        raise ValueError("each view's cut must be between 1 and its sample's length")
    return sample_lengths, view_sample, view_cut


def _tile_values(phi, lengths, pair, row, col, teacher: str, sigma: float, method: str) -> torch.Tensor:
    """Values at prefix cells ``(row, col)`` of the tile's sample pairs ``pair``: ``log K`` from
    the GAK table, or (``teacher="mean"``) the mean local similarity over the prefix block."""
    if teacher == "mean":
        csum = (1 - phi / 2).cumsum(0).cumsum(1)  # a prefix block's mean = its sum / (c_a c_b)
        return csum[row - 1, col - 1, pair] / (row * col).to(phi.dtype)
    t = phi * (0.5 / float(sigma) ** 2)
    return read_log_kernels(t, lengths[0], lengths[1], pair, row, col, local="gak", method=method)


def gak_matrix_prefix(
    u: torch.Tensor | None,
    v: torch.Tensor,
    modality: torch.Tensor,
    sample_lengths: torch.Tensor,
    view_sample: torch.Tensor,
    view_cut: torch.Tensor,
    *,
    sigma: float,
    normalize: bool = True,
    single_slice: str = "cosine",
    teacher: str = "triple",
    method: str = "auto",
) -> torch.Tensor:
    """Target similarities between views that are prefixes of samples, one DP table per sample pair.

    With a fixed ``σ`` the table of samples ``A``, ``B`` holds ``log K`` of every pair of their
    prefixes at ``L[c_a, c_b]``, so ``P`` cut points per sample cost one table instead of ``P²``.
    The result equals :func:`gak_matrix_triple` on the packed views with ``sigma=σ`` (a test
    checks it). Targets need no gradient: this runs without one.

    Args:
        u, v, modality: slice features of the *samples*, packed (see :func:`gak_matrix_triple`).
        sample_lengths: ``[N_s]`` slices per sample.
        view_sample: ``[N]`` the sample each view is a prefix of.
        view_cut: ``[N]`` the view's length (its cut point, ``1 ≤ c ≤`` the sample's length).
        sigma: the fixed bandwidth ``σ`` (a length-scaled ``σ`` differs per pair of views, so their
            tables cannot be shared; use :func:`gak_matrix_triple` for it).

    Returns:
        ``[N, N]`` similarities (``K̃``, or raw ``K`` when ``normalize=False``).
    """
    sample_lengths, view_sample, view_cut = _checked_views(
        v, sample_lengths, view_sample, view_cut, sigma, single_slice, teacher
    )
    dtype = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.no_grad():
        pv = pad_views(v.to(dtype), sample_lengths)
        pm = pad_views(modality.to(v.device), sample_lengths)
        pu = pad_views(u.to(dtype), sample_lengths) if u is not None else None
        kind = "clip" if teacher == "clip" else "triple"
        if kind == "triple" and pu is None:
            raise ValueError("the triple kernel needs expert features u (prepare with both experts)")
        n_samples, n_views = sample_lengths.numel(), view_sample.numel()
        va, vb = torch.triu_indices(n_views, n_views, device=v.device)
        sa, sb = view_sample[va], view_sample[vb]
        swap = sa > sb  # each unordered sample pair's table is read from (low, high)
        lo, hi = torch.where(swap, sb, sa), torch.where(swap, sa, sb)
        row = torch.where(swap, view_cut[vb], view_cut[va])
        col = torch.where(swap, view_cut[va], view_cut[vb])
        read_key = lo * n_samples + hi
        vals = torch.empty(va.numel(), dtype=dtype, device=v.device)
        distance = _triple_distance(pu, pv, pm, kind)
        for views_a, views_b, ga, gb, keep in _tiles(n_samples, pv.shape[1], v.device):
            tile_key = ga * n_samples + gb  # sorted: tiles enumerate pairs row-major
            mine = torch.nonzero((read_key >= tile_key[0]) & (read_key <= tile_key[-1])).flatten()
            pair = torch.searchsorted(tile_key, read_key[mine])
            hit = tile_key[pair.clamp_max(len(tile_key) - 1)] == read_key[mine]
            mine, pair = mine[hit], pair[hit]
            if mine.numel() == 0:
                continue
            phi = _pairs_of_tile(distance(views_a, views_b), keep)
            lengths = (sample_lengths[ga], sample_lengths[gb])
            vals[mine] = _tile_values(phi, lengths, pair, row[mine], col[mine], teacher, sigma, method)
        out = vals.new_zeros(n_views, n_views)
        out[va, vb] = vals
        out[vb, va] = vals
        if teacher == "mean":
            return out
        result = _normalise(out) if normalize else torch.exp(out)
        if single_slice == "cosine":
            cos = _first_slice_cosine(pu, pv, pm, kind)[view_sample][:, view_sample]
            single = view_cut == 1
            result = torch.where(single.unsqueeze(0) & single.unsqueeze(1), cos, result)
        return result
