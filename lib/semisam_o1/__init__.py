"""SemiSAM-O1: one labelled template volume to segmentations of a whole study pool.

Stage one propagates the template's labels through cached foundation-model features; stage two
self-trains a 3D network with voxel-wise, feature-space refinement of uncertain pseudo-labels.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The checkout this package is installed from (``pip install -e .`` keeps it in place).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
