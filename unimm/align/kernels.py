"""Local distances between slices and the local log-kernel of the global alignment kernel.

- plain vectors (student embeddings): ``φ(a, b) = ‖a − b‖²``;
- teacher features ``(u, v, modality)`` with the triple kernel (docs/method.md):
  same modality ``φ = ‖u_a − u_b‖²`` (the unimodal expert decides), different modality
  ``φ = ‖v_a − v_b‖²`` (CLIP's shared space decides). For unit rows these are ``2 − 2 a·b``; we
  compute the squared distance itself, which stays exact (and smooth) for rows stored in
  float16 whose norms are only nearly 1;
  ``teacher="clip"`` uses ``v`` for every pair (the paper's "w/o TK" ablation).

The local log-kernel (Cuturi 2011, as in tslearn): with ``t = φ / (2σ²)``,
``log k = −t − log(2 − e^{−t})``, computed as ``−t − log1p(−expm1(−t))`` so that it stays
accurate for small and large ``t``. ``log k ≤ 0`` for every ``φ ≥ 0``.
"""

from __future__ import annotations

import torch

TEACHERS = ("triple", "clip", "mean")


def squared_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``‖x_i − y_j‖²`` for ``x`` ``[..., n, d]`` and ``y`` ``[..., m, d]``: ``[..., n, m]``, clamped ≥ 0.

    One matrix product (the norms are added afterwards), so it is as fast as a Gram matrix.
    """
    gram = x @ y.transpose(-1, -2)
    sq_x = (x * x).sum(-1)
    sq_y = (y * y).sum(-1)
    return (sq_x.unsqueeze(-1) + sq_y.unsqueeze(-2) - 2 * gram).clamp_min(0)


def triple_distance(
    u_x: torch.Tensor | None,
    v_x: torch.Tensor,
    mod_x: torch.Tensor,
    u_y: torch.Tensor | None,
    v_y: torch.Tensor,
    mod_y: torch.Tensor,
    *,
    teacher: str = "triple",
) -> torch.Tensor:
    """Triple-kernel distances between the slices of two views (or batches of views).

    Args:
        u_x, v_x, mod_x: ``[..., n, d_u]``, ``[..., n, d_v]`` unit rows and ``[..., n]`` modality
            (0 text, 1 image) of the first views; ``u`` may be ``None`` when ``teacher="clip"``.
        u_y, v_y, mod_y: the same for the second views (``m`` slices).
        teacher: ``triple`` (expert within a modality, CLIP across) or ``clip`` (CLIP only).

    Returns:
        ``φ`` ``[..., n, m]`` (in ``[0, 4]`` for unit rows).
    """
    if teacher not in ("triple", "clip", "mean"):
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    phi_v = squared_distance(v_x, v_y)
    if teacher == "clip":
        return phi_v
    if u_x is None or u_y is None:
        raise ValueError("the triple kernel needs expert features u (prepare with both experts)")
    same = mod_x.unsqueeze(-1) == mod_y.unsqueeze(-2)
    return torch.where(same, squared_distance(u_x, u_y), phi_v)


def local_log_kernel(phi: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``log k = −t − log(2 − e^{−t})`` with ``t = φ / (2σ²)``; ``sigma`` broadcasts against ``φ``."""
    t = phi / (2 * torch.as_tensor(sigma, dtype=phi.dtype, device=phi.device) ** 2)
    return -t - torch.log1p(-torch.expm1(-t))
