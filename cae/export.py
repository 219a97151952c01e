"""A trial's model out of a run: ``load_model``, torch.export programs, encoding images.

>>> from cae import load_model
>>> model, config = load_model("runs/quickstart-20250101-120000", trial={"latent_size": 8})
>>> z = model.encode(images)  # (B, C, H, W) floats in [0, 1] -> (B, 8)

Which trial: the table every reader uses, ``RUN_DIR/trials.parquet``. ``"best"`` is the
lowest best validation loss among the trials trained to their own end (max_epochs or
patience: neither stopped by the scheduler nor unfinished), a filter such as
``{"latent_size": 8}`` the same among those with that value, a string a trial id (or its
number, or its directory). The model gets the weights of its best epoch (by validation
loss, as the test errors were measured), on the CPU, in eval mode.

``export_models`` writes, per trial, ``encoder.pt2`` and ``decoder.pt2`` (torch.export
programs that need torch alone: images in [0, 1] of the trained shape -> latents (B,
latent size), and back), ``weights.pt`` (the state dict), ``config.json`` (the trial's
full config) and ``card.md`` (what it is and how good). ``encode`` turns a folder or an
array file of images into latents, preprocessed exactly as in training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cae.config.errors import UserError
from cae.config.trial import TrialConfig
from cae.model.network import CAE, build_model, count_params

if TYPE_CHECKING:  # pandas and the run directories are read only when a run is
    import pandas as pd

WEIGHTS, CONFIG, CARD = "weights.pt", "config.json", "card.md"
ENCODER, DECODER = "encoder.pt2", "decoder.pt2"
MAX_BATCH = 1 << 20  # the largest batch the exported programs accept


# ---- which trial --------------------------------------------------------------------------


def row_config(local: Path, trial: pd.Series) -> TrialConfig:
    """The config the trial of a ``trials`` row ran (``cae.run.record.trial_config_of``)."""
    from cae.results.tables import read_trial
    from cae.run import directory as rundir
    from cae.run.record import trial_config_of

    files = read_trial(local / str(trial["trial_dir"]), outcome=False)
    return trial_config_of(files.record, rundir.read_spec(local).get("trial") or {},
                           files.point)


def read_trials(run_dir: str) -> tuple[pd.DataFrame, Path]:
    """A run's ``trials`` table (``trials.parquet``, brought up to date if the run wrote
    since) and a local copy of the run (its mirror for a URI)."""
    from cae.results.tables import tables
    from cae.run import directory as rundir

    local = rundir.local_copy(run_dir)
    trials = tables(local).trials
    if trials.empty:
        raise UserError(f"{run_dir}: no trials yet")
    return trials, local


def trained_to_the_end(trials: pd.DataFrame) -> pd.Series:
    """Trials that ended by themselves (max_epochs or patience) and hold a validation loss."""
    import pandas as pd

    from cae.run import outcomes

    has_loss = pd.to_numeric(trials["best_val_loss"], errors="coerce").notna()
    return outcomes.trained_to_the_end(trials) & has_loss


def select(trials: pd.DataFrame, trial: str | dict = "best") -> pd.Series:
    """One row of ``trials``: see the module doc."""
    import pandas as pd

    if isinstance(trial, str) and trial != "best":
        return _by_id(trials, trial)
    wanted = trial if isinstance(trial, dict) else {}
    done = trials[trained_to_the_end(trials)]
    for key, value in wanted.items():
        if key not in trials:
            near = [c for c in trials.columns if key.split(".")[-1] in c][:6]
            raise UserError(f"trial filter {key!r}: trials.parquet has no such column"
                            + (f" (did you mean {', '.join(near)}?)" if near else ""))
        done = done[_matches(done[key], value)]
    if done.empty:
        what = ", ".join(f"{k}={v}" for k, v in wanted.items()) or "any value"
        raise UserError(f"no trial trained to its end with {what} (trials stopped early or "
                        "unfinished are not picked)")
    return done.loc[pd.to_numeric(done["best_val_loss"]).idxmin()]


def _matches(column: pd.Series, value: Any) -> pd.Series:
    import pandas as pd

    if isinstance(value, (list, dict)):
        return column.astype(str) == json.dumps(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return pd.to_numeric(column, errors="coerce").sub(value).abs() < 1e-9
    return column.astype(str) == str(value)


def _by_id(trials: pd.DataFrame, trial: str) -> pd.Series:
    ids = trials["trial_id"].astype(str)
    hit = trials[(ids == trial) | (trials["trial_dir"].astype(str) == trial)
                 | ids.str.endswith(f"_{trial}")]
    if len(hit) != 1:
        shown = ", ".join(ids.head(8))
        raise UserError(f"trial {trial!r}: {'no' if hit.empty else len(hit)} trials match "
                        f"(trial ids look like {shown})")
    return hit.iloc[0]


def select_many(trials: pd.DataFrame, best_per: str | None = None,
                ids: list[str] | None = None) -> list[pd.Series]:
    """The trials ``cae export-models`` writes: the named ones, the best at each value of
    ``best_per`` (among those trained to the end), else the best."""
    if ids:
        return [_by_id(trials, t) for t in ids]
    if best_per:
        if best_per not in trials:
            raise UserError(f"--best-per {best_per}: trials.parquet has no such column")
        values = trials.loc[trained_to_the_end(trials), best_per].dropna().unique()
        return [select(trials, {best_per: v.item() if hasattr(v, "item") else v})
                for v in sorted(values, key=str)]
    return [select(trials, "best")]


# ---- the model ----------------------------------------------------------------------------


def best_weights(run_dir: str, trial: pd.Series) -> dict:
    """The best epoch's state dict from the trial's newest whole checkpoint (read where the
    run is: a local path or a URI)."""
    from cae.run import checkpoints

    fs, path = checkpoints.filesystem(f"{run_dir.rstrip('/')}/{trial['trial_dir']}")
    found = checkpoints.load_newest(fs, path)
    if found is None:
        raise UserError(f"trial {trial['trial_id']} of {run_dir} has no readable checkpoint")
    return found.state.get("best_model") or found.state["model"]


def load_model(run_dir: str, trial: str | dict = "best") -> tuple[CAE, TrialConfig]:
    """The model of one trial of a run (local or s3://, gs://, file://) with its best
    epoch's weights, on the CPU, in eval mode, and the config it ran with."""
    from cae.run import directory as rundir

    run_dir = rundir.storage_uri(str(run_dir))
    trials, local = read_trials(run_dir)
    row = select(trials, trial)
    return _model(run_dir, local, row)


def _model(run_dir: str, local: Path, row: pd.Series) -> tuple[CAE, TrialConfig]:
    cfg = row_config(local, row)
    model = build_model(cfg.model, seed=cfg.seed)
    model.load_state_dict(best_weights(run_dir, row))
    return model.eval(), cfg


def load_exported(model_dir: str | Path) -> tuple[CAE, TrialConfig]:
    """A model written by :func:`export_models` (its ``config.json`` and ``weights.pt``)."""
    d = Path(model_dir)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise UserError(f"{model_dir} holds no exported model ({CONFIG} and {WEIGHTS}); "
                        "write one with cae export-models, or pass a run directory")
    cfg = TrialConfig.model_validate(json.loads((d / CONFIG).read_text()))
    model = build_model(cfg.model, seed=cfg.seed)
    model.load_state_dict(torch.load(d / WEIGHTS, weights_only=True, map_location="cpu"))
    return model.eval(), cfg


# ---- torch.export programs ------------------------------------------------------------------


class Encoder(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> latents (B, latent size), whatever the bottleneck."""

    def __init__(self, model: CAE):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)


class Decoder(nn.Module):
    """Latents (B, latent size) -> images (B, out channels, H, W)."""

    def __init__(self, model: CAE, latent_shape: tuple[int, ...]):
        super().__init__()
        self.decoder, self.latent_shape = model.decoder, tuple(latent_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.reshape(z.shape[0], *self.latent_shape))


def programs(model: CAE) -> tuple[Any, Any]:
    """torch.export programs of the encoder and the decoder, dynamic in the batch size."""
    cfg = model.cfg
    x = torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        latent_shape = tuple(model.encode(x).shape[1:])
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    enc = torch.export.export(Encoder(model).eval(), (x,), dynamic_shapes=({0: batch},))
    z = torch.zeros(2, math.prod(latent_shape))
    dec = torch.export.export(Decoder(model, latent_shape).eval(), (z,),
                              dynamic_shapes=({0: batch},))
    return enc, dec


def export_models(run_dir: str, out: str | Path, best_per: str | None = None,
                  trials: list[str] | None = None) -> list[Path]:
    """Write the chosen trials' models into ``out/<trial_id>/`` (see the module doc)."""
    from cae.run import directory as rundir

    run_dir = rundir.storage_uri(str(run_dir))
    table, local = read_trials(run_dir)
    baselines = _baselines(local)
    written = []
    for row in select_many(table, best_per, trials):
        model, cfg = _model(run_dir, local, row)
        dest = Path(out) / str(row["trial_id"])
        dest.mkdir(parents=True, exist_ok=True)
        enc, dec = programs(model)
        torch.export.save(enc, dest / ENCODER)
        torch.export.save(dec, dest / DECODER)
        torch.save(model.state_dict(), dest / WEIGHTS)
        (dest / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        (dest / CARD).write_text(card(model, cfg, row, run_dir, baselines))
        written.append(dest)
    return written


def _baselines(local: Path) -> pd.DataFrame | None:
    from cae.results.tables import read_baselines

    return read_baselines(local)


def pca_at(baselines: pd.DataFrame | None, cfg: TrialConfig, latent: int, split: str
           ) -> float | None:
    """PCA's error at ``latent`` on ``split`` for ``cfg``'s data, task and loss, if known."""
    if baselines is None or baselines.empty:
        return None
    b = baselines[(baselines["baseline"] == "pca") & (baselines["split"] == split)
                  & (baselines["dataset"] == cfg.data.label())
                  & (baselines["task"] == cfg.task.name) & (baselines["loss_kind"] == cfg.loss)
                  & (baselines["latent_size"] == float(latent))]
    return float(b["loss"].iloc[0]) if len(b) else None


def card(model: CAE, cfg: TrialConfig, row: pd.Series, run_dir: str,
         baselines: pd.DataFrame | None) -> str:
    """``card.md``: what the model is, how good, where it came from, how to use it."""
    import pandas as pd

    latent = int(model.plan.latent_size)
    c, h, w = cfg.data.info().shape
    shape_in = f"{cfg.model.in_channels}, {h}, {w}"  # as torch writes a tensor's shape
    task = cfg.task.name
    note = {"colorize": " (the luma Y of YCbCr; the decoder gives the chroma CbCr)",
            "denoise": " (a distorted image; the decoder gives the clean one)"}.get(task, "")

    def num(key: str) -> str:
        v = row.get(key)
        return "-" if v is None or pd.isna(v) else f"{float(v):.5g}"

    rows = [("dataset", f"{cfg.data.label()}" + (f" ({cfg.data.path})" if cfg.data.path else "")
             + f", {c}x{h}x{w}"),
            ("task", task), ("latent size", str(latent)),
            ("parameters", f"{count_params(model):,}"),
            (f"validation {cfg.loss} (best epoch {int(row.get('best_epoch', 0) or 0)})",
             num("best_val_loss")),
            (f"test {cfg.loss}", num("test_loss"))]
    for split in ("val", "test"):
        pca = pca_at(baselines, cfg, latent, split)
        rows.append((f"PCA at latent {latent}, {split}", "-" if pca is None else f"{pca:.5g}"))
    rows += [("run", run_dir), ("trial", str(row["trial_id"]))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# CAE {row['trial_id']}: {task}, latent {latent}

| | |
|---|---|
{table}

`encoder.pt2`: images (B, {shape_in}) float32 in [0, 1]{note} -> latents (B, {latent}).
`decoder.pt2`: latents (B, {latent}) -> images (B, {cfg.model.out_channels}, {h}, {w}). Any batch
size; they need torch alone:

```python
import torch
encoder = torch.export.load("encoder.pt2").module()
decoder = torch.export.load("decoder.pt2").module()
z = encoder(x)          # x: (B, {shape_in}) in [0, 1]
x_hat = decoder(z)
```

`weights.pt` is the state dict and `config.json` the full trial config
(`cae.export.load_exported(DIR)` rebuilds the model); `cae encode DIR --images PATH -o
latents.npz` turns a folder or array file into latents, preprocessed as in training.
"""


# ---- encoding images --------------------------------------------------------------------------


def model_inputs(cfg: TrialConfig, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> the model's input as in training (the task's own
    ``clean_input``): [0, 1]; for colorize the luma Y of YCbCr. (A denoiser's input is the
    image as it is.)"""
    from cae.train.tasks import make_task

    return make_task(cfg.task).clean_input(images)


def read_images(cfg: TrialConfig, path: str, skip_unreadable: bool = False
                ) -> tuple[np.ndarray, list[str] | None]:
    """A folder or array file of images as the trial's model takes them (size, channels)
    -> uint8 (N, C, H, W) in the file's (array) or sorted path (folder) order, and the
    folder's relative paths."""
    from cae.config.trial import absolute_path
    from cae.data.userdata import Want, data_root, read

    p = Path(path)
    kind = "folder" if p.is_dir() else "arrays"
    size = cfg.model.image_size
    want = Want(kind, absolute_path(path), None, (size, size), cfg.data.info().shape[0],
                cfg.data.layout if cfg.data.dataset == "arrays" else "auto", skip_unreadable)
    got = read(want, data_root())
    paths = got.paths  # one list (a property: made on each access)
    if paths is None:
        return got.images, None
    order = np.argsort(np.asarray(paths, dtype=object), kind="stable")
    return got.images[order], [paths[i] for i in order]


@torch.inference_mode()
def encode_array(model: CAE, cfg: TrialConfig, images: np.ndarray, batch: int = 1024
                 ) -> np.ndarray:
    """Latents (N, latent size) float32 of uint8 images (N, C, H, W)."""
    out = []
    for s in range(0, len(images), batch):
        x = model_inputs(cfg, torch.from_numpy(np.ascontiguousarray(images[s:s + batch])))
        out.append(model.encode(x).flatten(1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.plan.latent_size), np.float32)


def encode(source: str, images: str, out: str | Path, trial: str | dict = "best",
           skip_unreadable: bool = False) -> tuple[Path, int]:
    """``cae encode``: latents of a folder or array file by an exported model (a directory
    of :func:`export_models`) or a run's trial (``trial``: an id, "best", a filter, or a
    filter as text, ``COLUMN=VALUE``); writes ``latents`` and, for a folder, ``paths`` to
    the .npz ``out``. Returns it and the number of images."""
    if isinstance(trial, str) and trial != "best" and "=" in trial:  # latent_size=8
        from cae.config.points import parse_overrides

        trial = parse_overrides([trial])
    if not Path(images).exists():
        raise UserError(f"--images {images} does not exist")
    exported = "://" not in source and (Path(source) / CONFIG).is_file()  # not a run's URI
    model, cfg = load_exported(source) if exported else load_model(source, trial)
    array, paths = read_images(cfg, images, skip_unreadable)
    latents = encode_array(model, cfg, array)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if paths is None else {"paths": np.asarray(paths)}
    with open(out, "wb") as f:  # the name as given (np.savez would add .npz to a path)
        np.savez(f, latents=latents, **extra)
    return out, len(latents)
