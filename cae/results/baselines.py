"""Reference errors for a sweep's report: PCA at every latent size, and the identity.

A CAE's error means little on its own; the report's "latent size versus error" figure puts
beside it what a linear model of the same size achieves, so a CAE that does not beat it is
visible at a glance:

- ``pca`` (tasks ``reconstruct`` and ``denoise``): PCA fitted on the clean training split
  (the very split the trials train on), then ``clamp(mean + (x - mean) V_k V_k^T, 0, 1)``
  for the task's evaluation input ``x``, scored against the task's target. For
  ``reconstruct`` with MSE this is, before the clamp, the lowest error any linear
  autoencoder of width ``k`` reaches on its training data (Eckart-Young; Baldi & Hornik
  1989), and the clamp (a sigmoid output stays in [0, 1] too) can only lower the error to a
  target in [0, 1]; for ``denoise`` it is "project the distorted input onto the clean data's
  principal subspace": a reference, not a bound (a linear map trained on distorted/clean
  pairs can do better).
- ``identity`` (task ``denoise``): the error of handing back the distorted input unchanged,
  the floor any denoiser has to get under. It has no latent size.

Scores use the sweep's own loss through :func:`cae.train.trainer.per_sample_loss` on the same
validation and test inputs as the trials (seeds ``eval_seed`` and ``eval_seed + 1``), so the
numbers are on exactly the scale of the trials' ``val_loss`` and ``test_loss``, per
distortion included. The report reads them from ``baselines.parquet`` in the run directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from cae.config.trial import TrialConfig
from cae.data.datasets import ImageData, load, split
from cae.results.tables import parquet_bytes, read_baselines  # noqa: F401
from cae.run.directory import BASELINES_FILE, write_file
from cae.train.loop import per_sample_loss
from cae.train.tasks import Task, make_task

# Columns of every baselines frame; denoise adds one ``loss_<distortion>`` per distortion.
COLUMNS = ("dataset", "task", "loss_kind", "baseline", "latent_size", "components", "split",
           "loss")
_CHUNK = 4096  # images per step, for the covariance and for scoring: bounded memory


@dataclass(frozen=True)
class PCA:
    """Leading principal components of flattened images in [0, 1] (float64, on the CPU).

    ``components`` holds the leading directions as columns, by decreasing variance: at most
    the ``max_components`` asked of :func:`fit_pca`, and only directions with non-zero
    training variance (the others are not determined by the data: any orthonormal
    completion fits the training set equally well). ``dim`` is the input dimension C*H*W.
    """

    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (D, R), orthonormal columns
    variances: torch.Tensor  # (R,), decreasing
    dim: int

    def used(self, k: int) -> int:
        """Components a latent size ``k`` gets: ``dim`` from ``k >= dim`` on (the full basis
        reproduces its input exactly, whatever the training data), else ``k`` capped at
        the components there are (the training data's rank, when that is smaller)."""
        return self.dim if k >= self.dim else min(k, self.components.shape[1])


def fit_pca(images: torch.Tensor, max_components: int | None = None) -> PCA:
    """PCA of uint8 images ``(N, C, H, W)`` seen as float vectors in [0, 1] of length C*H*W.

    The covariance is accumulated in float64 over chunks of images (memory stays bounded)
    and decomposed once with ``torch.linalg.eigh``; every latent size is then scored from
    that one decomposition. ``max_components`` (default: all) keeps only the leading ones;
    0 needs only the mean, so nothing is decomposed.
    """
    n = images.shape[0]
    flat = images.reshape(n, -1)  # (N, D) uint8
    d = flat.shape[1]
    mean = torch.zeros(d, dtype=torch.float64)
    for s in range(0, n, _CHUNK):
        mean += flat[s : s + _CHUNK].sum(0, dtype=torch.float64)
    mean /= 255.0 * n
    if max_components == 0:
        empty = torch.zeros(d, 0, dtype=torch.float64)
        return PCA(mean=mean, components=empty, variances=empty[0], dim=d)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, n, _CHUNK):
        xc = flat[s : s + _CHUNK].to(torch.float64).div_(255.0).sub_(mean)  # (B, D)
        cov.addmm_(xc.T, xc)
    cov /= max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)  # (D,), (D, D) by decreasing variance
    # Eigenvalues below this are rounding noise of the covariance, not variance of the data.
    tol = float(evals[0]) * max(n, d) * torch.finfo(torch.float64).eps
    rank = int((evals > tol).sum()) if float(evals[0]) > 0 else 0
    keep = rank if max_components is None else min(rank, max_components)
    return PCA(mean=mean, components=evecs[:, :keep].contiguous(),
               variances=evals[:keep].contiguous(), dim=d)


def _check_sizes(latent_sizes: Iterable[int]) -> list[int]:
    sizes = set()
    for k in latent_sizes:
        if isinstance(k, float) and not k.is_integer():
            raise ValueError(f"latent sizes must be whole numbers, got {k!r}")
        if int(k) < 0:
            raise ValueError(f"latent sizes must be >= 0, got {k!r}")
        sizes.add(int(k))
    return sorted(sizes)


@torch.inference_mode()
def _score(pca: PCA, sizes: list[int], prepared: tuple, task: Task, loss_kind: str,
           identity: bool) -> list[dict]:
    """Mean loss (and per group) of PCA at each size, and of the identity, on one prepared
    split; one pass over the split, each size adding its components to the last one's."""
    x_all, y_all, groups = prepared
    n = x_all.shape[0]
    names = task.group_names or []
    keys = [("pca", k) for k in sizes] + ([("identity", None)] if identity else [])
    sums = {key: torch.zeros((), dtype=torch.float64) for key in keys}
    per_group = {key: torch.zeros(len(names), dtype=torch.float64) for key in keys}
    counts = torch.zeros(len(names), dtype=torch.float64)
    mean = pca.mean.to(torch.float32)  # (D,)
    v = pca.components.to(torch.float32)  # (D, R)
    r = max([pca.used(k) for k in sizes if pca.used(k) < pca.dim], default=0)

    def add(key, losses: torch.Tensor, g: torch.Tensor | None) -> None:
        sums[key] += losses.sum()
        if names:
            per_group[key].index_add_(0, g, losses)

    for s in range(0, n, _CHUNK):
        x, y = x_all[s : s + _CHUNK].cpu(), y_all[s : s + _CHUNK].cpu()  # (B, C, H, W)
        g = None if groups is None else groups[s : s + _CHUNK].cpu()
        if names:
            counts.index_add_(0, g, torch.ones(g.shape[0], dtype=torch.float64))
        flat = x.reshape(x.shape[0], -1)  # (B, D)
        z = (flat - mean) @ v[:, :r]  # (B, r) coordinates in the leading components
        recon = mean.expand_as(flat).clone()  # (B, D), k = 0: the training mean
        done = 0
        for k in sizes:
            c = pca.used(k)
            if c >= pca.dim:  # the full basis reproduces its input exactly
                out = x.clamp(0.0, 1.0)
            else:
                if c > done:
                    recon.addmm_(z[:, done:c], v[:, done:c].T)  # (B, D)
                    done = c
                out = recon.clamp(0.0, 1.0).view_as(y)
            add(("pca", k), per_sample_loss(loss_kind, out, y).double(), g)
        if identity:
            add(("identity", None), per_sample_loss(loss_kind, x, y).double(), g)

    rows = []
    for key in keys:
        kind, k = key
        row = {"baseline": kind,
               "latent_size": math.nan if k is None else float(k),
               "components": math.nan if k is None else float(pca.used(k)),
               "loss": float(sums[key]) / n}
        for name, total, count in zip(names, per_group[key].tolist(), counts.tolist()):
            row[f"loss_{name}"] = total / count if count else math.nan
        rows.append(row)
    return rows


@torch.inference_mode()
def _mean_target_rows(cfg: TrialConfig, splits, task: Task) -> list[dict]:
    """The per-pixel mean target of the training split as a constant prediction, scored on
    the validation and test splits like the trials."""
    total, n = None, 0
    for s in range(0, splits.train.shape[0], _CHUNK):
        _, y, _ = task.batch(splits.train[s : s + _CHUNK].cpu(), None)
        part = y.double().sum(0)
        total, n = (part if total is None else total + part), n + y.shape[0]
    mean = (total / n).float()  # (C, H, W)
    rows = []
    for split_name, images, seed in (("val", splits.val, cfg.task.eval_seed),
                                     ("test", splits.test, cfg.task.eval_seed + 1)):
        _, y_all, _ = task.eval_inputs(images, seed=seed)
        losses = sum(float(per_sample_loss(cfg.loss, mean.expand_as(y), y).double().sum())
                     for y in (y_all[s : s + _CHUNK].cpu()
                               for s in range(0, y_all.shape[0], _CHUNK)))
        rows.append({"dataset": cfg.data.label(), "task": cfg.task.name, "loss_kind": cfg.loss,
                     "baseline": "mean_chroma", "latent_size": math.nan,
                     "components": math.nan, "split": split_name,
                     "loss": losses / y_all.shape[0]})
    return rows


def compute_baselines(cfg: TrialConfig, data: ImageData | None,
                      latent_sizes: Iterable[int]) -> pd.DataFrame:
    """Reference errors of the sweep whose trials share ``cfg``'s data, task and loss.

    One row per baseline x latent size x split (``val``, ``test``): ``pca`` at every size of
    ``latent_sizes`` (deduplicated, sorted; 0 means predicting the training mean), and for
    ``denoise`` also ``identity`` (``latent_size`` NaN). ``components`` says how many
    principal components a size really got: a size at or above the input dimension C*H*W
    gets all of them (exact reconstruction of the input), a size above the training data's
    rank below that gets the rank. ``latent_size`` and ``components`` are floats because the
    identity has none (whole numbers elsewhere). ``loss`` is ``cfg.loss`` averaged over
    the split's samples, as the trials' ``val_loss`` / ``test_loss``; denoise adds
    ``loss_<distortion>`` as the trials' ``val_loss_<distortion>``. ``data`` None loads
    ``cfg.data``.

    ``colorize`` gets one baseline, ``mean_chroma`` (``latent_size`` NaN): every pixel
    coloured with the training images' mean chroma at that pixel, whatever the input; a
    model that does not beat it has learned no colour from the luma. PCA does not apply:
    input (luma) and target (chroma) are different signals, so a PCA of the input (a linear
    *autoencoder*) does not predict the target, and there is no identity to return.
    """
    sizes = _check_sizes(latent_sizes)
    name = cfg.task.name
    data = data if data is not None else load(cfg.data)
    splits = split(data, cfg.data.val_fraction, cfg.data.split_seed)
    task = make_task(cfg.task)
    if "mean_chroma" in task.references:
        return _frame(_mean_target_rows(cfg, splits, task), [])
    d = math.prod(splits.train.shape[1:])
    need = max([k for k in sizes if k < d], default=0)
    pca = fit_pca(splits.train, max_components=need)
    rows = []
    for split_name, images, seed in (("val", splits.val, cfg.task.eval_seed),
                                     ("test", splits.test, cfg.task.eval_seed + 1)):
        prepared = task.eval_inputs(images, seed=seed)
        for row in _score(pca, sizes, prepared, task, cfg.loss,
                          identity="identity" in task.references):
            rows.append({"dataset": cfg.data.label(), "task": name, "loss_kind": cfg.loss,
                         "split": split_name, **row})
    order = {"pca": 0, "identity": 1}
    rows.sort(key=lambda r: (order[r["baseline"]], r["split"] != "val",
                             -1.0 if math.isnan(r["latent_size"]) else r["latent_size"]))
    return _frame(rows, [f"loss_{g}" for g in task.group_names or []])


def for_configs(configs: Iterable[TrialConfig],
                datasets: dict[str, ImageData] | None = None) -> pd.DataFrame:
    """The baselines of a whole sweep: its trials grouped by what the references depend on
    (the images, their split, the task and the loss), each group scored at every latent
    size its trials have. ``datasets`` (by ``DataConfig.source_key``) spares reloading what
    the driver already holds."""
    from cae.model.plan import describe

    groups: dict[str, tuple[TrialConfig, set[int]]] = {}
    for cfg in configs:
        key = json.dumps([cfg.data.source_key(), cfg.data.val_fraction, cfg.data.split_seed,
                          cfg.task.model_dump(mode="json"), cfg.loss])
        groups.setdefault(key, (cfg, set()))[1].add(describe(cfg.model)["latent_size"])
    frames = [compute_baselines(cfg, (datasets or {}).get(cfg.data.source_key()), sorted(sizes))
              for cfg, sizes in groups.values()]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else _frame([], [])


def _frame(rows: list[dict], group_columns: list[str]) -> pd.DataFrame:
    columns = [*COLUMNS, *group_columns]
    frame = pd.DataFrame(rows, columns=columns)
    for col in ("latent_size", "components", "loss", *group_columns):
        frame[col] = frame[col].astype("float64")
    return frame


def write_baselines(run_dir: Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` to ``run_dir/baselines.parquet`` (whole: a report reading the run
    meanwhile sees the old file or the new one, never half of one); returns the path."""
    write_file(run_dir, BASELINES_FILE, parquet_bytes(frame))
    return Path(run_dir) / BASELINES_FILE
