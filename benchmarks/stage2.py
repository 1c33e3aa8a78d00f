"""Stage-two benchmark: one-label self-training vs its lower and upper bounds, in one run.

    python benchmarks/stage2.py [--rounds 3] [--iterations N] [--test 15] [--pool 30] [--variants none,voxel,volume] [--seed 0]
                                [--conf KEY VALUE ...] [--out benchmarks/results/stage2.json]

MSD Task04 hippocampus, template hippocampus_001; the last ``--test`` volumes (sorted ids) are a
fixed test set never used for training labels; the rest is the unlabelled pool. With the same
network and training budget it reports test Dice of: the template-only network (lower bound),
stage one's propagation (also with its borders snapped as stage two's round 0 snaps them, and the
paper's prototype stage one, same features), the single-atlas
peer ANTs SyN, SemiSAM-O1 after each round (plus the pool Dice of its pseudo-labels) with the
app's default (no refinement), the paper's voxel-level refinement and the published code's
volume-level refinement (ablations, ``--variants``), and full supervision on the pool's ground truth
(upper bound; with ``--conf warm_start true`` also trained for as many steps as the published round's network
had in all, ``full_supervision_same_steps``); wall time per round and peak RSS. Features and registrations are shared with
``benchmarks/stage1.py`` (same work folder), so run that first to skip encoding.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time

from atlas_bench import ants_syn
from common import (CLASSES, build_datastore, parser, peak_rss_bytes, source_or_exit, split, with_training_seed,
                    write_result)
from semisam_o1.config import AppConfig
from semisam_o1.evaluation import mean_dice, scores
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.stage_one.normalize import normalize
from semisam_o1.stage_one.predictor import StageOne
from semisam_o1.stage_two.boundary import snap_to_edges
from semisam_o1.stage_two.network import load_network, predict_with_uncertainty
from semisam_o1.stage_two.training import train_network
from semisam_o1.stage_two.rounds import StageTwo
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_image, load_label
from tqdm import tqdm


def network_dice(net, cases: dict, patch) -> float:
    """Test Dice of a network (flip TTA, no MC dropout: what the infer task serves)."""
    out = []
    for image, truth in cases.values():
        prob, _ = predict_with_uncertainty(net, normalize(image.array), patch, mc_samples=0)
        out.append(scores(prob.argmax(0), truth, CLASSES))
    return mean_dice(out)


#: Label-free round-quality signals stage two records per round, and their sign (+1: higher is better).
CRITERIA = {"network_entropy": -1, "agreement_with_stage_one": +1, "template_dice": +1, "labels_agreement_with_stage_one": +1, "mean_entropy": -1}


def main(argv=None) -> int:
    p = parser(__doc__, "stage2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", default="auto", help="training iterations (default: the app's, planned: 1000 for these crops)")
    p.add_argument("--variants", default="none,voxel,volume",
                   help="refinements run, the first is the one reported per round: none (the app's default), voxel (the paper's), volume (the published code's)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every network in the run (repeat with others to measure the spread)")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[], help="app option, e.g. pseudo_templates 3")
    args = p.parse_args(argv)

    source = source_or_exit()
    studies, everything = build_datastore(args.work, source, args.template, None)
    test_ids, pool_ids = split(args, everything)
    config = AppConfig.from_conf({"labels": "anterior=1,posterior=2", "rounds": str(args.rounds), "iterations": str(args.iterations), **dict(args.conf)})
    stage_one = build_stage_one(studies, config)
    templates = find_templates(open_datastore(studies))
    load = lambda i: (lambda img: (img, load_label(source.labels / f"{i}.nii.gz", img)))(load_image(studies / f"{i}.nii.gz"))
    test = {i: load(i) for i in test_ids}
    pool = {i: load(i) for i in pool_ids}
    params = config.stage_two_params()
    params = with_training_seed(params, args.seed)
    patch = params.train.patch
    result: dict = {"template": args.template, "test_ids": test_ids, "pool_size": len(pool_ids), "params": dataclasses.asdict(params)}

    # stage one on the test set and the pool (propagation only, no network)
    s1_labels = {i: stage_one.predict(img.path, templates).label for i, (img, _) in tqdm(test.items(), desc="stage 1 test")}
    result["dice_stage1"] = mean_dice([scores(s1_labels[i], truth, CLASSES) for i, (_, truth) in test.items()])
    # stage one's test labels with the borders stage two's round 0 gets (boundary "edges"): how much of stage two's gain the snap alone gives
    result["dice_stage1_snapped"] = mean_dice([scores(snap_to_edges(normalize(img.array), s1_labels[i], img.spacing, beta=params.boundary_beta), truth, CLASSES)
                                               for i, (img, truth) in test.items()])
    paper = StageOne(studies, stage_one.cache, stage_one.label_values, propagation="prototype")  # the paper's stage one, same features
    result["dice_prototype_stage1"] = mean_dice([scores(paper.predict(img.path, templates).label, truth, CLASSES) for img, truth in test.values()])
    # the single-atlas registration a user would pick instead (ANTs SyN, full resolution, nearest-neighbour label)
    result["dice_ants_syn"] = mean_dice([scores(ants_syn(img.path, templates[0].image_path, templates[0].label_path), truth, CLASSES)
                                         for img, truth in tqdm(test.values(), desc="ANTs SyN test")])

    # bounds: the same network and budget on the template alone / on the pool's ground truth
    tpl_img = load_image(templates[0].image_path)
    tpl_lab = load_label(templates[0].label_path, tpl_img)
    start = time.perf_counter()
    train = StageTwo(studies, stage_one, params).train_params([tpl_lab], 1 + len(CLASSES), tpl_img)  # the same network: stage two's flips and rotations
    net = train_network([normalize(tpl_img.array)], [tpl_lab], 1 + len(CLASSES), train)
    result["dice_template_only"] = network_dice(net, test, patch)
    full_images, full_labels = [normalize(tpl_img.array)] + [normalize(i.array) for i, _ in pool.values()], [tpl_lab] + [t for _, t in pool.values()]
    net = train_network(full_images, full_labels, 1 + len(CLASSES), train)
    result["dice_full_supervision"] = network_dice(net, test, patch)
    result["seconds_per_training"] = (time.perf_counter() - start) / 2

    # SemiSAM-O1 (voxel-level) and the volume-level ablation, from scratch in their own folders
    variants, states = {}, {}
    for refinement in args.variants.split(","):
        work = args.work / ".semisam" / f"bench-stage2-{refinement}"
        if work.exists():
            shutil.rmtree(work)
        two = StageTwo(studies, stage_one, dataclasses.replace(params, refinement=refinement), work=work)
        state = states[refinement] = two.run(templates, {i: img.path for i, (img, _) in pool.items()}, progress=True)
        per_round = []
        for r in range(0, len(state["rounds"]) + 1):  # fewer than --rounds when rounds stopped early
            pool_d = mean_dice([scores(load_label(two.labels_dir(r) / f"{i}.nii.gz", img, require_foreground=False), truth, CLASSES) for i, (img, truth) in pool.items()])
            entry = {"round": r, "pool_pseudo_label_dice": pool_d}
            if r:
                net = load_network(work / f"round_{r}" / "model.pt")
                entry["test_dice"] = network_dice(net, test, patch)
                entry.update({k: state["rounds"][r - 1].get(k) for k in ("seconds", "uncertain_voxels", "changed_per_class", *CRITERIA, "ensemble",
                                                                      "replace_confidence", "kept_previous_fraction", "network_volume_ratio",
                                                                      "network_volume_change")})
            per_round.append(entry)
            print(refinement, json.dumps(entry))
        variants[refinement] = per_round

    main_variant = args.variants.split(",")[0]
    rounds = variants[main_variant]
    result.update(
        {
            "dice_per_round": [r["test_dice"] for r in rounds[1:]],
            "pool_dice_per_round": [r["pool_pseudo_label_dice"] for r in rounds],
            "refinement": main_variant,
            "dice_volume_level_ablation": variants["volume"][-1]["test_dice"] if "volume" in variants and main_variant != "volume" else None,
            "dice_voxel_level": variants["voxel"][-1]["test_dice"] if "voxel" in variants and main_variant != "voxel" else None,
            "per_round": rounds,
            **{f"{name}_level_per_round": variants.get(name) for name in ("volume", "voxel")},
            "seconds_per_round": [r["seconds"] for r in rounds[1:]],
            "peak_rss_bytes": peak_rss_bytes(),
        }
    )
    result["published"] = states[main_variant].get("published")
    result["pseudo_templates"] = states[main_variant].get("pseudo_templates", [])
    result["pseudo_templates_volume_change"] = states[main_variant].get("pseudo_templates_volume_change")
    result["pseudo_templates_note"] = states[main_variant].get("pseudo_templates_note")
    result["boundary_changed"] = states[main_variant].get("boundary_changed")
    result["conf"] = dict(args.conf)
    published = StageTwo.published(states[main_variant])
    result["dice_final"] = rounds[published]["test_dice"]  # the published model's test Dice
    result["ratio_to_full_supervision"] = result["dice_final"] / result["dice_full_supervision"]
    if params.warm_start and published > 1:  # the published network trained `published` rounds' steps: so does this peer
        steps = published * train.iterations
        net = train_network(full_images, full_labels, 1 + len(CLASSES), dataclasses.replace(train, iterations=steps))
        result["full_supervision_same_steps"] = {"iterations": steps, "dice": network_dice(net, test, patch)}
        result["ratio_to_full_supervision_same_steps"] = result["dice_final"] / result["full_supervision_same_steps"]["dice"]
    result["ratio_to_stage1"] = result["dice_final"] / result["dice_stage1"]
    result["ratio_to_ants_syn"] = result["dice_final"] / result["dice_ants_syn"]
    # which round each label-free criterion would publish, and that round's test Dice (never used to choose)
    result["round_chosen_by"] = {
        name: {"round": best["round"], "test_dice": best["test_dice"]}
        for name, sign in CRITERIA.items()
        for best in [max(rounds[1:], key=lambda r: sign * r[name])]
    }
    write_result(result, args.out, [
        f"template only {result['dice_template_only']:.3f} | stage 1 {result['dice_stage1']:.3f} (borders snapped {result['dice_stage1_snapped']:.3f}; paper's prototypes {result['dice_prototype_stage1']:.3f}) | rounds {[round(d, 3) for d in result['dice_per_round']]}",
        f"volume-level ablation {result['dice_volume_level_ablation']} | full supervision {result['dice_full_supervision']:.3f} | ANTs SyN {result['dice_ants_syn']:.3f}",
        f"published round {result['published']} -> {result['dice_final']:.3f} (x{result['ratio_to_stage1']:.3f} stage one, x{result['ratio_to_ants_syn']:.3f} ANTs SyN)",
        f"ratio final/full {result['ratio_to_full_supervision']:.3f} (same steps: {result.get('ratio_to_full_supervision_same_steps')}); pool pseudo-label Dice per round {[round(d, 3) for d in result['pool_dice_per_round']]}",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
