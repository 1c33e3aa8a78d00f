"""SemiSAM-O1: one labelled template volume to segmentations of a whole study pool.

Stage one propagates the template's labels through cached foundation-model features; stage two
self-trains a 3D network with voxel-wise, feature-space refinement of uncertain pseudo-labels.
"""

import logging
from pathlib import Path

# FAISS logs, at INFO, each CPU build it probes and does not find, with the ImportError's text: a normal start-up
# would read like a failure. What it loads in the end it logs too; failures to load at all still raise.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"

#: The checkout this package is installed from (``pip install -e .`` keeps it in place).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
