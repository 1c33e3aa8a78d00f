"""Infer round-trip through Orthanc: request -> label file on the client, features already cached.

    python benchmarks/dicomweb_latency.py [--calls 20] [--out benchmarks/results/dicomweb_latency.json]

Starts a private Orthanc (loopback, DICOMweb, basic auth) under ``benchmarks/out/dicomweb``, uploads
the real cropped hippocampus series of ``../shared/data/dicom`` and the sample template (MSD
``hippocampus_001`` written as a DICOM series), starts ``python main.py serve --studies
<orthanc>/dicom-web`` with the app's default encoder settings, saves the template label through the
app (a DICOM SEG in Orthanc), runs one cold infer per series (download, conversion, encoding,
registration) and then ``--calls`` timed infers of one series with MONAI Label's own client.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the Orthanc harness

from orthanc_harness import SHARED_DICOM, Orthanc, nifti_to_dicom_series  # noqa: E402
from semisam_o1 import PROJECT_ROOT  # noqa: E402
from semisam_o1.distributed import free_port  # noqa: E402
from semisam_o1.sample_data import find_local_source  # noqa: E402

OUT = PROJECT_ROOT / "benchmarks" / "out" / "dicomweb"
NO_INTERNET = {k: "http://127.0.0.1:9" for k in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"]}
NO_INTERNET.update({"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"})


def machine() -> dict:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}


def start_server(dicomweb: str, auth: tuple[str, str], log: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_") and k != "PYTHONPATH"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
    env.update(NO_INTERNET)
    env.update({"MONAI_LABEL_DICOMWEB_USERNAME": auth[0], "MONAI_LABEL_DICOMWEB_PASSWORD": auth[1],
                "MONAI_LABEL_DATASTORE_CACHE_PATH": str(OUT / "cache"), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    cmd = [sys.executable, str(PROJECT_ROOT / "main.py"), "serve", "--studies", dicomweb, "--port", str(port),
           "--conf", "labels", "anterior=1,posterior=2"]
    process = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).ok:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready in 180 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the server (torch intra-op threads); default: torch's own (one per core)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "dicomweb_latency.json")
    args = parser.parse_args()
    source = find_local_source()
    if source is None or not SHARED_DICOM.is_dir():
        print("error: needs ../shared/data/hippocampus and ../shared/data/dicom", file=sys.stderr)
        return 2
    from monailabel.client import MONAILabelClient

    shutil.rmtree(OUT / "orthanc", ignore_errors=True)  # a fresh Orthanc; the app's cache (features) is kept
    OUT.mkdir(parents=True, exist_ok=True)
    orthanc = Orthanc(OUT / "orthanc", username="semisam", password=secrets.token_hex(8))
    load_at_start = os.getloadavg()
    orthanc_start = orthanc.start()
    process = None
    try:
        started = time.monotonic()
        targets = {}
        for folder in sorted(SHARED_DICOM.glob("*/*HCropVolume")):
            orthanc.upload(folder)
        template = nifti_to_dicom_series(source.images / "hippocampus_001.nii.gz", OUT / "template", "Template^Hippocampus", "MSD hippocampus_001")
        orthanc.upload(OUT / "template")
        upload_s = time.monotonic() - started
        for uid, tags in orthanc.series().items():
            if tags.get("SeriesDescription") == "HippoCrop":
                targets[uid] = tags
        process, url = start_server(orthanc.dicomweb, orthanc.auth, OUT / "server.log", args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            client = MONAILabelClient(url, tmpdir=tmp)
            client.save_label(template, str(source.labels / "hippocampus_001.nii.gz"), tag="final")
            cold = {}
            for uid in targets:
                t = time.perf_counter()
                client.infer("semisam_stage_one", uid, {})
                cold[uid] = round(time.perf_counter() - t, 3)
            target = sorted(targets)[0]
            total, server_side = [], []
            for _ in range(args.calls):
                t = time.perf_counter()
                label_file, result = client.infer("semisam_stage_one", target, {})
                total.append(time.perf_counter() - t)
                server_side.append(result["latencies"]["total"])
                os.unlink(label_file)
        result = {
            "what": "POST /infer/semisam_stage_one?image=<SeriesInstanceUID> with MONAI Label's client -> label file on "
                    "the client; studies = Orthanc DICOMweb (basic auth) on loopback; features/registrations cached",
            "calls": args.calls,
            "round_trip_p50_seconds": round(float(np.percentile(total, 50)), 3),
            "round_trip_p95_seconds": round(float(np.percentile(total, 95)), 3),
            "round_trip_max_seconds": round(max(total), 3),
            "server_task_p50_seconds": round(float(np.percentile(server_side, 50)), 3),
            "round_trip_per_call_seconds": [round(t, 3) for t in total],
            "server_task_per_call_seconds": server_side,
            "cold_first_infer_seconds": cold,
            "target_series": target,
            "target_size": targets[target].get("SeriesDescription"),
            "orthanc_start_seconds": round(orthanc_start, 2),
            "upload_seconds": round(upload_s, 2),
            "server_torch_threads": args.threads or "default (one per core)",
            "conf": {"labels": "anterior=1,posterior=2", "encoder": "default (litemedsam, 64 px, axes 0,1,2, 32 dims)"},
            "machine": {**machine(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        }
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        orthanc.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"infer round trip through Orthanc: p50 {result['round_trip_p50_seconds']} s, p95 {result['round_trip_p95_seconds']} s "
          f"over {args.calls} calls (cold first calls {cold}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
