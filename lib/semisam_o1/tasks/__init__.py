"""MONAI Label tasks of the SemiSAM-O1 app (one module per task, wired by apps/semisam_o1/main.py)."""
