"""Hippocampus (MSD Task04): stage one vs ANTs SyN vs the registration-only warp, the peers of ``la.py``/``chaos.py``.

    python benchmarks/hippocampus.py [--limit N] [--work DIR]

Template ``hippocampus_001``, the other volumes the pool (``--limit``: the first N, sorted; the same
cases as ``stage1.py --limit N``). Writes ``benchmarks/results/hippocampus_atlas.json`` (see :mod:`atlas_bench`).
"""

import sys

from atlas_bench import RESULTS, parser, run
from common import CLASSES
from semisam_o1 import PROJECT_ROOT

DATA = PROJECT_ROOT.parent / "shared" / "data" / "hippocampus"

if __name__ == "__main__":
    args = parser(__doc__, "hippocampus").parse_args()
    args.out = args.out or RESULTS / "hippocampus_atlas.json"
    sys.exit(run("hippocampus", DATA / "images", DATA / "labels", "hippocampus_001", CLASSES, args))
