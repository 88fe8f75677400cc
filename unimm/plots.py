"""PNG plots of a run: loss curves, and the target (teacher) vs learned (student) similarity of views.

    python -c "from unimm.plots import loss_curves; loss_curves('RUN/metrics.jsonl', 'loss.png')"

matplotlib draws off screen (Agg); each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from unimm.utils import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over at most ``window`` values (the first points average fewer)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves(metrics: str | Path | dict[str, Path], out: str | Path, window: int = 10) -> Path:
    """Plot ``loss_gen`` and ``loss_disc`` against the step from ``metrics.jsonl`` file(s).

    ``metrics`` is one file, or ``{label: file}`` to overlay several runs (e.g. the ablation).
    """
    runs = metrics if isinstance(metrics, dict) else {"": Path(metrics)}
    fig, axes = _figure(1, 2, figsize=(10, 3.6))
    for label, path in runs.items():
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("loss_gen", "loss_disc"), strict=True):
            values = [r[key] for r in rows]
            if any(v for v in values):
                ax.plot(steps, moving_average(values, window), label=label or key)
    for ax, title in zip(axes, ("generative loss L_g", "discriminative loss L_d"), strict=True):
        ax.set_title(f"{title} (mean of {window} steps)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    return _save(fig, out)


def similarity_heatmap(
    targets: torch.Tensor, learned: torch.Tensor, out: str | Path, labels: list[str] | None = None
) -> Path:
    """Side-by-side heatmaps of the target ``M^l`` and the learned ``M^r`` over the same views."""
    fig, axes = _figure(1, 2, figsize=(12, 5.5), layout="constrained")  # room for the colour bars
    for ax, matrix, title in (
        (axes[0], targets, "target M^l (teachers, GAK)"),
        (axes[1], learned, "learned M^r (student cosine)"),
    ):
        image = ax.imshow(
            matrix.float().numpy(), vmin=min(0.0, float(matrix.min())), vmax=1.0, cmap="viridis"
        )
        ax.set_title(title)
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
            ax.set_yticks(range(len(labels)), labels, fontsize=5)
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, out)


def off_diagonal_correlation(targets: torch.Tensor, learned: torch.Tensor, keep: torch.Tensor) -> float:
    """Pearson correlation of two similarity matrices over the entries where ``keep`` is true."""
    a = targets[keep].double()
    b = learned[keep].double()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator else float("nan")


def ablation_bars(rows: dict[str, dict[str, float]], metrics: list[str], out: str | Path) -> Path:
    """Grouped bars: one group per metric, one bar per variant (``rows[variant][metric]``)."""
    fig, ax = _figure(figsize=(max(6, 1.6 * len(metrics)), 3.8))
    variants = list(rows)
    width = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        values = [rows[variant].get(m, float("nan")) for m in metrics]
        ax.bar([i + k * width for i in range(len(metrics))], values, width, label=variant)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics, fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)
