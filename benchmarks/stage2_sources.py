"""What each source of stage two's soft labels is worth: stage one, each round's network alone, their ensemble.

    python benchmarks/stage2_sources.py la|chaos [--work DIR] [--out benchmarks/results/<name>_stage2_sources.json]

Reads the stage-two work folder a ``benchmarks/{la,chaos}.py --stage2`` run left
(``<work>/.semisam/bench-stage2``; no training, no prediction) and, per round r, scores against the
ground truth on the pool (mean over images of the mean Dice over classes):

- ``labels``: the refined hard labels (what round r+1 trains on; ``pool_dice`` of the run)
- ``soft_argmax``: the argmax of the ensembled soft labels, before the refinement
- ``network``: round r's network alone, recovered exactly from the stored soft labels by inverting
  :func:`~semisam_o1.stage_two.rounds.ensemble_weights` (``soft_r = w_net net_r + w_prev soft_{r-1} + w_stage1 soft_0``)
- ``*_volume_ratio``: foreground voxels over the ground truth's (1 = no over- or under-segmentation)

Ground truth is read here only to score; nothing of it reaches stage two.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import RESULTS, write_result
from semisam_o1 import PROJECT_ROOT
from semisam_o1.evaluation import class_dice
from semisam_o1.stage_two.labels import ensemble_weights
from semisam_o1.volumes import load_image, load_label
from tqdm import tqdm

DATA = PROJECT_ROOT.parent / "shared" / "data"
DATASETS = {"la": DATA / "la" / "labels", "chaos": DATA / "chaos-t2" / "labels"}


def sources_of_round(soft: list[np.ndarray], labels: np.ndarray, truth: np.ndarray, ensemble: str, n_classes: int) -> dict:
    """One image, round ``r = len(soft) - 1``: Dice and volume ratio of each source (see the module docstring)."""
    r = len(soft) - 1
    hard = {"labels": labels, "soft_argmax": soft[r].argmax(0)}
    if r:
        w_net, w_prev, w_stage1 = ensemble_weights(ensemble, r)
        hard["network"] = ((soft[r] - w_prev * soft[r - 1] - w_stage1 * soft[0]) / w_net).argmax(0)
    foreground = max(1, int((truth > 0).sum()))
    row = {}
    for name, h in hard.items():
        row[name] = float(class_dice(h, truth, n_classes).mean())
        row[f"{name}_volume_ratio"] = float((h > 0).sum() / foreground)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(DATASETS))
    p.add_argument("--work", type=Path, default=None, help="the benchmark's datastore (default: its own, /tmp/semisam-bench/<name>)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    studies = args.work or Path("/tmp/semisam-bench") / args.name
    work = studies / ".semisam" / "bench-stage2"
    state_path = work / "state.json"
    if not state_path.exists():
        sys.exit(f"{state_path}: no stage-two run here; run benchmarks/{args.name}.py --stage2 first")
    state = json.loads(state_path.read_text())
    ensemble, n_classes = state["inputs"]["params"].get("ensemble", "mean"), int(state["n_classes"])
    rounds = len(state["rounds"])
    used = ["", *(stats.get("ensemble", ensemble) for stats in state["rounds"])]  # each round's ensemble ("auto" resolved)
    rows: dict[int, list[dict]] = {r: [] for r in range(rounds + 1)}
    for case in tqdm(state["inputs"]["pool"], desc="images", unit="image"):
        truth = load_label(DATASETS[args.name] / f"{case}.nii.gz", load_image(studies / f"{case}.nii.gz"))
        soft = []
        for r in range(rounds + 1):
            soft.append(np.load(work / f"round_{r}" / "probs" / f"{case}.npy").astype(np.float32))
            rows[r].append(sources_of_round(soft, np.load(work / f"round_{r}" / "labels" / f"{case}.npy"), truth, used[r], n_classes))
    per_round = [{"round": r, **{k: round(float(np.mean([row[k] for row in rows[r]])), 4) for k in rows[r][0]}} for r in rows]
    result = {"dataset": args.name, "ensemble": ensemble, "pool_size": len(state["inputs"]["pool"]), "published": state.get("published"),
              "per_round": per_round}
    lines = [f"{args.name}, ensemble {ensemble}: per round (pool mean Dice; volume / truth)"]
    lines += [f"  round {e['round']}: labels {e['labels']:.4f} ({e['labels_volume_ratio']:.2f}x), soft argmax {e['soft_argmax']:.4f}"
              + (f", network alone {e['network']:.4f} ({e['network_volume_ratio']:.2f}x)" if "network" in e else "") for e in per_round]
    write_result(result, args.out or RESULTS / f"{args.name}_stage2_sources_{ensemble}.json", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
