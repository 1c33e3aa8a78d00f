"""Pictures of a pipeline run: Dice per round (PNG) and overlays of image, pseudo-label and uncertainty."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: Label colours (RGBA) for values 1, 2, ...
COLOURS = [(1.0, 0.3, 0.2, 0.45), (0.2, 0.6, 1.0, 0.45), (0.3, 0.9, 0.3, 0.45), (1.0, 0.9, 0.2, 0.45)]


def curve_plot(curves: dict[str, dict[int, float]], path: Path, xlabel: str, ylabel: str, title: str = "",
               xticklabels: dict[int, str] | None = None) -> Path:
    """Line plot of one or more named curves ``{name: {x: y}}`` (e.g. Dice per round, per label count)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
    for name, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o", label=name)
    xs = sorted({x for c in curves.values() for x in c})
    ax.set_xticks(xs)
    if xticklabels:
        ax.set_xticklabels([xticklabels.get(x, str(x)) for x in xs])
    lowest = min(y for c in curves.values() for y in c.values())
    ax.set_ylim(min(0.5, lowest - 0.05), 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def dice_per_round_plot(pool_dice: list[float], path: Path, title: str = "pseudo-label Dice per round") -> Path:
    """Mean Dice for round 0 (stage one) .. R."""
    ticks = {0: "stage 1", **{r: f"round {r}" for r in range(1, len(pool_dice))}}
    return curve_plot({"pool": dict(enumerate(pool_dice))}, path, "", "mean Dice vs ground truth", title, ticks)


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
