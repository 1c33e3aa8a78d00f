"""One training run's steps, the same in one process and in each DDP process: the seeded batches and network
(:func:`_prepare`) and the Adam loop of Dice + CE on them (:func:`_train_loop`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch.utils.data import WeightedRandomSampler

from semisam_o1.stage_two.network import build_network
from semisam_o1.stage_two.params import TrainParams
from semisam_o1.stage_two.patches import PatchSampler, augmentation, patch_context


def _prepare(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], n_classes: int, params: TrainParams,
             weights: Sequence[float] | None = None, init: Mapping[str, torch.Tensor] | None = None) -> tuple[DataLoader, UNet]:
    """The seeded batches and network of one training run (identical wherever it runs); ``weights``:
    per-case sampling weights, ``init``: starting weights, else a fresh network (see :func:`train_network`)."""
    torch.manual_seed(params.seed)
    transform = augmentation(params)
    patches = PatchSampler(images, labels, params.patch, seed=params.seed, context=patch_context(params))
    generator = torch.Generator().manual_seed(params.seed)
    if weights is None:
        order = {"shuffle": True, "generator": generator}
    else:
        if len(weights) != len(patches) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights: {len(patches)} non-negative numbers with a positive sum needed, got {list(weights)}")
        order = {"sampler": WeightedRandomSampler([float(w) for w in weights], len(patches), replacement=True, generator=generator)}
    loader = DataLoader(Dataset(patches, transform), batch_size=params.batch_size, num_workers=0, **order)
    net = build_network(n_classes, params)
    if init is not None:
        net.load_state_dict(init)
    return loader, net


def _train_loop(net: torch.nn.Module, loader: DataLoader, params: TrainParams, device: str,
                on_iteration: Callable[[int, float], None] | None, rows=None) -> None:
    """``params.iterations`` Adam steps (cosine-decayed learning rate) of Dice + CE on ``loader``'s batches.

    ``rows`` None: ``net`` trains on whole batches. Else (a :class:`~semisam_o1.stage_two.ddp._Rows`) ``net`` is a DistributedDataParallel replica (its
    dropout layers :class:`_RowsDropout` reading ``rows``) training on rows ``rows.rank::rows.world`` of each
    batch, loss weighted so the averaged gradient is the whole batch's; ``on_iteration`` then gets the whole
    batch's loss (all-reduced).
    """
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=params.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / params.iterations)))
    net.train()
    iteration = 0
    while iteration < params.iterations:
        for batch in loader:
            optimizer.zero_grad()
            image, label = batch["image"], batch["label"]
            if rows is None:
                loss = loss_fn(net(image.to(device)), label.to(device).long())
                loss.backward()
                reported = loss.detach().item()
            else:
                rows.n = len(image)
                own = list(range(rows.rank, rows.n, rows.world))
                rows.index = own or [0]
                share = len(own) / rows.n  # this rank's share of the whole batch's loss
                loss = loss_fn(net(image[rows.index].to(device)), label[rows.index].to(device).long())
                (loss * (share * rows.world)).backward()  # DDP averages over the world
                total = (loss.detach() * share).reshape(1)
                torch.distributed.all_reduce(total)
                reported = total.item()
            optimizer.step()
            scheduler.step()
            iteration += 1
            if on_iteration is not None:
                on_iteration(iteration, reported)
            if iteration >= params.iterations:
                break
