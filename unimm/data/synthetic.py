"""A synthetic interleaved image–text dataset drawn with Pillow (no downloads).

Scenes hold 1–3 shapes of one kind and colour at one position; captions say exactly that
("two red circles on the left"), so both retrieval and generation have a right answer. Kinds:

- ``caption``: [image, caption];
- ``story``: three captioned scenes interleaved, [text, image, text, image, text, image, text];
- ``qa``: [image, question] with a one-word response (colour, shape, count or position);
- ``pair``: two captioned scenes that differ in exactly one attribute (``meta.pair``), the
  near-duplicates that fine-grained (Winoground-style) evaluation needs.

    python -c "from unimm.data.synthetic import write_synthetic; write_synthetic('synth', 200)"
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = {1: "one", 2: "two", 3: "three"}


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a synthetic image shows."""

    shape: str
    colour: str
    position: str
    count: int

    @property
    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNTS[self.count]} {self.colour} {noun} on the {self.position}"

    def changed(self, rng: random.Random) -> Scene:
        """The same scene with exactly one attribute changed."""
        field = rng.choice(["shape", "colour", "position", "count"])
        options = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS, "count": tuple(COUNTS)}[
            field
        ]
        value = rng.choice([o for o in options if o != getattr(self, field)])
        return dataclasses.replace(self, **{field: value})


def random_scene(rng: random.Random) -> Scene:
    """A uniformly random scene."""
    return Scene(
        rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(POSITIONS), rng.choice(tuple(COUNTS))
    )


def draw_scene(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Render a scene: shapes in the named half of a light-grey canvas, small random jitter."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    half = size // 2
    boxes = {
        "left": (0, 0, half, size),
        "right": (half, 0, size, size),
        "top": (0, 0, size, half),
        "bottom": (0, half, size, size),
    }
    x0, y0, x1, y1 = boxes[scene.position]
    r = max(3, size // 10)
    for k in range(scene.count):
        # spread the shapes along the long side of the region
        t = (k + 1) / (scene.count + 1)
        if x1 - x0 < y1 - y0:
            cx, cy = (x0 + x1) / 2, y0 + t * (y1 - y0)
        else:
            cx, cy = x0 + t * (x1 - x0), (y0 + y1) / 2
        cx += rng.uniform(-1.5, 1.5)
        cy += rng.uniform(-1.5, 1.5)
        colour = COLOURS[scene.colour]
        if scene.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


_QUESTIONS = {
    "colour": ("What colour are the shapes?", lambda s: s.colour),
    "shape": ("What shape is shown?", lambda s: s.shape),
    "count": ("How many shapes are there?", lambda s: COUNTS[s.count]),
    "position": ("Where are the shapes?", lambda s: s.position),
}

# Two-choice questions (MMVP-style): the same question is asked of both images of a pair.
_CHOICE_QUESTIONS = {
    "colour": "Are the shapes {a} or {b}?",
    "shape": "Is the shape a {a} or a {b}?",
    "count": "Are there {a} or {b} shapes?",
    "position": "Are the shapes on the {a} or on the {b}?",
}


def _value(scene: Scene, field: str) -> str:
    return COUNTS[scene.count] if field == "count" else getattr(scene, field)


def _changed_field(first: Scene, second: Scene) -> str:
    return next(
        f for f in ("shape", "colour", "position", "count") if getattr(first, f) != getattr(second, f)
    )


def write_synthetic(out_dir: str | Path, records: int = 200, *, seed: int = 0, image_size: int = 64) -> Path:
    """Write ``records`` records (mixed kinds) and their PNG images; return the JSONL path.

    Kinds (``meta.kind``), drawn with weights 35/20/25/20:

    - ``caption``: an image and its caption, in either order (text first in half of them, so
      that text-only prefixes are views too);
    - ``story``: a title, then three scenes, each caption *before* its image, where each scene
      changes one attribute of the previous one (the last image follows from the text before it:
      the VIST-style interleaved retrieval task); final scenes do not repeat within a file;
    - ``qa``: an image and a question with a one-word response (colour, shape, count, position);
    - ``pair``: two scenes that differ in exactly one attribute (``meta.pair``, ``meta.field``),
      written as two captioned records (Winoground-style) and two two-choice questions
      (``meta.kind = choice``, ``meta.choices``): the same question for both images, so the
      right answer is the first option for one and the second for the other (MMVP-style).

    Same arguments, same files.
    """
    writer = _SyntheticWriter(Path(out_dir), random.Random(seed), image_size)
    kinds = {"caption": writer.caption, "story": writer.story, "qa": writer.qa, "pair": writer.pair}
    rows: list[dict] = []
    while len(rows) < records:
        kind = writer.rng.choices(list(kinds), weights=[35, 20, 25, 20])[0]
        rows.extend(kinds[kind](len(rows)))
    path = writer.out / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:records]), encoding="utf-8")
    return path


class _SyntheticWriter:
    """Draws the records of one file from one generator (the order of draws is the file's seed)."""

    def __init__(self, out: Path, rng: random.Random, image_size: int) -> None:
        self.out, self.rng, self.image_size = out, rng, image_size
        (out / "images").mkdir(parents=True, exist_ok=True)
        self.images = 0
        self.story_endings: set[Scene] = set()

    def image(self, scene: Scene) -> str:
        name = f"images/{self.images:05d}.png"
        self.images += 1
        draw_scene(scene, self.image_size, self.rng).save(self.out / name)
        return name

    def captioned(self, rid: str, scene: Scene, text_first: bool, meta: dict) -> dict:
        pair = [{"image": self.image(scene)}, {"text": scene.caption}]
        return {
            "id": rid,
            "slices": pair[::-1] if text_first else pair,
            "meta": {**meta, "caption": scene.caption},
        }

    def caption(self, n: int) -> list[dict]:
        return [
            self.captioned(f"cap-{n}", random_scene(self.rng), self.rng.random() < 0.5, {"kind": "caption"})
        ]

    def story(self, n: int) -> list[dict]:
        scenes = [random_scene(self.rng)]
        for step in range(2):
            for _ in range(20):  # a final scene not used by an earlier story, if one is near
                scene = scenes[-1].changed(self.rng)
                if step == 0 or scene not in self.story_endings:
                    break
            scenes.append(scene)
        self.story_endings.add(scenes[-1])
        slices: list[dict] = [{"text": "A short story in pictures."}]
        for word, scene in zip(("First", "Then", "Finally"), scenes, strict=True):
            slices += [{"text": f"{word}, {scene.caption}."}, {"image": self.image(scene)}]
        return [{"id": f"story-{n}", "slices": slices, "meta": {"kind": "story"}}]

    def qa(self, n: int) -> list[dict]:
        scene = random_scene(self.rng)
        attribute = self.rng.choice(sorted(_QUESTIONS))
        question, answer = _QUESTIONS[attribute]
        return [
            {
                "id": f"qa-{n}",
                "slices": [{"image": self.image(scene)}, {"text": question}],
                "response": answer(scene),
                "meta": {"kind": "qa", "attribute": attribute, "caption": scene.caption},
            }
        ]

    def pair(self, n: int) -> list[dict]:
        first = random_scene(self.rng)
        second = first.changed(self.rng)
        field = _changed_field(first, second)
        options = [_value(first, field), _value(second, field)]
        self.rng.shuffle(options)
        question = _CHOICE_QUESTIONS[field].format(a=options[0], b=options[1])
        group = f"pair-{n}"
        scenes = (("a", first), ("b", second))
        rows = [
            self.captioned(f"{group}-{tag}", scene, False, {"kind": "pair", "pair": group, "field": field})
            for tag, scene in scenes
        ]
        for tag, scene in scenes:
            meta = {
                "kind": "choice",
                "pair": group,
                "field": field,
                "choices": options,
                "caption": scene.caption,
            }
            rows.append(
                {
                    "id": f"{group}-q{tag}",
                    "slices": [{"image": self.image(scene)}, {"text": question}],
                    "response": _value(scene, field),
                    "meta": meta,
                }
            )
        return rows


def caption_pairs(jsonl: str | Path, limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """The (image, caption) pairs of a synthetic file's caption and pair records (images opened)."""
    root = Path(jsonl).parent
    images: list[Image.Image] = []
    texts: list[str] = []
    for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["meta"]["kind"] not in ("caption", "pair"):
            continue
        path = next(s["image"] for s in row["slices"] if "image" in s)
        with Image.open(root / path) as img:
            images.append(img.convert("RGB"))
        texts.append(row["meta"]["caption"])
        if limit is not None and len(texts) >= limit:
            break
    return images, texts


def clustered_unit_parts(
    n: int,
    dim: int,
    *,
    part_size: int = 10_000,
    clusters: int = 4096,
    noise: float = 0.05,
    seed: int = 0,
    stored: bool = True,
) -> Iterator:
    """``n`` unit vectors around ``clusters`` random centres (per-coordinate noise ``noise``: the
    neighbourhoods real embeddings have and uniform random vectors lack, on which every ANN method
    degrades to a scan), as float32 numpy parts of ``part_size`` rows, rounded to float16 when
    ``stored`` (what an index stores); the same for the same arguments, part by part, without
    holding more than one part."""
    import torch

    centres = _centres(clusters, dim, seed)
    for number, start in enumerate(range(0, n, part_size)):
        rows = min(part_size, n - start)
        g = torch.Generator().manual_seed(seed * 1_000_003 + number + 1)
        picks = torch.randint(0, clusters, (rows,), generator=g)
        part = torch.nn.functional.normalize(
            centres[picks] + noise * torch.randn(rows, dim, generator=g), dim=1
        )
        yield (part.half().float() if stored else part).numpy()


def _centres(clusters: int, dim: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=1)
