"""Fused Triton kernels for the all-pairs global alignment kernel (forward and backward).

Design (docs/alignment.md):

- Views are ``(offset, length)`` ranges of one slice array, so views that are prefixes of the
  same sample share slices; one Gram matrix per feature space is computed over those slices by
  the host (cuBLAS; bf16 inputs optional, fp32 output) with their squared norms in fp32.
- The forward kernel gives each program ``BLOCK_P`` view pairs (pairs on the contiguous axis).
  Each anti-diagonal is a ``[BLOCK_L, BLOCK_P]`` register tile; the local distance of each cell
  is read from the Gram matrices by index (``‖a‖² + ‖b‖² − 2 a·b``; the triple kernel picks the
  expert or CLIP Gram by modality), turned into ``log k`` in registers, and the recursion runs
  in fp32 log space. The one-row shift an anti-diagonal step needs is a ``tl.gather`` within
  the tile (no scratch memory, no hand-written barrier). One scalar is written per pair.
- The backward kernel replays the forward (storing each diagonal), runs the expected-alignment
  recursion back from ``(n, m)`` and accumulates ``∂ log K / ∂ Gram`` (atomic adds: shared
  slices meet in several pairs). The gradient with respect to the features is then two matrix
  products on the host.

Row ``r`` of a tile is table row ``i = r + 1``; views of up to :data:`MAX_SLICES` slices are
supported (longer ones fail with a clear message rather than being cut).
"""

from __future__ import annotations

import torch

try:  # Triton is optional: the reference back end runs everywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

MAX_SLICES = 128
NEG = -1.0e30  # "minus infinity" that keeps logsumexp free of inf − inf


def available() -> bool:
    """Whether the Triton back end can run here."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _local_log_k(gv, gu, sqv_a, sqv_b, squ_a, squ_b, same, inv, TRIPLE: tl.constexpr):
        phi = sqv_a + sqv_b - 2.0 * gv
        if TRIPLE:
            phi = tl.where(same, squ_a + squ_b - 2.0 * gu, phi)
        t = tl.maximum(phi, 0.0) * inv
        return -t - tl.log(2.0 - tl.exp(-t))

    @triton.jit
    def _cell_log_k(
        gram_v,
        gram_u,
        sq_v,
        sq_u,
        modality,
        off_a,
        off_b,
        rows,
        d,
        n_a,
        n_b,
        inv,
        pmask,
        n_slices,
        TRIPLE: tl.constexpr,
    ):
        """``log k`` of the cells of anti-diagonal ``d`` (``i = rows + 1``, ``j = d − i``), and validity."""
        i = rows + 1
        j = d - i
        valid = (i <= n_a[None, :]) & (j >= 1) & (j <= n_b[None, :]) & pmask[None, :]
        sa = off_a[None, :] + i - 1
        sb = off_b[None, :] + j - 1
        sa = tl.where(valid, sa, 0).to(tl.int64)
        sb = tl.where(valid, sb, 0).to(tl.int64)
        gv = tl.load(gram_v + sa * n_slices + sb, mask=valid, other=0.0)
        sqv_a = tl.load(sq_v + sa, mask=valid, other=0.0)
        sqv_b = tl.load(sq_v + sb, mask=valid, other=0.0)
        if TRIPLE:
            gu = tl.load(gram_u + sa * n_slices + sb, mask=valid, other=0.0)
            squ_a = tl.load(sq_u + sa, mask=valid, other=0.0)
            squ_b = tl.load(sq_u + sb, mask=valid, other=0.0)
            same = tl.load(modality + sa, mask=valid, other=0) == tl.load(modality + sb, mask=valid, other=0)
        else:
            gu = gv
            squ_a = sqv_a
            squ_b = sqv_b
            same = valid
        logk = _local_log_k(gv, gu, sqv_a, sqv_b, squ_a, squ_b, same, inv[None, :], TRIPLE)
        return logk, valid, sa, sb, same

    @triton.jit
    def _lse3(a, b, c):
        m = tl.maximum(tl.maximum(a, b), c)
        return m + tl.log(tl.exp(a - m) + tl.exp(b - m) + tl.exp(c - m))

    @triton.jit
    def _pair_setup(pair_a, pair_b, view_offset, view_length, sigma2_of_pair, n_pairs, BLOCK_P: tl.constexpr):
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < n_pairs
        a = tl.load(pair_a + p, mask=pmask, other=0)
        b = tl.load(pair_b + p, mask=pmask, other=0)
        off_a = tl.load(view_offset + a, mask=pmask, other=0)
        off_b = tl.load(view_offset + b, mask=pmask, other=0)
        n_a = tl.load(view_length + a, mask=pmask, other=1)
        n_b = tl.load(view_length + b, mask=pmask, other=1)
        inv = 0.5 / tl.load(sigma2_of_pair + p, mask=pmask, other=1.0)
        return p, pmask, off_a, off_b, n_a, n_b, inv

    @triton.jit
    def _gak_forward_kernel(
        gram_v,
        gram_u,
        sq_v,
        sq_u,
        modality,
        view_offset,
        view_length,
        pair_a,
        pair_b,
        sigma2_of_pair,
        out,
        table,
        n_pairs,
        n_slices,
        TRIPLE: tl.constexpr,
        STORE: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        p, pmask, off_a, off_b, n_a, n_b, inv = _pair_setup(
            pair_a, pair_b, view_offset, view_length, sigma2_of_pair, n_pairs, BLOCK_P
        )
        rows = tl.arange(0, BLOCK_L)[:, None]
        shift = tl.maximum(rows - 1, 0) + tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.int32)
        prev = tl.full([BLOCK_L, BLOCK_P], NEG, tl.float32)  # diagonal d − 1
        prev2 = tl.full([BLOCK_L, BLOCK_P], NEG, tl.float32)  # diagonal d − 2
        end = n_a + n_b
        result = tl.zeros([BLOCK_P], dtype=tl.float32)
        last = tl.max(tl.where(pmask, end, 2), axis=0)
        for d in range(2, last + 1):
            logk, valid, _, _, _ = _cell_log_k(
                gram_v,
                gram_u,
                sq_v,
                sq_u,
                modality,
                off_a,
                off_b,
                rows,
                d,
                n_a,
                n_b,
                inv,
                pmask,
                n_slices,
                TRIPLE,
            )
            up = tl.where(rows >= 1, tl.gather(prev, shift, 0), NEG)  # cell (i − 1, j)
            corner = tl.where(d == 2, 0.0, NEG)  # L[0, j − 1]: 0 only at (0, 0)
            diag = tl.where(rows >= 1, tl.gather(prev2, shift, 0), corner)  # cell (i − 1, j − 1)
            cur = tl.where(valid, logk + _lse3(up, prev, diag), NEG)
            if STORE:
                row_of_table = (d * BLOCK_L + rows).to(tl.int64) * n_pairs
                tl.store(table + row_of_table + p[None, :], cur, mask=pmask[None, :])
            hit = (rows + 1 == n_a[None, :]) & (end[None, :] == d)
            result += tl.sum(tl.where(hit, cur, 0.0), axis=0)
            prev2 = prev
            prev = cur
        tl.store(out + p, result, mask=pmask)

    @triton.jit
    def _gak_backward_kernel(
        gram_v,
        gram_u,
        sq_v,
        sq_u,
        modality,
        view_offset,
        view_length,
        pair_a,
        pair_b,
        sigma2_of_pair,
        log_z,
        grad_out,
        table,
        d_gram_v,
        d_gram_u,
        n_pairs,
        n_slices,
        TRIPLE: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        p, pmask, off_a, off_b, n_a, n_b, inv = _pair_setup(
            pair_a, pair_b, view_offset, view_length, sigma2_of_pair, n_pairs, BLOCK_P
        )
        rows = tl.arange(0, BLOCK_L)[:, None]
        down = tl.minimum(rows + 1, BLOCK_L - 1) + tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.int32)
        end = n_a + n_b
        lz = tl.load(log_z + p, mask=pmask, other=0.0)
        g = tl.load(grad_out + p, mask=pmask, other=0.0)
        g1 = tl.full([BLOCK_L, BLOCK_P], NEG, tl.float32)  # log k + B on diagonal d + 1
        g2 = tl.full([BLOCK_L, BLOCK_P], NEG, tl.float32)  # ... on diagonal d + 2
        last = tl.max(tl.where(pmask, end, 2), axis=0)
        for step in range(0, last - 1):
            d = last - step
            logk, valid, sa, sb, same = _cell_log_k(
                gram_v,
                gram_u,
                sq_v,
                sq_u,
                modality,
                off_a,
                off_b,
                rows,
                d,
                n_a,
                n_b,
                inv,
                pmask,
                n_slices,
                TRIPLE,
            )
            below = tl.where(rows + 1 < BLOCK_L, tl.gather(g1, down, 0), NEG)  # cell (i + 1, j)
            below_diag = tl.where(rows + 1 < BLOCK_L, tl.gather(g2, down, 0), NEG)  # cell (i + 1, j + 1)
            beta = _lse3(below, g1, below_diag)  # g1 at the same row is cell (i, j + 1)
            start = (rows + 1 == n_a[None, :]) & (end[None, :] == d)
            beta = tl.where(start, 0.0, beta)
            beta = tl.where(valid, beta, NEG)
            row_of_table = (d * BLOCK_L + rows).to(tl.int64) * n_pairs
            forward = tl.load(table + row_of_table + p[None, :], mask=valid, other=NEG)
            expect = tl.where(valid, tl.exp(forward + beta - lz[None, :]), 0.0)
            # d log k / d t = −(1 + k), dt/dφ = inv, dφ/d(a·b) = −2  →  d log K / d(a·b)
            k = tl.exp(logk)
            w = expect * (1.0 + k) * 2.0 * inv[None, :] * g[None, :]
            if TRIPLE:
                tl.atomic_add(d_gram_u + sa * n_slices + sb, w, mask=valid & same)
                tl.atomic_add(d_gram_v + sa * n_slices + sb, w, mask=valid & (same == 0))
            else:
                tl.atomic_add(d_gram_v + sa * n_slices + sb, w, mask=valid)
            g2 = g1
            g1 = tl.where(valid, logk + beta, NEG)


def _blocks(longest: int) -> tuple[int, int]:
    if longest > MAX_SLICES:
        raise ValueError(
            f"the Triton back end supports views of up to {MAX_SLICES} slices, got {longest}; "
            "use UNIMM_ALIGN_BACKEND=reference for longer views"
        )
    block_l = max(2, triton.next_power_of_2(longest))
    block_p = max(16, min(128, 4096 // block_l))
    return block_l, block_p


def _norms(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * x.float()).sum(-1).contiguous()


def _gram(x: torch.Tensor, bf16: bool) -> torch.Tensor:
    if bf16 and x.is_cuda:
        xb = x.to(torch.bfloat16)
        return (xb @ xb.T).float().contiguous()
    xf = x.float()
    return (xf @ xf.T).contiguous()


class _TritonGAK(torch.autograd.Function):
    """``log K`` per view pair from slice features; gradients for ``v`` and ``u``."""

    @staticmethod
    def forward(ctx, v, u, modality, view_offset, view_length, pair_a, pair_b, sigma2, bf16):
        triple = u is not None
        gram_v = _gram(v, bf16)
        gram_u = _gram(u, bf16) if triple else gram_v
        sq_v = _norms(v)
        sq_u = _norms(u) if triple else sq_v
        longest = int(view_length.max())
        block_l, block_p = _blocks(longest)
        n_pairs = pair_a.numel()
        out = torch.empty(n_pairs, dtype=torch.float32, device=v.device)
        store = ctx.needs_input_grad[0] or (triple and ctx.needs_input_grad[1])
        n_diag = 2 * longest + 1
        table = torch.empty(
            (n_diag, block_l, n_pairs) if store else (1,), dtype=torch.float32, device=v.device
        )
        modality = modality.to(torch.int32).contiguous()
        args = (gram_v, gram_u, sq_v, sq_u, modality, view_offset, view_length, pair_a, pair_b, sigma2)
        grid = (triton.cdiv(n_pairs, block_p),)
        _gak_forward_kernel[grid](
            *args,
            out,
            table,
            n_pairs,
            v.shape[0],
            TRIPLE=triple,
            STORE=store,
            BLOCK_L=block_l,
            BLOCK_P=block_p,
        )
        if store:
            ctx.save_for_backward(v, u if triple else v, out, table, *args)
            ctx.meta = (triple, block_l, block_p, n_pairs)
        return out

    @staticmethod
    def backward(ctx, grad):
        v, u, log_z, table, *args = ctx.saved_tensors
        triple, block_l, block_p, n_pairs = ctx.meta
        n_slices = v.shape[0]
        d_gram_v = torch.zeros(n_slices, n_slices, dtype=torch.float32, device=v.device)
        d_gram_u = torch.zeros_like(d_gram_v) if triple else d_gram_v
        grid = (triton.cdiv(n_pairs, block_p),)
        _gak_backward_kernel[grid](
            *args,
            log_z,
            grad.float().contiguous(),
            table,
            d_gram_v,
            d_gram_u,
            n_pairs,
            n_slices,
            TRIPLE=triple,
            BLOCK_L=block_l,
            BLOCK_P=block_p,
        )
        grad_v = _feature_grad(d_gram_v, v)
        grad_u = _feature_grad(d_gram_u, u) if triple else None
        return grad_v, grad_u, None, None, None, None, None, None, None


def _feature_grad(d_gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """From ``W_ab = ∂L/∂(x_a·x_b)`` (as accumulated by the kernel) to ``∂L/∂x``: two matrix products.

    With ``φ = ‖x_a‖² + ‖x_b‖² − 2 x_a·x_b`` the norm terms carry ``−W/2`` each, so
    ``∂L/∂x_a = Σ_b W_ab (x_b − x_a)`` over both orientations: ``(W + Wᵀ) x − rowsum(W + Wᵀ) ⊙ x``.
    """
    w = d_gram + d_gram.T
    xf = x.float()
    grad = w @ xf - w.sum(1, keepdim=True) * xf
    return grad.to(x.dtype)


def triton_log_gak_pairs(
    v: torch.Tensor,
    u: torch.Tensor | None,
    modality: torch.Tensor | None,
    view_offset: torch.Tensor,
    view_length: torch.Tensor,
    pair_a: torch.Tensor,
    pair_b: torch.Tensor,
    sigma2: torch.Tensor,
    *,
    bf16: bool = False,
) -> torch.Tensor:
    """``log K`` ``[P]`` for view pairs ``(pair_a, pair_b)``; differentiable in ``v`` and ``u``.

    Args:
        v: ``[S, d_v]`` slice features (CLIP, or the plain vectors when ``u`` is ``None``).
        u: ``[S, d_u]`` expert features for the triple kernel, or ``None`` (``φ`` from ``v`` only).
        modality: ``[S]`` (used with ``u``).
        view_offset, view_length: ``[N]`` each view's first slice and slice count.
        pair_a, pair_b: ``[P]`` view indices.
        sigma2: ``[P]`` ``σ²`` per pair.
        bf16: compute the Gram matrices from bf16 inputs (fp32 output) on CUDA.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; use UNIMM_ALIGN_BACKEND=reference")
    device = v.device
    i32 = {"dtype": torch.int32, "device": device}
    modality = modality if modality is not None else torch.zeros(v.shape[0], **i32)
    return _TritonGAK.apply(
        v.contiguous(),
        u.contiguous() if u is not None else None,
        modality.to(device),
        view_offset.to(**i32).contiguous(),
        view_length.to(**i32).contiguous(),
        pair_a.to(**i32).contiguous(),
        pair_b.to(**i32).contiguous(),
        sigma2.to(device=device, dtype=torch.float32).contiguous(),
        bf16,
    )
