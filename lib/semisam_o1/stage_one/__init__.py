"""Stage one: the templates' labels propagated to any image, without training.

Modules, in the order a target image meets them:

- :mod:`.plan` -- the datastore's working plan (device, feature stride, registration grid), on disk;
- :mod:`.normalize`, :mod:`.encoders`, :mod:`.feature_cache` -- foundation features, computed once per image;
- :mod:`.registration` -- template -> target alignment, computed once per pair and kept on disk;
- :mod:`.propagation` -- registration-guided feature label fusion; :mod:`.prototypes` -- the paper's class
  prototypes instead (an ablation, ``propagation prototype``);
- :mod:`.predictor` -- :class:`~semisam_o1.stage_one.predictor.StageOne`, which runs those steps for one image and
  applies the registration safety floor.

Nothing here imports stage two, the server or the command line.
"""
