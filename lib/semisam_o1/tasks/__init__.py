"""MONAI Label task classes of the SemiSAM-O1 app (infer, train, strategies, scoring, batch infer), one module per
task, wired by ``apps/semisam_o1/main.py``. What hardens MONAI Label itself lives in :mod:`semisam_o1.server`."""
