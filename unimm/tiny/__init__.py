"""Tiny random models and teachers built offline from real ``transformers`` configs.

The quickstart, the benchmarks and the tests need an MLLM and three teacher encoders without
downloading anything; these builders write ordinary Hugging Face folders that the rest of
``unimm`` loads exactly like real checkpoints. It is product code (``model.tiny=true``, the
quickstart), not a test double, hence not ``testing``.
"""

from unimm.tiny.fit import fit_tiny_clip, fit_tiny_expert
from unimm.tiny.models import save_tiny_llava, save_tiny_mllm
from unimm.tiny.teachers import save_tiny_siglip, save_tiny_teachers

__all__ = [
    "fit_tiny_clip",
    "fit_tiny_expert",
    "save_tiny_llava",
    "save_tiny_mllm",
    "save_tiny_siglip",
    "save_tiny_teachers",
]
