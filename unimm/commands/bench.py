"""Benchmarks: ours against a baseline on the same data, in the same run, reported as ratios.

    unimm bench prepare            # samples/s of `unimm prepare` vs a plain tarfile writer
    unimm bench align              # all-pairs GAK: Triton / reference / tslearn

Training throughput (``bench train``, ``bench data``) is in :mod:`unimm.commands.bench_train`,
search and serving (``bench retrieve``, ``bench serve``) in :mod:`unimm.commands.bench_serve`.

Absolute times depend on the machine; the ratios are what the goals in docs/benchmarks.md
refer to. Each variant is timed ``repeats`` times, interleaved with the baseline, best kept.
"""

from __future__ import annotations

import contextlib
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

from unimm.utils import bench_timer, text_table


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
    from unimm.data.prepare import write_shards as run

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
    print(text_table(rows, ["variant", "workers", "samples_per_s", "baseline_samples_per_s", "ratio"]))
    if rows:
        first = rows[0]
        print(
            f"data: {first['records']} records x {first['images_per_record']} images ({first['image']}); "
            f"{first['cpus']} CPUs"
        )


# ---------------------------------------------------------------------------------------------
# unimm bench align


def _align_data(n_views: int, slices: int, width: int, triple: bool, dtype, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    total = n_views * slices

    def unit(d):
        x = torch.randn(total, d, generator=g, dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=-1).to(dtype=dtype, device=device)

    lengths = torch.full((n_views,), slices, device=device)
    modality = torch.randint(0, 2, (total,), generator=g).to(device)
    return (unit(width) if triple else None), unit(width), modality, lengths


def bench_align(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """Time the all-pairs GAK: reference (and Triton on CUDA), tslearn on CPU, as ratios.

    Grid: views × slices per view × features (``teacher``: triple kernel on 768 + 768 teacher
    features; ``student``: plain 4096-d vectors). CPU runs a grid sized for a small machine.
    """
    import torch

    if device.startswith("cuda:"):  # one named GPU: make it the current one
        torch.cuda.set_device(device)
        device = "cuda"
    timer = bench_timer(device)
    cpu = device == "cpu"
    if cpu:
        grid = [(256, 4), (256, 16)] if quick else [(256, 4), (256, 16), (1024, 4), (1024, 16), (256, 64)]
    elif quick:  # the acceptance case (scripts/gpu-check): 1024 views of 16 slices
        grid = [(1024, 16)]
    else:
        grid = [(n, s) for n in (256, 1024, 4096) for s in (4, 16, 64)]
    backends = ["reference"] + ([] if cpu else ["triton"])
    rows: list[dict] = []
    for n_views, slices in grid:
        for kind, width, triple in (("teacher", 768, True), ("student", 4096, False)):
            if kind == "student" and (n_views > (256 if cpu else 1024) or slices > 16):
                continue  # the student Gram alone is ~(N·L)²·4096 flops
            case = _AlignCase(n_views, slices, kind, width, triple, device)
            rows.extend(case.rows(backends, timer))
    if cpu:
        rows.extend(_bench_tslearn(timer))
    return rows


@contextlib.contextmanager
def _align_backend(name: str):
    old = os.environ.get("UNIMM_ALIGN_BACKEND")
    os.environ["UNIMM_ALIGN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("UNIMM_ALIGN_BACKEND", None)
        else:
            os.environ["UNIMM_ALIGN_BACKEND"] = old


class _AlignCase:
    """One cell of the alignment grid: random slice features of ``n_views`` views."""

    def __init__(self, n_views: int, slices: int, kind: str, width: int, triple: bool, device: str) -> None:
        import torch

        self.n_views, self.slices, self.kind, self.triple, self.device = n_views, slices, kind, triple, device
        self.u, self.v, self.modality, self.lengths = _align_data(
            n_views, slices, width, triple, torch.float32, device
        )

    def forward(self):
        import torch

        from unimm.align import gak_matrix, gak_matrix_triple

        with torch.no_grad():
            if self.triple:
                return gak_matrix_triple(self.u, self.v, self.modality, self.lengths, delta=1.0)
            return gak_matrix(self.v, self.lengths, delta=1.0)

    def forward_backward(self) -> None:
        from unimm.align import gak_matrix

        x = self.v.detach().requires_grad_()
        gak_matrix(x, self.lengths, delta=1.0).sum().backward()

    def rows(self, backends: list[str], timer) -> list[dict]:
        import torch

        cuda = self.device == "cuda"
        rows, times, outputs = [], {}, {}
        for backend in backends:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with _align_backend(backend):
                outputs[backend] = self.forward()
                fwd = timer(self.forward)
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
                both = timer(self.forward_backward) if self.kind == "student" else None
            times[backend] = fwd
            cells = self.n_views * (self.n_views + 1) / 2 * self.slices * self.slices
            rows.append(
                {
                    "views": self.n_views,
                    "slices": self.slices,
                    "features": self.kind,
                    "backend": backend,
                    "dtype": "float32",
                    "forward_s": round(fwd, 6),
                    "forward_backward_s": round(both, 6) if both else None,
                    "cells_per_s": round(cells / fwd),
                    "peak_mib": round(peak, 1) if peak else None,
                }
            )
        if "triton" in times:
            rows[-1]["speedup_vs_reference"] = round(times["reference"] / times["triton"], 1)
            error = (outputs["triton"].double() - outputs["reference"].double()).abs().max()
            rows[-1]["max_abs_error_vs_reference"] = float(f"{float(error):.3g}")
        if self.kind == "student" and cuda:
            x = self.v.detach().requires_grad_()

            def matmuls():  # the Gram and the backward's two products: the floor
                gram = x @ x.T
                return torch.ones_like(gram) @ x, gram

            rows[-1]["matmul_floor_s"] = round(timer(matmuls), 6)
        return rows


def _bench_tslearn(timer) -> list[dict]:
    """Reference forward vs tslearn ``cdist_gak`` (numba) on the same plain vectors, N=256, 16 slices."""
    import numpy as np
    import torch

    from unimm.align import gak_matrix

    try:
        from tslearn.metrics import cdist_gak
    except ImportError:
        return []
    rows = []
    for width in (64, 768):
        _, v, _, lengths = _align_data(256, 16, width, False, torch.float64, "cpu", seed=1)
        series = v.numpy().reshape(256, 16, width)
        ts = timer(lambda series=series: cdist_gak(series, sigma=1.0))
        want = cdist_gak(series, sigma=1.0)
        for dtype in (torch.float64, torch.float32):
            x = v.to(dtype)
            with torch.no_grad():
                ours_s = timer(
                    lambda x=x, lengths=lengths: gak_matrix(x, lengths, sigma=1.0, single_slice="gak")
                )
                got = gak_matrix(x, lengths, sigma=1.0, single_slice="gak").double().numpy()
            rows.append(
                {
                    "views": 256,
                    "slices": 16,
                    "features": f"plain {width}-d",
                    "backend": "reference",
                    "dtype": str(dtype).removeprefix("torch."),
                    "forward_s": round(ours_s, 4),
                    "tslearn_s": round(ts, 4),
                    "speedup_vs_tslearn": round(ts / ours_s, 1),
                    "max_rel_diff_vs_tslearn": float(np.abs(got / want - 1).max()),
                }
            )
    return rows


def print_align_table(rows: list[dict]) -> None:
    """Print ``bench align`` rows as a table."""
    keys = [
        "views",
        "slices",
        "features",
        "backend",
        "dtype",
        "forward_s",
        "forward_backward_s",
        "cells_per_s",
        "peak_mib",
        "speedup_vs_reference",
        "max_abs_error_vs_reference",
        "matmul_floor_s",
        "tslearn_s",
        "speedup_vs_tslearn",
        "max_rel_diff_vs_tslearn",
    ]
    print(text_table(rows, keys))
