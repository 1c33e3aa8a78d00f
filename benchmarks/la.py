"""Left atrium (LGE-MRI, ``../shared/data/la``): stage one vs ANTs SyN vs the registration-only warp.

    python benchmarks/la.py [--limit N] [--work DIR] [--conf KEY VALUE ...]

Template ``06SR5RBREL16DQ6M8LWS``, the other 19 volumes the pool (``--limit``: the first N, sorted).
Writes ``benchmarks/results/la.json`` (see :mod:`atlas_bench` for what is measured), including the
real-sizes numbers: feature extraction seconds per volume, its peak RSS (a child process that only
extracts one volume), cache bytes per image voxel.
"""

import sys

from atlas_bench import parser, run
from semisam_o1 import PROJECT_ROOT

DATA = PROJECT_ROOT.parent / "shared" / "data" / "la"

if __name__ == "__main__":
    args = parser(__doc__, "la").parse_args()
    sys.exit(run("la", DATA / "images", DATA / "labels", "06SR5RBREL16DQ6M8LWS", {"atrium": 1}, args))
