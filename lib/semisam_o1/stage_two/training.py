"""Stage two's network training: :func:`train_network` trains in this process, or as DistributedDataParallel
processes (:mod:`~semisam_o1.stage_two.ddp`) when there are several GPUs or ``train.processes`` > 1.

Volumes are ``(D, H, W)`` float32 in [0, 1] (already normalised); labels ``(D, H, W)`` int.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.networks.nets import UNet

from semisam_o1.stage_two.ddp import train_network_replicas, train_processes
from semisam_o1.stage_two.loop import _prepare, _train_loop
from semisam_o1.stage_two.network import build_network
from semisam_o1.stage_two.params import TrainParams


def train_network(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    n_classes: int,
    params: TrainParams = TrainParams(),
    on_iteration: Callable[[int, float], None] | None = None,
    device: str = "cpu",
    weights: Sequence[float] | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> UNet:
    """Train a network on ``images`` (each (D, H, W) in [0, 1]) and ``labels`` (each (D, H, W) int).

    With :func:`train_processes` = 1 it trains in this process (reproducible bit for bit for a given
    ``params.seed`` on the CPU). With N > 1 it trains as N DistributedDataParallel processes
    (:func:`train_network_replicas`), checks that every replica ended with the same weights (else
    ``RuntimeError("DDP replicas diverged ...")``) and returns rank 0's: the same network as one process
    would train, up to float rounding.

    Args:
        on_iteration: called as ``on_iteration(iteration, loss)`` after every step (progress, stats), in
            this process; ``loss`` is the loss of the whole batch (averaged over the processes).
        device: where the network trains (patches are cropped on the CPU); it is returned on the CPU, in eval mode,
            with ``flip_axes`` set to ``params.flip_axes`` (what :func:`predict_with_uncertainty` mirrors along).
        weights: how often each case gives a training patch, relative to the others (drawn with replacement,
            :class:`torch.utils.data.WeightedRandomSampler`); ``None``: every case once per epoch, shuffled.
            E.g. ``[1, 1, 1]`` + 30 x ``[0.1]``: half the patches come from the first three cases.
        init: the weights to start from (a ``state_dict`` of a network of the same architecture, e.g. the previous
            round's); ``None``: a fresh network (seeded by ``params.seed``). Either way the full learning-rate
            schedule runs.
    """
    processes = train_processes(params, device)
    if processes == 1:
        loader, net = _prepare(images, labels, n_classes, params, weights, init)
        _train_loop(net.to(device), loader, params, device, on_iteration)
        net.eval()
        net.flip_axes = params.flip_axes  # what its prediction mirrors along (as load_network reads it)
        return net.cpu()
    replicas = train_network_replicas(images, labels, n_classes, params, on_iteration, device, processes, weights, init)
    for rank, replica in enumerate(replicas[1:], 1):
        if replica.keys() != replicas[0].keys() or not all(torch.equal(replica[k], replicas[0][k]) for k in replica):
            raise RuntimeError(f"DDP replicas diverged: rank {rank}'s weights differ from rank 0's")
    net = build_network(n_classes, params)
    net.load_state_dict(replicas[0])
    net.flip_axes = params.flip_axes
    return net.eval()
