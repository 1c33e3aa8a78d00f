"""Scale benchmark: one real LA volume blown up to CT size, and stage two's memory as the pool grows.

    python benchmarks/scale.py [--sizes 512x512x300 512x512x600] [--pools 10 19] [--device cpu]

Steps, each in a fresh process so its peak RSS is its own (``ru_maxrss`` of that process):

1. ``../shared/data/la`` volume 2 (``0RZDK210BSMWAA6467LU``) resampled (linear) to each size, same
   physical extent; the LA template ``06SR5RBREL16DQ6M8LWS`` with its label is the datastore's
   template. For each size: feature extraction (cache miss -> file), stage-one infer (template
   registration on the plan's registration grid + propagation, features cached), and a network
   predict (sliding window, flip TTA) -- seconds and peak RSS each, plus cache bytes per voxel; with
   ``--steps snap``, round 0's border snapping (:func:`~semisam_o1.stage_two.boundary.snap_to_edges`) of the
   volume's own label resampled (nearest) to the size, with its soft labels memory-mapped as stage two
   keeps them.
2. One stage-two round (``--iterations`` training steps, predict, refine) with a pool of each
   ``--pools`` size of LA volumes: its peak RSS, and the ratio largest / smallest pool.

Writes ``benchmarks/results/scale.json`` (``scale_gpu.json`` with ``--device cuda``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS, PeakWhere, machine, peak_rss_bytes
from semisam_o1 import PROJECT_ROOT

LA = PROJECT_ROOT.parent / "shared" / "data" / "la"
TEMPLATE = "06SR5RBREL16DQ6M8LWS"
TARGET = "0RZDK210BSMWAA6467LU"
WORK = PROJECT_ROOT / "benchmarks" / "out" / "scale"


def la_ids() -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (LA / "images").glob("*.nii.gz"))


def resampled(size: tuple[int, int, int], out: Path) -> Path:
    """The LA target resampled to ``size`` voxels over the same physical extent (written once)."""
    import SimpleITK as sitk

    if out.exists():
        return out
    image = sitk.ReadImage(str(LA / "images" / f"{TARGET}.nii.gz"), sitk.sitkFloat32)
    spacing = [sp * n / m for sp, n, m in zip(image.GetSpacing(), image.GetSize(), size)]
    big = sitk.Resample(image, list(size), sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing, image.GetDirection(), 0.0, sitk.sitkFloat32)
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(big, str(out))
    return out


def resampled_label(size: tuple[int, int, int], out: Path) -> Path:
    """The LA target's label resampled (nearest) onto :func:`resampled`'s grid of ``size`` (written once)."""
    import SimpleITK as sitk

    if out.exists():
        return out
    label = sitk.ReadImage(str(LA / "labels" / f"{TARGET}.nii.gz"), sitk.sitkUInt8)
    spacing = [sp * n / m for sp, n, m in zip(label.GetSpacing(), label.GetSize(), size)]
    sitk.WriteImage(sitk.Resample(label, list(size), sitk.Transform(), sitk.sitkNearestNeighbor, label.GetOrigin(), spacing, label.GetDirection(), 0,
                                  sitk.sitkUInt8), str(out))
    return out


def datastore(root: Path, images: list[Path]) -> Path:
    """``root`` with the LA template (and its label as ``final``) and ``images``."""
    (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
    shutil.copy(LA / "images" / f"{TEMPLATE}.nii.gz", root)
    shutil.copy(LA / "labels" / f"{TEMPLATE}.nii.gz", root / "labels" / "final")
    for image in images:
        if not (root / image.name).exists():
            shutil.copy(image, root / image.name)
    return root


def run_step(*args: str) -> dict:
    """One measured step in a fresh process; its JSON line back."""
    cmd = [sys.executable, __file__, "--step", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ steps (child processes)
def step(name: str, studies: Path, image: str, device: str, extra: str) -> dict:
    from semisam_o1.config import AppConfig
    from semisam_o1.pool import build_stage_one

    config = AppConfig.from_conf({"labels": "atrium=1", "device": device})
    stage_one = build_stage_one(studies, config)
    start = time.perf_counter()
    result: dict = {}
    with PeakWhere() as where:
        start = _run_step(name, studies, image, extra, stage_one, result) or start
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds: less sensitive than wall time to a shared machine
    result.update(seconds=round(time.perf_counter() - start, 2), cpu_seconds=round(usage.ru_utime + usage.ru_stime, 1), peak_rss_bytes=peak_rss_bytes(),
                  peak_at=where.stack, rss_timeline=where.timeline)
    return result


def _run_step(name: str, studies: Path, image: str, extra: str, stage_one, result: dict) -> float | None:
    """Run step ``name``, adding its numbers to ``result``; returns when its timed part started (None: at the call)."""
    from semisam_o1.templates import Template
    from semisam_o1.volumes import load_image

    if name == "extract":
        img = load_image(studies / image)
        stage_one.cache.get_or_compute(img)
        result["cache_bytes_per_voxel"] = stage_one.cache.path(img.path).stat().st_size / img.array.size
        result["stride"] = list(stage_one.cache.stride(img))
    elif name == "stage1":
        template = Template(TEMPLATE, studies / f"{TEMPLATE}.nii.gz", studies / "labels" / "final" / f"{TEMPLATE}.nii.gz")
        prediction = stage_one.predict(studies / image, [template])
        result["foreground_voxels"] = int((prediction.label > 0).sum())
    elif name == "snap":
        from semisam_o1.stage_one.normalize import normalize
        from semisam_o1.stage_two.boundary import snap_to_edges
        from semisam_o1.stage_two.labels import soft_label
        from semisam_o1.stage_two.params import StageTwoParams
        from semisam_o1.volumes import load_label

        img = load_image(studies / image)
        label = load_label(WORK / "volumes" / image.replace("la_", "la_label_"), img).astype(np.uint8)
        probs_path = studies / ".semisam" / "snap-probs.npy"
        np.save(probs_path, soft_label(label, np.full(label.shape, 0.9, np.float16), 2))  # (unmeasured set-up: stage one writes it)
        import psutil

        result["rss_before_bytes"] = psutil.Process().memory_info().rss
        probs = np.load(probs_path, mmap_mode="r+")
        start = time.perf_counter()
        snapped = snap_to_edges(normalize(img.array, stage_one.cache.modality), label, img.spacing, probs, StageTwoParams().boundary_beta)
        probs.flush()
        result["foreground_voxels"] = int((label > 0).sum())
        result["changed_fraction"] = round(float((snapped != label).sum() / max((label > 0).sum(), 1)), 4)
        return start
    elif name == "predict":
        from semisam_o1.stage_one.normalize import normalize
        from semisam_o1.stage_two.network import predict_with_uncertainty
        from semisam_o1.stage_two.training import train_network
        from semisam_o1.stage_two.params import TrainParams
        from semisam_o1.volumes import load_label

        tpl = load_image(studies / f"{TEMPLATE}.nii.gz")
        params = TrainParams(iterations=10)
        net = train_network([normalize(tpl.array)], [load_label(studies / "labels" / "final" / f"{TEMPLATE}.nii.gz", tpl)], 2, params, device=stage_one.cache.device)
        img = load_image(studies / image)
        start = time.perf_counter()
        # one pass (no flip TTA: the served infer runs 4 flipped passes, ~4x these seconds)
        predict_with_uncertainty(net, normalize(img.array), params.patch, mc_samples=0, flips=False, device=stage_one.cache.device)
        return start
    elif name == "round":
        from semisam_o1.pool import open_datastore
        from semisam_o1.stage_two.params import StageTwoParams, TrainParams
        from semisam_o1.stage_two.rounds import StageTwo
        from semisam_o1.templates import find_templates

        pool_ids = extra.split(",")
        templates = find_templates(open_datastore(studies))
        work = studies / ".semisam" / f"stage2-pool{len(pool_ids)}"
        keep = ("round_0", "images", "positions")  # made once per pool (stage one's labels, normalised images, positions): not the round
        for path in work.glob("*") if work.exists() else []:
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for warm in studies.glob(".semisam/stage2-pool*"):  # the unmeasured warm-up of the largest pool made them
            for sub in (Path("images"), Path("positions"), Path("round_0") / "labels", Path("round_0") / "probs"):
                for f in (warm / sub).glob("*"):
                    if f.name.split(".")[0] in [*pool_ids, TEMPLATE] and not (work / sub / f.name).exists():
                        (work / sub).mkdir(parents=True, exist_ok=True)
                        shutil.copy(f, work / sub / f.name)
        stage_two = StageTwo(studies, stage_one, StageTwoParams(rounds=1, train=TrainParams(iterations=int(image))), work=work)
        # stage one's labels and the images of the pool come from the warm-up call: this one measures the round
        stage_two.run(templates, {i: studies / f"{i}.nii.gz" for i in pool_ids})
    return None


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", nargs=5, metavar=("NAME", "STUDIES", "IMAGE", "DEVICE", "EXTRA"))
    p.add_argument("--sizes", nargs="*", default=["512x512x300", "512x512x600"])
    p.add_argument("--steps", nargs="*", default=["extract", "stage1", "predict"], help="which steps to run for each size (others keep their last result)")
    p.add_argument("--pools", nargs="*", type=int, default=[10, 19])
    p.add_argument("--iterations", type=int, default=100, help="training steps of the measured stage-two round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pool-work", type=Path, default=WORK / "pool",
                   help="datastore of the LA pool (e.g. benchmarks/la.py's work folder, to reuse its cached features)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip-warm-up", action="store_true", help="the largest pool's stage-one labels and images are already there")
    args = p.parse_args(argv)
    if args.step:
        name, studies, image, device, extra = args.step
        result = step(name, Path(studies), image, device, extra)
        # each step's result is also kept beside its datastore (a run stopped midway keeps what it measured)
        (Path(studies) / f"step-{name}-{image}.json").write_text(json.dumps(result))
        print(json.dumps(result))
        return 0

    out = args.out or RESULTS / ("scale_gpu.json" if args.device.startswith("cuda") else "scale.json")
    result: dict = json.loads(out.read_text()) if out.exists() else {}  # parts run separately add up
    result["device"] = args.device
    for text in args.sizes:
        size = tuple(int(v) for v in text.split("x"))
        studies = datastore(WORK / f"ct{text}", [resampled(size, WORK / "volumes" / f"la_{text}.nii.gz")])
        if "snap" in args.steps:
            resampled_label(size, WORK / "volumes" / f"la_label_{text}.nii.gz")
        image = f"la_{text}.nii.gz"
        for name in args.steps:
            r = run_step(name, str(studies), image, args.device, "-")
            result[f"{name}_{text}"] = r
            print(f"{text} {name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB at {' > '.join(r['peak_at'][-3:])}", flush=True)
            write(result, out)
        steps = [result.get(f"{n}_{text}") for n in ("extract", "stage1", "predict")]
        if all(steps):
            result[f"peak_rss_bytes_{text}"] = max(r["peak_rss_bytes"] for r in steps)
            result[f"seconds_{text}"] = round(sum(r["seconds"] for r in steps), 1)

    write(result, out)
    if not args.pools:
        return 0
    pool_all = [i for i in la_ids() if i != TEMPLATE]
    studies = datastore(args.pool_work, [LA / "images" / f"{i}.nii.gz" for i in pool_all])
    # unmeasured: features, registrations and stage-one labels of the largest pool (the others are subsets)
    if not args.skip_warm_up:
        run_step("round", str(studies), "1", args.device, ",".join(pool_all[:max(args.pools)]))
    rounds = {}
    for n in args.pools:
        r = run_step("round", str(studies), str(args.iterations), args.device, ",".join(pool_all[:n]))
        rounds[n] = r
        print(f"stage-two round, pool {n}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    result["stage_two_round"] = {str(k): v for k, v in rounds.items()}
    lo, hi = min(args.pools), max(args.pools)
    result["round_peak_rss_ratio_20_over_10"] = round(rounds[hi]["peak_rss_bytes"] / rounds[lo]["peak_rss_bytes"], 3)
    result["round_pools"] = [lo, hi]
    write(result, out)
    print(f"round peak RSS ratio {hi}/{lo}: {result['round_peak_rss_ratio_20_over_10']}")
    return 0


def write(result: dict, out: Path) -> None:
    result["machine"] = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
