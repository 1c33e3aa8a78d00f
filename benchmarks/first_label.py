"""The first label: the ``representative`` strategy's pick against the issue's 3 protocol templates, and the O1 -> Ok curve.

Per dataset (the matrix's: ``../shared/data/{hippocampus,la,chaos-t2,kbp-ct}``, work datastores shared with
``matrix.py`` so cached features and registrations are reused):

1. ``recommended_template``: what the ``representative`` strategy serves on a datastore with no label
   (:func:`semisam_o1.representative.most_representative` over every image of the dataset), timed from
   cold (``selection_seconds``; ``selection_seconds_200_images``: the 200-image estimate, per thumbnail
   registration: ``selection_registrations`` here, 200 x 24 - 24 there).
2. Stage one from the recommended template and from each protocol template (:func:`matrix.choose_templates`:
   the suggested one and 2 drawn with ``default_rng(0)``) on the SAME targets: the dataset's ids minus every
   template used anywhere in this run, sorted, the first ``limit``. ``mean_template_stage1_dice`` is the mean of
   the 3 protocol templates' means.
3. ``curve``: stage-one Dice on the same targets with 1, 2, 3, 5 real labels, the labels taken in the order
   the ``representative`` strategy serves them (greedy k-medoids coverage; each served image becomes a label)
   and in 3 random orders (``default_rng(1..3)`` over the ids but the protocol templates, whatever the strategy picks). ``final_dice`` (stage two per
   point) is ``null``: not measured (see ``final_dice_note``).

4. ``candidates`` (``--candidates N``): stage one from at least N single templates (the pick, the protocol's 3,
   every template the output already has all cases of, the rest drawn with ``default_rng(0)``), each on the
   targets minus itself, with the strategy's cost of each
   (``representative_cost``): where the pick ranks among the choices (``recommended_rank_among_candidates``)
   and whether the cost predicts the Dice at all.

Writes ``benchmarks/results/first_label_<dataset>.json`` after every stage-one case (``complete``: false until done), and\nthe curve as ``first_label_<dataset>.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from atlas_bench import Extraction, copy_images, stage_one_columns
from common import RESULTS, machine
from matrix import DATA, DATASETS, ORDER, choose_templates, ids_of
from semisam_o1.config import AppConfig
from semisam_o1.pool import build_stage_one
from semisam_o1.report import curve_plot
from semisam_o1.representative import Thumbnails, coverage_ranking, most_representative, partners
from semisam_o1.stage_one.plan import resolve_device
from semisam_o1.templates import Template
from semisam_o1.volumes import load_image, load_label

LABEL_COUNTS = (1, 2, 3, 5)
RANDOM_ORDERS = 3


def registrations(n: int) -> int:
    """Thumbnail registrations the ``representative`` strategy runs for a pool of ``n`` images (each to its partners)."""
    return n * len(partners(n)) - len(partners(n))


def representative_order(paths: dict[str, Path], thumbnails: Thumbnails, n: int) -> list[str]:
    """The first ``n`` images the ``representative`` strategy serves, each labelled before the next is chosen."""
    ids, d = thumbnails.pool_distances(paths)
    chosen: list[int] = []
    for _ in range(n):
        costs = coverage_ranking(d, [c for c in range(len(ids)) if c not in chosen], chosen)
        chosen.append(min(costs, key=lambda c: (costs[c], c)))
    return [ids[c] for c in chosen]


def run_dataset(name: str, args) -> dict:
    ds = DATASETS[name]
    ids = ids_of(ds)
    images = DATA / ds.folder / "images"
    labels = DATA / ds.folder / "labels"
    studies = args.work / name
    copy_images(images, studies, ids)
    conf = {"labels": ",".join(f"{n}={v}" for n, v in ds.classes.items())}
    config = AppConfig.from_conf(conf)
    stage_one = build_stage_one(studies, config)
    modality = stage_one.cache.plan.modality
    paths = {i: images / f"{i}.nii.gz" for i in ids}

    thumbnails = Thumbnails(modality)
    start = time.perf_counter()
    ranking = most_representative(paths, modality, thumbnails=thumbnails)
    selection_seconds = time.perf_counter() - start
    recommended = ranking[0][0]
    protocol = choose_templates(ids, ds.suggested, 3)
    max_labels = min(max(LABEL_COUNTS), args.max_labels)
    counts = [k for k in LABEL_COUNTS if k <= max_labels]
    orders = {"representative": representative_order(paths, thumbnails, max_labels)}
    assert orders["representative"][0] == recommended
    used = {*protocol, *orders["representative"]}
    pinned = set(args.targets.split(",")) if args.targets else set()
    others = [i for i in ids if i not in protocol and i not in pinned]  # the same random orders whatever the strategy picks
    for seed in range(1, RANDOM_ORDERS + 1):
        orders[f"random_{seed}"] = [others[int(j)] for j in np.random.default_rng(seed).permutation(len(others))[:max_labels]]
    reserved = {*protocol, recommended} if args.no_curve else {*used, *(i for o in orders.values() for i in o)}
    targets = sorted(pinned) if pinned else [i for i in ids if i not in reserved][: args.limit]
    print(f"== {name}: recommended {recommended} ({selection_seconds:.1f} s); protocol {protocol}; {len(targets)} targets; "
          f"orders {json.dumps(orders)}", flush=True)

    features = Extraction(studies, stage_one.cache, conf, child=False, timing_name=f"extraction_timing_{stage_one.cache.settings_id}.json")
    features(protocol[0])  # the matrix fits the feature basis on the suggested template: same cache
    truths = {t: load_label(labels / f"{t}.nii.gz", load_image(studies / f"{t}.nii.gz")) for t in targets}
    out = args.out or RESULTS / f"first_label_{name}.json"
    done: dict[str, dict] = {}
    if out.exists() and args.resume:
        done = json.loads(out.read_text()).get("stage1_cases", {})

    def stage_one_dice(template_ids: list[str]) -> float:
        """Mean stage-one Dice over ``targets`` (minus the templates themselves) from ``template_ids``."""
        key = "+".join(sorted(template_ids))
        rows = done.setdefault(key, {})
        templates = [Template(t, studies / f"{t}.nii.gz", labels / f"{t}.nii.gz") for t in sorted(template_ids)]
        for t in template_ids:
            features(t)
        cases = [c for c in targets if c not in template_ids]
        for case in cases:
            if case not in rows:
                features(case)
                row = stage_one_columns(stage_one, studies / f"{case}.nii.gz", templates, truths[case], ds.classes, "stage1")
                rows[case] = {"dice": float(np.mean(list(row["stage1"].values()))), "per_class": row["stage1"], "seconds": row["stage1_seconds"]}
                write(partial=True)
        return round(float(np.mean([rows[c]["dice"] for c in cases])), 4)

    def write(partial: bool) -> dict:
        result = {"dataset": name, "complete": not partial, "recommended_template": recommended, "protocol_templates": protocol,
                  "selection": "representative: the pool's medoid under affinely aligned thumbnail correlation (semisam_o1.representative)",
                  "selection_seconds": round(selection_seconds, 2), "selection_images": len(ids),
                  "selection_seconds_per_image": round(selection_seconds / len(ids), 3),
                  "selection_registrations": registrations(len(ids)),
                  "selection_seconds_200_images": round(selection_seconds / registrations(len(ids)) * registrations(200), 1),
                  "targets": targets, "orders": orders, "modality": modality, "feature_settings": stage_one.cache.settings_id,
                  "device": resolve_device(config.device), "note": args.note, **summary, "stage1_cases": done, "machine": machine()}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)
        return result

    summary: dict = {"recommended_stage1_dice": None, "mean_template_stage1_dice": None, "recommended_final_dice": None,
                     "final_dice_note": "stage two per template / per curve point not run (about 10-40 min each on 2 CPU cores)",
                     "protocol_stage1_dice": {}, "curve": []}
    summary["recommended_stage1_dice"] = stage_one_dice([recommended])
    for t in protocol:
        summary["protocol_stage1_dice"][t] = stage_one_dice([t])
    summary["mean_template_stage1_dice"] = round(float(np.mean(list(summary["protocol_stage1_dice"].values()))), 4)
    summary["recommended_minus_protocol_mean"] = round(summary["recommended_stage1_dice"] - summary["mean_template_stage1_dice"], 4)
    write(partial=True)
    if args.candidates:
        # every image (or a seeded draw of them) as the single template: how good is the pick among all choices?
        costs = dict(ranking)
        chosen = {recommended, *protocol}
        chosen |= {t for t in ids if all(c in done.get(t, {}) for c in targets if c != t)}  # measured before: free
        pool = [i for i in ids if i not in chosen]
        chosen |= {pool[int(j)] for j in np.random.default_rng(0).permutation(len(pool))[: max(0, args.candidates - len(chosen))]}
        summary["candidates"] = {}
        for t in sorted(chosen, key=lambda i: costs[i]):
            summary["candidates"][t] = {"stage1_dice": stage_one_dice([t]), "representative_cost": round(costs[t], 5)}
            write(partial=True)
        dice = np.array([c["stage1_dice"] for c in summary["candidates"].values()])
        summary["recommended_rank_among_candidates"] = int((dice > summary["recommended_stage1_dice"]).sum()) + 1
        summary["candidates_stage1_dice_mean"] = round(float(dice.mean()), 4)
        write(partial=True)
    if not args.no_curve:
        for k in counts:
            for strategy, order in orders.items():
                summary["curve"].append({"labels": k, "strategy": strategy, "templates": order[:k], "stage1_dice": stage_one_dice(order[:k]),
                                         "final_dice": None})
                write(partial=True)
        for k in counts:
            rnd = [c["stage1_dice"] for c in summary["curve"] if c["labels"] == k and c["strategy"].startswith("random")]
            rep = next(c["stage1_dice"] for c in summary["curve"] if c["labels"] == k and c["strategy"] == "representative")
            summary.setdefault("representative_minus_random_mean", {})[str(k)] = round(rep - float(np.mean(rnd)), 4)
    result = write(partial=False)
    if result["curve"]:
        curves: dict[str, dict[int, float]] = {}
        for c in result["curve"]:
            curves.setdefault(c["strategy"], {})[c["labels"]] = c["stage1_dice"]
        curve_plot(curves, out.with_suffix(".png"), "real labels", "stage-one Dice (same targets)",
                   f"{name}: labels in the order 'representative' serves them vs random")
    print(f"== {name}: recommended {result['recommended_stage1_dice']} vs protocol mean {result['mean_template_stage1_dice']} "
          f"{json.dumps(result['protocol_stage1_dice'])}; curve gains {json.dumps(result.get('representative_minus_random_mean'))}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=[*ORDER, "all"], default="all")
    p.add_argument("--limit", type=int, default=15, help="targets (default 15; fewer where the dataset has fewer images left)")
    p.add_argument("--max-labels", type=int, default=5, help="the curve's largest label count (1, 2, 3, 5)")
    p.add_argument("--no-curve", action="store_true", help="the first label only")
    p.add_argument("--targets", default="", help="comma-separated target ids instead of the rule above (e.g. an earlier run's, "
                                                 "so its cases are reused); a template among them is scored on the others")
    p.add_argument("--candidates", type=int, default=0,
                   help="also stage one from at least this many single templates (the pick, the protocol's 3, those the output "
                        "already has every case of, the rest drawn with default_rng(0)), each on the targets minus itself: "
                        "where the pick ranks among the choices")
    p.add_argument("--work", type=Path, default=Path("/tmp/semisam-matrix"), help="parent of the per-dataset work datastores")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resume", action="store_true", help="keep the stage-one cases the output JSON already has")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    for name in ORDER if args.dataset == "all" else (args.dataset,):
        run_dataset(name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
