"""The Ray Tune function trainable of a sweep: one Tune trial, which trains one trial of the
sweep (a ``cae.train.trainer.Trainer``) or a fused pack of several (a ``cae.train.pack.Pack``).
At this level a trial is a pack of one: the same members' folders, resume path, checkpoint
writer, extension and epoch loop (``cae.train.loop.fit``) serve both.

Each member of the Tune trial has a folder in the run: a trial's is its Tune trial's
directory; a pack's members have ``member_NN`` folders in the directory of the pack that
first trained them (``cae.run.packfiles``), and a pack formed later from survivors of other
packs (successive halving, ``cae.sweep.packs``) trains its members in those folders. When a
member first starts it writes its record there (``cae.run.record``: the configuration it
runs, every default filled in); restarted, it goes on with that configuration. Every epoch
each member's checkpoint (weights, optimiser, schedule, stopping counters, history; see
``cae.train.loop.trial_checkpoint``) goes into its folder: a trial's through ``tune.report``,
so Tune keeps and prunes it, a pack's member's written by cae, which keeps the newest few.
The last epoch of a member carries its test errors and stop reason (a scheduler may end the
trial right after its last report). A member that diverges ends with the reason as its
error (``cae.train.loop.fit``); the others go on.

A restarted trial goes on from the newest checkpoint of each member that can be read whole
(``cae.run.checkpoints``), which after a restore from an older state can be newer than Tune's
view: it then first reports that epoch again, so that the scheduler decides on it as if
nothing had happened. A trial of a rebuilt run takes over the directory of the earlier trial
with its search-space point (``adopt``). A trial of ``cae extend`` takes over a finished trial
of another run the same way (``extends.json`` names it): it starts from that trial's newest
checkpoint, the last epoch's whole state (a trial trained to ``max_epochs`` while still
improving ends on its best epoch), trains on to its own, higher ``max_epochs``, and its
record says which trial it ``extends``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune

from cae.config.points import trial_config
from cae.config.trial import TrialConfig
from cae.data.datasets import ImageData
from cae.run import checkpoints, packfiles
from cae.sweep import internals
from cae.sweep.members import (
    MemberFolder,
    clear_stop_mark,
    extended,
    pack_report,
    recorded_config,
    save_member,
    start_states,
)
from cae.train import loop
from cae.train.pack import Pack
from cae.train.trainer import Trainer


def static_facts(runner, data: ImageData) -> dict:
    """What every report of a trial (or a pack) carries: where and how it trains (its worker
    process too: a pack's members' checkpoints say which process trained them)."""
    return {
        "device": str(runner.device),
        "precision": runner.precision,
        "data_loaded": f"{data.name}: {tuple(data.train.shape)} train images",
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
    }


def report_epoch(metrics: dict, state: dict, history: dict) -> None:
    """Report ``metrics`` to Tune with a checkpoint of the weights and the trial's history
    (its epochs, kept beside state.pt since result.json can lose rows on a restart)."""
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / checkpoints.STATE_FILE)
        (Path(d) / checkpoints.HISTORY_FILE).write_text(json.dumps(history, default=float))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _ray_epoch() -> int:
    """The last epoch of the checkpoint Tune hands this trial (0 for none)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    history = checkpoints.read_history(checkpoint.filesystem, checkpoint.path)
    return checkpoints.epoch_of(history or {})


def go_on(found: checkpoints.Found | None, member: MemberFolder, epochs: list[dict],
          static: dict) -> bool:
    """What a trial alone reports before it trains on from ``found``, its newest checkpoint,
    whose epochs so far are ``epochs``. True when it had already finished before an
    interruption: nothing is left to train.

    When Tune's view is behind (a restore from an older state, a torn newest checkpoint, a
    trial taken over from another directory), the last epoch is reported again first, so
    that the scheduler decides on it before any new one; a trial taken over also keeps its
    history in its own directory."""
    if found is None:
        return False
    moved = member.source != member.folder
    if found.state.get("final"):
        if moved:
            report_epoch(found.state["final"], found.state, found.history)
        else:
            tune.report(found.state["final"])
        return True
    if moved or found.skipped or checkpoints.epoch_of(found.history) > _ray_epoch():
        note = {}
        if moved or found.skipped:
            where = found.name if not moved else f"{found.path.rsplit('/', 2)[-2]}/" \
                f"{found.name}"
            skipped = f" ({'; '.join(found.skipped)})" if found.skipped else ""
            note = {"resumed_from": f"{where}{skipped}"}
        report_epoch({**epochs[-1], **static, **note, "reported_again": True}, found.state,
                     {"epochs": epochs, "static": static, "final": None})
    return False


@dataclass
class _Job:
    """One Tune trial's members: their folders, configurations and checkpoints to go on
    from, and its data."""

    folders: list[MemberFolder]
    cfgs: list[TrialConfig]
    found: list[checkpoints.Found | None]
    data: ImageData
    pack: bool  # a pack (of any size), or a trial alone


def _job(config: dict, base: dict, datasets: dict[str, ImageData], run_dir: str,
         adopt: dict[str, str] | None) -> _Job:
    """Who trains in this Tune trial (``config``: a trial's point, or a pack's), as what,
    from where."""
    here = f"{run_dir.rstrip('/')}/{internals.trial_dir_name()}"
    folders = MemberFolder.of(config, here, run_dir, adopt)
    cfgs, found = [], []
    for member in folders:
        current = trial_config(base, member.point)
        newest = checkpoints.load_newest(*checkpoints.filesystem(member.source))
        if member.extends is None:
            cfg = recorded_config(member, current)
        elif newest is None:  # cae extend checked that it had one: it went since
            raise RuntimeError(f"{member.source}: no whole checkpoint left to train on from")
        else:  # cae extend: this run's point says what it runs, the old trial where it starts
            cfg = recorded_config(member, current, extended_at=int(newest.state["epoch"]))
            newest = extended(newest, cfg)
        cfgs.append(cfg)
        found.append(newest)
    key = cfgs[0].data.source_key()
    if key not in datasets:  # check_spec loads every grid value: a bug if this happens
        raise RuntimeError(f"no dataset loaded for {key}; loaded: {', '.join(datasets)}")
    return _Job(folders, cfgs, found, datasets[key], packfiles.is_pack_point(config))


def run_trial(config: dict, base: dict, datasets: dict[str, ImageData], run_dir: str,
              adopt: dict[str, str] | None = None, threads: int = 1) -> None:
    """Train one Tune trial of a sweep, a trial or a fused pack, reporting every epoch to
    Ray Tune (used with ``tune.with_parameters``; see the module doc).

    ``datasets`` holds every dataset of the sweep by ``DataConfig.source_key``; ``run_dir``
    is the run directory (a path or a URI); ``adopt`` maps search-space points to
    directories of a rebuilt run's earlier trials."""
    torch.set_num_threads(max(1, threads))
    job = _job(config, base, datasets, run_dir, adopt)
    if job.pack:
        _train_pack(job, config, run_dir)
    else:
        _train_alone(job)


def run_pack(config: dict, **kwargs) -> None:
    """``run_trial`` under the name the Tune trials of fused sweeps carry (their directories
    are ``run_pack_*``; a run is restored with the trainable of the name it began with)."""
    run_trial(config, **kwargs)


# ---- a trial alone ----------------------------------------------------------------------


def _train_alone(job: _Job) -> None:
    """One trial: its checkpoints through ``tune.report`` into its own directory."""
    (member,), (found,) = job.folders, job.found
    trainer = Trainer(job.cfgs[0], job.data)
    static = static_facts(trainer, job.data)
    if found is not None and not found.state.get("final"):
        trainer.load_state_dict(found.state)
    if go_on(found, member, trainer.history, static):
        return

    def on_epoch(metrics: dict[int, dict]) -> None:
        report = {**metrics[0], **static}
        state = trainer.state_dict()
        if "stop_reason" in report:  # the last epoch of this trial
            report.update(_end(trainer.member))
            state["final"] = trainer.member.final = report
        report_epoch(report, state, {"epochs": trainer.history, "static": static,
                                     "final": state.get("final")})

    loop.fit(trainer, on_epoch)


def _end(member: loop.Member) -> dict:
    """What a member's last report adds to its epoch: its test errors, or why it diverged."""
    return {**member.test, **({"error": member.error} if member.error else {})}


# ---- a pack -------------------------------------------------------------------------------


def _train_pack(job: _Job, config: dict, run_dir: str) -> None:
    """A fused pack: each member's checkpoint written into its folder every epoch; what Tune
    gets is the pack's epoch (``cae.sweep.members.pack_report``), with every member's
    metrics under halving, and no checkpoint (the members' are the pack's)."""
    pack = Pack(job.cfgs, job.data)
    states, slots = start_states(job.found, job.folders)
    pack.load_members(states, slots)
    static = static_facts(pack, job.data)
    name = job.folders[0].pack_name
    tune_id = tune.get_context().get_trial_id()
    ids = [f.trial_id(tune_id, found) for f, found in zip(job.folders, job.found)]
    book_ids = config.get("ids")

    def report(metrics: dict[int, dict]) -> dict:
        return {**pack_report(pack, metrics, job.folders, run_dir, ids, book_ids), **static}

    for folder, found in zip(job.folders, job.found):
        folder.take_over(found)
    if any(states):  # restarted, or formed from members that trained before: say where
        last = {i: m.history[-1] for i, m in enumerate(pack.members) if m.history}
        if not pack.live():
            tune.report({**report(last), "final": True})
            return
        tune.report({**report(last), "reported_again": True})
    for i in pack.live():
        clear_stop_mark(job.folders[i])

    def on_epoch(metrics: dict[int, dict]) -> None:
        for i, m in metrics.items():
            member = pack.members[i]
            before = member.history[-2]["time_total_s"] if len(member.history) > 1 else 0.0
            m["time_total_s"] = before + m["epoch_time_s"]
            m["pack"] = name
            if "stop_reason" in m:
                member.final = {**m, **static, **_end(member)}
            state = pack.member_state(i)
            state["pack"]["name"] = name  # a pack resumed from these takes its rows back
            save_member(job.folders[i], pack.epoch, state,
                        {"epochs": member.history, "static": {**static, "trial_id": ids[i]},
                         "final": member.final}, keep=job.folders[i].start_epoch)
        done = all(pack.members[i].stop_reason for i in pack.live())
        tune.report({**report(metrics), **({"final": True} if done else {})})

    loop.fit(pack, on_epoch, evaluate_test=pack.evaluate_test)
