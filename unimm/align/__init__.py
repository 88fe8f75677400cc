"""The alignment core: the triple-kernel global alignment kernel (GAK).

Stable entry points (keep names and arguments):

- :func:`log_gak_matrix` ``(x, lengths, *, sigma)`` — raw ``log K`` ``[N, N]`` of plain vectors;
- :func:`gak_matrix_triple` ``(u, v, modality, lengths, *, delta, sigma, normalize, single_slice,
  teacher)`` — the structure-induced loss's targets from teacher features.

Also: :func:`gak_matrix` (plain vectors, normalised), :func:`log_gak` / :func:`gak` (one pair),
:func:`gak_matrix_prefix` (one DP table per sample pair
for views that are prefixes), the local distances :func:`triple_distance`,
:func:`squared_distance`, :func:`local_log_kernel`, and the DP itself,
:func:`alignment_log_kernel` (differentiable) and :func:`read_log_kernels`.

Everything here is the PyTorch reference back end (CPU or CUDA, float32 or float64); see
:mod:`unimm.align.dp` for the recursions and their accuracy guarantees.
"""

from unimm.align.dp import alignment_log_kernel, read_log_kernels
from unimm.align.gak import gak, gak_matrix, gak_matrix_triple, log_gak, log_gak_matrix, pad_views
from unimm.align.kernels import local_log_kernel, squared_distance, triple_distance
from unimm.align.prefix import gak_matrix_prefix

__all__ = [
    "alignment_log_kernel",
    "gak",
    "gak_matrix",
    "gak_matrix_prefix",
    "gak_matrix_triple",
    "local_log_kernel",
    "log_gak",
    "log_gak_matrix",
    "pad_views",
    "read_log_kernels",
    "squared_distance",
    "triple_distance",
]
