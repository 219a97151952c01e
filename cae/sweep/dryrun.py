"""The dry run's text: what a sweep would run, checked, without starting anything.

``cae sweep --dry-run`` prints it: the trials, the scheduler and trial order, every distinct
architecture with its parameters, latent size and memory, the datasets, the strata of the
halving, the work at most, and what it will write to its storage.
"""

from __future__ import annotations

import json

from cae.config.trial import DataConfig
from cae.sweep.plan import Checked


def summarize(checked: Checked) -> str:
    """The dry run: trials, distinct architectures with params and latent size, the work."""
    from cae.model.plan import describe

    spec = checked.spec
    swept = spec.swept()
    sched = spec.scheduler
    how = sched.kind if not sched.stratify or sched.kind == "fifo" else (
        f"{sched.kind} per stratum of {', '.join(sched.stratify)}")
    if spec.search.kind == "optuna":
        first = min(spec.search.startup(spec.num_samples), spec.num_samples)
        order = (f"random axes proposed by Optuna's TPE, one search per grid point (its first "
                 f"{first} trials at random), seed {spec.seed}")
    else:
        order = f"trials started in an order shuffled with seed {spec.seed}"
    lines = [
        f"sweep {spec.name}: {checked.n_trials} trials ({checked.n_points} grid points x "
        f"{spec.num_samples} samples), scheduler {how}, {order}",
        f"distinct architectures: {len(checked.models)}",
        f"  {'params':>10} {'latent':>7} {'memory':>9}  grid point",
    ]
    rows = []
    for arch, (cfg, point) in checked.models.items():
        info = describe(cfg.model)
        label = ", ".join(f"{k}={json.dumps(v)}" for k, v in point.items()
                          if k.startswith(("model.", "variant")))
        rows.append((info["params"], info["latent_size"], checked.memory[arch],
                     label or cfg.model.preset or "base"))
    for params, latent, mem, label in sorted(rows, key=lambda r: (r[1], r[0])):
        lines.append(f"  {params:>10,} {latent:>7} {mem / 2**20:>5,.0f} MiB  {label}")
    lines.append(f"datasets: {len(checked.datasets)}"
                 + (", each loaded once" if len(checked.datasets) > 1 else ""))
    lines += [f"  {dataset_line(cfg)}" for cfg in checked.datasets.values()]
    if checked.budget is not None:
        lines.append(f"memory per trial: at most {max(checked.memory.values()) / 2**20:,.0f} MiB "
                     f"of the {checked.budget[0] / 2**20:,.0f} MiB a trial may use here "
                     f"({checked.budget[1]})")
    if checked.strata:
        sizes = sorted(set(checked.strata.values()))
        each = f"{sizes[0]} trials each" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} trials"
        lines.append(f"strata: {len(checked.strata)} ({each}); the best of each is trained "
                     "to the end:")
        lines += [f"  {label}: {n} trials" for label, n in checked.strata.items()]
    trial_epochs = checked.n_trials * checked.max_epochs
    lines.append(
        f"work: at most {trial_epochs:,} trial-epochs ({checked.n_trials} x "
        f"{checked.max_epochs}), {trial_epochs * checked.train_images:,} training images"
        + ("; weak trials stopped early" if spec.scheduler.kind != "fifo" else "")
    )
    lines.append(f"swept axes: {', '.join(swept) or 'none'}")
    lines.append(f"resources per trial: {spec.resources.cpu:g} cpu, {spec.resources.gpu:g} gpu")
    if checked.disk is not None:
        lines.append(f"storage: about {checked.disk} written to {spec.storage}")
    lines += [f"note: {note}" for note in checked.notes]
    return "\n".join(lines)


def dataset_line(cfg: DataConfig) -> str:
    """One dataset of the dry run: where from, how many images, their shape, and (a user's
    folder) whether its decoded images are cached."""
    from cae.config.catalog import USER_DATASETS

    if cfg.dataset in USER_DATASETS:
        from cae.data.userdata import describe

        return describe(cfg)
    info = cfg.info()
    n_train, n_test = cfg.sizes()
    where = ("inside the package" if cfg.dataset == "sample" else "scikit-image's photographs"
             if cfg.dataset == "photos" else "torchvision")
    return (f"{cfg.dataset}: {n_train:,} training + {n_test:,} test images, "
            f"{'x'.join(map(str, info.shape))} uint8, {where}")
