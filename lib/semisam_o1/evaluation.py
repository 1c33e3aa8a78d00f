"""Dice and HD95 per class (MONAI metrics) of label maps against ground truth, and folder-level evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from semisam_o1.volumes import InputError, load_label, read_geometry


def scores(pred: np.ndarray, truth: np.ndarray, classes: dict[str, int], spacing=None) -> dict[str, dict[str, float]]:
    """``{class: {"dice", "hd95"}}`` of ``pred`` vs ``truth`` (both (D, H, W) int); HD95 in mm.

    A class absent from both maps has Dice 1; absent from one of them, HD95 is ``nan``.
    """
    n = 1 + max(classes.values())
    onehot = lambda a: torch.nn.functional.one_hot(torch.as_tensor(np.asarray(a)).long().clamp(0, n - 1), n).permute(3, 0, 1, 2)[None].float()
    p, t = onehot(pred), onehot(truth)
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)[0]
    hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)[0]
    return {name: {"dice": float(dice[v]), "hd95": float(hd95[v])} for name, v in classes.items()}


def class_dice(pred: np.ndarray, truth: np.ndarray, n_classes: int, slab: int = 16) -> np.ndarray:
    """``(n_classes - 1,)`` Dice of each foreground class 1..n-1 of two (D, H, W) label maps (1 where a
    class is absent from both), from their confusion matrix counted slab by slab along axis 0: no one-hot
    volume (MONAI's ``compute_dice`` needs ``classes x voxels`` floats), so any size and memory maps work."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    for z in range(0, pred.shape[0], slab):
        a = np.asarray(pred[z:z + slab], np.int64).clip(0, n_classes - 1)
        b = np.asarray(truth[z:z + slab], np.int64).clip(0, n_classes - 1)
        confusion += np.bincount((a * n_classes + b).ravel(), minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    both = np.diag(confusion)[1:]
    total = confusion.sum(1)[1:] + confusion.sum(0)[1:]
    return np.where(total > 0, 2 * both / np.maximum(total, 1), 1.0)


def mean_dice(per_case: list[dict]) -> float:
    """Mean over cases and classes of :func:`scores` results."""
    return float(np.mean([[c[name]["dice"] for name in c] for c in per_case]))


def evaluate_folders(pred_dir: Path, truth_dir: Path, classes: dict[str, int]) -> dict:
    """Score every ``truth_dir/<case>.nii.gz`` that has a prediction of the same name in ``pred_dir``.

    Returns:
        ``{"cases": {case: scores}, "mean": {class: {"dice", "hd95"}}, "mean_dice": float, "missing": [...]}``.
    """
    cases, missing = {}, []
    for truth_path in sorted(Path(truth_dir).glob("*.nii*")):
        pred_path = Path(pred_dir) / truth_path.name
        if not pred_path.exists():
            missing.append(truth_path.name)
            continue
        truth_img = read_geometry(truth_path)
        truth = load_label(truth_path, truth_img, require_foreground=False)
        pred = load_label(pred_path, truth_img, require_foreground=False)
        cases[truth_path.name.split(".")[0]] = scores(pred, truth, classes, spacing=truth_img.spacing)
    if not cases:
        raise InputError(f"{pred_dir}: no prediction matches a ground-truth file of {truth_dir}")
    mean = {n: {m: float(np.nanmean([c[n][m] for c in cases.values()])) for m in ("dice", "hd95")} for n in classes}
    return {"cases": cases, "mean": mean, "mean_dice": mean_dice(list(cases.values())), "missing": missing}
