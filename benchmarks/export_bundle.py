"""Bundle benchmark: the exported MONAI Bundle's labels against the server's, on the sample pool.

    python benchmarks/export_bundle.py [--work /tmp/semisam-bench/export-bundle] [--rounds 1] [--conf KEY VALUE ...]

A copy of the sample datastore (``sample_data.populate``: template hippocampus_001, 19 unlabelled MSD hippocampus
images, their ground truth in ``truth/``) gets a published network from ``main.py pipeline --rounds R`` (the app's
defaults otherwise; a finished run in ``--work`` is resumed, not redone). Then a real server (``main.py serve``,
``OMP_NUM_THREADS=1``, no start-up scoring) labels each pool image (``POST /infer/semisam_o1``) and hands out the
bundle (``GET /model/semisam_o1/bundle``), which ``python -m monai.bundle run`` runs on the same 19 images in a
process started outside the project (no ``PYTHONPATH``, another working folder, ``OMP_NUM_THREADS=1``).

Reported: Dice per class against the ground truth of the server's labels and of the bundle's (mean over the pool and
per image), their agreement (Dice per class between the two, voxels that differ) and the seconds of each.
Writes ``benchmarks/results/export_bundle.json``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from common import CLASSES, parser, write_result  # noqa: E402
from load import start_server  # noqa: E402
from semisam_o1 import PROJECT_ROOT  # noqa: E402
from semisam_o1.sample_data import TRUTH_DIR, load_manifest, populate  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 1.0 if not (x.any() or y.any()) else 2.0 * float((x & y).sum()) / float(x.sum() + y.sum())


def read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).astype(np.int64)


def main(argv=None) -> int:
    p = parser(__doc__, "export_bundle", test_split=False)
    p.set_defaults(work=Path("/tmp/semisam-bench/export-bundle"))
    p.add_argument("--rounds", type=int, default=1, help="stage-two rounds of the published network (default 1: minutes on 2 cores)")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[], help="app option for pipeline and serve")
    args = p.parse_args(argv)
    work, studies = args.work, args.work / "studies"
    populate(studies, progress=False)
    labels = load_manifest(studies / "manifest.json")["labels"]
    pool = sorted(p.name[: -len(".nii.gz")] for p in studies.glob("*.nii.gz") if not (studies / "labels" / "final" / p.name).exists())
    conf = [x for key, value in args.conf for x in ("--conf", key, value)]

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "main.py", "pipeline", "--studies", str(studies), "--rounds", str(args.rounds), *conf],
                          cwd=PROJECT_ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: pipeline exited with {done.returncode}:\n{done.stderr[-3000:]}")
    pipeline_seconds = time.perf_counter() - start

    server_dir, bundle_out = work / "server_labels", work / "bundle_labels"
    for folder in (server_dir, bundle_out, work / "bundle", work / "elsewhere", work / "images"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    process, url = start_server(studies, {"labels": ",".join(f"{k}={v}" for k, v in labels.items()), **dict(args.conf)},
                                work / "server.log")
    try:
        server_seconds = []
        for image_id in pool:
            start = time.perf_counter()
            res = requests.post(f"{url}/infer/semisam_o1", params={"image": image_id, "output": "image"}, timeout=600)
            server_seconds.append(time.perf_counter() - start)
            res.raise_for_status()
            (server_dir / f"{image_id}.nii.gz").write_bytes(res.content)
        start = time.perf_counter()
        res = requests.get(f"{url}/model/semisam_o1/bundle", timeout=600)
        res.raise_for_status()
        download_seconds = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(60)
    zipfile.ZipFile(io.BytesIO(res.content)).extractall(work / "bundle")
    bundle = work / "bundle" / "semisam_o1"
    for image_id in pool:
        shutil.copy(studies / f"{image_id}.nii.gz", work / "images")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                           "--bundle_root", str(bundle), "--dataset_dir", str(work / "images"), "--output_dir", str(bundle_out)],
                          cwd=work / "elsewhere", env=env, capture_output=True, text=True)
    bundle_seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"error: monai.bundle run exited with {done.returncode}:\n{done.stderr[-3000:]}")

    cases = {}
    for image_id in pool:
        truth, server, exported = (read(studies / TRUTH_DIR / f"{image_id}.nii.gz"), read(server_dir / f"{image_id}.nii.gz"),
                                   read(bundle_out / f"{image_id}_seg.nii.gz"))
        cases[image_id] = {"server_dice": {n: dice(server, truth, v) for n, v in CLASSES.items()},
                           "bundle_dice": {n: dice(exported, truth, v) for n, v in CLASSES.items()},
                           "agreement_dice": {n: dice(exported, server, v) for n, v in CLASSES.items()},
                           "voxels_differing": int((server != exported).sum()), "voxels": int(server.size)}

    def mean(key: str) -> dict:
        per_class = {n: float(np.mean([c[key][n] for c in cases.values()])) for n in CLASSES}
        return {**{n: round(v, 4) for n, v in per_class.items()}, "mean": round(float(np.mean(list(per_class.values()))), 4)}

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    result = {
        "pool": f"sample datastore: {len(pool)} unlabelled images, template hippocampus_001",
        "rounds": args.rounds, "conf": dict(args.conf), "model_version": meta.get("model_version"),
        "server_dice": mean("server_dice"), "bundle_dice": mean("bundle_dice"), "agreement_dice": mean("agreement_dice"),
        "min_agreement_dice": round(min(min(c["agreement_dice"].values()) for c in cases.values()), 6),
        "voxels_differing": sum(c["voxels_differing"] for c in cases.values()), "voxels": sum(c["voxels"] for c in cases.values()),
        "identical_images": sum(c["voxels_differing"] == 0 for c in cases.values()),
        "pipeline_seconds": round(pipeline_seconds, 1), "server_infer_seconds_per_image": round(float(np.mean(server_seconds)), 2),
        "bundle_download_seconds": round(download_seconds, 2),
        "bundle_run_seconds": round(bundle_seconds, 1), "bundle_run_seconds_note": "one process for the whole pool, imports included",
        "threads": "OMP_NUM_THREADS=1 for the server and the bundle run",
        "device": "cuda" if torch.cuda.is_available() else "cpu",  # the server's (--conf device auto) and the bundle's
        "cases": cases,
    }
    write_result(result, args.out, [
        f"server Dice {result['server_dice']}  bundle Dice {result['bundle_dice']}",
        f"agreement {result['agreement_dice']} (min {result['min_agreement_dice']}); {result['voxels_differing']} of "
        f"{result['voxels']} voxels differ; {result['identical_images']}/{len(pool)} images identical",
        f"pipeline {pipeline_seconds:.0f} s; server {result['server_infer_seconds_per_image']} s/image; bundle run {bundle_seconds:.0f} s "
        f"for {len(pool)} images",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
