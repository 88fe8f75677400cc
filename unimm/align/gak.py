"""Global alignment kernels between views: all pairs of a ragged batch, and single pairs.

A batch of ``N`` views is given packed: slice features ``[S, d]`` (views one after another) and
``lengths`` ``[N]`` (``S = lengths.sum()``). All-pairs functions return ``[N, N]`` matrices and
compute each unordered pair once (the matrix is symmetric), tile by tile so that memory stays
bounded. Bandwidth: ``sigma="length_scaled"`` uses ``σ = δ·sqrt((n + m)/2)`` per pair (the
paper's choice), ``"fixed"`` uses ``σ = δ``, and a number is used as ``σ`` directly.

Normalised: ``K̃(x, y) = exp(log K(x, y) − ½ log K(x, x) − ½ log K(y, y))``, so ``K̃(x, x) = 1``.
With ``single_slice="cosine"`` a pair of single-slice views gets the cosine of its two slices
(the paper's choice; GAK is monotone in it there).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from unimm.align.dp import alignment_dp, alignment_log_kernel
from unimm.align.kernels import TEACHERS, local_log_kernel, squared_distance
from unimm.align.scratch import scratch

SIGMAS = ("length_scaled", "fixed")
SINGLE_SLICE = ("cosine", "gak")
# Elements of one batch of local kernels [L, L, pairs]; bounds peak memory per DP call.
_TILE_CELLS = 1 << 24
# Views per block when only the upper triangle of the Gram matrix is computed (no gradient).
_BLOCK_VIEWS = 64


# ---------------------------------------------------------------------------------------------
# Packing


def _check_lengths(lengths: torch.Tensor, total: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths).to(torch.long).flatten()
    if lengths.numel() == 0:
        raise ValueError("no views: lengths is empty")
    if int(lengths.min()) < 1:
        raise ValueError("every view needs at least one slice (a length is < 1)")
    if int(lengths.sum()) != total:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but {total} slices were given")
    return lengths


def pad_views(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Packed slices ``[S, ...]`` → ``[N, L_max, ...]`` zero-padded (differentiable)."""
    lengths = lengths.to(x.device)
    n_views, longest = lengths.numel(), int(lengths.max())
    view = torch.repeat_interleave(torch.arange(n_views, device=x.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(x.shape[0], device=x.device) - starts[view]
    out = x.new_zeros((n_views, longest, *x.shape[1:]))
    return out.index_put((view, pos), x)


def _sigma_of(lengths_a: torch.Tensor, lengths_b: torch.Tensor, sigma, delta: float, dtype) -> torch.Tensor:
    if isinstance(sigma, str):
        if sigma == "length_scaled":
            return delta * torch.sqrt((lengths_a + lengths_b).to(dtype) / 2)
        if sigma == "fixed":
            return torch.full(lengths_a.shape, float(delta), dtype=dtype, device=lengths_a.device)
        raise ValueError(f"sigma must be one of {SIGMAS} or a number, got {sigma!r}")
    value = float(sigma)
    if not value > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return torch.full(lengths_a.shape, value, dtype=dtype, device=lengths_a.device)


# ---------------------------------------------------------------------------------------------
# All pairs (pair-last layout: [L, L, pairs], see unimm.align.dp)


BlockDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(views_a [A], views_b [B]) -> φ [L, A, L, B]`` (slice-major: the matrix product's own
layout, in which the pair-last ``[L, L, A, B]`` is a permutation that keeps ``B`` contiguous, so
gathering pairs copies runs of views rather than single elements)."""


def _block_gram(xa: torch.Tensor, xb: torch.Tensor, slot: str) -> torch.Tensor:
    """``[L, A, d]``, ``[L, B, d]`` → ``[L, A, L, B]`` dot products, as one matrix product (into
    working memory ``slot`` when no gradient is taken)."""
    (length, n_a, dim), n_b = xa.shape, xb.shape[1]
    a, b = xa.reshape(length * n_a, dim), xb.reshape(length * n_b, dim).T
    if _needs_grad(xa, xb):
        gram = a @ b
    else:
        gram = torch.mm(a, b, out=scratch(slot, (length * n_a, length * n_b), a))
    return gram.view(length, n_a, length, n_b)


def _plain_distance(padded: torch.Tensor, slot: str = "gram") -> BlockDistance:
    by_slice = padded.transpose(0, 1)  # [L, N, d]
    sq = (by_slice * by_slice).sum(-1)  # [L, N]

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        phi = _block_gram(by_slice[:, a], by_slice[:, b], slot).mul_(-2)
        length = sq.shape[0]
        phi.add_(sq[:, a].view(length, len(a), 1, 1)).add_(sq[:, b].view(1, 1, length, len(b)))
        return phi.clamp_min_(0)

    return distance


def _triple_distance(pu, pv, pm, kind: str) -> BlockDistance:
    # ‖a − b‖² with the norms, not 2 − 2 a·b: the same for unit rows, exactly 0 for a slice and
    # itself, and smooth for rows that are only nearly unit (features stored in float16).
    plain_v = _plain_distance(pv)
    plain_u = _plain_distance(pu, "gram-expert") if kind == "triple" else None

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        phi = plain_v(a, b)
        if kind == "triple":
            length = pm.shape[1]
            same = pm[a].T.reshape(length, len(a), 1, 1) == pm[b].T.reshape(1, 1, length, len(b))
            phi = torch.where(same, plain_u(a, b), phi)
        return phi

    return distance


def _tiles(n_views: int, longest: int, device):
    """Upper-triangular tiles of view blocks; per tile, the view ids and local pair indices."""
    tile = max(1, int(math.sqrt(_TILE_CELLS / max(1, longest * longest))))
    for a0 in range(0, n_views, tile):
        for b0 in range(a0, n_views, tile):
            views_a = torch.arange(a0, min(a0 + tile, n_views), device=device)
            views_b = torch.arange(b0, min(b0 + tile, n_views), device=device)
            ia, ib = torch.meshgrid(
                torch.arange(len(views_a), device=device),
                torch.arange(len(views_b), device=device),
                indexing="ij",
            )
            ia, ib = ia.flatten(), ib.flatten()
            keep = None
            if a0 == b0:
                keep = ia <= ib
                ia, ib = ia[keep], ib[keep]
            yield views_a, views_b, views_a[ia], views_b[ib], keep is not None


def _pairs_of_tile(phi: torch.Tensor, upper: bool) -> torch.Tensor:
    """``φ [L, A, L, B]`` → pair-last ``[L, L, P]``: all pairs, or (``upper``) pairs ``a ≤ b`` row-major.

    One copy either way; the upper triangle is gathered row by row (twice as fast as an index).
    """
    cells = phi.permute(0, 2, 1, 3)
    if not upper:
        return cells.reshape(cells.shape[0], cells.shape[1], -1)
    if (
        phi.requires_grad
    ):  # one index: its backward is one scatter (row slices would each need a full zero tensor)
        ia, ib = torch.triu_indices(cells.shape[2], cells.shape[3], device=phi.device)
        return cells[:, :, ia, ib]
    return torch.cat([cells[:, :, a, a:] for a in range(cells.shape[2])], dim=2)


def _all_pairs(
    distance: BlockDistance,
    lengths: torch.Tensor,
    longest: int,
    reduce: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    needs_grad: bool = False,
) -> torch.Tensor:
    """Evaluate ``reduce(φ [L, L, P], n, m)`` for every unordered view pair; return the symmetric matrix.

    Without gradients, blocks of :data:`_BLOCK_VIEWS` views are visited upper-triangle only (the
    lower half of a Gram matrix is never computed) and their pairs are written straight into one
    pair-last buffer per :data:`_TILE_CELLS` budget, so ``reduce`` (the DP) runs once per buffer.
    With gradients, tiles are gathered by one index whose backward is a single scatter.
    """
    if needs_grad:
        return _all_pairs_tiled(distance, lengths, longest, reduce)
    n_views, device = lengths.numel(), lengths.device
    budget = max(1, _TILE_CELLS // max(1, longest * longest))
    blocks = []
    for a0 in range(0, n_views, _BLOCK_VIEWS):
        for b0 in range(a0, n_views, _BLOCK_VIEWS):
            na, nb = min(_BLOCK_VIEWS, n_views - a0), min(_BLOCK_VIEWS, n_views - b0)
            blocks.append((a0, b0, na, nb, na * (na + 1) // 2 if a0 == b0 else na * nb))
    values, rows, cols = [], [], []
    start = 0
    while start < len(blocks):
        stop, count = start, 0
        while stop < len(blocks) and (count == 0 or count + blocks[stop][4] <= budget):
            count += blocks[stop][4]
            stop += 1
        phi = None
        offset = 0
        for a0, b0, na, nb, n_pairs in blocks[start:stop]:
            views_a = torch.arange(a0, a0 + na, device=device)
            views_b = torch.arange(b0, b0 + nb, device=device)
            cells = distance(views_a, views_b).permute(0, 2, 1, 3)  # [L, L, A, B], B contiguous
            if phi is None:
                phi = scratch("distances", (cells.shape[0], cells.shape[1], count), cells)
            if a0 == b0:
                ia, ib = torch.triu_indices(na, nb, device=device)
                for a in range(na):  # row slices: a copy each, faster than one gather
                    phi[:, :, offset : offset + nb - a] = cells[:, :, a, a:]
                    offset += nb - a
            else:
                ia, ib = (
                    t.flatten()
                    for t in torch.meshgrid(
                        torch.arange(na, device=device), torch.arange(nb, device=device), indexing="ij"
                    )
                )
                phi[:, :, offset : offset + n_pairs].view(cells.shape).copy_(cells)
                offset += n_pairs
            rows.append(views_a[ia])
            cols.append(views_b[ib])
        ga, gb = torch.cat(rows[-(stop - start) :]), torch.cat(cols[-(stop - start) :])
        values.append(reduce(phi, lengths[ga], lengths[gb]))
        start = stop
    vals, r, c = torch.cat(values), torch.cat(rows), torch.cat(cols)
    return _symmetric(vals, r, c, n_views)


def _all_pairs_tiled(distance, lengths, longest, reduce) -> torch.Tensor:
    n_views = lengths.numel()
    values, rows, cols = [], [], []
    for views_a, views_b, ga, gb, upper in _tiles(n_views, longest, lengths.device):
        phi = _pairs_of_tile(distance(views_a, views_b), upper)
        values.append(reduce(phi, lengths[ga], lengths[gb]))
        rows.append(ga)
        cols.append(gb)
    return _symmetric(torch.cat(values), torch.cat(rows), torch.cat(cols), n_views)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _symmetric(vals: torch.Tensor, r: torch.Tensor, c: torch.Tensor, n_views: int) -> torch.Tensor:
    out = vals.new_zeros(n_views, n_views)
    out = out.index_put((r, c), vals)
    return out.index_put((c, r), vals)


def _gak_reduce(sigma, delta: float, method: str):
    def reduce(phi: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        s = _sigma_of(n, m, sigma, delta, phi.dtype)
        scale = 0.5 / (s * s)
        # φ is a fresh copy unless it needs a gradient: scale it in place then (saves a pass).
        t = phi * scale.view(1, 1, -1) if phi.requires_grad else phi.mul_(scale.view(1, 1, -1))
        return alignment_dp(t, n, m, local="gak", method=method)

    return reduce


def _inside(shape, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(shape[0], device=n.device).view(-1, 1, 1)
    cols = torch.arange(shape[1], device=n.device).view(1, -1, 1)
    return (rows < n.view(1, 1, -1)) & (cols < m.view(1, 1, -1))


def _mean_similarity_reduce(phi: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    sim = (1 - phi / 2) * _inside(phi.shape, n, m)
    return sim.sum((0, 1)) / (n * m).to(phi.dtype)


# ---------------------------------------------------------------------------------------------
# Back ends


BACKENDS = ("reference", "triton")
BACKEND_ENV = "UNIMM_ALIGN_BACKEND"


def backend_for(x: torch.Tensor) -> str:
    """The back end for tensors like ``x``: ``$UNIMM_ALIGN_BACKEND`` if set, else Triton on CUDA.

    Raises:
        ValueError: an unknown back end is asked for, or Triton where it cannot run.
    """
    from unimm.align import triton_gak

    asked = os.environ.get(BACKEND_ENV, "").strip().lower()
    if asked and asked not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={asked!r}: use one of {', '.join(BACKENDS)}")
    if asked == "reference":
        return "reference"
    if asked == "triton":
        if not triton_gak.available():
            raise ValueError(f"{BACKEND_ENV}=triton but Triton is not installed (pip install triton)")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{BACKEND_ENV}=triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return "triton"
    return "triton" if x.is_cuda and triton_gak.available() else "reference"


def _triton_all_pairs(v, u, modality, lengths, sigma, delta) -> torch.Tensor:
    """``log K`` ``[N, N]`` between all packed views with the fused kernels (fp32)."""
    from unimm.align.triton_gak import triton_log_gak_pairs

    n_views = lengths.numel()
    pair_a, pair_b = torch.triu_indices(n_views, n_views, device=v.device)
    s = _sigma_of(lengths[pair_a], lengths[pair_b], sigma, delta, torch.float32)
    offset = torch.cumsum(lengths, 0) - lengths
    vals = triton_log_gak_pairs(v, u, modality, offset, lengths, pair_a, pair_b, s * s)
    out = vals.new_zeros(n_views, n_views)
    out = out.index_put((pair_a, pair_b), vals)
    return out.index_put((pair_b, pair_a), vals)


def _normalise(log_k: torch.Tensor) -> torch.Tensor:
    diag = torch.diagonal(log_k)
    return torch.exp(log_k - 0.5 * diag.unsqueeze(0) - 0.5 * diag.unsqueeze(1))


def _finish(
    log_k: torch.Tensor, cosine: torch.Tensor | None, lengths: torch.Tensor, normalize: bool
) -> torch.Tensor:
    out = _normalise(log_k) if normalize else torch.exp(log_k)
    if cosine is not None:
        single = lengths == 1
        both = single.unsqueeze(0) & single.unsqueeze(1)
        out = torch.where(both, cosine, out)
    return out


def _first_slice_cosine(pu, pv, pm, kind: str) -> torch.Tensor:
    """Cosine of the first slices of all views as the teacher picks it: ``[N, N]``."""

    def cosine(x: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(x, dim=-1)
        return unit @ unit.T

    cos = cosine(pv[:, 0])
    if kind == "triple":
        same = pm[:, 0].unsqueeze(1) == pm[:, 0].unsqueeze(0)
        cos = torch.where(same, cosine(pu[:, 0]), cos)
    return cos


def log_gak_matrix(
    x: torch.Tensor, lengths: torch.Tensor, *, sigma: float, method: str = "auto"
) -> torch.Tensor:
    """Raw ``log K`` between all views of a batch of plain vectors (stable contract).

    Args:
        x: ``[S, d]`` slices of ``N`` views, packed.
        lengths: ``[N]`` slices per view.
        sigma: the fixed bandwidth ``σ`` (local distance ``‖a − b‖²``).
        method: DP recursion (``auto``, ``scaled``, ``log``); see :mod:`unimm.align.dp`.

    Returns:
        ``[N, N]`` symmetric ``log K``, differentiable in ``x``. No normalisation, no shortcut.
    """
    lengths = _check_lengths(lengths, x.shape[0]).to(x.device)
    if backend_for(x) == "triton":
        return _triton_all_pairs(x, None, None, lengths, float(sigma), 1.0)
    padded = pad_views(x, lengths)
    return _all_pairs(
        _plain_distance(padded),
        lengths,
        padded.shape[1],
        _gak_reduce(float(sigma), 1.0, method),
        needs_grad=_needs_grad(x),
    )


def gak_matrix(
    x: torch.Tensor,
    lengths: torch.Tensor,
    *,
    delta: float = 1.0,
    sigma: str | float = "length_scaled",
    normalize: bool = True,
    single_slice: str = "cosine",
    method: str = "auto",
) -> torch.Tensor:
    """``K̃`` (or raw ``K``) between all views of plain vectors (e.g. student slice embeddings).

    Same options as :func:`gak_matrix_triple` with ``φ = ‖a − b‖²``; the single-slice shortcut
    uses the cosine of the two vectors.
    """
    _check_options(sigma, single_slice, "triple")
    lengths = _check_lengths(lengths, x.shape[0]).to(x.device)
    padded = pad_views(x, lengths)
    if backend_for(x) == "triton":
        log_k = _triton_all_pairs(x, None, None, lengths, sigma, delta)
    else:
        log_k = _all_pairs(
            _plain_distance(padded),
            lengths,
            padded.shape[1],
            _gak_reduce(sigma, delta, method),
            needs_grad=_needs_grad(x),
        )
    cosine = None
    if single_slice == "cosine":
        unit = torch.nn.functional.normalize(padded[:, 0], dim=-1)
        cosine = unit @ unit.T
    return _finish(log_k, cosine, lengths, normalize)


def gak_matrix_triple(
    u: torch.Tensor | None,
    v: torch.Tensor,
    modality: torch.Tensor,
    lengths: torch.Tensor,
    *,
    delta: float,
    sigma: str | float = "length_scaled",
    normalize: bool = True,
    single_slice: str = "cosine",
    teacher: str = "triple",
    method: str = "auto",
) -> torch.Tensor:
    """The target similarities ``M^l`` of the structure-induced loss (stable contract).

    Args:
        u: ``[S, d_u]`` expert features (unit rows; ``None`` allowed with ``teacher="clip"``).
        v: ``[S, d_v]`` CLIP features (unit rows).
        modality: ``[S]`` 0 text, 1 image.
        lengths: ``[N]`` slices per view (views packed one after another).
        delta: bandwidth scale ``δ``.
        sigma: ``length_scaled`` (``σ = δ·sqrt((n+m)/2)``), ``fixed`` (``σ = δ``) or a number.
        normalize: return ``K̃`` (else raw ``K``, which may overflow for long views).
        single_slice: ``cosine`` — single-slice pairs get the cosine their teacher picks
            (``u`` within a modality, ``v`` across) — or ``gak``.
        teacher: ``triple``, ``clip`` (``v`` for every pair) or ``mean`` (mean slice similarity
            ``1 − φ/2`` instead of GAK; the paper's "w/o GAK").
        method: DP recursion; see :mod:`unimm.align.dp`.

    Returns:
        ``[N, N]`` symmetric similarities, in ``(0, 1]`` when normalised.
    """
    _check_options(sigma, single_slice, teacher)
    lengths = _check_lengths(lengths, v.shape[0]).to(v.device)
    dtype = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
    v = v.to(dtype)
    u = u.to(dtype) if u is not None else None
    pv, pm = pad_views(v, lengths), pad_views(modality.to(v.device), lengths)
    pu = pad_views(u, lengths) if u is not None else None
    kind = "clip" if teacher == "clip" else "triple"
    if kind == "triple" and pu is None:
        raise ValueError("the triple kernel needs expert features u (prepare with both experts)")

    distance = _triple_distance(pu, pv, pm, kind)
    if teacher == "mean":
        return _all_pairs(
            distance, lengths, pv.shape[1], _mean_similarity_reduce, needs_grad=_needs_grad(u, v)
        )
    if backend_for(v) == "triton":
        log_k = _triton_all_pairs(v, u if kind == "triple" else None, modality, lengths, sigma, delta)
    else:
        log_k = _all_pairs(
            distance, lengths, pv.shape[1], _gak_reduce(sigma, delta, method), needs_grad=_needs_grad(u, v)
        )
    cosine = _first_slice_cosine(pu, pv, pm, kind) if single_slice == "cosine" else None
    return _finish(log_k, cosine, lengths, normalize)


def _check_options(sigma, single_slice: str, teacher: str) -> None:
    if isinstance(sigma, str) and sigma not in SIGMAS:
        raise ValueError(f"sigma must be one of {SIGMAS} or a number, got {sigma!r}")
    if single_slice not in SINGLE_SLICE:
        raise ValueError(f"single_slice must be one of {SINGLE_SLICE}, got {single_slice!r}")
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")


# ---------------------------------------------------------------------------------------------
# Single pairs


def log_gak(x: torch.Tensor, y: torch.Tensor, *, sigma: float, method: str = "auto") -> torch.Tensor:
    """``log K(x, y)`` for two sequences of plain vectors ``[n, d]``, ``[m, d]`` (fixed ``σ``)."""
    logk = local_log_kernel(squared_distance(x, y), float(sigma)).unsqueeze(0)
    n = torch.tensor([x.shape[0]])
    m = torch.tensor([y.shape[0]])
    return alignment_log_kernel(logk, n, m, method=method)[0]


def gak(x: torch.Tensor, y: torch.Tensor, *, sigma: float, normalize: bool = True) -> torch.Tensor:
    """``K̃(x, y)`` (or raw ``K``) for two sequences of plain vectors with a fixed ``σ``."""
    value = log_gak(x, y, sigma=sigma)
    if not normalize:
        return torch.exp(value)
    return torch.exp(value - 0.5 * log_gak(x, x, sigma=sigma) - 0.5 * log_gak(y, y, sigma=sigma))
