"""The alignment dynamic programme over many pairs at once: the PyTorch reference back end.

For a pair with local log-kernels ``log k_ij`` (``i ≤ n``, ``j ≤ m``)::

    L[0,0] = 0,  L[i,0] = L[0,j] = −∞,
    L[i,j] = log k_ij + logsumexp(L[i−1,j], L[i,j−1], L[i−1,j−1]),   log K = L[n,m]

(the global alignment kernel; with ``log k = −cost/γ`` it is soft-DTW: ``sdtw = −γ·log K``).

Layout. Inputs are *pair-last*, ``[n_max, m_max, P]``, so each DP step is a few vectorised
operations over contiguous rows of pairs. Anti-diagonals are read without a gather: with rows
padded to width ``W = n_max + m_max``, cell ``(i, j)`` sits at ``i·(W−1) + (i+j)`` rows of
pairs, so ``X[d, i] = cell(i, d−i)`` is a strided view (the padding reads as "no cell").
Ragged pairs need no masks in the recursion: ``L[n,m]`` depends only on cells ``≤ (n, m)``;
cells beyond get ``k = 0`` and the result is read at ``(n, m)``.

Local kernels. ``local="gak"`` takes ``t = φ/(2σ²)`` and uses ``k = e^{−t}/(2 − e^{−t})`` (so
``log k = −t − log(2 − e^{−t})``, one ``exp`` per cell and ``∂ log k/∂t = −(1 + k)``);
``local="log"`` takes ``log k`` itself.

Two recursions:

- **scaled** (fast): in the linear domain, ``Z[i,j] = k_ij (Z[i−1,j] + Z[i,j−1] + Z[i−1,j−1])``,
  each anti-diagonal divided by its maximum and the logs of those factors carried along. Only
  adds and multiplies per cell. While every cell stays a *normal* float (at least
  ``finfo.tiny`` times the largest on its diagonal) the result carries the usual rounding error
  of a sum of products; the sweep checks exactly that, for each pair, forward and backward.
- **log** (exact in any range): the same sweep with ``logsumexp``. ``method="auto"`` sends a pair
  here when one of its local kernels is not a normal float, or when the scaled sweep saw a cell
  leave the normal range — so every pair gets full precision, and typical pairs the fast path.

The backward pass is the expected-alignment recursion: ``∂ log K / ∂ log k_ij`` is the
probability that an alignment path passes through ``(i, j)``,
``E_ij = exp(L[i,j] + B[i,j] − log K)`` with ``B`` the same recursion run back from ``(n, m)``.
"""

from __future__ import annotations

import math

import torch

from unimm.align.scratch import scratch

LOCALS = ("gak", "log")
METHODS = ("auto", "scaled", "log")

Reads = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def skew(padded: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """Anti-diagonal view ``[n_rows + n_cols − 1, n_rows, P]`` of a row-padded ``[n_rows, W, P]``.

    ``W = n_rows + n_cols`` and columns ``≥ n_cols`` hold the "no cell" value; element
    ``[d, i]`` is cell ``(i, d − i)`` (0-based) or padding.
    """
    pairs = padded.shape[-1]
    width = n_rows + n_cols
    assert padded.shape == (n_rows, width, pairs) and padded.is_contiguous()
    return padded.as_strided((n_rows + n_cols - 1, n_rows, pairs), (pairs, (width - 1) * pairs, 1))


def _padded(x: torch.Tensor, fill: float) -> torch.Tensor:
    n_rows, n_cols, pairs = x.shape
    out = x.new_full((n_rows, n_rows + n_cols, pairs), fill)
    out[:, :n_cols] = x
    return out


def _group_reads(pair: torch.Tensor, row: torch.Tensor, col: torch.Tensor, count: int) -> Reads:
    """Group read-out cells ``(pair, row, col)`` (1-based) by anti-diagonal ``row + col``."""
    diag = row + col
    order = torch.argsort(diag)
    sizes = torch.bincount(diag, minlength=count).tolist()
    return [(pair[o], row[o], o) for o in torch.split(order, sizes)]


def _forward_scaled(k: torch.Tensor, reads: Reads, n_out: int, store: bool, full: bool = False):
    """Linear-domain sweep with per-diagonal rescaling over the skewed kernels ``k`` ``[D−2, I−1, P]``.

    Diagonal ``d`` (of the 1-based table, ``d = i + j``) uses ``k[d − 2]`` for rows ``i = 1..``.
    ``full`` says that no pair is ragged (every cell of the table is real). Returns ``log Z`` at
    the read-out cells, every scaled diagonal and its scale (if ``store``), and which pairs had a
    cell leave the normal float range (their result may be inexact).
    """
    n_inner, rows_m1, pairs = k.shape
    rows, n_diag = rows_m1 + 1, n_inner + 2
    prev2 = k.new_zeros(rows, pairs)
    prev2[0] = 1.0  # cell (0, 0)
    prev = k.new_zeros(rows, pairs)
    scale2 = k.new_zeros(pairs)
    scale1 = k.new_zeros(pairs)
    log_z = k.new_empty(n_out)
    tiny = torch.finfo(k.dtype).tiny
    lost = torch.zeros(pairs, dtype=torch.bool, device=k.device)
    cells = scales = None
    if store:
        cells = k.new_zeros(n_diag, rows, pairs)
        cells[0] = prev2
        scales = k.new_zeros(n_diag, pairs)
    n_cols = n_diag - rows  # the table's column count (n_diag = rows + cols)
    spare = k.new_zeros(rows, pairs)
    for d in range(2, n_diag):
        if store:
            cur = cells[d]
        else:  # three buffers in rotation; rows outside this diagonal's range must read as zero
            cur, spare = spare, prev2 if d >= 3 else k.new_zeros(rows, pairs)
        # Rows that can hold a cell on this diagonal: 1 <= i <= rows - 1 and 1 <= d - i <= n_cols.
        lo, hi = max(1, d - n_cols), min(rows - 1, d - 1)
        if not store:
            cur[:lo] = 0.0
            cur[hi + 1 :] = 0.0
        body = cur[lo : hi + 1]
        torch.add(prev[lo - 1 : hi], prev[lo : hi + 1], out=body)
        body.addcmul_(prev2[lo - 1 : hi], torch.exp(scale2 - scale1).expand(hi - lo + 1, pairs))
        k_rows = k[d - 2, lo - 1 : hi]
        body.mul_(k_rows)
        peak = body.amax(0)
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        body.div_(peak)
        if full:  # every row in range is a real cell of every pair
            lost |= body.amin(0) < tiny
        else:  # a real cell (k > 0) left the normal range
            lost |= ((body < tiny) & (k_rows > 0)).any(0)
        scale0 = scale1 + torch.log(peak)
        if store:
            scales[d] = scale0
        pair, row, out = reads[d]
        if out.numel():
            log_z[out] = torch.log(cur[row, pair]) + scale0[pair]
        prev2, prev, scale2, scale1 = prev, cur, scale1, scale0
    return log_z, cells, scales, lost


def _backward_scaled(k: torch.Tensor, cells, scales, reads: Reads, log_z) -> torch.Tensor:
    """Expected alignment on the skewed layout ``[D−2, I−1, P]`` from the stored forward sweep."""
    n_inner, rows_m1, pairs = k.shape
    rows, n_diag = rows_m1 + 1, n_inner + 2
    expect = torch.empty_like(k)
    g1 = k.new_zeros(rows, pairs)  # k · beta on diagonal d + 1 (scaled by exp(b1))
    g2 = k.new_zeros(rows, pairs)  # ... on diagonal d + 2
    b1 = k.new_zeros(pairs)
    b2 = k.new_zeros(pairs)
    tiny = torch.finfo(k.dtype).tiny
    lost = torch.zeros(pairs, dtype=torch.bool, device=k.device)
    for d in range(n_diag - 1, 1, -1):
        beta = k.new_empty(rows, pairs)
        torch.add(g1[1:], g1[:-1], out=beta[:-1])
        beta[-1] = g1[-1]
        beta[:-1].addcmul_(g2[1:], torch.exp(b2 - b1).expand(rows - 1, pairs))
        b0 = b1.clone()
        pair, row, _ = reads[d]
        if pair.numel():
            beta[row, pair] = 1.0
            b0[pair] = 0.0
        peak = beta.amax(0)
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        beta.div_(peak)
        lost |= ((beta[1:] < tiny) & (cells[d, 1:] > 0)).any(0)
        b0 = b0 + torch.log(peak)
        torch.mul(cells[d, 1:], beta[1:], out=expect[d - 2])
        # a cell lost to underflow is 0 here; keep its factor finite so that it stays 0, not NaN
        expect[d - 2].mul_(torch.exp(scales[d] + b0 - log_z).clamp_max(torch.finfo(k.dtype).max))
        g = k.new_zeros(rows, pairs)
        torch.mul(k[d - 2], beta[1:], out=g[1:])
        g2, g1, b2, b1 = g1, g, b1, b0
    return expect, lost


def _forward_log(logk: torch.Tensor, reads: Reads, n_out: int, store: bool):
    """Log-domain sweep over the skewed ``log k`` ``[D−2, I−1, P]`` (``−inf`` = no cell)."""
    n_inner, rows_m1, pairs = logk.shape
    rows, n_diag = rows_m1 + 1, n_inner + 2
    ninf = -math.inf
    prev2 = logk.new_full((rows, pairs), ninf)
    prev2[0] = 0.0
    prev = logk.new_full((rows, pairs), ninf)
    log_z = logk.new_empty(n_out)
    cells = logk.new_full((n_diag, rows, pairs), ninf) if store else None
    if store:
        cells[0] = prev2
    for d in range(2, n_diag):
        cur = logk.new_empty(rows, pairs)
        cur[0] = ninf
        cur[1:] = logk[d - 2] + torch.logsumexp(torch.stack([prev[:-1], prev[1:], prev2[:-1]]), dim=0)
        if store:
            cells[d] = cur
        pair, row, out = reads[d]
        if out.numel():
            log_z[out] = cur[row, pair]
        prev2, prev = prev, cur
    return log_z, cells


def _backward_log(logk: torch.Tensor, cells, reads: Reads, log_z) -> torch.Tensor:
    n_inner, rows_m1, pairs = logk.shape
    rows, n_diag = rows_m1 + 1, n_inner + 2
    ninf = -math.inf
    expect = torch.empty_like(logk)
    g1 = logk.new_full((rows, pairs), ninf)
    g2 = logk.new_full((rows, pairs), ninf)
    for d in range(n_diag - 1, 1, -1):
        beta = logk.new_empty(rows, pairs)
        beta[:-1] = torch.logsumexp(torch.stack([g1[1:], g1[:-1], g2[1:]]), dim=0)
        beta[-1] = g1[-1]
        pair, row, _ = reads[d]
        if pair.numel():
            beta[row, pair] = 0.0
        expect[d - 2] = torch.exp(cells[d, 1:] + beta[1:] - log_z)
        g = logk.new_full((rows, pairs), ninf)
        g[1:] = logk[d - 2] + beta[1:]
        g2, g1 = g1, g
    return expect


def _outside(n_rows: int, n_cols: int, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor | None:
    """``[n_rows, n_cols, P]`` mask of cells beyond each pair's lengths (``None`` if none is ragged)."""
    if bool((n == n_rows).all()) and bool((m == n_cols).all()):
        return None
    rows = torch.arange(n_rows, device=n.device).view(-1, 1, 1)
    cols = torch.arange(n_cols, device=n.device).view(1, -1, 1)
    return (rows >= n.view(1, 1, -1)) | (cols >= m.view(1, 1, -1))


def _log_k_min(x: torch.Tensor, local: str, outside: torch.Tensor | None) -> torch.Tensor:
    """Smallest ``log k`` over each pair's cells: ``[P]``."""
    if local == "gak":  # log k falls as t grows
        t_max = (x if outside is None else x.masked_fill(outside, -math.inf)).amax((0, 1))
        return -t_max - torch.log1p(-torch.expm1(-t_max))
    return (x if outside is None else x.masked_fill(outside, math.inf)).amin((0, 1))


def _local_log(x: torch.Tensor, local: str) -> torch.Tensor:
    return -x - torch.log1p(-torch.expm1(-x)) if local == "gak" else x


def _local_kernel_into(x: torch.Tensor, local: str, out: torch.Tensor) -> None:
    """``k`` from ``x`` written into ``out``; for GAK ``k = e^{−t}/(2 − e^{−t}) = 1/(2e^t − 1)``."""
    torch.exp(x, out=out)
    if local == "gak":  # e^t overflows to inf only where k underflows to 0 anyway
        out.mul_(2).sub_(1).reciprocal_()


def _choose(x, local: str, method: str, outside) -> torch.Tensor:
    """Pairs to try on the scaled path: every local kernel must be a normal float."""
    pairs = x.shape[-1]
    if method != "auto":
        return torch.full((pairs,), method == "scaled", dtype=torch.bool, device=x.device)
    return _log_k_min(x, local, outside) > math.log(torch.finfo(x.dtype).tiny)


def _sweep(
    x: torch.Tensor,
    n: torch.Tensor,
    m: torch.Tensor,
    reads_of,
    n_reads: int,
    local: str,
    method: str,
    store: bool,
):
    """Run the right recursion for each pair; return ``log K`` per read-out and what backward needs.

    Pairs the scaled sweep flags (a cell left the normal float range) are run again in log space
    under ``method="auto"``; the log groups come last, so their results overwrite.
    """
    n_rows, n_cols, pairs = x.shape
    outside = _outside(n_rows, n_cols, n, m)
    scaled = _choose(x, local, method, outside)
    groups = []
    result = x.new_empty(n_reads)

    def subset(idx):
        sub = x if idx.numel() == pairs else x[..., idx]
        sub_out = None if outside is None else (outside if idx.numel() == pairs else outside[..., idx])
        return sub, sub_out

    idx = torch.nonzero(scaled).flatten()
    redo = torch.nonzero(~scaled).flatten()
    if idx.numel():
        sub, sub_out = subset(idx)
        reads, read_idx, count = reads_of(idx)
        if count:
            shape = (n_rows, n_rows + n_cols, sub.shape[-1])
            # kept for the backward pass when it is stored, else reused working memory
            padded = sub.new_empty(shape) if store else scratch("kernels", shape, sub)
            padded[:, n_cols:] = 0.0
            k = padded[:, :n_cols]
            _local_kernel_into(sub, local, k)
            if sub_out is not None:
                k.masked_fill_(sub_out, 0.0)
            k_skew = skew(padded, n_rows, n_cols)
            log_z, cells, scales, lost = _forward_scaled(k_skew, reads, count, store, full=sub_out is None)
            result[read_idx] = log_z
            groups.append((idx, True, k, k_skew, cells, scales, reads, log_z))
            if method == "auto" and bool(lost.any()):
                redo = torch.cat([redo, idx[lost]])
    if redo.numel():
        groups.extend(_log_group(x, outside, redo, reads_of, result, local, store, subset))
    return result, groups


def _log_group(x, outside, idx, reads_of, result, local, store, subset) -> list:
    """Log-domain sweep of pairs ``idx``; writes their read-outs into ``result``."""
    n_rows, n_cols, _ = x.shape
    sub, sub_out = subset(idx)
    reads, read_idx, count = reads_of(idx)
    if count == 0:
        return []
    logk = _local_log(sub, local)
    if sub_out is not None:
        logk = logk.masked_fill(sub_out, -math.inf)
    l_skew = skew(_padded(logk, -math.inf), n_rows, n_cols)
    log_z, cells = _forward_log(l_skew, reads, count, store)
    result[read_idx] = log_z
    return [(idx, False, logk, l_skew, cells, None, reads, log_z)]


def _expected_alignment(groups, x, n, m, local: str, method: str) -> torch.Tensor:
    """``∂ log K / ∂x`` ``[n_max, m_max, P]`` from the groups :func:`_sweep` stored.

    Pairs whose scaled backward sweep left the normal range are redone in log space.
    """
    n_rows, n_cols, pairs = x.shape
    dtype, device = x.dtype, x.device
    grad = torch.zeros(x.shape, dtype=dtype, device=device)
    groups = list(groups)
    done_in_log = torch.zeros(pairs, dtype=torch.bool, device=device)
    for idx, use_scaled, *_ in groups:
        if not use_scaled:
            done_in_log[idx] = True
    position = 0
    while position < len(groups):
        idx, use_scaled, kernel, kernel_skew, cells, scales, reads, log_z = groups[position]
        position += 1
        if use_scaled:
            e_skew, lost = _backward_scaled(kernel_skew, cells, scales, reads, log_z)
            lost &= ~done_in_log[idx]
            if method == "auto" and bool(lost.any()):
                redo = idx[lost]
                done_in_log[redo] = True
                groups.extend(_log_group_for_backward(x, n, m, redo, local))
        else:
            e_skew = _backward_log(kernel_skew, cells, reads, log_z)
        padded = torch.zeros((n_rows, n_rows + n_cols, len(idx)), dtype=dtype, device=device)
        skew(padded, n_rows, n_cols).copy_(e_skew)
        expect = padded[:, :n_cols]
        if local == "gak":  # d log k / d t = −(1 + k)
            k = kernel if use_scaled else torch.exp(kernel)
            expect = -expect * (1 + k)
        if len(idx) == pairs:  # later groups (log-space redos) overwrite earlier ones
            grad.copy_(expect)
        else:
            grad[..., idx] = expect
    return grad


def _log_group_for_backward(x, n, m, idx, local) -> list:
    """A stored log-domain forward sweep of pairs ``idx`` (for their backward pass)."""
    outside = _outside(x.shape[0], x.shape[1], n, m)

    def subset(sub_idx):
        return x[..., sub_idx], None if outside is None else outside[..., sub_idx]

    def reads_of(sub_idx):
        local_pairs = torch.arange(len(sub_idx), device=x.device)
        return (
            _group_reads(local_pairs, n[sub_idx], m[sub_idx], x.shape[0] + x.shape[1] + 1),
            local_pairs,
            len(sub_idx),
        )

    scratch = x.new_empty(len(idx))
    return _log_group(x, outside, idx, reads_of, scratch, local, True, subset)


class AlignmentDP(torch.autograd.Function):
    """``log K`` ``[P]`` from pair-last local inputs ``[n_max, m_max, P]``; differentiable."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, n: torch.Tensor, m: torch.Tensor, local: str, method: str
    ) -> torch.Tensor:
        pairs = x.shape[-1]

        def reads_of(idx):
            local_pairs = torch.arange(len(idx), device=x.device)
            return _group_reads(local_pairs, n[idx], m[idx], x.shape[0] + x.shape[1] + 1), idx, len(idx)

        store = ctx.needs_input_grad[0]
        log_z, groups = _sweep(x, n, m, reads_of, pairs, local, method, store)
        if store:
            ctx.groups, ctx.local, ctx.method = groups, local, method
            ctx.save_for_backward(x, n, m)
        return log_z

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, n, m = ctx.saved_tensors
        expect = _expected_alignment(ctx.groups, x, n, m, ctx.local, ctx.method)
        return expect * grad.view(1, 1, -1), None, None, None, None


def _check(x: torch.Tensor, n, m, local: str, method: str):
    if local not in LOCALS:
        raise ValueError(f"local must be one of {LOCALS}, got {local!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = torch.as_tensor(n).to(device=x.device, dtype=torch.long).flatten()
    m = torch.as_tensor(m).to(device=x.device, dtype=torch.long).flatten()
    if n.numel() != x.shape[-1] or m.numel() != x.shape[-1]:
        raise ValueError(f"{x.shape[-1]} pairs but {n.numel()} and {m.numel()} lengths")
    if n.numel() and (int(n.min()) < 1 or int(m.min()) < 1):
        raise ValueError("every view needs at least one slice")
    if n.numel() and (int(n.max()) > x.shape[0] or int(m.max()) > x.shape[1]):
        raise ValueError("a length exceeds the table size")
    return n, m


def alignment_dp(x: torch.Tensor, n, m, *, local: str = "gak", method: str = "auto") -> torch.Tensor:
    """``log K`` per pair from pair-last inputs (the fast entry point used by :mod:`unimm.align.gak`).

    Args:
        x: ``[n_max, m_max, P]``: ``t = φ/(2σ²)`` (``local="gak"``) or ``log k`` (``local="log"``).
        n, m: ``[P]`` lengths (≥ 1); cells beyond them are ignored.
        method: ``auto`` (scaled where its bound holds, log elsewhere), ``scaled`` or ``log``.

    Returns:
        ``[P]`` values ``log K``, differentiable with respect to ``x``.
    """
    n, m = _check(x, n, m, local, method)
    if x.shape[-1] == 0:
        return x.new_zeros(0)
    return AlignmentDP.apply(x.contiguous(), n, m, local, method)


def alignment_log_kernel(logk: torch.Tensor, n, m, *, method: str = "auto") -> torch.Tensor:
    """``log K`` for each pair from its local log-kernels ``[P, n_max, m_max]`` (pair-first).

    Returns ``[P]`` values, differentiable with respect to ``logk``.
    """
    return alignment_dp(logk.permute(1, 2, 0), n, m, local="log", method=method)


@torch.no_grad()
def read_log_kernels(
    x: torch.Tensor,
    n,
    m,
    read_pair: torch.Tensor,
    read_row: torch.Tensor,
    read_col: torch.Tensor,
    *,
    local: str = "gak",
    method: str = "auto",
) -> torch.Tensor:
    """``L[row, col]`` at many cells of each pair's table from one sweep (prefix sharing; no gradient).

    With a fixed σ the table of a pair of samples holds the kernel of every pair of their
    prefixes: ``L[c_a, c_b]`` is ``log K`` of the first ``c_a`` slices of one sample against the
    first ``c_b`` of the other.

    Args:
        x: ``[n_max, m_max, P]`` pair-last inputs of the sample pairs (see :func:`alignment_dp`).
        n, m: ``[P]`` sample lengths.
        read_pair, read_row, read_col: ``[R]`` cells to read (1-based, ``row ≤ n``, ``col ≤ m``).

    Returns:
        ``[R]`` values ``L[row, col]``.
    """
    n, m = _check(x, n, m, local, method)
    read_pair, read_row, read_col = (
        torch.as_tensor(t).to(device=x.device, dtype=torch.long) for t in (read_pair, read_row, read_col)
    )
    if read_pair.numel() and (
        bool((read_row < 1).any())
        or bool((read_row > n[read_pair]).any())
        or bool((read_col < 1).any())
        or bool((read_col > m[read_pair]).any())
    ):
        raise ValueError("read-out cells must lie inside their pair's table (1 <= row <= n, 1 <= col <= m)")
    x = x.contiguous()
    pairs = x.shape[-1]
    n_diag = x.shape[0] + x.shape[1] + 1

    def reads_of(idx):
        where = torch.full((pairs,), -1, dtype=torch.long, device=x.device)
        where[idx] = torch.arange(len(idx), device=x.device)
        mine = torch.nonzero(where[read_pair] >= 0).flatten()
        return (
            _group_reads(where[read_pair[mine]], read_row[mine], read_col[mine], n_diag),
            mine,
            mine.numel(),
        )

    log_z, _ = _sweep(x, n, m, reads_of, read_pair.numel(), local, method, store=False)
    return log_z
