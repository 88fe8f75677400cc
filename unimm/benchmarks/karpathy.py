"""MSCOCO and Flickr30k image–text retrieval on Karpathy's splits (``coco``, ``flickr30k``).

Karpathy & Fei-Fei's files, as everyone since (FROMAGe, CLIP, BLIP) evaluates on them::

    dataset_coco.json       {"dataset": "coco", "images": [{"filepath": "val2014",
                             "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895,
                             "split": "test", "sentences": [{"raw": "A man with a red helmet … ",
                             "sentid": 770337, …}, …]}, …]}
    dataset_flickr30k.json  the same without filepath/cocoid; images in flickr30k-images/

The ``test`` split is scored (``val`` on request, for choosing checkpoints during training;
``restval`` is training data): 5,000 COCO images and 1,000 Flickr30k images, five captions
each. Relevance is by image: a caption's relevant image is the one it describes; an image's
relevant captions are its five. Handling of the files' quirks:

- captions are stripped (Karpathy's ``raw`` strings end in spaces); a blank ``raw`` falls back to
  the joined ``tokens``;
- the first five captions of an image are used (a few COCO images have six or seven), as the
  usual 25,000-caption test set;
- images are looked for at ``IMAGE_ROOT/filepath/filename`` (COCO) or
  ``IMAGE_ROOT/flickr30k-images/filename`` (Flickr30k; ``images/`` and the root itself are tried
  too); IMAGE_ROOT defaults to the folder of the JSON file. Missing images are an error that
  names them.
"""

from __future__ import annotations

from pathlib import Path

from unimm.benchmarks.base import BenchmarkData, ImageFinder, Item, RankingTask, field, find_file, read_json
from unimm.errors import UnimmError

SPLITS = ("test", "val")
CAPTIONS_PER_IMAGE = 5
USUAL_TEST_IMAGES = {"coco": 5000, "flickr30k": 1000}
IMAGE_FOLDERS = {"coco": ("", "images"), "flickr30k": ("flickr30k-images", "images", "Images", "")}


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """A split of ``dataset_<name>.json`` (``test``, or ``val`` for choosing checkpoints during
    training) as two ranking tasks (see the module docstring)."""
    name = benchmark.name
    file = find_file(
        path, [f"dataset_{name}.json", f"annotations/dataset_{name}.json"], name, benchmark.expects
    )
    doc = read_json(file)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise UnimmError(f"{file}: not a Karpathy split file (expected an object with an 'images' list)")
    if doc.get("dataset") not in (None, name):
        raise UnimmError(
            f"{file}: a Karpathy split of {doc['dataset']!r}, not {name!r}; "
            f"use --benchmark {doc['dataset']} or give dataset_{name}.json"
        )
    splits: dict[str, int] = {}
    test = []
    for n, image in enumerate(doc["images"]):
        where = f"{file}: images[{n}]"
        its_split = field(image, "split", str, where)
        splits[its_split] = splits.get(its_split, 0) + 1
        if its_split == split:
            test.append((where, image))
    if not test:
        found = ", ".join(f"{k} ({v})" for k, v in sorted(splits.items())) or "no images"
        raise UnimmError(f"{file}: no image in the {split!r} split (found {found})")
    usual = USUAL_TEST_IMAGES[name]
    notes = [] if split == "test" else [f"the {split!r} split, not the published test split"]
    if limit:
        test = test[:limit]
        notes.append(
            f"--limit {limit}: {len(test)} of the {split} images; not comparable to published figures"
        )
    elif split == "test" and len(test) != usual:
        notes.append(f"the test split has {len(test)} images, not the usual {usual}")
    finder = ImageFinder(image_root or file.parent, IMAGE_FOLDERS[name], name)
    images, captions, owner = [], [], []
    for where, image in test:
        filename = field(image, "filename", str, where)
        image_id = str(image["cocoid"]) if "cocoid" in image else Path(filename).stem
        folder = image.get("filepath") if name == "coco" else None
        found = finder(f"{folder}/{filename}" if folder else filename)
        sentences = field(image, "sentences", list, where)[:CAPTIONS_PER_IMAGE]
        if not sentences:
            raise UnimmError(f"{where} ({filename}): no sentences")
        for k, sentence in enumerate(sentences):
            captions.append(_caption(sentence, f"{where}.sentences[{k}]", image_id, k))
            owner.append(image_id)
        images.append(Item.image(image_id, found or ""))
    finder.check()
    if len({i.id for i in images}) != len(images):
        raise UnimmError(f"{file}: two test images share an id (cocoid / file name)")
    by_image: dict[str, list[str]] = {}
    for caption, image_id in zip(captions, owner, strict=True):
        by_image.setdefault(image_id, []).append(caption.id)
    return BenchmarkData(
        benchmark=name,
        root=str(finder.root),
        tasks=[
            RankingTask("text_to_image", captions, images, [[o] for o in owner]),
            RankingTask("image_to_text", images, captions, [by_image[i.id] for i in images]),
        ],
        files=[str(file)],
        images=[i.parts[0][1] for i in images],
        notes=notes,
    )


def _caption(sentence: object, where: str, image_id: str, k: int) -> Item:
    if not isinstance(sentence, dict):
        raise UnimmError(f"{where}: expected an object with 'raw'")
    text = sentence.get("raw")
    text = text.strip() if isinstance(text, str) else ""
    if not text and isinstance(sentence.get("tokens"), list):
        text = " ".join(str(t) for t in sentence["tokens"]).strip()
    if not text:
        raise UnimmError(f"{where}: an empty caption (no 'raw' text, no 'tokens')")
    sentid = sentence.get("sentid")
    return Item.text(str(sentid) if isinstance(sentid, int) else f"{image_id}#{k}", text)
