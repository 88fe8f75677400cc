"""Image-only processors on a machine without torchvision — for the tests, never for the product.

Qwen2/2.5/3-VL, LLaVA-OneVision and InternVL processors carry a video processor, which needs
torchvision; these machines have no CPU build of it, so ``AutoProcessor`` cannot load those
families here at all. Inside :func:`image_only` a processor loads with a stand-in video processor
(its image path is untouched: the tests never pass videos; its settings are kept, so a saved
processor writes them back). unimm itself loads processors with
plain ``AutoProcessor`` and, without torchvision, says that such a model needs it
(:func:`unimm.model.core.load_mllm`); nothing under ``unimm/`` imports this module.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from transformers import processing_utils
from transformers.utils import is_torchvision_available


class _VideoSettings(dict):
    """Stands in for the video processor: its saved settings, written back when the processor is
    saved (a checkpoint keeps them), never run."""

    _auto_class = None


class _NoVideoProcessor:
    @staticmethod
    def from_pretrained(folder, *args, **kwargs):
        config = Path(folder) / "processor_config.json"
        settings = json.loads(config.read_text()).get("video_processor", {}) if config.is_file() else {}
        return _VideoSettings(settings)


@contextlib.contextmanager
def image_only():
    """Let processors with a video processor load and run images without torchvision."""
    if is_torchvision_available():
        yield
        return
    mixin = processing_utils.ProcessorMixin
    check = mixin.check_argument_for_proper_class
    names = type(processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING)._MAPPING_NAMES
    original = dict(names)

    def check_but_video(self, name, argument):
        if name == "video_processor" and isinstance(argument, _VideoSettings):
            return _VideoSettings
        return check(self, name, argument)

    mixin.check_argument_for_proper_class = check_but_video
    names["video_processor"] = (__name__, "_NoVideoProcessor")
    try:
        yield
    finally:
        mixin.check_argument_for_proper_class = check
        names.clear()
        names.update(original)
