"""Pure functions of one stage-two round's labels: ensembling the soft labels, replacing only where confident,
resolving the ``auto`` settings from round 1's label-free volume change, and choosing the round to publish.

No I/O: each takes arrays or round stats and returns arrays or numbers (worked examples in the docstrings).

Soft pseudo-labels are a temporal ensemble (Laine & Aila, 2017): after round r they are the mean of
stage one's soft labels and the softmax (flip + MC-dropout mean) of every round's network so far,
``(r * previous + network_r) / (r + 1)`` (``ensemble="mean"``); with ``ensemble="anchored"`` they are the
mean of stage one's soft labels and the mean of every round's network so far, so stage one keeps half the
say in every round (:func:`ensemble_weights`); with ``ensemble="latest"`` they are the mean of stage one's and
the round's network's (which with ``warm_start`` has trained on from every earlier round's); with ``ensemble="network"`` they are the round's network's
softmax alone; ``ensemble="auto"`` (the default) is ``mean``, or from round 2 on ``latest`` (``anchored`` without
``warm_start``) when round 1's network changed the class volumes of its training labels by more than 10 % (:func:`resolve_ensemble`; each
round's stats record the ensemble it used and ``network_volume_change``). With the mean every source (stage one, each round's network) keeps an equal say, so no
single network's errors take over the labels; with ``anchored`` the networks, which learn from each
other's labels and share their errors, together weigh as much as stage one, and with ``latest`` the last one does. The entropy of the soft labels is
the voxel-wise uncertainty; the round's labels are their argmax, and with ``refinement="voxel"`` (the paper's
step; off by default) the most uncertain voxels of the argmax take the vote of their nearest confident voxels in
feature space (:func:`~semisam_o1.stage_two.refinement.refine_voxels`). With
``replace_confidence`` > 0 the argmax replaces the previous round's label only where its top class holds
at least that probability (:func:`confident_replacement`); the refinement then sees that label. The default
(``None``, ``auto``) is :data:`AUTO_REPLACE_CONFIDENCE` when round 1's network kept its training labels' class
volumes (the signal that keeps ``ensemble auto`` at ``mean``), else 0 (:func:`resolve_replace_confidence`);
each round's stats record the threshold it used. With
``teacher_floor`` (default) each refined class of each image that fails the safety floor's check against
stage one's label of that image (:func:`~semisam_o1.stage_one.predictor.registration_floor`) is written as stage
one's voxels: a round can move a class's border, not lose or double the class.
"""

from __future__ import annotations

import numpy as np

from semisam_o1.choices import ENSEMBLES, SIGNALS
from semisam_o1.stage_two.params import AUTO_REPLACE_CONFIDENCE, AUTO_VOLUME_CHANGE


def choose_round(rounds: list[dict], publish: str) -> dict:
    """The round whose network is published, and why: ``{"round", "by", "value", "reason"}``.

    ``publish="last"``: the last finished round. Else the round best by that signal (ties: the earlier
    round); rounds recorded without the signal (older runs) count as worst. Ground truth is never used.

    >>> choose_round([{"round": 1, "network_entropy": 0.2}, {"round": 2, "network_entropy": 0.3}], "network_entropy")["round"]
    1
    """
    if publish == "last" or not rounds:
        return {"round": len(rounds), "by": "last", "value": None, "reason": "the last finished round"}
    sign = SIGNALS[publish]
    score = lambda r: sign * r[publish] if r.get(publish) is not None else -np.inf  # noqa: E731
    best = max(rounds, key=lambda r: (score(r), -r["round"]))
    word = "highest" if sign > 0 else "lowest"
    return {"round": best["round"], "by": publish, "value": best.get(publish),
            "reason": f"{word} {publish} of rounds 1-{len(rounds)}"}


def volume_change(network_voxels: dict[str, int], label_voxels: dict[str, int]) -> float | None:
    """How much a network's prediction (or any new labels) changes the class volumes of the labels it trained
    on (the labels it replaces), over the pool: ``sum_c |N_c - L_c| / sum_c L_c`` over the foreground classes
    ``c`` (``N_c``: voxels the network's argmax gives class ``c``, ``L_c``: voxels of class ``c`` in its
    training labels); ``None`` without foreground. Label-free: both counts come from the pool, none from
    ground truth.

    >>> volume_change({"1": 115}, {"1": 100})
    0.15
    >>> volume_change({"1": 90, "2": 110}, {"1": 100, "2": 100})
    0.1
    """
    total = sum(label_voxels.values())
    if total == 0:
        return None
    return round(sum(abs(network_voxels.get(c, 0) - n) for c, n in label_voxels.items()) / total, 6)


def training_weights(real: int, pseudo: int, real_share: float) -> list[float] | None:
    """Per-image sampling weights of a round's training set (``real`` real-labelled images first, then ``pseudo``
    pseudo-labelled ones) so that ``real_share`` of the patches come from the real ones, or their own share of the
    images when that is larger (a real label is never drawn less often than a pseudo-label); ``None`` (every image
    equally often) when that is what they come to, ``real_share`` is 0 or one of the two groups is empty.

    >>> training_weights(1, 4, 0.5)
    [0.5, 0.125, 0.125, 0.125, 0.125]
    >>> training_weights(2, 0, 0.5) is None, training_weights(1, 4, 0.0) is None, training_weights(3, 1, 0.5) is None
    (True, True, True)
    """
    if not real_share or not real or not pseudo or real_share <= real / (real + pseudo):
        return None
    return [real_share / real] * real + [(1 - real_share) / pseudo] * pseudo


def resolve_ensemble(ensemble: str, rounds: list[dict], warm_start: bool = True) -> str:
    """The ensemble the next round uses, given the stats of the rounds finished so far.

    Every ensemble but ``"auto"`` is itself. ``"auto"`` is ``"mean"`` in round 1 (where ``mean``, ``anchored``
    and ``latest`` weigh the same, :func:`ensemble_weights`) and later, if round 1's network changed its
    training labels' volumes by more than :data:`AUTO_VOLUME_CHANGE` (``rounds[0]["network_volume_change"]``),
    ``"latest"`` with ``warm_start`` (each round's network has trained on from the earlier ones) or
    ``"anchored"`` without (fresh networks: their mean), else ``"mean"``: a network that grows or shrinks what
    it learnt from is extrapolating its teacher's errors, and its votes then weigh against stage one's half
    and half instead of outvoting it round by round.

    >>> resolve_ensemble("auto", []), resolve_ensemble("auto", [{"network_volume_change": 0.15}])
    ('mean', 'latest')
    >>> resolve_ensemble("auto", [{"network_volume_change": 0.15}], warm_start=False)
    'anchored'
    """
    if ensemble != "auto":
        return ensemble
    change = rounds[0].get("network_volume_change") if rounds else None
    if change is not None and change > AUTO_VOLUME_CHANGE:
        return "latest" if warm_start else "anchored"
    return "mean"


def resolve_replace_confidence(replace_confidence: float | None, first_round_change: float | None) -> float:
    """The probability a round's top class needs to replace the previous round's label (0: everywhere).

    A number is itself. ``None`` (``auto``) is :data:`AUTO_REPLACE_CONFIDENCE` when round 1's network changed
    its training labels' class volumes on the pool by at most :data:`AUTO_VOLUME_CHANGE`
    (``first_round_change``, its ``network_volume_change``: label-free, the signal that keeps ``ensemble auto``
    at ``mean``), else 0. A network that keeps the volumes disagrees with its labels only along their borders,
    where a flip the ensemble holds with less than 0.6 is as likely noise as a correction, so later rounds
    could only move such labels back and forth; a network that grows or shrinks the classes is correcting a
    systematic error of stage one's (the left atrium's labels are 1.10 x the truth), and under ``auto`` its
    rounds weigh stage one half and half (``latest``), so no flip of stage one's label would ever reach 0.6.

    >>> resolve_replace_confidence(None, 0.02), resolve_replace_confidence(None, 0.18), resolve_replace_confidence(0.7, 0.18)
    (0.6, 0.0, 0.7)
    """
    if replace_confidence is not None:
        return replace_confidence
    return AUTO_REPLACE_CONFIDENCE if first_round_change is not None and first_round_change <= AUTO_VOLUME_CHANGE else 0.0


def ensemble_weights(ensemble: str, round_: int) -> tuple[float, float, float]:
    """Round ``round_``'s (>= 1) soft labels as ``w_net * network + w_prev * previous + w_stage1 * stage_one``.

    ``previous`` is round ``round_ - 1``'s soft labels (stage one's for round 1), so the weights unroll to:

    - ``"mean"``: every source an equal say, ``(stage_one + net_1 + ... + net_r) / (r + 1)``
    - ``"anchored"``: ``stage_one / 2 + (net_1 + ... + net_r) / (2 r)``
    - ``"latest"``: ``(stage_one + net_r) / 2``: with ``warm_start`` round r's network has trained on from
      every earlier one, so it stands for them
    - ``"network"``: ``net_r`` alone

    Example: round 2 gives ``(1/3, 2/3, 0)`` (mean), ``(1/4, 1/2, 1/4)`` (anchored), ``(1/2, 0, 1/2)`` (latest),
    ``(1, 0, 0)`` (network); round 1 is half network, half stage one for mean ``(1/2, 1/2, 0)``, anchored and
    latest ``(1/2, 0, 1/2)``.

    Returns:
        ``(w_net, w_prev, w_stage1)``, summing to 1.
    """
    if ensemble == "mean":
        return 1 / (round_ + 1), round_ / (round_ + 1), 0.0
    if ensemble == "anchored":
        return 1 / (2 * round_), (round_ - 1) / round_, 1 / (2 * round_)
    if ensemble == "latest":
        return 0.5, 0.0, 0.5
    if ensemble == "network":
        return 1.0, 0.0, 0.0
    raise ValueError(f"ensemble must be one of {ENSEMBLES} ('auto' through resolve_ensemble), got '{ensemble}'")


def soft_label(label: np.ndarray, confidence: np.ndarray, n_classes: int) -> np.ndarray:
    """Stage one's soft label ``(C, D, H, W)`` float16: ``confidence`` on the voxel's ``label``, the rest
    shared evenly by the other classes (built class by class: no float32 ``(C, D, H, W)`` copy).

    >>> soft_label(np.array([[[0, 1]]], np.uint8), np.array([[[0.8, 0.6]]], np.float32), 3)[:, 0, 0].tolist()
    [[0.7998046875, 0.199951171875], [0.0999755859375, 0.60009765625], [0.0999755859375, 0.199951171875]]
    """
    out = np.empty((n_classes, *label.shape), np.float16)
    rest = (1 - confidence) / max(n_classes - 1, 1)
    for c in range(n_classes):
        out[c] = np.where(label == c, confidence, rest)
    return out


def confident_replacement(prob: np.ndarray, previous: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """A round's hard label: the soft label's arg-max where its top class holds at least ``threshold``,
    else the previous round's label (``threshold`` 0: the arg-max everywhere).

    Args:
        prob: ``(C, D, H, W)`` float soft label of this round; previous: ``(D, H, W)`` the previous round's label.
    Returns:
        ``(label, kept)``: ``(D, H, W)`` uint8, and the bool mask of voxels that kept the previous label.

    >>> prob = np.array([[[[0.9, 0.45]]], [[[0.1, 0.55]]]], np.float32)  # two voxels, two classes
    >>> label, kept = confident_replacement(prob, np.array([[[0, 0]]], np.uint8), 0.6)
    >>> label.tolist(), kept.tolist()
    ([[[0, 0]]], [[[False, True]]])
    """
    label = prob.argmax(0).astype(np.uint8)
    if threshold <= 0:
        return label, np.zeros(label.shape, bool)
    kept = prob.max(0) < threshold
    label[kept] = previous[kept]
    return label, kept
