"""Fused sweeps on Ray Tune: the sweep's trials grouped into packs, one Tune trial per pack.

With ``fuse`` on (``SweepSpec.fusion``), the trials are the same as without it (the same
points, repeats and random draws, in the same shuffled order: ``cae.sweep.packplan``),
grouped into packs of up to ``max_members`` trials that may fuse (``cae.train.packing``).
Each pack is one Tune trial with the sweep's resources (``run_pack``, around
``cae.train.pack.Pack``); its config is ``{"pack": [point, ...]}``. Every epoch it writes
each member's checkpoint into the member's own folder of the pack's directory
(``cae.run.packfiles``: the tables read a member as a trial), then reports the pack's epoch
to Tune with the pack's checkpoint, from which a restarted pack goes on exactly, through
the same resume branches as a trial (``cae.sweep.trainable.go_on``). Members stop by their
own patience or max_epochs; the scheduler is FIFO (``SweepSpec`` refuses the others with
fusion).

Why one Tune trial per pack rather than one per member: the members share one process and
one stack of weights, and a Tune trial is a process; Tune's view of a member would have to
be made up. The member tables, checkpoints and report are each member's own.
"""

from __future__ import annotations

import io
import json
import math

import torch
from ray import tune

from cae.config.points import trial_config
from cae.config.spec import SweepSpec
from cae.data.datasets import ImageData
from cae.run import checkpoints, packfiles
from cae.run.directory import write_file
from cae.run.diskspace import CHECKPOINTS_KEPT
from cae.sweep.trainable import (
    go_on,
    here_and_source,
    recorded_config,
    report_epoch,
    static_facts,
)
from cae.train.pack import Pack

# ---- one pack as a Tune trial ---------------------------------------------------------------


def wrapped_pack_trainable(spec: SweepSpec, datasets: dict, run_dir: str,
                           adopt: dict[str, str] | None = None):
    """``run_pack`` with the sweep's data, run directory and resources (one pack each)."""
    fn = tune.with_parameters(run_pack, base=spec.trial, datasets=datasets, run_dir=run_dir,
                              adopt=adopt or {}, threads=max(1, int(spec.resources.cpu)))
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _save_member(folder: str, epoch: int, state: dict, history: dict) -> None:
    """A member's checkpoint, as a trial's (``cae.run.checkpoints``), the newest few kept."""
    name = f"{checkpoints.PREFIX}{epoch:06d}"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_file(f"{folder}/{name}", checkpoints.STATE_FILE, buffer.getvalue())
    write_file(f"{folder}/{name}", checkpoints.HISTORY_FILE,
               json.dumps(history, default=float).encode())
    fs, path = checkpoints.filesystem(folder)
    for old in checkpoints.list_checkpoints(fs, path)[CHECKPOINTS_KEPT:]:
        fs.delete_dir(old)


def _take_over_members(source: str, folders: list[str]) -> None:
    """A pack that takes over an earlier pack's directory copies each member's newest
    checkpoint into its own member folders: the tables leave the earlier members out, and
    a member that had already stopped trains no more epochs to write a checkpoint of its
    own."""
    for folder in folders:
        earlier = f"{source}/{folder.rstrip('/').rsplit('/', 1)[-1]}"
        found = checkpoints.load_newest(*checkpoints.filesystem(earlier))
        if found is not None:
            _save_member(folder, int(found.state["epoch"]), found.state, found.history)


def run_pack(config: dict, base: dict, datasets: dict[str, ImageData], run_dir: str,
             adopt: dict[str, str] | None = None, threads: int = 1) -> None:
    """Train one fused pack, its members reporting as trials (see the module doc)."""
    torch.set_num_threads(max(1, threads))
    points = config[packfiles.PACK_KEY]
    here, source = here_and_source(run_dir, config, adopt)
    folders = [f"{here}/{packfiles.member_name(i)}" for i in range(len(points))]
    current = [trial_config(base, p) for p in points]
    fused = {"pack": here.rstrip("/").rsplit("/", 1)[-1], "members": len(points)}
    # each member recorded as a trial is (cae.sweep.trainable), with its pack and its point
    cfgs = [recorded_config(f, f"{source}/{packfiles.member_name(i)}", c, p, depth=2,
                            extra={"fused": fused},
                            files={"params.json": json.dumps(p).encode()})
            for i, (f, c, p) in enumerate(zip(folders, current, points))]
    key = cfgs[0].data.source_key()
    pack = Pack(cfgs, datasets[key])
    found = checkpoints.load_newest(*checkpoints.filesystem(source))
    if source != here:  # taken over: each member's checkpoints so far go on in its folder
        _take_over_members(source, folders)
    if found is not None and not found.state.get("final"):
        pack.load_state_dict(found.state)
    static = static_facts(pack, datasets[key])
    summary = list((found.history.get("epochs") if found else None) or [])
    if go_on(found, here, source, summary, static):  # as a trial does
        return
    pack_id = tune.get_context().get_trial_id()

    def on_epoch(metrics: dict[int, dict], state_fn) -> None:
        for i, m in metrics.items():
            member = pack.members[i]
            before = member.history[-2]["time_total_s"] if len(member.history) > 1 else 0.0
            m["time_total_s"] = before + m["epoch_time_s"]
            if "stop_reason" in m:
                member.final = {**m, **static, **member.test,
                                **({"error": member.error} if member.error else {})}
            mine = {**static, "trial_id": f"{pack_id}_{i:02d}"}
            state = pack.member_state(i)
            _save_member(folders[i], pack.epoch, state,
                         {"epochs": member.history, "static": mine, "final": member.final})
        report = _pack_report(pack, metrics)
        summary.append(report)
        state = state_fn()
        if all(pack.members[i].stop_reason for i in pack.live()):
            state["final"] = report  # every member has stopped
        report_epoch({**report, **static}, state,
                     {"epochs": summary, "static": static, "final": state.get("final")})

    pack.fit(on_epoch)


def _pack_report(pack: Pack, metrics: dict[int, dict]) -> dict:
    """What Tune sees of a pack's epoch: its members' best losses (FIFO reads nothing)."""
    vals = [m["val_loss"] for m in metrics.values()]
    finite = [v for v in vals if math.isfinite(v)]
    return {"epoch": pack.epoch, "val_loss": min(finite, default=float("nan")),
            "best_val_loss": min((pack.members[i].stopping.best_val for i in metrics),
                                 default=float("nan")),
            "pack_members": len(metrics),
            "members_stopped": sum(1 for m in pack.members if m.stop_reason),
            "member_epochs": sum(len(m.history) for m in pack.members)}  # for the progress bar
