"""Abdominal organs (CHAOS T2 MRI, ``../shared/data/chaos-t2``): stage one vs ANTs SyN vs the registration-only warp, per organ.

    python benchmarks/chaos.py [--limit N] [--work DIR] [--conf KEY VALUE ...]

Template the first case (sorted ids), the other 9 the pool; labels 1 liver, 2 right kidney,
3 left kidney, 4 spleen (1.25 x 1.25 x 7.7 mm). Writes ``benchmarks/results/chaos.json`` (see
:mod:`atlas_bench`).
"""

import sys

from atlas_bench import parser, run
from semisam_o1 import PROJECT_ROOT

DATA = PROJECT_ROOT.parent / "shared" / "data" / "chaos-t2"
CLASSES = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}

if __name__ == "__main__":
    args = parser(__doc__, "chaos").parse_args()
    template = sorted(p.name[: -len(".nii.gz")] for p in (DATA / "images").glob("*.nii.gz"))[0]
    sys.exit(run("chaos", DATA / "images", DATA / "labels", template, CLASSES, args))
