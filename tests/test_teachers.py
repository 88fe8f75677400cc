"""Teacher roles: any dual encoder as the cross-modal teacher, any image or text encoder as an expert.

Each feature is compared with the model's own call on one input at a time (no padding, no
batching), so batching, padding and pooling mistakes show.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from unimm.config import TeacherOptions
from unimm.data.teachers import TeacherEncoders
from unimm.errors import UnimmError

IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (24, 36), (10, 200, 30))]
TEXTS = ["a red square", "two small blue circles on the left", "three"]


def _unit(x) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else x.pooler_output
    return torch.nn.functional.normalize(x.float().reshape(-1), dim=0)


def _samples():
    return [[TEXTS[0], IMAGES[0]], [IMAGES[1], TEXTS[1], TEXTS[2]]]


@pytest.fixture(scope="module")
def teacher_dirs(tiny_teachers) -> dict[str, str]:
    return {name: str(path) for name, path in tiny_teachers.items()}


@pytest.fixture(scope="module")
def siglips(tmp_path_factory):
    from unimm.tiny import save_tiny_siglip

    root = tmp_path_factory.mktemp("siglip")
    return {v: save_tiny_siglip(root / f"v{v}", version=v) for v in (1, 2)}


@pytest.mark.parametrize("version", [1, 2])
def test_siglip_is_a_cross_modal_teacher(siglips, version):
    from transformers import AutoModel, AutoProcessor

    folder = siglips[version]
    teachers = TeacherEncoders(TeacherOptions(clip=str(folder)))
    features = teachers.encode(_samples())
    assert teachers.manifest()["clip"]["model_type"] == ("siglip" if version == 1 else "siglip2")
    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    v = [f.v.float() for f in features]
    got_images = [v[0][1], v[1][0]]
    got_texts = [v[0][0], v[1][1], v[1][2]]
    padded_anyway = []
    with torch.no_grad():
        for image, got in zip(IMAGES, got_images, strict=True):
            want = _unit(model.get_image_features(**processor(images=[image], return_tensors="pt")))
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # float16 storage
        for text, got in zip(TEXTS, got_texts, strict=True):
            # SigLIP was trained on text padded to the full length; its pooled token is the last
            tokens = processor.tokenizer(
                [text], padding="max_length", truncation=True, max_length=16, return_tensors="pt"
            )
            want = _unit(model.get_text_features(**tokens))
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
            shorter = processor.tokenizer([text], truncation=True, max_length=16, return_tensors="pt")
            if shorter["input_ids"].shape[1] < 16:  # padding matters to it ("three")
                padded_anyway.append(
                    torch.allclose(want, _unit(model.get_text_features(**shorter)), atol=1e-2)
                )
    assert padded_anyway == [False] * len(padded_anyway) and padded_anyway


def test_image_experts_any_encoder_or_a_dual_encoders_image_half(tmp_path, siglips, teacher_dirs):
    """DINOv2 with registers, a SigLIP vision tower and a whole SigLIP as image experts."""
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionModel,
    )

    registers = tmp_path / "registers"
    torch.manual_seed(0)
    Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            image_size=32,
            patch_size=8,
            hidden_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_register_tokens=2,
        )
    ).save_pretrained(registers)
    AutoImageProcessor.from_pretrained(teacher_dirs["image_expert"]).save_pretrained(registers)
    tower = tmp_path / "siglip-vision"
    SiglipVisionModel.from_pretrained(siglips[1]).save_pretrained(tower)
    AutoImageProcessor.from_pretrained(siglips[1]).save_pretrained(tower)

    for folder, width in ((registers, 40), (tower, 32), (siglips[1], 32)):
        options = TeacherOptions(
            image_expert=str(folder), text_expert=teacher_dirs["text_expert"], clip=teacher_dirs["clip"]
        )
        teachers = TeacherEncoders(options)
        assert teachers.manifest()["image_expert"]["dim"] == width
        features = teachers.encode(_samples())
        got = [features[0].u[1, :width].float(), features[1].u[0, :width].float()]
        model, processor = (
            AutoModel.from_pretrained(folder).eval(),
            AutoImageProcessor.from_pretrained(folder),
        )
        with torch.no_grad():
            for image, row in zip(IMAGES, got, strict=True):
                inputs = processor(images=[image], return_tensors="pt")
                if hasattr(model, "get_image_features"):
                    want = _unit(model.get_image_features(**inputs))
                else:
                    want = _unit(model(**inputs).pooler_output)
                torch.testing.assert_close(row, want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_expert_pooling(teacher_dirs, pooling):
    from transformers import AutoModel, AutoTokenizer

    folder = teacher_dirs["text_expert"]
    options = TeacherOptions(
        image_expert=teacher_dirs["image_expert"],
        text_expert=folder,
        text_pooling=pooling,
        clip=teacher_dirs["clip"],
    )
    teachers = TeacherEncoders(options)
    assert teachers.manifest()["text_expert"]["pooling"] == pooling
    features = teachers.encode(_samples())
    got = [features[0].u[0], features[1].u[1], features[1].u[2]]
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    width = teachers.manifest()["text_expert"]["dim"]
    with torch.no_grad():
        for text, row in zip(TEXTS, got, strict=True):
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]  # unpadded
            want = _unit(hidden[0] if pooling == "cls" else hidden.mean(0))
            torch.testing.assert_close(row[:width].float(), want, atol=2e-3, rtol=0)


def test_wrong_or_broken_teachers_are_named(tmp_path, teacher_dirs):
    with pytest.raises(UnimmError, match=r"'bert' model is not a dual encoder.*CLIP, SigLIP or SigLIP 2"):
        TeacherEncoders(TeacherOptions(clip=teacher_dirs["text_expert"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "clip"}')
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UnimmError, match=r"--teacher-clip .*broken: cannot load the model \("):
        TeacherEncoders(TeacherOptions(clip=str(broken)))
    no_tokenizer = tmp_path / "no-tokenizer"
    from transformers import AutoModel

    AutoModel.from_pretrained(teacher_dirs["text_expert"]).save_pretrained(no_tokenizer)
    options = TeacherOptions(
        image_expert=teacher_dirs["image_expert"], text_expert=str(no_tokenizer), clip=teacher_dirs["clip"]
    )
    with pytest.raises(UnimmError, match=r"--teacher-text-expert .*no tokenizer files"):
        TeacherEncoders(options)
