"""Which trials can train together as one fused pack, decided without torch.

Trials fuse (``cae.fused``) when their tensors have the same shapes: the same layers, batch
sizes, data, task, device, precision and compile mode. What may differ between members is
what only changes numbers, never shapes: the seed (initial weights, dropout masks), the
learning rate, weight decay, dropout rates, activity and edge penalties, the loss, the
initialisation scheme, and the stopping rule (max_epochs, patience, min_delta). A dropout
layer is part of the shape (a rate of 0 means no layer), so a member with dropout and one
without do not fuse, whereas rates 0.1 and 0.3 do.

Torch-free like ``cae.arch``, so a dry run can list the packs of a large sweep quickly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING

from cae import arch
from cae.memory import MemoryEstimate, estimate

if TYPE_CHECKING:
    from cae.config import SweepSpec, TrialConfig

# Settings a pack's members may differ in (dotted TrialConfig keys).
FUSABLE = (
    "seed", "lr", "weight_decay", "loss", "max_epochs", "patience", "min_delta",
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
    optimiser and activations, one copy of the data and one runtime (``cae.memory``)."""
    one = estimate(cfg)
    return MemoryEstimate(one.weights * members, one.activations * members, one.data,
                          one.runtime)


# ---- the packs of a sweep (these import Ray for its variant generation) ----------------


def trial_points(spec: SweepSpec, param_space: dict) -> list[dict]:
    """Every trial's point, in the order the unfused grid search hands them out."""
    from cae.schedulers import shuffled_search

    search = shuffled_search(param_space, spec.num_samples, spec.seed)
    return [search.search_alg.suggest(str(i)) for i in range(search.num_samples)]


def packs(spec: SweepSpec, param_space: dict,
          budget: tuple[int, str] | None = None) -> list[tuple[list[dict], TrialConfig]]:
    """The packs of a fused sweep: (member points, first member's config), refusing a pack
    that cannot fit what one trial may use (``budget``, as ``cae.plan.check_spec``)."""
    from cae.config import trial_config
    from cae.plan import SpecError

    points = trial_points(spec, param_space)
    cfgs = [trial_config(spec.trial, p) for p in points]
    out = []
    for members in plan_packs(cfgs, spec.fusion() or 1):
        cfg = cfgs[members[0]]
        need = pack_memory(cfg, len(members))
        if budget is not None and need.total > budget[0]:
            raise SpecError(
                f"fuse: a pack of {len(members)} needs about {need.total / 2**20:,.0f} MiB "
                f"({need}) but may use {budget[0] / 2**20:,.0f} MiB ({budget[1]}); lower "
                "fuse.max_members or give each trial more resources")
        out.append(([points[i] for i in members], cfg))
    return out


def describe(spec: SweepSpec, param_space: dict, limit: int = 20) -> list[str]:
    """The dry run's lines on the packs: how many, and each one's members and memory."""
    found = packs(spec, param_space)
    n = sum(len(p) for p, _ in found)
    lines = [(f"fused packs: {len(found)} (up to {spec.fusion()} members each) for {n} "
              "trials, one Ray Tune trial per pack"),
             f"  {'members':>7} {'memory':>9}  what they share"]
    for points, cfg in found[:limit]:
        mem = pack_memory(cfg, len(points)).total
        label = ", ".join(f"{k}={json.dumps(v)}" for k, v in points[0].items()
                          if k not in FUSABLE and k != "repeat")
        lines.append(f"  {len(points):>7} {mem / 2**20:>5,.0f} MiB  {label or 'the base trial'}")
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} more packs")
    return lines


def pack_searcher(spec: SweepSpec, param_space: dict,
                  budget: tuple[int, str] | None = None):
    """The searcher handing out one ``{"pack": [point, ...]}`` config per pack, and their
    number (as ``cae.search.make_searcher``)."""
    from cae.packfiles import PACK_KEY
    from cae.schedulers import ShuffledSearcher

    configs = [{PACK_KEY: points} for points, _ in packs(spec, param_space, budget)]
    return ShuffledSearcher(configs), len(configs)
