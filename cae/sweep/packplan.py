"""The packs of a fused sweep: its trials, as the unfused grid search hands them out,
grouped into packs (``cae.train.packing``); their memory, the dry run's lines on them, and the
searcher that hands out one pack per Ray Tune trial. Torch-free; Ray for its variant
generation, so that the trials are the very ones of the unfused sweep."""

from __future__ import annotations

import json

from cae.config.points import trial_config
from cae.config.spec import SweepSpec
from cae.config.trial import TrialConfig
from cae.run.packfiles import PACK_KEY
from cae.sweep.plan import SpecError
from cae.train.packing import FUSABLE, pack_memory, plan_packs


def trial_points(spec: SweepSpec, space: dict) -> list[dict]:
    """Every trial's point, in the order the unfused grid search hands them out (``space``:
    ``cae.sweep.tuner.param_space(spec)``)."""
    from cae.schedule.grid import shuffled_search

    search = shuffled_search(space, spec.num_samples, spec.seed)
    return [search.search_alg.suggest(str(i)) for i in range(search.num_samples)]


def packs(spec: SweepSpec, space: dict,
          budget: tuple[int, str] | None = None) -> list[tuple[list[dict], TrialConfig]]:
    """The packs of a fused sweep: (member points, first member's config), refusing a pack
    that cannot fit what one trial may use (``budget``, as ``cae.sweep.plan.check_spec``)."""
    points = trial_points(spec, space)
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


def describe(spec: SweepSpec, space: dict, budget: tuple[int, str] | None = None,
             limit: int = 20) -> list[str]:
    """The dry run's lines on the packs: how many, and each one's members and memory."""
    found = packs(spec, space, budget)
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


def pack_searcher(spec: SweepSpec, space: dict, budget: tuple[int, str] | None = None):
    """The searcher handing out one ``{"pack": [point, ...]}`` config per pack, and their
    number (as ``cae.schedule.create_searcher``)."""
    from cae.schedule.grid import ShuffledSearcher

    configs = [{PACK_KEY: points} for points, _ in packs(spec, space, budget)]
    return ShuffledSearcher(configs), len(configs)
