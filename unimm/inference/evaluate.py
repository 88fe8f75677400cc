"""``unimm eval``: generative and retrieval scores of a checkpoint on records or shards.

    unimm eval --model RUN/step-000600 --data eval.jsonl --out eval.json
    unimm eval --model RUN/step-000600 --data eval-shards --tasks retrieval,winoground

The tasks are read off the records themselves (docs/formats.md, "Evaluation records"):

- ``qa`` — records with a ``response`` (and no ``meta.choices``): greedy answer, exact match;
- ``captioning`` — records ``[image, text]`` without a response: the text generated after the
  image, exact match (first line of the generation);
- ``two_choice`` — records with a ``response`` and ``meta.choices``: the option the model finds
  most likely as the answer (summed token log-probabilities); with ``meta.pair`` MMVP-style
  pair accuracy (both questions of a pair right);
- ``retrieval`` — records of one image and one text: text→image and image→text over all of them
  (an item is relevant when its text equals the query's); ``interleaved``: records with two or
  more images: the last image retrieved from everything before it (VIST-style);
- ``winoground`` — two image–text records sharing ``meta.pair``: text, image and group scores
  from the cosine of the text and image embeddings.

Metrics are the pure functions of :mod:`unimm.inference.metrics`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from unimm.config import TASKS, EvalOptions
from unimm.data.samples import Sample, Slice
from unimm.errors import UnimmError
from unimm.utils import text_table

# ---------------------------------------------------------------------------------------------
# Data → tasks (pure)


def load_samples(paths: list[str], fmt: str = "auto", image_root: str | None = None) -> list[Sample]:
    """Decoded samples from record files and shard directories, in the order given."""
    from unimm.data.adapters import load_decoded_records
    from unimm.data.shards import read_samples

    samples: list[Sample] = []
    for path in paths:
        if Path(path).is_dir():
            samples.extend(read_samples(path, split_by_node=False, split_by_worker=False))
        else:
            samples.extend(load_decoded_records(path, fmt, image_root))
    if not samples:
        raise UnimmError(f"eval: no record in {', '.join(paths)}")
    return samples


def _text_of(sample: Sample) -> str:
    return sample.texts()[0]


def _image_of(sample: Sample) -> Slice:
    return next(s for s in sample.slices if s.kind == "image")


def build_tasks(samples: list[Sample]) -> dict[str, list]:
    """Which samples serve which task (see the module docstring); each task a list of items."""
    tasks: dict[str, list] = {name: [] for name in TASKS}
    pairs: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        meta = s.meta or {}
        kinds = s.kinds()
        choices = meta.get("choices")
        if s.response:
            if isinstance(choices, list) and len(choices) >= 2 and s.response in choices:
                tasks["two_choice"].append(i)
            else:
                tasks["qa"].append(i)
            continue
        if sorted(kinds) == ["image", "text"]:
            tasks["retrieval"].append(i)
            if kinds == ["image", "text"]:
                tasks["captioning"].append(i)
            if isinstance(meta.get("pair"), str):
                pairs.setdefault(meta["pair"], []).append(i)
        last_image = max((n for n, k in enumerate(kinds) if k == "image"), default=-1)
        if kinds.count("image") >= 2 and last_image > 0:
            tasks["interleaved"].append((i, last_image))
    tasks["winoground"] = [tuple(members) for members in pairs.values() if len(members) == 2]
    return tasks


def relevant_by_text(texts: list[str]) -> list[set[int]]:
    """For each text, the indices of the texts equal to it after normalisation (itself included)."""
    from unimm.inference.metrics import normalize_answer

    groups: dict[str, set[int]] = {}
    keys = [normalize_answer(t) for t in texts]
    for i, key in enumerate(keys):
        groups.setdefault(key, set()).add(i)
    return [groups[key] for key in keys]


# ---------------------------------------------------------------------------------------------
# Model calls


class Evaluator:
    """A loaded checkpoint with the three calls the tasks need: embed, generate, score options."""

    def __init__(self, session, batch_size: int = 16) -> None:
        self.session = session
        self.model, self.device = session.model, session.device
        self.collator = session.collator
        self.batch_size = batch_size

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        device: str = "auto",
        batch_size: int = 16,
        dtype: str = "auto",
        attn_implementation: str = "auto",
    ) -> Evaluator:
        """Load ``checkpoint`` for evaluation (see :meth:`unimm.inference.session.Session.load`)."""
        from unimm.inference.session import Session

        session = Session.load(
            checkpoint, device=device, dtype=dtype, attn_implementation=attn_implementation
        )
        return cls(session, batch_size)

    def embed(self, slice_lists: list[list[Slice]]) -> torch.Tensor:
        """Unit embeddings ``[n, d]`` of interleaved inputs, each one view cut after its last slice."""
        out = []
        for start in range(0, len(slice_lists), self.batch_size):
            chunk = slice_lists[start : start + self.batch_size]
            out.append(
                self.session.embed_views(
                    [Sample.of_slices(s, key=str(start + i)) for i, s in enumerate(chunk)]
                )
            )
        return torch.cat(out)

    @torch.no_grad()
    def view_similarities(self, samples: list[Sample], align) -> tuple[torch.Tensor, ...]:
        """Target ``M^l`` and learned ``M^r`` over every prefix view of ``samples`` (with teachers).

        Returns ``(targets, learned, same_sample, labels)``; labels read ``id:slices``.
        """
        from unimm.model.targets import same_sample_mask, view_targets

        slices = self.session.embed_slices(samples)
        views = [(b, c) for b, rows in enumerate(slices) for c in range(len(rows))]
        emb = torch.cat(slices)
        targets = view_targets([s.teacher for s in samples], views, align)
        labels = [f"{samples[b].id}:{c + 1}" for b, c in views]
        return targets, emb @ emb.T, same_sample_mask(views), labels

    def generate(self, prompts: list[Sample], *, after: str, max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``prompts`` in batches (:meth:`Session.generate`); each answer is
        its first line."""
        answers: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            texts = self.session.generate(chunk, after=after, max_new_tokens=max_new_tokens)
            answers.extend(text.split("\n", 1)[0].strip() for text in texts)
        return answers

    @torch.no_grad()
    def answer_logprobs(self, samples: list[Sample]) -> torch.Tensor:
        """Summed log-probability of each sample's ``response`` (and end token) given its prompt."""
        from unimm.data.collate import IGNORE

        out = []
        for start in range(0, len(samples), self.batch_size):
            batch = self.collator(samples[start : start + self.batch_size])
            hidden = self.model.hidden_states(
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                batch["image_inputs"],
            )
            target = batch["labels"][:, 1:].to(self.device)
            mask = target != IGNORE
            logits = self.model.base.lm_head(hidden[:, :-1][mask]).float()
            token_lp = torch.log_softmax(logits, -1).gather(1, target[mask].unsqueeze(1)).squeeze(1)
            rows = torch.arange(target.shape[0], device=self.device).unsqueeze(1).expand_as(target)[mask]
            out.append(torch.zeros(target.shape[0], device=self.device).index_add_(0, rows, token_lp).cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Tasks


def _user(slices: list[Slice]) -> list[Slice]:
    return [s.as_role("user") for s in slices]


def _generation_scores(ids: list[str], predicted: list[str], gold: list[str]) -> dict:
    from unimm.inference.metrics import exact_match, word_accuracy

    return {
        "exact_match": exact_match(predicted, gold),
        "word_accuracy": word_accuracy(predicted, gold),
        "n": len(gold),
        "examples": [
            {"id": i, "predicted": a, "gold": g}
            for i, a, g in zip(ids[:3], predicted[:3], gold[:3], strict=True)
        ],
    }


def _qa(ev: Evaluator, samples: list[Sample], items: list[int], opts: EvalOptions) -> dict:
    prompts = [samples[i] for i in items]
    predicted = ev.generate(prompts, after="assistant", max_new_tokens=opts.max_new_tokens)
    return _generation_scores([p.id for p in prompts], predicted, [p.response for p in prompts])


def _captioning(ev: Evaluator, samples: list[Sample], items: list[int], opts: EvalOptions) -> dict:
    prompts = [Sample.of_slices([_image_of(samples[i])], key=samples[i].key) for i in items]
    predicted = ev.generate(prompts, after="slice", max_new_tokens=opts.max_new_tokens)
    gold = [_text_of(samples[i]) for i in items]
    return _generation_scores([samples[i].id for i in items], predicted, gold)


def _two_choice(ev: Evaluator, samples: list[Sample], items: list[int]) -> dict:
    from unimm.inference.metrics import choice_scores

    expanded, owner = [], []
    for i in items:
        for choice in samples[i].meta["choices"]:
            expanded.append(samples[i].replace(response=choice))
            owner.append(i)
    logprobs = ev.answer_logprobs(expanded).tolist()
    best: dict[int, tuple[float, str]] = {}
    for i, lp, sample in zip(owner, logprobs, expanded, strict=True):
        if i not in best or lp > best[i][0]:
            best[i] = (lp, sample.response)
    correct = [best[i][1] == samples[i].response for i in items]
    groups = [samples[i].meta.get("pair") for i in items]
    out = choice_scores(correct, [g if isinstance(g, str) else None for g in groups])
    first = [samples[i].response == samples[i].meta["choices"][0] for i in items]
    out["answer_first"] = sum(first) / len(first)
    out["chance"] = sum(1 / len(samples[i].meta["choices"]) for i in items) / len(items)
    return out


class _PairEmbeddings:
    """Text and image embeddings of image–text records, each computed once per evaluation
    (retrieval and the Winoground pairs share most of them)."""

    def __init__(self, ev: Evaluator, samples: list[Sample]) -> None:
        self.ev, self.samples = ev, samples
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(texts [n, d], images [n, d])`` for the records ``indices``."""
        missing = [i for i in dict.fromkeys(indices) if i not in self.cache]
        if missing:
            texts = self.ev.embed([[Slice.of_text(_text_of(self.samples[i]))] for i in missing])
            images = self.ev.embed([_user([_image_of(self.samples[i])]) for i in missing])
            self.cache.update(zip(missing, zip(texts, images, strict=True), strict=True))
        return torch.stack([self.cache[i][0] for i in indices]), torch.stack(
            [self.cache[i][1] for i in indices]
        )


def _retrieval(pairs: _PairEmbeddings, samples: list[Sample], items: list[int]) -> dict:
    from unimm.inference.metrics import ranking_scores

    text_emb, image_emb = pairs(items)
    relevant = relevant_by_text([_text_of(samples[i]) for i in items])
    return {
        "text_to_image": ranking_scores(text_emb @ image_emb.T, relevant),
        "image_to_text": ranking_scores(image_emb @ text_emb.T, relevant),
    }


def _interleaved(ev: Evaluator, samples: list[Sample], items: list[tuple[int, int]]) -> dict:
    from unimm.inference.metrics import ranking_scores

    context = ev.embed([_user(samples[i].slices[:cut]) for i, cut in items])
    targets = ev.embed([_user([samples[i].slices[cut]]) for i, cut in items])
    return ranking_scores(context @ targets.T, [{q} for q in range(len(items))])


def _winoground(pairs: _PairEmbeddings, items: list[tuple[int, int]]) -> dict:
    from unimm.inference.metrics import winoground_scores

    texts, images = pairs([i for pair in items for i in pair])
    texts = texts.view(len(items), 2, -1)
    images = images.view(len(items), 2, -1)
    return winoground_scores(torch.einsum("pcd,pid->pci", texts, images))


def evaluate(ev: Evaluator, samples: list[Sample], opts: EvalOptions, *, progress: bool = False) -> dict:
    """Run the requested tasks that the samples support; skipped tasks say why."""
    from unimm.utils import progress_bar

    tasks = build_tasks(samples)
    results: dict[str, Any] = {"samples": len(samples)}
    skipped: dict[str, str] = {}
    pairs = _PairEmbeddings(ev, samples)
    minimum = {"retrieval": 2, "interleaved": 2}
    for name in progress_bar(opts.tasks, desc="eval", unit="task", disable=not progress):
        items = tasks[name][: opts.limit] if opts.limit else tasks[name]
        if len(items) < minimum.get(name, 1):
            skipped[name] = "no record of this shape in the data (see docs/formats.md, Evaluation records)"
            continue
        if name == "qa":
            results["qa"] = _qa(ev, samples, items, opts)
        elif name == "captioning":
            results["captioning"] = _captioning(ev, samples, items, opts)
        elif name == "two_choice":
            results["two_choice"] = _two_choice(ev, samples, items)
        elif name == "retrieval":
            results.update(_retrieval(pairs, samples, items))
        elif name == "interleaved":
            results["interleaved"] = _interleaved(ev, samples, items)
        else:
            results["winoground"] = _winoground(pairs, items)
    if skipped:
        results["skipped"] = skipped
    return results


def strict_json(value: Any) -> Any:
    """``value`` with NaN replaced by ``None``, so the JSON written is strict."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Reporting

HEADLINE = (
    ("qa", "exact_match", "QA exact match", None, "n"),
    ("captioning", "exact_match", "captioning exact match", None, "n"),
    ("captioning", "word_accuracy", "captioning word accuracy", None, "n"),
    ("two_choice", "accuracy", "two-choice accuracy", "chance", "questions"),
    ("two_choice", "group_accuracy", "two-choice pair accuracy (MMVP)", None, "groups"),
    ("text_to_image", "R@1", "text→image R@1", "chance@1", "queries"),
    ("text_to_image", "R@5", "text→image R@5", None, "queries"),
    ("image_to_text", "R@1", "image→text R@1", "chance@1", "queries"),
    ("interleaved", "R@1", "interleaved R@1 (VIST-style)", "chance@1", "queries"),
    ("interleaved", "MRR", "interleaved MRR", None, "queries"),
    ("winoground", "text", "Winoground text", None, "pairs"),
    ("winoground", "image", "Winoground image", None, "pairs"),
    ("winoground", "group", "Winoground group", None, "pairs"),
)
WINOGROUND_CHANCE = {"text": 0.25, "image": 0.25, "group": 1 / 6}


def table_rows(results: dict) -> list[tuple[str, float, float | None, int]]:
    """``(metric, value, chance or None, count)`` rows of the headline metrics present."""
    rows = []
    for section, key, label, chance_key, count_key in HEADLINE:
        part = results.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        chance = part.get(chance_key) if chance_key else None
        if section == "winoground":
            chance = WINOGROUND_CHANCE[key]
        if section == "two_choice" and key == "group_accuracy":
            chance = None
        rows.append((label, part[key], chance, part[count_key]))
    return rows


def format_table(results: dict) -> str:
    """The headline metrics as an aligned text table."""
    rows = table_rows(results)
    cells = [
        {
            "metric": label,
            "value": f"{value:.3f}",
            "chance": None if chance is None else f"{chance:.3f}",
            "n": count,
        }
        for label, value, chance, count in rows
    ]
    lines = [text_table(cells, ["metric", "value", "chance", "n"], right=("value", "chance", "n"))]
    for name, why in results.get("skipped", {}).items():
        lines.append(f"{name}: skipped ({why})")
    return "\n".join(lines)
