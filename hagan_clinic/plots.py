"""Figures: orthogonal mid-slices of volumes, for previews and reports (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io.files import atomic_target


def mid_slices_png(
    rows: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str = "", vmin: float = -1, vmax: float = 1
) -> Path:
    """One row per (label, volume (D, H, W)): axial, coronal and sagittal mid-slices. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for ax_row, (label, vol) in zip(axes, rows):
        d, h, w = (s // 2 for s in vol.shape)
        for ax, img, name in zip(ax_row, (vol[d], vol[:, h, :], vol[:, :, w]), ("axial", "coronal", "sagittal")):
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, origin="upper" if name == "axial" else "lower")
            ax.set_title(f"{label}: {name}" if label else name, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_target(path, ".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive: a long run would accumulate them
    return path
