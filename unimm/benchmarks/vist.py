"""VIST contextual image retrieval, the FROMAGe protocol (``vist``).

The Visual Storytelling release's story-in-sequence files (``SIS-with-labels.tar.gz``)::

    sis/val.story-in-sequence.json   {"images": [...], "albums": [...], "annotations": [
                                      [{"story_id": "45530", "photo_flickr_id": "2627795780",
                                        "worker_arranged_photo_order": 0, "text": "…",
                                        "original_text": "…", …}], …]}
    images/val/2627795780.jpg        (the Flickr photos, downloaded by id; .png / .gif occur)

Every annotation is a one-element list; a story is the five annotations sharing ``story_id``,
ordered by ``worker_arranged_photo_order``. As in FROMAGe (and the paper, which follows it), the
last image of each story is retrieved from everything before it, over the gallery of every image
the file's stories use; R@1/5/10. Tasks:

- ``last_caption`` — the fifth caption alone;
- ``captions`` — the five captions;
- ``captions_images`` — the five captions and the first four images, interleaved; the story's own
  four images are excluded from the ranking (FROMAGe's "don't retrieve previously seen images",
  its published setting);
- ``captions_images_all`` — the same input, nothing excluded.

FROMAGe reports on the ``val`` file (``--split val``); ``test`` reads ``test.story-in-sequence.json``.
Handling of the release's quirks: Flickr photos disappear, so — as FROMAGe does — a story with a
missing image is left out (counted and named in the notes) and the gallery holds the images
found; an error only when no story is left. Image names carry no extension in the file
(``.jpg``, ``.png``, ``.gif`` are tried); captions are stripped; a story of another length than
VIST's five (none in the release) is scored the same way, its last photo from all before it, and
counted in the notes; one of a single annotation is left out.
"""

from __future__ import annotations

from pathlib import Path

from unimm.benchmarks.base import BenchmarkData, ImageFinder, Item, RankingTask, field, find_file, read_json
from unimm.errors import UnimmError

SPLITS = ("test", "val")
STORY_LENGTH = 5


def _folders(split: str) -> tuple[str, ...]:
    """Where the photos of a split are usually extracted to (VIST's download script, GILL's)."""
    return (f"images/{split}", f"{split}_images", f"sis/{split}_images", split, "images", "")


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """The stories of ``<split>.story-in-sequence.json`` as four ranking tasks (module docstring)."""
    name = f"{split}.story-in-sequence.json"
    present = [p for p in (path / name, path / "sis" / name) if p.is_file()]
    if path.is_dir() and not present:
        for other in (s for s in SPLITS if s != split):
            if any((p / f"{other}.story-in-sequence.json").is_file() for p in (path, path / "sis")):
                raise UnimmError(
                    f"{path}: no {name}, but {other}.story-in-sequence.json: use --split {other}"
                )
    file = find_file(path, [name, f"sis/{name}"], benchmark.name, f"{name} ({benchmark.expects})")
    doc = read_json(file)
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise UnimmError(f"{file}: not a VIST story-in-sequence file (expected an 'annotations' list)")
    stories = _stories(doc["annotations"], file)
    notes = [] if split == "val" else ["FROMAGe's published figures are on the val file (--split val)"]
    single = [s for s, anns in stories.items() if len(anns) < 2]
    if single:
        notes.append(f"{len(single)} stories of one annotation left out (e.g. {single[0]})")
        stories = {s: a for s, a in stories.items() if len(a) >= 2}
    other = [s for s, anns in stories.items() if len(anns) != STORY_LENGTH]
    if other:
        notes.append(
            f"{len(other)} stories not of {STORY_LENGTH} annotations (e.g. {other[0]}): their last photo "
            "is retrieved from all before it"
        )
    if limit:
        stories = dict(list(stories.items())[:limit])
        notes.append(f"--limit {limit}: {len(stories)} stories and their images only; not comparable")
    root = image_root or (path if path.is_dir() else file.parent)
    finder = ImageFinder(root, _folders(split), benchmark.name)
    found: dict[str, str | None] = {}
    for anns in stories.values():
        for _, image, _ in anns:
            if image not in found:
                found[image] = finder(image)
    missing = [image for image, where in found.items() if where is None]
    kept = {s: a for s, a in stories.items() if all(found[image] for _, image, _ in a)}
    if not kept:
        finder.check()
        raise UnimmError(f"{file}: no story")
    if missing:
        notes.append(
            f"{len(stories) - len(kept)} of {len(stories)} stories left out: {len(missing)} image(s) not "
            f"found under {finder.root} (e.g. {', '.join(missing[:3])}), as FROMAGe leaves out stories "
            "whose photos are gone"
        )
    gallery = [Item.image(image, where) for image, where in found.items() if where]
    return BenchmarkData(
        benchmark=benchmark.name,
        root=str(finder.root),
        tasks=_tasks(kept, found, gallery),
        files=[str(file)],
        images=[i.parts[0][1] for i in gallery],
        notes=notes,
    )


def _stories(annotations: list, file: Path) -> dict[str, list[tuple[int, str, str]]]:
    """``story_id`` → its ``(order, photo id, caption)`` in story order, stories in file order."""
    stories: dict[str, list[tuple[int, str, str]]] = {}
    for n, entry in enumerate(annotations):
        where = f"{file}: annotations[{n}]"
        if isinstance(entry, list) and len(entry) == 1:
            entry = entry[0]
        if not isinstance(entry, dict):
            raise UnimmError(f"{where}: expected a one-element list holding an annotation object")
        story = str(field(entry, "story_id", (str, int), where))
        order = field(entry, "worker_arranged_photo_order", int, where)
        photo = str(field(entry, "photo_flickr_id", (str, int), where)).strip()
        text = field(entry, "text", str, where).strip()
        if not text:
            raise UnimmError(f"{where}: story {story} has an empty 'text'")
        stories.setdefault(story, []).append((order, photo, text))
    for anns in stories.values():
        anns.sort(key=lambda a: a[0])
    return stories


def _tasks(stories: dict, found: dict[str, str | None], gallery: list[Item]) -> list[RankingTask]:
    targets = [[anns[-1][1]] for anns in stories.values()]
    last_caption, captions, interleaved, seen = [], [], [], []
    for story, anns in stories.items():
        texts = [text for _, _, text in anns]
        last_caption.append(Item.text(story, texts[-1]))
        captions.append(Item(story, tuple(("text", t) for t in texts)))
        parts: list[tuple] = []
        for _, image, text in anns[:-1]:
            parts += [("text", text), ("image", found[image])]
        interleaved.append(Item(story, (*parts, ("text", texts[-1]))))
        seen.append([image for _, image, _ in anns[:-1] if image != anns[-1][1]])
    return [
        RankingTask("last_caption", last_caption, gallery, targets),
        RankingTask("captions", captions, gallery, targets),
        RankingTask("captions_images", interleaved, gallery, targets, exclude=seen),
        RankingTask("captions_images_all", interleaved, gallery, targets),
    ]
