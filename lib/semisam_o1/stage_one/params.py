"""Stage one's research settings, one dataclass per step: :class:`StageOneParams` (features and registration),
:class:`PropagationParams` (the label fusion), :class:`FloorParams` (the registration safety floor).

Each default is written here once. ``python main.py params`` lists every field with the comment above it;
``--set <section>.<field>=<value>`` (sections ``stage_one``, ``propagation``, ``floor``) sets one, validated against
the field's type and, where given, ``metadata`` ``choices`` or ``range``. Imports nothing heavy: parsing options
loads neither torch nor an encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from semisam_o1.choices import DEMONS_AFFINES, FUSION_DECISIONS, PROPAGATIONS, REGISTRATIONS


@dataclass(frozen=True)
class StageOneParams:
    """How stage one computes features and aligns templates (the encoder itself is an operator option)."""

    #: the spatial prior: demons (affine + diffeomorphic demons, SimpleITK), syn (ANTs SyN, antspyx), or
    #: demons+syn (every template registered by both; each mapping votes as if it were another template)
    registration: str = field(default="demons+syn", metadata={"choices": (*REGISTRATIONS, "+".join(REGISTRATIONS))})
    #: fusion (registration-guided feature label fusion) or prototype (the paper's per-class prototypes; ablation)
    propagation: str = field(default="fusion", metadata={"choices": PROPAGATIONS})
    #: slice orientations (volume axes) the encoder runs on and whose features are fused, e.g. 0,1,2
    encoder_axes: tuple[int, ...] = field(default=(0, 1, 2), metadata={"range": (0, 2), "distinct": True})
    #: LiteMedSAM slice input size in pixels (multiple of 32); None = planned (64 on CPU, up to 256 on GPU)
    encoder_image_size: int | None = field(default=None, metadata={"range": (32, 1024)})
    #: stored feature dimension after PCA (float16: 2 bytes each)
    feature_dims: int = field(default=32, metadata={"range": (4, 256)})
    #: features stored every N voxels per axis (thick-slice axes: 1), interpolated on lookup; None = planned (2)
    feature_stride: int | None = field(default=None, metadata={"range": (1, 8)})
    #: no registration grid or feature stride coarser than this (mm) on an axis finer than that (e.g. 5); 0 = no such floor
    coarsest_grid_mm: float = field(default=0.0, metadata={"range": (0.0, 50.0)})
    #: the affine registration the demons refine: sitk (SimpleITK, Mattes MI) or ants (ANTs Affine, seeded)
    demons_affine: str = field(default="sitk", metadata={"choices": DEMONS_AFFINES})


@dataclass
class PropagationParams:
    """Parameters of :func:`~semisam_o1.stage_one.propagation.propagate`, defaults = best measured values."""

    #: search window half-width (mm) per axis, converted with the template's spacing
    #: (:func:`~semisam_o1.stage_one.propagation.window_radius`: ``round(radius_mm / spacing)`` voxels, at most 7 positions per axis)
    radius_mm: float = 3.0
    #: softmax temperature on cosine similarity
    h: float = 0.05
    #: target voxels mapped farther than this (mm, template space) from template foreground -> background
    margin_mm: float = 5.0
    #: Gaussian sigma (mm, per axis with the target's spacing) on the per-class vote maps before arg-max; 0 = off
    sigma_mm: float = 1.0
    #: per class, keep the largest connected component where the class is one component in every template
    largest_cc: bool = True
    #: with several mappings (templates x registrations), leave out those whose
    #: :func:`~semisam_o1.stage_one.propagation.mapping_consistency` is more than this below the best one's (a failed registration)
    mapping_tolerance: float = 0.05
    #: how the smoothed vote shares become a label: "argmax", or "volume" (the arg-max, except that a foreground
    #: class it gives under 95 % of the voxels its shares sum to grows to that volume,
    #: :func:`~semisam_o1.stage_one.votes.volume_matched_argmax`: fused votes otherwise starve thin classes)
    decision: str = field(default="argmax", metadata={"choices": FUSION_DECISIONS})

    def __post_init__(self):
        if self.decision not in FUSION_DECISIONS:
            raise ValueError(f"decision must be one of {FUSION_DECISIONS}, got '{self.decision}'")


@dataclass(frozen=True)
class FloorParams:
    """The label-free safety floor of :func:`~semisam_o1.stage_one.predictor.registration_floor` (per class)."""

    #: fall back when the Dice overlap of the voted class and the warped class is below this
    min_agreement: float = 0.5
    #: ... or when the voted volume is more than this factor larger or smaller than the warped one
    #: (hippocampus, where the votes beat the warp, stays within 0.76-1.14; docs/experiments.md)
    max_volume_ratio: float = 1.4
    #: false: the feature vote always stands (no class falls back to the registration)
    enabled: bool = True
