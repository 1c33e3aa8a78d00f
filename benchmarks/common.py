"""What the benchmarks share: the MSD hippocampus work datastore, the split, the machine record, JSON output.

Every benchmark works in ``benchmarks/out/stage1`` (git-ignored) so features and registrations are
computed once for all of them; results go to ``benchmarks/results/<name>.json`` (committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from semisam_o1 import PROJECT_ROOT
from semisam_o1.sample_data import SourceDir, find_local_source

CLASSES = {"anterior": 1, "posterior": 2}
WORK = PROJECT_ROOT / "benchmarks" / "out" / "stage1"
RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}


def with_training_seed(params, seed: int):
    """``params`` (a :class:`~semisam_o1.stage_two.rounds.StageTwoParams`) with every network trained with ``seed`` (``--seed``)."""
    return replace(params, train=replace(params.train, seed=seed))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakWhere:
    """Where the peak RSS happens: a thread samples this process's RSS every ``interval`` s and, each
    time it reaches a new high, records the main thread's innermost project frames.

    ``with PeakWhere() as w: ...`` then ``w.rss`` (bytes, sampled; ``ru_maxrss`` stays the exact peak),
    ``w.stack``: ``["file.py:line function", ...]``, innermost last, and ``w.timeline``: one
    ``[seconds, GiB, innermost frame]`` each time the RSS first passes another ``step`` bytes.
    """

    def __init__(self, interval: float = 0.02, frames: int = 6, step: int = 1 << 28):
        import threading

        self.interval, self.frames, self.step = interval, frames, step
        self.rss, self.stack, self.timeline, self._bucket = 0, [], [], -1
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as statm:
            while not self._stop.wait(self.interval):
                statm.seek(0)
                rss = int(statm.read().split()[1]) * page
                if rss > self.rss:
                    self.rss = rss
                    frame = sys._current_frames().get(self._main)
                    stack = []
                    while frame is not None:
                        code = frame.f_code
                        if "semisam_o1" in code.co_filename or "benchmarks" in code.co_filename:
                            stack.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
                        frame = frame.f_back
                    self.stack = stack[: self.frames][::-1]
                    if rss // self.step > self._bucket:
                        self._bucket = rss // self.step
                        self.timeline.append([round(time.perf_counter() - self._start, 1), round(rss / 2**30, 2), stack[0] if stack else ""])

    def __enter__(self) -> "PeakWhere":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def parser(doc: str, name: str, test_split: bool = True) -> argparse.ArgumentParser:
    """Options every benchmark has: ``--template``, ``--work``, ``--out`` (and the fixed test split)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--template", default="hippocampus_001")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    if test_split:
        p.add_argument("--test", type=int, default=15, help="size of the fixed test set (the last ids), never used for labels")
        p.add_argument("--pool", type=int, default=None, help="limit the pool to its first N volumes")
    return p


def source_or_exit() -> SourceDir:
    source = find_local_source()
    if source is None:
        sys.exit("error: ../shared/data/hippocampus not found (set SEMISAM_SAMPLE_SOURCE)")
    return source


def build_datastore(root: Path, source, template: str, limit: int | None) -> tuple[Path, list[str]]:
    """Images copied into ``root``, the template's label as its only ``final`` label; returns (root, other ids)."""
    ids = sorted(p.name[: -len(".nii.gz")] for p in source.images.glob("*.nii.gz"))
    pool = [i for i in ids if i != template][:limit]
    (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for case in [template, *pool]:
        dst = root / f"{case}.nii.gz"
        if not dst.exists():
            shutil.copy(source.images / f"{case}.nii.gz", dst)
    shutil.copy(source.labels / f"{template}.nii.gz", root / "labels" / "final" / f"{template}.nii.gz")
    return root, pool


def split(args, others: list[str]) -> tuple[list[str], list[str]]:
    """``(test ids, pool ids)``: the last ``--test`` ids are the test set, the rest (``--pool`` first) the pool."""
    return others[-args.test :], others[: -args.test][: args.pool]


def write_result(result: dict, out: Path, lines: list[str]) -> None:
    """Add ``machine``, write ``out`` as JSON and print the summary ``lines``."""
    result["machine"] = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for line in lines:
        print(line)
    print(f"-> {out}")
