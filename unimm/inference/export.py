"""``unimm export``: a checkpoint as a folder other tools load.

    unimm export --model RUN/step-000200 --format sentence-transformers --out st-model
    unimm export --model RUN/step-000200 --format hf-merged --out merged

``sentence-transformers``: ``SentenceTransformer(DIR, trust_remote_code=True)`` loads it; its
one module (:mod:`unimm.inference.st_encoder`) runs unimm's own collator and model, so ``encode``
gives ``unimm embed``'s vectors. The folder holds ``modules.json``,
``config_sentence_transformers.json``, the module's ``unimm_encoder.json`` and the checkpoint
under ``checkpoint/`` (hard links where the file system allows, else copies).

``hf-merged``: a plain transformers image-text-to-text folder with the LoRA adapters folded into
the weights (what vLLM, TGI or ``AutoModelForImageTextToText`` load), plus the retrieval head
and ``unimm.json`` — so it is also a unimm checkpoint — and a README saying how to serve it.

The folder is built under a temporary name and renamed when complete; ``unimm-export.json``
says what it is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from unimm import __version__
from unimm.config import ExportOptions
from unimm.errors import UnimmError
from unimm.utils import atomic_write_json, replace_folder

EXPORT_MANIFEST = "unimm-export.json"
FORMATS = ("sentence-transformers", "hf-merged")


def _st_prompts(meta: dict[str, Any], instruction: str | None) -> dict[str, str]:
    """sentence-transformers' ``prompts`` of the export: the instruction task's query and
    document texts (``encode_query``/``encode_document`` pick them; the module makes a prompt the
    sample's instruction, as ``unimm embed`` and ``retrieve`` do)."""
    from unimm.data.instructions import INSTRUCTION_ROLES, chosen_task, instruction_text

    settings = meta["inference"]
    task = chosen_task(settings, instruction)
    texts = {role: instruction_text(settings["instructions"], task, role) for role in INSTRUCTION_ROLES}
    return {role: text for role, text in texts.items() if text}


def _sentence_transformers(
    checkpoint: Path, staging: Path, meta: dict[str, Any], prompts: dict[str, str]
) -> None:
    import sentence_transformers
    import torch
    import transformers

    from unimm.inference.st_encoder import CONFIG_NAME
    from unimm.model.card import model_card
    from unimm.model.checkpoint import copy_checkpoint

    copy_checkpoint(checkpoint, staging / "checkpoint")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "unimm.inference.st_encoder.UnimmEncoder"}]
    atomic_write_json(staging / "modules.json", modules)
    versions = {
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
        "unimm": __version__,
    }
    atomic_write_json(
        staging / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "__version__": versions,
            "prompts": prompts,
            # plain encode() embeds documents, as `unimm embed` does
            "default_prompt_name": "document" if "document" in prompts else None,
            "similarity_fn_name": "cosine",
        },
    )
    atomic_write_json(staging / CONFIG_NAME, {"checkpoint": "checkpoint"})
    card = model_card(
        meta,
        title="A unimm checkpoint for sentence-transformers",
        arch=_architecture(checkpoint),
        usage=_ST_USAGE.format(version=__version__),
        library="sentence-transformers",
    )
    (staging / "README.md").write_text(card, encoding="utf-8")


def _hf_merged(checkpoint: Path, staging: Path, opts: ExportOptions) -> None:
    from unimm.inference.session import DTYPES
    from unimm.model.checkpoint import load_checkpoint, read_meta, save_checkpoint

    meta = read_meta(checkpoint)
    name = meta["inference"]["dtype"] if opts.model_dtype == "auto" else opts.model_dtype
    model, processor, meta = load_checkpoint(checkpoint, dtype=DTYPES[name])
    kept = {k: v for k, v in meta.items() if k not in ("files", "lora")}
    save_checkpoint(staging, model, processor, kept, merge_lora=True, usage=_MERGED_USAGE)


def export(opts: ExportOptions) -> dict[str, Any]:
    """Write ``opts.model`` as ``opts.format`` into ``opts.out``; return the export manifest.

    Raises:
        UnimmError: an unknown format, a missing package, or an output folder that is taken.
    """
    from unimm.inference.store import model_hash
    from unimm.model.checkpoint import check_content, read_meta
    from unimm.outputs import claim_output

    checkpoint, out = Path(opts.model), Path(opts.out)
    if opts.format not in FORMATS:
        raise UnimmError(f"--format {opts.format}: use {' or '.join(FORMATS)}")
    if opts.format == "sentence-transformers":
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            raise UnimmError(
                'the sentence-transformers export needs it: pip install "sentence-transformers>=6"'
            ) from None
    claim_output(out, "unimm-export", [checkpoint])
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise UnimmError(
            f"--out {out} is not empty; pass --overwrite (it replaces an earlier export) or another --out"
        )
    prompts: dict[str, str] = {}
    meta: dict[str, Any] = {}
    if opts.format == "sentence-transformers":  # hf-merged's load checks the same, once
        meta = read_meta(checkpoint)
        check_content(checkpoint, meta)  # complete and undamaged, before any copy
        prompts = _st_prompts(meta, opts.instruction)
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if opts.format == "hf-merged":
            _hf_merged(checkpoint, staging, opts)
        else:
            staging.mkdir(parents=True)
            _sentence_transformers(checkpoint, staging, meta, prompts)
        manifest = {
            "kind": "unimm-export",
            "format": opts.format,
            "model": str(checkpoint.resolve()),
            "model_hash": model_hash(checkpoint),
            "unimm_version": __version__,
        }
        atomic_write_json(staging / EXPORT_MANIFEST, manifest)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _architecture(checkpoint: Path) -> str:
    import json

    architectures = json.loads((checkpoint / "config.json").read_text()).get("architectures") or ["?"]
    return architectures[0]


_ST_USAGE = """Exported by unimm {version} (`unimm export --format sentence-transformers`).

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder", trust_remote_code=True)
vectors = model.encode([
    "two red circles",                                     # text
    PIL.Image.open("photo.jpg"),                           # an image
    {{"image": PIL.Image.open("photo.jpg"), "text": "its caption"}},
    [{{"role": "user", "content": [                         # an interleaved document, in order
        {{"type": "text", "text": "Step 1"}}, {{"type": "image", "image": "step1.png"}},
        {{"type": "text", "text": "Step 2"}}]}}],
])
```

The vectors are unit length and equal `unimm embed`'s for the same documents. The one module
(`unimm.inference.st_encoder.UnimmEncoder`) runs unimm's own code, so `unimm` must be installed,
and sentence-transformers asks for `trust_remote_code=True` before it imports a module from
outside its own package. The checkpoint itself is in `checkpoint/`.
"""

_MERGED_USAGE = """Exported with `unimm export --format hf-merged`: a plain transformers image-text-to-text
folder with any LoRA adapters folded into the weights, plus unimm's retrieval head
(`retrieval_head.safetensors`) and settings (`unimm.json`).

```python
from transformers import pipeline

chat = pipeline("image-text-to-text", model="path/to/this/folder")
chat(text=[{"role": "user", "content": [{"type": "image", "url": "photo.jpg"},
                                       {"type": "text", "text": "What is in the picture?"}]}])
```

- Generate with any server that loads transformers folders, e.g. vLLM:
  `vllm serve path/to/this/folder` (chat completions use the model's own chat template), or
  `AutoModelForImageTextToText.from_pretrained("path/to/this/folder")`.
- Embed and retrieve with unimm, which also reads this folder as a checkpoint:
  `unimm serve --model path/to/this/folder`, `unimm embed --model path/to/this/folder ...`.
  A vector is the retrieval head on the hidden state at the end of a document's last slice;
  other servers' pooling endpoints do not compute it.
"""
