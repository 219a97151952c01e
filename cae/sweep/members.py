"""The members of one Tune trial of a sweep, in the run directory: where each one's files are,
where it goes on from, what configuration it runs, and its checkpoints (written and read).
Ray-free, for ``cae.sweep.trainable``.

A Tune trial's config says who trains in it (``cae.run.packfiles``): a trial's search-space
point (the trial alone, in the Tune trial's own directory), a pack's points (``pack``; each
member in a ``member_NN`` folder of the pack's directory), or, for a pack formed from members
that trained in earlier packs (``cae.sweep.packs``), also their folders (``homes``, relative
to the run directory) and the epoch they are at (``epoch``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import torch

from cae.config.trial import TrialConfig
from cae.run import checkpoints, packfiles
from cae.run.directory import write_file
from cae.run.diskspace import CHECKPOINTS_KEPT
from cae.run.record import RECORD_FILE, make_record, trial_config_of
from cae.run.state import point_key
from cae.sweep.extension import read_sources


@dataclass
class MemberFolder:
    """One member of a Tune trial: its ``folder`` in the run, the ``source`` it goes on from
    (its folder, or the folder it takes over: an earlier trial of a rebuilt run, or, with
    ``extends`` set, a trial of another run that ``cae extend`` trains on), its point and
    index, the name of the Tune trial's directory that trains it now (``pack_name``), and
    the epoch that trial expects it at (0: wherever its checkpoints are)."""

    folder: str
    source: str
    point: dict
    index: int = 0
    pack_name: str = ""
    extends: str | None = None
    depth: int = 1  # the parts of ``source`` a record that continues it names
    start_epoch: int = 0
    fused: dict | None = None  # its record's ``fused``: the pack it first trained in

    @classmethod
    def of(cls, config: dict, here: str, run_dir: str, adopt: dict[str, str] | None
           ) -> list[MemberFolder]:
        """The members of the Tune trial in directory ``here`` with ``config``."""
        run_dir = run_dir.rstrip("/")
        name = here.rstrip("/").rsplit("/", 1)[-1]
        if not packfiles.is_pack_point(config):
            own, source = _own_and_source(run_dir, here, config, adopt)
            return [cls(own, source, config, extends=extension_of(run_dir, source))]
        points = config[packfiles.PACK_KEY]
        homes = config.get(packfiles.HOMES_KEY)
        if homes:  # formed from members of earlier packs: each trains in its own folder
            return [cls(f"{run_dir}/{home}", f"{run_dir}/{home}", p, i, name,
                        start_epoch=int(config.get(packfiles.EPOCH_KEY, 0)))
                    for i, (home, p) in enumerate(zip(homes, points))]
        _, pack_source = _own_and_source(run_dir, here, config, adopt)
        sources = read_sources(run_dir)  # cae extend's, if any
        out = []
        for i, p in enumerate(points):
            folder = f"{here.rstrip('/')}/{packfiles.member_name(i)}"
            source = f"{pack_source.rstrip('/')}/{packfiles.member_name(i)}"
            if point_key(p) in sources and not _has_checkpoint(folder):
                source = sources[point_key(p)]
            out.append(cls(folder, source, p, i, name, extends=extension_of(run_dir, source),
                           depth=2, fused={"pack": name, "members": len(points)}))
        return out

    def trial_id(self, tune_trial_id: str, found: checkpoints.Found | None) -> str:
        """The member's trial id in the tables: the one it was given when it first trained in
        its folder (by the Tune trial of that pack, and its index there), else this Tune
        trial's with its index."""
        if found is not None and self.source == self.folder:
            given = (found.history.get("static") or {}).get("trial_id")
            if given:
                return str(given)
        return f"{tune_trial_id}_{self.index:02d}"

    def take_over(self, found: checkpoints.Found | None) -> None:
        """A member that goes on from another folder keeps its newest checkpoint in its own
        (the tables then leave the one taken over out, and a member that had already
        stopped need train no epoch to have one)."""
        if found is not None and self.source != self.folder:
            save_member(self, int(found.state["epoch"]), found.state, found.history)


def _has_checkpoint(folder: str) -> bool:
    return bool(checkpoints.list_checkpoints(*checkpoints.filesystem(folder)))


def _own_and_source(run_dir: str, here: str, config: dict, adopt: dict[str, str] | None
                    ) -> tuple[str, str]:
    """A Tune trial's directory, and the one it goes on from: its own, or, when it has no
    checkpoint yet and ``adopt`` names an earlier directory for its point, that one: a
    directory of this run (a run whose state was lost, ``cae.run.state.orphans``), or by
    its full path or URI a trial of another run that this one trains on (``cae extend``)."""
    adopt = {**read_sources(run_dir), **(adopt or {})}
    if point_key(config) in adopt and not _has_checkpoint(here) and not any(
            _has_checkpoint(f"{here}/{packfiles.member_name(i)}")
            for i in range(len(config.get(packfiles.PACK_KEY) or []))):
        where = adopt[point_key(config)]
        outside = "://" in where or where.startswith("/")
        return here, where if outside else f"{run_dir}/{where}"
    return here, here


def extension_of(run_dir: str, source: str) -> str | None:
    """How the record of a trial names the trial of another run it trains on: relative to
    the storage the two runs share (``<run>/<trial dir>``), else in full; None for a source
    in this run."""
    run_dir = run_dir.rstrip("/")
    if source.startswith(run_dir + "/"):
        return None
    storage = run_dir.rsplit("/", 1)[0] + "/"
    return source.removeprefix(storage) if source.startswith(storage) else source


def extended(found: checkpoints.Found, cfg: TrialConfig) -> checkpoints.Found:
    """A finished trial's newest checkpoint made the start of its extension: no final
    report (it trains on to ``cfg.max_epochs``), its last epoch no longer its end, and a
    fresh patience where it had run out (an extension of a trial stopped by patience gets
    ``patience`` epochs to improve)."""
    state = dict(found.state, final=None)
    history = [dict(h) for h in state.get("history") or []]
    if history:
        history[-1].pop("stop_reason", None)
    state["history"] = history
    if cfg.patience and int(state.get("bad_epochs", 0)) >= cfg.patience:
        state["bad_epochs"] = 0
    return checkpoints.Found(found.path, state, {**found.history, "epochs": history,
                                                  "final": None}, found.skipped)


# ---- what a member runs ----------------------------------------------------------------------


def read_record(location: str) -> dict | None:
    """The record a trial (or a pack's member) wrote in ``location`` at its first start."""
    fs, path = checkpoints.filesystem(location)
    try:
        with fs.open_input_stream(f"{path}/{RECORD_FILE}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def recorded_config(member: MemberFolder, current: TrialConfig,
                    extended_at: int | None = None) -> TrialConfig:
    """The configuration a member runs: the record of its first start (in its folder, or
    in the folder it takes over), else ``current``, recorded now. A record taken over names
    the trial it ``continues``; a member of ``cae extend`` records its own point's
    configuration, the trial it ``extends`` and the epoch it took over at
    (``extended_at``); a pack's member its pack (``fused``) and, in ``params.json``, its
    point."""
    record = read_record(member.folder)
    if record is None:
        moved = member.source != member.folder and member.extends is None
        record = (read_record(member.source) if moved else None) or make_record(
            current, member.point)
        if moved:  # the tables then leave the trial taken over out
            parts = member.source.rstrip("/").rsplit("/", member.depth)[-member.depth:]
            record["continues"] = "/".join(parts)
        if member.extends is not None:
            record.update({"extends": member.extends, "extended_at": extended_at or 0})
        if member.fused is not None:
            record["fused"] = member.fused
            write_file(member.folder, "params.json", json.dumps(member.point).encode())
        write_file(member.folder, RECORD_FILE, json.dumps(record).encode())
    # where the data are read from may differ on a resume (cae resume --data-dir)
    return trial_config_of(record, {}, member.point, current.data.data_dir)


# ---- a pack member's checkpoints ---------------------------------------------------------------


def save_member(member: MemberFolder, epoch: int, state: dict, history: dict,
                keep: int = 0) -> None:
    """A pack member's checkpoint in its folder, as a trial's (``cae.run.checkpoints``): the
    newest few are kept, and the one at epoch ``keep`` (where the pack training it started:
    a pack formed again after an interruption can always start its members there)."""
    name = f"{checkpoints.PREFIX}{epoch:06d}"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_file(f"{member.folder}/{name}", checkpoints.STATE_FILE, buffer.getvalue())
    write_file(f"{member.folder}/{name}", checkpoints.HISTORY_FILE,
               json.dumps(history, default=float).encode())
    fs, path = checkpoints.filesystem(member.folder)
    kept = f"{checkpoints.PREFIX}{keep:06d}"
    for old in checkpoints.list_checkpoints(fs, path)[CHECKPOINTS_KEPT:]:
        if not old.endswith("/" + kept):
            fs.delete_dir(old)


def _ended(found: checkpoints.Found) -> bool:
    history = found.state.get("history") or []
    return bool(found.state.get("final") or found.state.get("error")
                or (history and history[-1].get("stop_reason")))


def start_states(found: list[checkpoints.Found | None], members: list[MemberFolder]
                 ) -> tuple[list[dict | None], list | None]:
    """Each member's checkpoint for ``Pack.load_members``, the members still training all at
    one epoch (a pack killed while it wrote its members' checkpoints left some an epoch
    ahead: they go back to the others' epoch; failing that, to where the pack started),
    and the pack's rows where the members come from this very pack (its own resume)."""
    if not any(found):
        return [None] * len(found), None
    live = [i for i, f in enumerate(found) if f is None or not _ended(f)]
    if any(found[i] is None for i in live):  # some never saved one: every member afresh
        if members[0].start_epoch:
            raise RuntimeError(f"{members[0].folder}: a member to go on from epoch "
                               f"{members[0].start_epoch} has no checkpoint")
        return [None] * len(found), None
    states = [f.state if f is not None else None for f in found]
    epochs = {int(found[i].state["epoch"]) for i in live}
    if len(epochs) > 1:
        target = min(epochs)
        for i in live:
            states[i] = _state_at(members[i], found[i], target) or _state_at(
                members[i], found[i], members[i].start_epoch)
            if states[i] is None:
                raise RuntimeError(f"{members[i].folder}: no checkpoint at epoch {target} "
                                   f"or {members[i].start_epoch} to line it up with its pack")
    if len({int(states[i]["epoch"]) for i in live}) > 1:
        raise RuntimeError("the members of a pack cannot be lined up at one epoch: "
                           + ", ".join(f"{members[i].folder} at {states[i]['epoch']}"
                                       for i in live))
    own = [((states[i].get("pack") or {}).get("name"), str((states[i].get("pack") or {}).get(
        "slots"))) for i in live]
    slots = None
    if live and len(set(own)) == 1 and own[0][0] == members[0].pack_name:
        slots = states[live[0]]["pack"]["slots"]
    return states, slots


def _state_at(member: MemberFolder, found: checkpoints.Found, epoch: int) -> dict | None:
    """The member's checkpoint at ``epoch`` (its newest if that is the one), or None."""
    if int(found.state["epoch"]) == epoch:
        return found.state
    if not epoch:
        return None
    fs, path = checkpoints.filesystem(member.source)
    one = checkpoints.load(fs, f"{path.rstrip('/')}/{checkpoints.PREFIX}{epoch:06d}")
    return one.state if one is not None else None


# ---- what Tune sees of a pack --------------------------------------------------------------

# each member's metrics a pack's report carries, for a scheduler that decides per member
MEMBER_KEYS = ("epoch", "train_loss", "val_loss", "best_val_loss", "best_epoch",
               "stop_reason", "epoch_time_s")


def pack_report(pack, metrics: dict[int, dict], folders: list[MemberFolder], run_dir: str,
                ids: list[str], book_ids: list[str] | None) -> dict:
    """A pack's epoch as Tune sees it: its members' best losses (FIFO reads nothing), how
    many trained and stopped, the trial-epochs trained in this pack (the progress bar), and
    under ``members`` each member's metrics, trial id (``ids``), folder (relative to the run
    directory) and divergence, by its id in ``cae.schedule.packbook`` under halving
    (``book_ids``), else by its trial id."""
    vals = [m["val_loss"] for m in metrics.values()]
    finite = [v for v in vals if v == v and abs(v) != float("inf")]
    report = {"epoch": pack.epoch, "val_loss": min(finite, default=float("nan")),
              "best_val_loss": min((pack.members[i].stopping.best_val for i in metrics),
                                   default=float("nan")),
              "pack_members": len(metrics),
              "members_stopped": sum(1 for m in pack.members if m.stop_reason),
              "member_epochs": sum(max(0, len(m.history) - f.start_epoch)
                                   for m, f in zip(pack.members, folders))}
    prefix = run_dir.rstrip("/") + "/"
    keys = book_ids or ids
    report["members"] = {keys[i]: {**{k: m[k] for k in MEMBER_KEYS if k in m},
                                   "trial": ids[i],
                                   "home": folders[i].folder.removeprefix(prefix),
                                   **({"error": pack.members[i].error}
                                      if pack.members[i].error else {})}
                         for i, m in metrics.items()}
    return report


def clear_stop_mark(member: MemberFolder) -> None:
    """A member trained again has no stop mark (one left by a decision that a resumed sweep
    took again otherwise)."""
    fs, path = checkpoints.filesystem(member.folder)
    mark = f"{path.rstrip('/')}/{packfiles.STOPPED_FILE}"
    try:
        fs.delete_file(mark)
    except (FileNotFoundError, OSError):
        pass
