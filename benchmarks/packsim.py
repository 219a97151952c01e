"""Fused packs on 1 and 8 GPUs, by simulation: the time to the per-latent answer of Study B's
whole grid (``sweeps/study_b_denoise.yaml``: 3,456 trials of model 12's family, 60,000
images, ``sha`` per latent size) for (a) one trial per GPU under ``sha``, (b) FIFO packs,
(c) packs under ``sha`` with their survivors regrouped at each rung.

(a) runs the project's real searcher and scheduler on ``simulator.SimController`` (validated
against recorded runs, ``schedsim.py``); (c) runs the real fused sweep's book, searcher and
scheduler (``cae.sweep.packplan.fused_halving``) against a controller of pack trials on the
same kind of clock; (b) is the FIFO packs of ``cae.sweep.packplan.planned`` placed on the
first free GPU in the order Tune starts them.

No pack has run on a GPU yet, so a pack's cost as a function of its width is an assumption,
from HFTA's published scaling (Wang et al., MLSys 2021: fusing models raised trials per hour
2.4x to 11.5x over one model per GPU): a pack of K members takes one member's epoch time
until the card saturates at S members, then grows linearly, ``t(K) = t1 * max(1, K / S)``,
for S = 2.4 and 11.5. One trial's epoch (``alone_s``) is launch-bound, as model 12 (108k
parameters, 28x28 images) is on a GPU: its steps times its layers times three kernels
(forward, backward, update) times 10 us. The validation curves are drawn (the decisions,
not the losses, set the time); every run here decides alike, since (a) and (c) share the
rung book, and (b) trains everything.
"""

from __future__ import annotations

import heapq
import json
import math
import types

import numpy as np
import simulator as sim

GRID = str(__import__("common").ROOT / "sweeps" / "study_b_denoise.yaml")
KERNEL_S = 10e-6  # one kernel launch on a GPU (the launch-bound cost of a small model's step)
START_S = 2.0  # a Tune trial's start on its GPU: a pack rebuilt from its members' checkpoints


def grid(num_samples: int = 1, max_members: int = 32):
    """Study B's grid as a fused sweep spec."""
    from cae.config.spec import load_spec

    return load_spec(GRID, [f"num_samples={num_samples}",
                            f"fuse={{max_members: {max_members}}}", "resources.gpu=1"])


def alone_s(cfg) -> float:
    """One trial's epoch alone on a GPU (launch-bound, see the module doc)."""
    from cae.model.plan import layers

    enc, dec = layers(cfg.model, cfg.seed)
    n_train = round(cfg.data.sizes()[0] * (1 - cfg.data.val_fraction))
    return math.ceil(n_train / cfg.batch_size) * 3 * len(enc + dec) * KERNEL_S


def curves(keys: list[str], epochs: int, seed: int = 0) -> dict[str, tuple[float, ...]]:
    """A drawn validation curve per trial: its own floor and speed, a little noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in keys:
        floor, start, rate = rng.lognormal(-3.5, 0.3), rng.lognormal(-2.0, 0.2), rng.uniform(
            0.1, 0.5)
        e = np.arange(1, epochs + 1)
        noise = np.exp(rng.normal(0, 0.01, epochs))
        out[key] = tuple(float(x) for x in (floor + (start - floor) * np.exp(-rate * e)) * noise)
    return out


def pack_s(one: float, k: int, saturate: float) -> float:
    """A pack epoch of ``k`` members (HFTA's scaling, the module doc)."""
    return one * max(1.0, k / saturate)


def unfused(spec, works: dict[str, sim.Work], gpus: int) -> sim.Outcome:
    """(a) One trial per GPU under sha: the real scheduler on the simulated controller."""
    alone = spec.model_copy(update={"fuse": None})
    costs = sim.Costs(segment_s=START_S, new_worker_s=START_S)
    return sim.simulate(alone, lambda c: works[sim.config_key(c)], gpus, costs)


def fifo_packs(spec, seconds: dict[str, float], gpus: int, saturate: float) -> float:
    """(b) FIFO packs: each to the end, on the first free GPU, in the order Tune starts them."""
    from cae.sweep.packplan import planned
    from cae.sweep.tuner import param_space

    points, groups, cfgs = planned(spec, param_space(spec))
    free = [0.0] * gpus
    for members in groups:
        one = seconds[sim.config_key(points[members[0]])]
        epochs = cfgs[members[0]].max_epochs
        start = heapq.heappop(free)
        heapq.heappush(free, start + START_S + epochs * pack_s(one, len(members), saturate))
    return max(free)


class _Pack:
    """A pack trial on the simulated clock."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config, self.status = trial_id, config, "PENDING"
        self.epoch = int(config.get("epoch", 0))
        self.live = list(config["ids"])
        self.gen = 0


def halving_packs(spec, works: dict[str, sim.Work], seconds: dict[str, float], gpus: int,
                  saturate: float) -> dict:
    """(c) Packs under sha, regrouped at each rung: the real book, searcher and scheduler
    (``fused_halving``) against a controller of packs."""
    from cae.config.trial import TrialConfig
    from cae.sweep.packplan import fused_halving
    from cae.sweep.tuner import METRIC, MODE, param_space

    max_epochs = TrialConfig.model_validate(spec.trial).max_epochs
    searcher, scheduler = fused_halving(spec, param_space(spec), "/nowhere", max_epochs,
                                        metric=METRIC, mode=MODE)
    scheduler._mark = lambda stopped: None  # no run directory to mark
    packs: list[_Pack] = []
    events: list = []
    state = types.SimpleNamespace(now=0.0, free=gpus, pack_epochs=0, member_epochs=0)

    def stop(pack: _Pack) -> None:
        if pack.status == "RUNNING":
            pack.gen += 1
            state.free += 1
        pack.status = "TERMINATED"
        scheduler.on_trial_complete(controller, pack, None)

    controller = types.SimpleNamespace(search_alg=types.SimpleNamespace(searcher=searcher),
                                       get_trials=lambda: packs, stop_trial=stop,
                                       _mark_trial_to_checkpoint=lambda trial: None)
    seats = searcher.book.seats

    def epoch_s(pack: _Pack) -> float:
        return pack_s(seconds[sim.config_key(seats[pack.live[0]].point)], len(pack.live),
                      saturate)

    def start(pack: _Pack) -> None:
        pack.status, state.free = "RUNNING", state.free - 1
        heapq.heappush(events, (state.now + START_S + epoch_s(pack), id(pack), pack, pack.gen))

    while True:
        progressed = True
        while progressed:  # hand out what the book formed, start what waits for a GPU
            while isinstance(config := searcher.suggest(f"{len(packs):08x}"), dict):
                packs.append(_Pack(f"{len(packs):08x}", config))
            while state.free > 0 and (pack := scheduler.choose_trial_to_run(controller)):
                start(pack)
            progressed = state.free > 0 and bool(searcher.book.formed)  # formed meanwhile
        if not events:
            break
        state.now, _, pack, gen = heapq.heappop(events)
        if gen != pack.gen or pack.status != "RUNNING":
            continue
        pack.epoch += 1
        state.pack_epochs += 1
        state.member_epochs += len(pack.live)
        result = {"epoch": pack.epoch, "val_loss": 0.0}
        for mid in pack.live:
            work = works[sim.config_key(seats[mid].point)]
            result[f"members/{mid}/epoch"] = pack.epoch
            result[f"members/{mid}/val_loss"] = work.val_loss[pack.epoch - 1]
            result[f"members/{mid}/home"] = f"sim/{mid}"  # its folder, as a pack reports it
            if pack.epoch >= len(work.val_loss):
                result[f"members/{mid}/stop_reason"] = work.own_end
        decision = scheduler.on_trial_result(controller, pack, result)
        pack.live = [m for m in pack.live
                     if f"members/{m}/stop_reason" not in result]
        if decision == "STOP" or not pack.live:
            pack.status, state.free = "TERMINATED", state.free + 1
            scheduler.on_trial_complete(controller, pack, None)
        else:
            heapq.heappush(events, (state.now + epoch_s(pack), id(pack), pack, pack.gen))
    if not searcher.book.finished():
        raise RuntimeError("the simulated fused sweep stalled")
    return {"wall_s": state.now, "packs": len(packs), "pack_epochs": state.pack_epochs,
            "trial_epochs": state.member_epochs}


def compare(num_samples: int, gpus: list[int], saturations: list[float]) -> dict:
    """(a), (b) and (c) for Study B's grid with ``num_samples`` repeats per point."""
    from cae.config.points import trial_config
    from cae.sweep.packplan import trial_points
    from cae.sweep.tuner import param_space

    spec = grid(num_samples)
    points = trial_points(spec, param_space(spec))
    keys = [sim.config_key(p) for p in points]
    cfgs = {k: trial_config(spec.trial, p) for k, p in zip(keys, points)}
    seconds = {k: alone_s(c) for k, c in cfgs.items()}
    epochs = max(c.max_epochs for c in cfgs.values())
    drawn = curves(keys, epochs)
    works = {k: sim.Work(drawn[k], (seconds[k],) * epochs) for k in keys}
    out = {"trials": len(points), "num_samples": num_samples, "runs": []}
    from cae.sweep.packplan import planned

    out["fifo_packs"] = len(planned(spec, param_space(spec))[1])
    for g in gpus:
        a = unfused(spec, works, g)
        for s in saturations:
            b = fifo_packs(spec, seconds, g, s)
            c = halving_packs(spec, works, seconds, g, s)
            out["runs"].append({
                "gpus": g, "saturation_members": s,
                "one_trial_per_gpu_sha_h": round(a.wall_s / 3600, 3),
                "fifo_packs_h": round(b / 3600, 3), "packs_sha_h": round(c["wall_s"] / 3600, 3),
                "packs_sha_vs_one_trial": round(a.wall_s / c["wall_s"], 3),
                "packs_sha_vs_fifo_packs": round(b / c["wall_s"], 3),
                "trial_epochs_one_trial": a.trial_epochs, "trial_epochs_packs": c["trial_epochs"],
                "packs": c["packs"], "pack_epochs": c["pack_epochs"]})
    return out


def describe_runs(result: dict) -> str:
    rows = [(r["gpus"], r["saturation_members"], f"{r['one_trial_per_gpu_sha_h']:.2f}",
             f"{r['fifo_packs_h']:.2f}", f"{r['packs_sha_h']:.2f}",
             f"{r['packs_sha_vs_one_trial']:.2f}x", f"{r['packs_sha_vs_fifo_packs']:.2f}x",
             r["packs"]) for r in result["runs"]]
    import common

    return common.table(rows, ("GPUs", "S", "(a) h", "(b) h", "(c) h", "(a)/(c)", "(b)/(c)",
                               "packs (c)"))


def figure(grids: list[dict], path) -> str:
    """Hours to the per-latent answer, (a) (b) (c), per grid, GPUs and saturation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(6 * len(grids), 4.2), squeeze=False)
    names = (("one_trial_per_gpu_sha_h", "(a) one trial per GPU, sha"),
             ("fifo_packs_h", "(b) FIFO packs"), ("packs_sha_h", "(c) packs under sha"))
    for ax, g in zip(axes[0], grids):
        labels = [f"{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}\nS={r['saturation_members']}"
                  for r in g["runs"]]
        x = np.arange(len(labels))
        for i, (key, name) in enumerate(names):
            ax.bar(x + (i - 1) * 0.27, [r[key] for r in g["runs"]], 0.27, label=name)
        ax.set_xticks(x, labels)
        ax.set_yscale("log")
        ax.set_ylabel("hours to the per-latent answer (simulated)")
        ax.set_title(f"Study B's grid: {g['trials']:,} trials ({g['num_samples']} per point)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    print(json.dumps(compare(1, [1], [2.4]), indent=1))
