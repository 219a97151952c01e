"""The packs of a fused sweep: its trials, as the unfused grid search hands them out,
grouped into packs (``cae.train.packing``); their memory, the dry run's lines on them, and the
searcher (and, under successive halving, the scheduler) that hand out one pack per Ray Tune
trial. Torch-free; Ray for its variant generation, so that the trials are the very ones of
the unfused sweep."""

from __future__ import annotations

import json
import math

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


def planned(spec: SweepSpec, space: dict, budget: tuple[int, str] | None = None
            ) -> tuple[list[dict], list[list[int]], list[TrialConfig]]:
    """Every trial's point (``trial_points``), the packs as lists of their indices, and the
    trials' configs, refusing a pack that cannot fit what one trial may use (``budget``, as
    ``cae.sweep.plan.check_spec``)."""
    points = trial_points(spec, space)
    cfgs = [trial_config(spec.trial, p) for p in points]
    groups = plan_packs(cfgs, spec.fusion() or 1)
    for members in groups:
        need = pack_memory(cfgs[members[0]], len(members))
        if budget is not None and need.total > budget[0]:
            raise SpecError(
                f"fuse: a pack of {len(members)} needs about {need.total / 2**20:,.0f} MiB "
                f"({need}) but may use {budget[0] / 2**20:,.0f} MiB ({budget[1]}); lower "
                "fuse.max_members or give each trial more resources")
    return points, groups, cfgs


def packs(spec: SweepSpec, space: dict,
          budget: tuple[int, str] | None = None) -> list[tuple[list[dict], TrialConfig]]:
    """The packs of a fused sweep: (member points, first member's config) (``planned``)."""
    points, groups, cfgs = planned(spec, space, budget)
    return [([points[i] for i in members], cfgs[members[0]]) for members in groups]


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
    if spec.scheduler.kind != "fifo":
        lines += halving_lines(spec, space, budget)
    return lines


def halving_plan(spec: SweepSpec, space: dict, budget: tuple[int, str] | None = None
                 ) -> dict[str, list[tuple[int, int, list[int]]]]:
    """The packs a fused sweep under halving is expected to train, per stratum (by label):
    (first epoch, last epoch, members of each pack) for its start and for each rung's
    survivors, as many as ``ceil(n / rf^k)`` (``cae.results.status.planned_trial_epochs``)
    spread over the stratum's architectures in proportion to their trials, each regrouped
    into as few packs as ``max_members`` allows (``cae.schedule.packbook``)."""
    from cae.config.spec import rungs, stratum_of
    from cae.schedule.packbook import chunks
    from cae.train.packing import pack_key

    s, most = spec.scheduler, spec.fusion() or 1
    points, groups, cfgs = planned(spec, space, budget)
    horizon = min(s.max_t or max(c.max_epochs for c in cfgs), max(c.max_epochs for c in cfgs))
    at = rungs(s.grace_period, s.reduction_factor, horizon)
    strata: dict[tuple, list[int]] = {}
    for i, p in enumerate(points):
        strata.setdefault(stratum_of(p, s.stratify), []).append(i)
    plan = {}
    for stratum, members in strata.items():
        label = ", ".join(f"{k}={json.dumps(v)}" for k, v in zip(s.stratify, stratum))
        mine = set(members)
        spans = [(0, at[0] if at else horizon,
                  [sum(m in mine for m in g) for g in groups if mine & set(g)])]
        per_group: dict[str, int] = {}
        for i in members:
            per_group[pack_key(cfgs[i])] = per_group.get(pack_key(cfgs[i]), 0) + 1
        for k, rung in enumerate(at):
            left = max(1, math.ceil(len(members) / s.reduction_factor ** (k + 1)))
            end = at[k + 1] if k + 1 < len(at) else horizon
            if rung >= end:
                continue
            spread = _spread(left, list(per_group.values()))
            spans.append((rung, end, [len(c) for n in spread
                                      for c in chunks(list(range(n)), most)]))
        plan[label or "the sweep"] = spans
    return plan


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _spread(total: int, sizes: list[int]) -> list[int]:
    """``total`` survivors shared out over groups of ``sizes`` trials, in proportion (largest
    remainders first), none above its group's size."""
    n = sum(sizes)
    shares = [total * size / n for size in sizes]
    out = [min(size, math.floor(x)) for x, size in zip(shares, sizes)]
    order = sorted(range(len(sizes)), key=lambda j: shares[j] - out[j], reverse=True)
    for j in order:
        if sum(out) >= total:
            break
        if out[j] < sizes[j]:
            out[j] += 1
    return [x for x in out if x]


def halving_lines(spec: SweepSpec, space: dict, budget: tuple[int, str] | None = None
                  ) -> list[str]:
    """The dry run's lines on the packs each stratum is expected to train at each rung
    (``halving_plan``), and the pack-epochs."""
    plan = halving_plan(spec, space, budget)
    lines = [f"packs under {spec.scheduler.kind}, survivors regrouped at each rung (expected, "
             "per stratum):"]
    total = trial_epochs = 0
    for label, spans in plan.items():
        lines.append(f"  {label}:")
        epochs = []
        for start, end, sizes in spans:
            what = "from the start" if start == 0 else f"after the rung at epoch {start}"
            span = f"epoch {end}" if end == start + 1 else f"epochs {start + 1}-{end}"
            members = ", ".join(map(str, sizes))
            lines.append(f"    {span} ({what}): {_count(len(sizes), 'pack')} "
                         f"({members} member{'s' if sizes != [1] else ''})")
            epochs.append(len(sizes) * (end - start))
            trial_epochs += sum(sizes) * (end - start)
        total += sum(epochs)
        lines.append(f"    pack-epochs: {' + '.join(map(str, epochs))} = {sum(epochs)}")
    lines.append(f"  pack-epochs in all: {total:,} (for {trial_epochs:,} trial-epochs)")
    return lines


def pack_searcher(spec: SweepSpec, space: dict, budget: tuple[int, str] | None = None):
    """The searcher handing out one ``{"pack": [point, ...]}`` config per pack, and their
    number (as ``cae.schedule.create_searcher``)."""
    from cae.schedule.grid import ShuffledSearcher

    configs = [{PACK_KEY: points} for points, _ in packs(spec, space, budget)]
    return ShuffledSearcher(configs), len(configs)


def fused_halving(spec: SweepSpec, space: dict, run_dir: str, max_epochs: int,
                  budget: tuple[int, str] | None = None, metric: str = "val_loss",
                  mode: str = "min"):
    """The searcher and scheduler of a fused sweep under ``sha`` or ``asha``
    (``cae.schedule.packed``): the sweep's first packs as FIFO packs them, then each rung's
    survivors regrouped; every member a trial to its stratum's halving."""
    from cae.config.spec import rungs, stratum_of
    from cae.schedule.packbook import PackBook, Seat
    from cae.schedule.packed import PackScheduler, PackSearcher, deciders
    from cae.train.packing import pack_key

    s = spec.scheduler
    max_t = s.max_t or max_epochs
    points, groups, cfgs = planned(spec, space, budget)
    ids = [f"m{i:05d}" for i in range(len(points))]
    seats = [Seat(ids[i], p, pack_key(cfgs[i]), stratum_of(p, s.stratify), i)
             for i, p in enumerate(points)]
    first = [[ids[i] for i in members] for members in groups]
    at = rungs(s.grace_period, s.reduction_factor, max_t)
    decide = deciders(s.kind, at, max_t=max_t, grace_period=s.grace_period,
                      reduction_factor=s.reduction_factor, metric=metric, mode=mode)
    book = PackBook(seats, first, spec.fusion() or 1, at, decide, sync=s.kind == "sha",
                    work_ahead=s.work_ahead, max_failures=spec.max_failures)
    return PackSearcher(book, metric, mode), PackScheduler(run_dir, metric, mode)

