"""Pictures of a pipeline run: Dice per round (PNG) and overlays of image, pseudo-label and uncertainty."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: Label colours (RGBA) for values 1, 2, ...
COLOURS = [(1.0, 0.3, 0.2, 0.45), (0.2, 0.6, 1.0, 0.45), (0.3, 0.9, 0.3, 0.45), (1.0, 0.9, 0.2, 0.45)]


def dice_per_round_plot(pool_dice: list[float], path: Path, title: str = "pseudo-label Dice per round") -> Path:
    """Line plot of mean Dice for round 0 (stage one) .. R."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(range(len(pool_dice)), pool_dice, marker="o")
    ax.set_xticks(range(len(pool_dice)))
    ax.set_xticklabels(["stage 1"] + [f"round {r}" for r in range(1, len(pool_dice))])
    ax.set_ylabel("mean Dice vs ground truth")
    ax.set_ylim(min(0.5, min(pool_dice) - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def overlay(image: np.ndarray, label: np.ndarray, uncertainty: np.ndarray | None, path: Path, title: str = "") -> Path:
    """Middle slices along each axis: image with the label on top, and the uncertainty map.

    Args:
        image: (D, H, W) intensities; label: (D, H, W) int; uncertainty: (D, H, W) entropy or ``None``.
    """
    rows = 2 if uncertainty is not None else 1
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3.2 * rows), dpi=110, squeeze=False)
    lo, hi = np.percentile(image, [0.5, 99.5])
    colours = np.zeros((int(label.max()) + 1, 4))
    for v in range(1, len(colours)):
        colours[v] = COLOURS[(v - 1) % len(COLOURS)]
    for axis in range(3):
        centre = _label_centre(label, axis)
        take = lambda a: np.take(a, centre, axis=axis).T
        ax = axes[0][axis]
        ax.imshow(take(image), cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.imshow(colours[take(label)], origin="lower")
        ax.set_title(f"axis {axis}, slice {centre}")
        ax.axis("off")
        if uncertainty is not None:
            ax = axes[1][axis]
            im = ax.imshow(take(uncertainty), cmap="magma", origin="lower")
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, label="entropy (nats)" if axis == 2 else None)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _label_centre(label: np.ndarray, axis: int) -> int:
    """Slice index through the label's centre of mass along ``axis`` (the middle slice if empty)."""
    idx = np.nonzero(label)[axis]
    return int(np.round(idx.mean())) if len(idx) else label.shape[axis] // 2
