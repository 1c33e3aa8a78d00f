"""The names each pluggable step accepts, one list per step.

:mod:`~semisam_o1.config` validates ``--conf`` options against them and the modules that implement the
steps check their arguments against them; this module imports nothing, so parsing options loads
neither torch nor an implementation.
"""

#: foundation image encoders (:class:`~semisam_o1.stage_one.encoders.EncoderSpec`); ``sam_<variant>`` builds
#: ``segment_anything``'s ``sam_model_registry[<variant>]``
ENCODERS = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h")
#: stage one's registration methods (:mod:`~semisam_o1.stage_one.registration`); several joined by ``+`` vote together
REGISTRATIONS = ("demons", "syn")
#: the affine registration the demons refine (:data:`~semisam_o1.stage_one.registration.DEMONS_AFFINES`): SimpleITK's
#: Mattes-MI affine, or ANTs' seeded ``Affine``
DEMONS_AFFINES = ("sitk", "ants")
#: stage one's label propagation: registration-guided feature label fusion, or the paper's per-class prototypes
PROPAGATIONS = ("fusion", "prototype")
#: how the fusion's smoothed class votes become a label (:class:`~semisam_o1.stage_one.propagation.PropagationParams`): their
#: arg-max, or the arg-max with the classes it starves grown to their summed votes
FUSION_DECISIONS = ("argmax", "volume")
#: stage two's pseudo-label correction (:mod:`~semisam_o1.stage_two.refinement`): per voxel, per volume, or none
REFINEMENTS = ("voxel", "volume", "none")
#: how stage two's round-0 labels meet the image's edges (:mod:`~semisam_o1.stage_two.boundary`): their borders snapped to
#: intensity edges within one voxel by a random walker, or left as stage one drew them
BOUNDARIES = ("edges", "none")
#: stage two's training augmentation (:func:`~semisam_o1.stage_two.network.augmentation`): mirroring and intensity
#: jitter, or those and random rotation and scaling
AUGMENTATIONS = ("flip", "affine")
#: a round's soft labels (:func:`~semisam_o1.stage_two.rounds.ensemble_weights`): the temporal ensemble with stage one,
#: stage one against the rounds' networks half and half, stage one against the round's network half and half,
#: the round's network alone, or mean / latest (anchored without warm starts) chosen
#: after round 1 by its network's volume change (:func:`~semisam_o1.stage_two.rounds.resolve_ensemble`)
ENSEMBLES = ("mean", "anchored", "latest", "network", "auto")
#: label-free signals of a round network's quality, recorded in every round's stats, with their sign
#: (+1: higher is better): its mean Dice against stage one's labels on the pool, the mean entropy of its
#: own flip/MC-dropout prediction, its Dice on the real templates (its training data), and the mean Dice
#: of the round's refined labels (what it publishes) against stage one's
SIGNALS = {"agreement_with_stage_one": +1, "network_entropy": -1, "template_dice": +1, "labels_agreement_with_stage_one": +1}
#: how stage two's published network is chosen (:func:`~semisam_o1.stage_two.rounds.choose_round`): the last round, or
#: the round best by a signal
PUBLISH = ("last", *SIGNALS)
