"""Model cards: the ``README.md`` of every checkpoint and export.

A card says what the folder is in the Hugging Face Hub's form (YAML front matter: library,
pipeline tag, base model, tags) and in words: the base model, the data it was trained on (the
manifests' fingerprints), the losses and their weights, the evaluation figures recorded at that
step, and how to load it. It is built from ``unimm.json`` alone, so a card never says more than
the checkpoint knows.
"""

from __future__ import annotations

import re
from typing import Any

from unimm import __version__

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _base_model(model: dict[str, Any]) -> tuple[str, str | None]:
    """How the card names the base model, and its Hub id when ``model.path`` looks like one."""
    if model.get("tiny"):
        return "a tiny random LLaVA built in-process (`model.tiny`, for tests and the quickstart)", None
    path = str(model.get("path") or "")
    return f"`{path}`", path if _HUB_ID.match(path) else None


def _losses(recipe: dict[str, Any]) -> list[str]:
    train, align, model = recipe.get("train", {}), recipe.get("align", {}), recipe.get("model", {})
    lines = [
        "- objective: `L = gen_weight·L_g + alpha·L_d + pair_weight·L_p` with "
        f"gen_weight {train.get('gen_weight', 1.0)}, alpha {train.get('alpha')}, "
        f"pair_weight {train.get('pair_weight', 1.0)} (L_p only on pair records)",
        f"- L_d: `{train.get('disc_loss')}` against the `{align.get('teacher')}` teacher kernel "
        f"(GAK delta {align.get('delta')}, sigma `{align.get('sigma')}`), temperature "
        f"{train.get('temperature')}",
    ]
    if model.get("lora"):
        lines.append(
            f"- LoRA r {model.get('lora_r')}, alpha {model.get('lora_alpha')} on {model.get('lora_targets')}"
        )
    lines.append(
        f"- {train.get('max_steps')} steps of batch {train.get('batch_size')} × grad_accum "
        f"{train.get('grad_accum', 1)}, lr {train.get('lr')}, seed {train.get('seed')}"
    )
    return lines


def _evaluation(meta: dict[str, Any]) -> list[str]:
    figures = meta.get("evaluation") or {}
    if not figures:
        return ["No evaluation was recorded at this step; `unimm eval --model FOLDER ...` measures one."]
    rows = ["| figure | value |", "|---|---|"]
    rows += [f"| {name} | {value:.4f} |" for name, value in sorted(figures.items())]
    return [f"Recorded during training at step {meta.get('step')}:", "", *rows]


def model_card(meta: dict[str, Any], *, title: str, arch: str, usage: str, library: str) -> str:
    """The card of a folder whose ``unimm.json`` is ``meta``.

    Args:
        meta: the checkpoint's ``unimm.json``.
        title: the card's heading.
        arch: the transformers model class.
        usage: Markdown saying how to load this kind of folder.
        library: the Hub's ``library_name`` (``transformers`` or ``sentence-transformers``).
    """
    recipe = meta.get("recipe", {})
    inference = meta.get("inference", {})
    base, hub_id = _base_model(recipe.get("model", {}))
    front = ["---", f"library_name: {library}", "pipeline_tag: image-text-to-text"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front += ["tags: [unimm, multimodal, retrieval, embeddings]", "---", ""]
    manifests = meta.get("data_manifests") or []
    tasks = sorted((inference.get("instructions") or {}).keys())
    body = [
        f"# {title}",
        "",
        f"Trained with unimm {meta.get('unimm_version', __version__)}: structure-induced joint "
        "training (arXiv 2411.00304), one model that both generates and embeds.",
        "",
        "## Model",
        f"- base model: {base}; architecture `{arch}`",
        f"- embeddings: {meta.get('embed_dim')} dimensions (Matryoshka sizes "
        f"{inference.get('dimensions', [meta.get('embed_dim')])}), pooling `{meta.get('pooling')}`, "
        "unit length, cosine similarity",
        f"- instruction tasks: {', '.join(tasks) if tasks else 'none'}",
        "- chat template: `chat_template.jinja` (the base model's, or unimm's plain layout "
        "`USER: … ASSISTANT:` for a base model without one)",
        "",
        "## Training",
        f"- step {meta.get('step')}; data manifests (sha256 fingerprints): "
        + (", ".join(f"`{m[:16]}…`" for m in manifests) or "none recorded"),
        *_losses(recipe),
        "",
        "## Evaluation",
        *_evaluation(meta),
        "",
        "## Use",
        usage.strip(),
        "",
    ]
    return "\n".join(front + body)


CHECKPOINT_USAGE = """
A unimm checkpoint: `unimm chat --model FOLDER`, `unimm embed --model FOLDER ...`,
`unimm serve --model FOLDER`, or `unimm export --model FOLDER --format hf-merged|sentence-transformers`
for other tools. The image-text-to-text weights load with
`AutoModelForImageTextToText.from_pretrained(FOLDER)` when no LoRA adapters are kept
(`adapter/`); the retrieval head (`retrieval_head.safetensors`) is unimm's.
"""
