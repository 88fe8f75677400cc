"""Benchmarks: ours against a baseline on the same data, in the same run, reported as ratios.

    unimm bench prepare            # samples/s of `unimm prepare` vs a plain tarfile writer

Absolute times depend on the machine; the ratios are what the goals in docs/benchmarks.md
refer to. Each variant is timed ``repeats`` times, interleaved with the baseline, best kept.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _synthetic_images(folder: Path, count: int, width: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, shapes, mild noise) so that sizes resemble real ones."""
    rng = np.random.default_rng(seed)
    height = width * 3 // 4
    paths = []
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(count):
        base = np.stack(
            [
                (xx * rng.uniform(0.1, 0.5) + yy * rng.uniform(0.1, 0.5) + rng.uniform(0, 255)) % 256
                for _ in range(3)
            ],
            axis=-1,
        )
        base += rng.normal(0, 6, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            size = int(rng.integers(20, width // 3))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.ellipse([x0, y0, x0 + size, y0 + size], fill=colour)
        path = folder / f"img{i:04d}.jpg"
        img.save(path, quality=85)
        paths.append(path)
    return paths


def _plain_tar(records: list[dict], root: Path, out: Path) -> None:
    """The I/O-bound baseline: the same JSON and image bytes into one tar, nothing checked."""
    with tarfile.open(out, "w") as tar:
        for n, record in enumerate(records):
            members = {"json": json.dumps(record).encode()}
            for k, s in enumerate(record["slices"]):
                if "image" in s:
                    members[f"{k}.jpg"] = (root / s["image"]).read_bytes()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{n:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def bench_prepare(
    *, records: int = 400, images_per_record: int = 2, image_width: int = 640, repeats: int = 3
) -> list[dict]:
    """Time `unimm prepare` variants against :func:`_plain_tar` on one synthetic set.

    Returns:
        One row per variant: ``variant``, ``workers``, ``samples_per_s``, ``baseline_samples_per_s``
        and ``ratio`` (ours / baseline; above 1 is faster than the baseline).
    """
    from unimm.config import PrepareConfig, build_config
    from unimm.prepare import run

    work = Path(tempfile.mkdtemp(prefix="unimm-bench-"))
    try:
        images = _synthetic_images(work, min(records * images_per_record, 128), image_width)
        rows = []
        for i in range(records):
            slices = [{"text": f"Record {i}: a scene with shapes."}]
            for k in range(images_per_record):
                slices.append({"image": images[(i * images_per_record + k) % len(images)].name})
                slices.append({"text": f"Caption of picture {k} in record {i}."})
            rows.append({"id": f"r{i}", "slices": slices})
        data = work / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        mean_kb = np.mean([p.stat().st_size for p in images]) / 1024

        def ours(**options) -> float:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            opts = {"prepare.inputs": [str(data)], "prepare.out": str(out)}
            opts.update({f"prepare.{k}": v for k, v in options.items()})
            cfg = build_config(PrepareConfig, options=opts)
            start = time.perf_counter()
            run(cfg, progress=False)
            return time.perf_counter() - start

        def baseline() -> float:
            out = work / "plain.tar"
            start = time.perf_counter()
            _plain_tar(rows, work, out)
            return time.perf_counter() - start

        variants = [
            ("copy, verify=full", {"verify_images": "full"}),
            ("copy, verify=header", {"verify_images": "header"}),
            ("re-encode 224px", {"image_size": 224}),
        ]
        results = []
        baseline()  # warm the page cache for both sides
        for workers in (1, 2):
            for name, options in variants:
                mine, base = [], []
                for _ in range(repeats):
                    base.append(baseline())
                    mine.append(ours(workers=workers, **options))
                results.append(
                    {
                        "variant": name,
                        "workers": workers,
                        "samples_per_s": round(records / min(mine), 1),
                        "baseline_samples_per_s": round(records / min(base), 1),
                        "ratio": round(min(base) / min(mine), 3),
                        "records": records,
                        "images_per_record": images_per_record,
                        "image": f"{image_width}x{image_width * 3 // 4} JPEG, {mean_kb:.0f} KiB mean",
                        "cpus": os.cpu_count(),
                        "machine": platform.machine(),
                    }
                )
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    """Print benchmark rows as an aligned text table."""
    keys = ["variant", "workers", "samples_per_s", "baseline_samples_per_s", "ratio"]
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r[k]).ljust(widths[k]) for k in keys))
    if rows:
        first = rows[0]
        print(
            f"data: {first['records']} records x {first['images_per_record']} images ({first['image']}); "
            f"{first['cpus']} CPUs"
        )
