"""Load benchmark: concurrent annotators against a real server process on the sample datastore.

    python benchmarks/load.py [--seconds 120] [--clients 8] [--out benchmarks/results/load.json]

A fresh copy of the sample datastore (``sample_data.populate`` into a temporary folder: template
hippocampus_001 + 19 unlabelled images) is served by ``python main.py serve`` (``OMP_NUM_THREADS=1``,
no start-up scoring job). Each client owns one pool image. Warm-up (not timed): every client saves
its image's ground truth as ``final`` (8 new templates), then the app's background stage-one refresh
(registration of each new template to every unlabelled image, encoding of the pool) runs to the end.
Then, for ``--seconds``, every client loops over requests picked at random (seeded) in equal parts:

- ``POST /infer/semisam_stage_one?image=<id>`` (stage one) on the last image next-sample gave it;
- ``POST /activelearning/random`` (next sample);
- ``PUT /datastore/label?image=<own image>&tag=final``: its ground truth with 40 random labelled voxels
  switched to the other class, a new label each time; the client keeps the array it sent;
- ``GET /datastore/?output=all`` (datastore listing).

With ``--auth`` the server runs with authentication on against the test OpenID provider (``tests/oidc/provider.mjs``,
Node.js): every client logs in as ``annotator`` through ``POST /auth/token`` (as Slicer does), sends its bearer token
with every request and logs in again before the token's 300 s lifetime ends.

Each save makes the server's background refresh run again, as in real use. Recorded: status codes
(5xx expected: none), latency per request (p50, p95, also per operation) and, after the run, whether
each client's stored ``final`` label (downloaded, and read on disk) has exactly the voxels of the
last label the server acknowledged (``labels_intact``). Encoder settings are the tests' light ones
(``--conf``): the run measures request handling under load, not first-time encoding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from common import RESULTS, machine  # noqa: E402
from semisam_o1 import PROJECT_ROOT  # noqa: E402
from semisam_o1.distributed import free_port  # noqa: E402
from semisam_o1.sample_data import TRUTH_DIR, find_local_source, load_manifest, populate  # noqa: E402
from semisam_o1.volumes import load_image, load_label, save_label  # noqa: E402

LIGHT_CONF = {"stage_one.encoder_image_size": "32", "stage_one.encoder_axes": "0", "stage_one.feature_dims": "8"}
OPERATIONS = ("infer", "next_sample", "save_label", "list")
CHANGED_VOXELS = 40


OIDC_DIR = PROJECT_ROOT / "tests" / "oidc"
#: the test provider's confidential client (tests/oidc/provider.mjs), tokens of 300 s
OIDC_CLIENT = {"client_id": "semisam-o1", "client_secret": "semisam-o1-secret"}
TOKEN_RENEW_SECONDS = 240.0


def start_provider() -> tuple[subprocess.Popen, str]:
    """The test OpenID provider on a free port: ``(process, issuer URL)``."""
    process = subprocess.Popen(["node", str(OIDC_DIR / "provider.mjs"), str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line:
        sys.exit(f"error: the OpenID provider did not start (make oidc-deps): {process.stderr.read()}")
    return process, json.loads(line)["issuer"]


class Login:
    """A bearer token for ``username`` from the server's ``/auth/token`` (Slicer's login), renewed before it expires."""

    def __init__(self, url: str, username: str):
        self.url, self.username = url, username
        self.token, self.at = None, 0.0
        self.lock = threading.Lock()

    def headers(self) -> dict:
        with self.lock:
            if self.token is None or time.monotonic() - self.at > TOKEN_RENEW_SECONDS:
                answer = requests.post(f"{self.url}/auth/token", data={"username": self.username, "password": f"{self.username}-pw"}, timeout=60)
                answer.raise_for_status()
                self.token, self.at = answer.json()["access_token"], time.monotonic()
            return {"Authorization": f"Bearer {self.token}"}


def no_login() -> dict:
    return {}


def start_server(studies: Path, conf: dict, log: Path, issuer: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_") and k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    if issuer:
        env.update({"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": issuer, "MONAI_LABEL_AUTH_CLIENT_ID": OIDC_CLIENT["client_id"],
                    "MONAI_LABEL_AUTH_CLIENT_SECRET": OIDC_CLIENT["client_secret"]})
    cmd = [sys.executable, str(PROJECT_ROOT / "main.py"), "serve", "--studies", str(studies), "--port", str(port)]
    cmd += [arg for key, value in conf.items() for arg in ("--conf", key, value)]
    process = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server exited with {process.returncode}: see {log}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code in ((401,) if issuer else (200,)):
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit(f"server not ready in 300 s: see {log}")


def wait_refresh_idle(url: str, timeout: float, headers=no_login) -> float:
    """Seconds until the app's background stage-one refresh has nothing left to do."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not requests.get(f"{url}/info/", headers=headers(), timeout=60).json()["semisam"]["pseudo_label_refresh"]["running"]:
            return time.monotonic() - start
        time.sleep(2)
    raise SystemExit(f"background refresh still running after {timeout} s")


class Client(threading.Thread):
    """One annotator: its own image, a seeded mix of requests, the labels it was told were saved."""

    def __init__(self, index: int, url: str, image_id: str, studies: Path, pool: list[str], work: Path, until: float, headers=no_login):
        super().__init__(name=f"client-{index}")
        self.headers = headers
        self.url, self.image_id, self.pool, self.until = url, image_id, pool, until
        self.rng = np.random.default_rng(index)
        self.session = requests.Session()
        self.image = load_image(studies / f"{image_id}.nii.gz")
        self.truth = load_label(studies / TRUTH_DIR / f"{image_id}.nii.gz", self.image)
        self.work = work / f"client-{index}"
        self.work.mkdir(parents=True)
        self.records: list[tuple[str, int | str, float]] = []  # (operation, status or error, seconds)
        self.acknowledged: np.ndarray | None = None  # the last label the server answered 200 for
        self.in_doubt: list[np.ndarray] = []  # saves without an answer (error): may or may not be stored
        self.target = str(self.rng.choice(pool))
        self.saves = 0

    def request(self, operation: str, method: str, path: str, **kwargs) -> requests.Response | None:
        start = time.perf_counter()
        try:
            answer = self.session.request(method, self.url + path, timeout=600, headers=self.headers(), **kwargs)
            answer.content  # the whole body
            self.records.append((operation, answer.status_code, time.perf_counter() - start))
            return answer
        except requests.RequestException as e:
            self.records.append((operation, type(e).__name__, time.perf_counter() - start))
            return None

    def new_label(self) -> np.ndarray:
        label = self.truth.copy()
        voxels = np.argwhere(label > 0)
        for d, h, w in voxels[self.rng.choice(len(voxels), CHANGED_VOXELS, replace=False)]:
            label[d, h, w] = 3 - label[d, h, w]  # anterior (1) <-> posterior (2)
        return label

    def save(self, label: np.ndarray) -> None:
        self.saves += 1
        path = save_label(label, self.image, self.work / f"{self.image_id}-{self.saves}.nii.gz")
        with open(path, "rb") as f:
            answer = self.request("save_label", "PUT", "/datastore/label", params={"image": self.image_id, "tag": "final"}, files={"label": (path.name, f)})
        path.unlink()
        if answer is None:
            self.in_doubt.append(label)
        elif answer.status_code == 200:
            self.acknowledged, self.in_doubt = label, []

    def step(self, operation: str) -> None:
        if operation == "infer":
            self.request(operation, "POST", f"/infer/semisam_stage_one?image={self.target}")
        elif operation == "next_sample":
            answer = self.request(operation, "POST", "/activelearning/random", json={"client_id": self.name})
            if answer is not None and answer.ok and answer.json().get("id") in self.pool:
                self.target = answer.json()["id"]
        elif operation == "save_label":
            self.save(self.new_label())
        else:
            self.request(operation, "GET", "/datastore/?output=all")

    def run(self) -> None:
        while time.monotonic() < self.until:
            self.step(OPERATIONS[int(self.rng.integers(len(OPERATIONS)))])

    def label_intact(self, studies: Path) -> dict:
        """The stored final label, downloaded and on disk, against the last acknowledged (or an unanswered) save."""
        expected = [a for a in [self.acknowledged, *self.in_doubt] if a is not None]
        answer = self.session.get(f"{self.url}/datastore/label", params={"label": self.image_id, "tag": "final"}, headers=self.headers(), timeout=120)
        if not answer.ok or not expected:
            return {"image": self.image_id, "saves_including_warmup": self.saves, "intact": False, "error": f"HTTP {answer.status_code}" if not answer.ok else "no save answered"}
        downloaded = self.work / f"{self.image_id}-downloaded.nii.gz"
        downloaded.write_bytes(answer.content)
        arrays = {"downloaded": load_label(downloaded, self.image), "on_disk": load_label(studies / "labels" / "final" / f"{self.image_id}.nii.gz", self.image)}
        match = {k: any(np.array_equal(a, e) for e in expected) for k, a in arrays.items()}
        return {"image": self.image_id, "saves_including_warmup": self.saves, "intact": all(match.values()),
                "matches_last_acknowledged": self.acknowledged is not None and np.array_equal(arrays["on_disk"], self.acknowledged),
                "sha256": hashlib.sha256(arrays["on_disk"].tobytes()).hexdigest()[:16]}


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_seconds": None, "p95_seconds": None}
    return {"p50_seconds": round(float(np.percentile(seconds, 50)), 3), "p95_seconds": round(float(np.percentile(seconds, 95)), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0, help="duration of the timed load (default 120)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, one pool image each (default 8)")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help=f"app option for the server (default {LIGHT_CONF})")
    p.add_argument("--warmup-timeout", type=float, default=1800.0, help="longest wait for the background refresh after the warm-up saves")
    p.add_argument("--out", type=Path, default=RESULTS / "load.json")
    p.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--auth", action="store_true", help="authentication on: the test OpenID provider, every client logged in as annotator")
    args = p.parse_args(argv)
    conf = {**LIGHT_CONF, **dict(args.conf or [])}
    provider, issuer = start_provider() if args.auth else (None, None)

    source = find_local_source()
    if source is None:
        sys.exit("error: ../shared/data/hippocampus not found (set SEMISAM_SAMPLE_SOURCE)")
    work = Path(tempfile.mkdtemp(prefix="semisam-load-"))
    studies = work / "studies"
    populate(studies, source=source, progress=False)
    manifest = load_manifest(studies / "manifest.json")
    pool = [c["id"] for c in manifest["cases"] if c["id"] != manifest["template"]]
    if not 1 <= args.clients < len(pool):
        sys.exit(f"error: --clients must be between 1 and {len(pool) - 1} (one pool image each, some left to annotate)")
    owned, unlabelled = pool[: args.clients], pool[args.clients :]

    process, url = start_server(studies, {"labels": ",".join(f"{k}={v}" for k, v in manifest["labels"].items()), **conf}, work / "server.log", issuer)
    try:
        warm = time.monotonic()
        logins = [Login(url, "annotator").headers if args.auth else no_login for _ in owned]  # one login per annotator
        clients = [Client(i, url, image_id, studies, unlabelled, work, until=0.0, headers=logins[i]) for i, image_id in enumerate(owned)]
        for client in clients:
            client.save(client.truth)
        assert all(c.acknowledged is not None for c in clients), "a warm-up save failed: see the server log"
        refresh = wait_refresh_idle(url, args.warmup_timeout, logins[0])
        warmup_seconds = time.monotonic() - warm
        print(f"warm-up: {len(clients)} templates saved, background refresh done, {warmup_seconds:.0f} s")
        for client in clients:
            client.records.clear()

        until = time.monotonic() + args.seconds
        for client in clients:
            client.until = until
            client.start()
        for client in clients:
            client.join()
        elapsed = time.monotonic() - (until - args.seconds)
        labels = [client.label_intact(studies) for client in clients]
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        if provider is not None:
            provider.terminate()

    records = [r for c in clients for r in c.records]
    statuses = Counter(str(status) for _, status, _ in records)
    per_op = defaultdict(list)
    for operation, status, seconds in records:
        per_op[operation].append((status, seconds))
    result = {
        "clients": args.clients,
        "auth": bool(args.auth),
        "seconds": args.seconds,
        "requests": len(records),
        "status_5xx": sum(1 for _, s, _ in records if isinstance(s, int) and s >= 500),
        "errors_without_answer": sum(1 for _, s, _ in records if not isinstance(s, int)),
        "labels_intact": all(entry["intact"] for entry in labels),
        **percentiles([s for _, _, s in records]),
        "status_counts": dict(statuses),
        "per_operation": {
            op: {"requests": len(v), **percentiles([s for _, s in v]), "status_counts": dict(Counter(str(s) for s, _ in v))}
            for op, v in sorted(per_op.items())
        },
        "labels": labels,
        "wall_seconds_until_last_answer": round(elapsed, 1),
        "warmup_seconds": round(warmup_seconds, 1),
        "warmup_refresh_wait_seconds": round(refresh, 1),
        "server": {"conf": conf, "OMP_NUM_THREADS": 1, "datastore": f"sample datastore ({len(pool) + 1} images), {args.clients} client images saved as final in warm-up"},
        "note": args.note,
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    kept = PROJECT_ROOT / "benchmarks" / "out" / "load-server.log"  # git-ignored: the server's side of any error
    kept.parent.mkdir(parents=True, exist_ok=True)
    if (work / "server.log").exists():
        shutil.copy(work / "server.log", kept)
        print(f"server log -> {kept}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"{result['requests']} requests from {args.clients} clients in {args.seconds:.0f} s: "
          f"5xx {result['status_5xx']}, no answer {result['errors_without_answer']}, labels intact {result['labels_intact']}, "
          f"p50 {result['p50_seconds']} s, p95 {result['p95_seconds']} s; statuses {dict(statuses)}")
    for op, entry in result["per_operation"].items():
        print(f"  {op:<12} {entry['requests']:>5} requests  p50 {entry['p50_seconds']} s  p95 {entry['p95_seconds']} s  {entry['status_counts']}")
    print(f"-> {args.out}")
    return 0 if result["status_5xx"] == 0 and result["labels_intact"] and not result["errors_without_answer"] else 1


if __name__ == "__main__":
    sys.exit(main())
