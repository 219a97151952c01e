"""Which trials can train together as one fused pack, decided without torch.

Trials fuse (``cae.train.pack``) when their tensors have the same shapes: the same layers, batch
sizes, data, task, device, precision and compile mode. What may differ between members is
what only changes numbers, never shapes: the seed (initial weights, dropout masks), the
learning rate and its schedule, weight decay, the optimiser's betas, eps and momentum,
gradient clipping, dropout rates, activity and edge penalties, the loss, the initialisation
scheme, and the stopping rule (max_epochs, patience, min_delta). The optimiser's name is
not: one batched optimiser steps a pack. A dropout
layer is part of the shape (a rate of 0 means no layer), so a member with dropout and one
without do not fuse, whereas rates 0.1 and 0.3 do.

Torch-free like ``cae.model.plan``, so a dry run can list the packs of a large sweep quickly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING

from cae.model import plan as arch
from cae.model.memory import MemoryEstimate, estimate

if TYPE_CHECKING:
    from cae.config.trial import TrialConfig

# Settings a pack's members may differ in (dotted TrialConfig keys).
FUSABLE = (
    "seed", "lr", "weight_decay", "loss", "max_epochs", "patience", "min_delta",
    "optimizer.momentum", "optimizer.nesterov", "optimizer.betas", "optimizer.eps",
    "schedule", "grad_clip",
    "model.dropout", "model.dropout_std", "model.dense_dropout", "model.edge_dropout",
    "model.activity_l1", "model.activity_l2", "model.edge_l2", "model.init", "model.preset",
)


def structure(cfg: TrialConfig) -> list[str]:
    """The model's layers with dropout rates blanked: equal for members of one pack."""
    enc, dec = arch.layers(cfg.model, cfg.seed)  # dropout_std draws rates from the seed
    return [repr(dataclasses.replace(layer, rate=0.0) if isinstance(layer, arch.Dropout)
                 else layer) for layer in (*enc, *dec)]


def pack_key(cfg: TrialConfig) -> str:
    """Trials with equal keys may train in one pack."""
    data = cfg.model_dump(mode="json")
    for key in FUSABLE:
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node.pop(last, None)
    return json.dumps([data, structure(cfg)], sort_keys=True)


def plan_packs(cfgs: list[TrialConfig], max_members: int) -> list[list[int]]:
    """Indices of ``cfgs`` grouped into packs of at most ``max_members`` fusable trials.

    Groups keep the order in which their first trial appears, members their order; a group
    larger than ``max_members`` is cut into the fewest packs of near-equal size (10 trials
    at 8 per pack: 5 and 5, not 8 and 2)."""
    if max_members < 1:
        raise ValueError(f"max_members must be at least 1 (got {max_members})")
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(pack_key(cfg), []).append(i)
    packs = []
    for members in groups.values():
        n = math.ceil(len(members) / max_members)
        size, extra = divmod(len(members), n)
        start = 0
        for j in range(n):
            end = start + size + (j < extra)
            packs.append(members[start:end])
            start = end
    return packs


def pack_memory(cfg: TrialConfig, members: int) -> MemoryEstimate:
    """Bytes a pack of ``members`` trials like ``cfg`` needs: each member's weights,
    optimiser and activations, one copy of the data and one runtime (``cae.model.memory``)."""
    one = estimate(cfg)
    return MemoryEstimate(one.weights * members, one.activations * members, one.data,
                          one.runtime)
