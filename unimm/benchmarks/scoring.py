"""How the generative benchmarks grade a generated answer: pure functions, checked by hand in tests.

- :func:`normalize_vqa_answer` and :func:`vqa_accuracy`: the VQA challenge's answer processing and
  accuracy (VQAv2, VizWiz, TextVQA): an answer is right in proportion to how many of the ten
  human annotators gave it, ``min(1, matches / 3)`` averaged over the ten ways of leaving one
  annotator out.
- :func:`yes_no`: a free-form reply read as ``yes``/``no`` by POPE's rule or MME's.
- :func:`binary_scores`: accuracy, precision, recall, F1 and the share of ``yes`` (POPE).
- :func:`option_letter`: the option a reply names (``"B"``, ``"B. cat"``, ``"The answer is B."``
  or the option's text), as LLaVA's ScienceQA and MMBench scripts read it; ``None`` when none.
- :func:`group_all_right`: the share of groups whose members are all right (MME's acc+, per
  image; MMBench's circular evaluation, per question over its rotations).
- :func:`with_breakdowns`: a task's figures overall and per value of each breakdown field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

# The VQA challenge's normalisation (the evaluation script of visualqa.org, as published with the
# VQA API): punctuation, number words, articles and contractions written without apostrophes.
_PUNCTUATION = list(';/[]"{}()=+\\_-><@`,?!')
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Contractions as annotators typed them without the apostrophe(s) → the written form. Built from
# the written forms (every apostrophe dropped; for the two-apostrophe ones also each one alone).
_WRITTEN = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've "
    "it'll it's let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
    "oughtn't 'ow's'at shan't she'd she'd've she'll she's should've shouldn't shouldn't've somebody'd "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've 'twas wasn't we'd we'd've we'll we're we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who're who's who've why'll why're "
    "why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()


def _contraction_forms() -> dict[str, str]:
    forms: dict[str, str] = {}
    for written in _WRITTEN:
        forms[written.replace("'", "")] = written
        positions = [i for i, ch in enumerate(written) if ch == "'"]
        if len(positions) == 2:  # "couldn't've" also typed "couldnt've" and "couldn'tve"
            for keep in positions:
                forms["".join(ch for i, ch in enumerate(written) if ch != "'" or i == keep)] = written
    return forms


_CONTRACTIONS = _contraction_forms()


def _strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it: newlines and tabs as spaces, punctuation
    dropped (or made a space), number words as digits, no articles, contractions written
    (``"Two dogs."`` → ``"2 dogs"``, ``"dont"`` → ``"don't"``)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_strip_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against the human ``answers`` (ten in VQAv2, VizWiz
    and TextVQA): for each annotator left out, ``min(1, (others who gave it) / 3)``, averaged.

    The prediction is always normalised (as LLaVA's submission scripts do before upload); the
    human answers are normalised when they differ from one another, as the official script does.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs the human answers")
    human = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(human)) > 1:
        human = [normalize_vqa_answer(a) for a in human]
    guess = normalize_vqa_answer(prediction)
    total = 0.0
    for left_out in range(len(human)):
        others = human[:left_out] + human[left_out + 1 :]
        total += min(1.0, sum(a == guess for a in others) / 3)
    return total / len(human)


def yes_no(reply: str, rule: str = "pope") -> str:
    """``"yes"``, ``"no"`` or (MME only) ``"other"``: how a benchmark reads a free-form reply.

    ``pope``: the first sentence, commas dropped, is ``no`` when a word of it is ``no``/``not``
    (any case: ``No``), else ``yes`` (POPE's script). ``mme``: lower case, periods dropped; the
    whole reply, or else its first four characters, says ``yes`` or ``no`` (MME's script).
    """
    if rule == "pope":
        first = reply.split(".", 1)[0].replace(",", "")
        words = first.split()
        return "no" if any(w in ("No", "not", "no") for w in words) else "yes"
    if rule == "mme":
        text = reply.lower().strip().replace(".", "")
        if text in ("yes", "no"):
            return text
        head = text[:4]
        return "yes" if "yes" in head else "no" if "no" in head else "other"
    raise ValueError(f"unknown yes/no rule {rule!r}")


def binary_scores(predicted: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """POPE's figures with ``yes`` the positive class: accuracy, precision, recall, F1, yes_ratio."""
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels")
    pairs = list(zip(predicted, labels, strict=True))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p != "yes" and y == "yes" for p, y in pairs)
    tn = sum(p != "yes" and y == "no" for p, y in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else float("nan"),
        "precision": precision,
        "recall": recall,
        "F1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else float("nan"),
        "questions": n,
    }


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_THE_ANSWER_IS = re.compile(r"[Tt]he answer is \(?([A-Z])\)?")


def option_letter(reply: str, options: Sequence[str]) -> str | None:
    """The letter of the option ``reply`` names, or ``None``: the reply is a letter (``"B"``,
    ``"(B)"``, ``"B."``), starts with one (``"B. cat"``, ``"B) cat"``), says ``the answer is
    B``, or is the text of exactly one option (any case, no final period)."""
    letters = LETTERS[: len(options)]
    text = reply.strip()
    bare = text.strip("()").rstrip(".").strip()
    if len(bare) == 1 and bare in letters:
        return bare
    head = re.match(r"\(?([A-Z])(?:\.|\)|:)\s", text + " ")
    if head and head.group(1) in letters:
        return head.group(1)
    said = _THE_ANSWER_IS.search(text)
    if said and said.group(1) in letters:
        return said.group(1)
    wanted = text.rstrip(".").strip().lower()
    named = [letters[i] for i, option in enumerate(options) if option.strip().lower() == wanted]
    return named[0] if len(named) == 1 else None


def group_all_right(correct: Sequence[bool], groups: Sequence[str]) -> tuple[float, int]:
    """The share of groups whose members are all right, and the number of groups."""
    every: dict[str, bool] = {}
    for right, group in zip(correct, groups, strict=True):
        every[group] = every.get(group, True) and bool(right)
    return (sum(every.values()) / len(every) if every else float("nan")), len(every)


def with_breakdowns(
    figures: Callable[[list[int]], dict[str, Any]], count: int, groups: dict[str, Sequence[str]]
) -> dict[str, Any]:
    """``figures`` of all ``count`` questions, plus ``by_<field>``: the figures of each value's
    questions, for every breakdown field in ``groups`` (field → each question's value)."""
    metrics = figures(list(range(count)))
    for name, values in groups.items():
        by_value: dict[str, list[int]] = {}
        for q, value in enumerate(values):
            by_value.setdefault(value, []).append(q)
        metrics[f"by_{name}"] = {v: figures(rows) for v, rows in sorted(by_value.items())}
    return metrics
