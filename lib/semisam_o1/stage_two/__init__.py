"""Stage two: rounds of self-training a 3D network on stage one's pseudo-labels and every real label.

- :mod:`.network` -- the network, its training (one process; DDP in :mod:`.ddp`) and its prediction with
  voxel-wise uncertainty;
- :mod:`.patches` -- the patch sampler and the training augmentation;
- :mod:`.round_zero` -- what round 1 trains on: pseudo-templates and border snapping (:mod:`.boundary`);
- :mod:`.labels` -- pure functions of one round's labels: ensembling, confident replacement, which round to publish;
- :mod:`.refinement` -- the paper's feature-space correction of uncertain voxels (off by default);
- :mod:`.rounds` -- :class:`~semisam_o1.stage_two.rounds.StageTwo`, the round loop and its state on disk;
- :mod:`.relabel` -- a round's new labels after training: prediction with uncertainty, confident replacement,
  refinement and the teacher floor;
- :mod:`.published` -- the published network that the infer task and uncertainty scoring use;
- :mod:`.export` -- the published network as a MONAI Bundle that MONAI alone runs (``main.py export``).

Imports stage one; nothing here imports the server or the command line.
"""
