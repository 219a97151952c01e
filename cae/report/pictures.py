"""Pictures of what the best trials do: best, median and worst test samples.

A mean error can hide a failure a look would show at once (Study B), so for each of the
best trials this rebuilds the model from its checkpoint (best weights), runs it on the test
inputs the trial was evaluated on (same task, same seed), ranks the samples by their own
squared error and shows the best, the median and the worst: input, output and clean target
side by side. For ``colorize`` the three are the gray input, the prediction and the truth in
RGB, and the error is measured in RGB. Images go into the figure as small PNGs.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cae.report.run import best_trials, short_id

PICKS = ("best", "median", "worst")
PICTURED_TRIALS = 3  # the best trials the report shows pictures of


def candidates(n_trials: int = PICTURED_TRIALS) -> int:
    """How many of the best trials the pictures of ``n_trials`` may look at: one whose
    checkpoint cannot be read is passed over for the next (a run at a URI fetches the
    checkpoints of these)."""
    return 3 * n_trials


@dataclass
class Samples:
    """One trial's chosen test samples as uint8 RGB images (H, W, 3) with their errors."""

    trial_id: str
    picks: list[str] = field(default_factory=list)  # "best", "median", "worst"
    index: list[int] = field(default_factory=list)  # position in the test split
    error: list[float] = field(default_factory=list)  # that sample's MSE
    group: list[str] = field(default_factory=list)  # its distortion (denoise), else ""
    inputs: list[np.ndarray] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    mean_error: float = float("nan")  # over all the samples looked at


def _rgb(images) -> np.ndarray:
    """float (B, C, H, W) in [0, 1] -> uint8 (B, H, W, 3); gray is repeated to RGB."""
    import torch

    x = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def trial_samples(
    run_dir: str | Path, trial: pd.Series, spec: dict, max_samples: int | None = 2000,
    batch: int = 500, data_dir: str | None = None,
) -> Samples:
    """Best, median and worst of the first ``max_samples`` test samples of one trial
    (``data_dir``: the dataset read from there, not from where the trial ran).

    Raises FileNotFoundError when the trial has no checkpoint yet; dataset errors
    (``cae.data.datasets.DatasetUnavailable``) pass through.
    """
    import torch

    from cae.data.datasets import load, split
    from cae.model.network import build_model
    from cae.results.tables import read_trial
    from cae.run.checkpoints import filesystem, load_newest
    from cae.run.record import trial_config_of
    from cae.train.tasks import make_task

    trial_dir = Path(run_dir) / str(trial["trial_dir"])
    found = load_newest(*filesystem(trial_dir))
    if found is None:
        raise FileNotFoundError(f"trial {trial['trial_id']} has no checkpoint yet")
    files = read_trial(trial_dir, outcome=False)
    cfg = trial_config_of(files.record, spec.get("trial") or {}, files.point, data_dir)
    state = found.state
    model = build_model(cfg.model, seed=cfg.seed)
    model.load_state_dict(state.get("best_model") or state["model"])
    model.eval()
    data = load(cfg.data)
    test = split(data, cfg.data.val_fraction, cfg.data.split_seed).test
    task = make_task(cfg.task)
    # The whole split is prepared as in the trial's test evaluation (same seed, same
    # distortions per index), then only the first max_samples are run through the model.
    x, y, groups = task.eval_inputs(test, seed=cfg.task.eval_seed + 1)
    n = x.shape[0] if max_samples is None else min(max_samples, x.shape[0])
    x, y = x[:n], y[:n]
    with torch.inference_mode():
        out = torch.cat([model(x[s:s + batch]) for s in range(0, n, batch)]).float()
    shown_in, shown_out, shown_target = task.visible(x, out, y)
    err = (shown_out - shown_target).square().flatten(1).mean(1)  # what one sees
    order = torch.argsort(err)
    chosen = [int(order[0]), int(order[n // 2]), int(order[-1])]
    names = task.group_names or []
    s = Samples(trial_id=str(trial["trial_id"]), mean_error=float(err.mean()))
    for pick, i in zip(PICKS, chosen):
        s.picks.append(pick)
        s.index.append(i)
        s.error.append(float(err[i]))
        s.group.append(names[int(groups[i])] if names and groups is not None else "")
        s.inputs.append(_rgb(shown_in[i:i + 1])[0])
        s.outputs.append(_rgb(shown_out[i:i + 1])[0])
        s.targets.append(_rgb(shown_target[i:i + 1])[0])
    return s


def png_uri(image: np.ndarray, scale: int = 1) -> str:
    """uint8 (H, W, 3) -> ``data:image/png;base64,...`` (optionally enlarged, nearest)."""
    from PIL import Image

    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def pictures_figure(samples: list[Samples], task: str = "reconstruct") -> go.Figure:
    """A grid: one row per (trial, pick), columns input / output / target."""
    from cae.config.trial import TaskConfig
    from cae.train.tasks import make_task

    columns = make_task(TaskConfig(name=task)).picture_titles
    rows = sum(len(s.picks) for s in samples)
    row_titles = []
    for rank, s in enumerate(samples, start=1):
        for pick, err, group in zip(s.picks, s.error, s.group):
            extra = f", {group}" if group else ""
            row_titles.append(f"#{rank} trial {short_id(s.trial_id)}<br>{pick} "
                              f"(MSE {err:.4f}{extra})")
    fig = make_subplots(rows=rows, cols=3, column_titles=list(columns), row_titles=row_titles,
                        horizontal_spacing=0.01, vertical_spacing=0.012)
    r = 0
    for s in samples:
        for i in range(len(s.picks)):
            r += 1
            for c, img in enumerate((s.inputs[i], s.outputs[i], s.targets[i]), start=1):
                fig.add_trace(go.Image(source=png_uri(img), name=f"{s.trial_id} {s.picks[i]}",
                                       hoverinfo="skip"), row=r, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.for_each_annotation(lambda a: a.update(font_size=11, textangle=0, xanchor="left")
                            if a.textangle == 90 else a)
    fig.update_layout(
        title="Test samples of the best trials: best, median and worst by their own MSE",
        height=60 + 150 * rows, width=820, margin=dict(l=10, r=230, t=90, b=10))
    return fig


def sample_pictures(
    run_dir: str | Path, trials: pd.DataFrame, spec: dict, n_trials: int = PICTURED_TRIALS,
    max_samples: int | None = 2000, data_dir: str | None = None,
) -> go.Figure:
    """Pictures of the ``n_trials`` best trials that have a checkpoint (see module doc);
    ``data_dir`` as in :func:`trial_samples`.

    Trials whose checkpoint cannot be read (a run still writing, an interrupted one) are
    passed over; when none can be shown the figure says why.
    """
    from cae.report.figures import _empty
    from cae.report.run import task_name

    title = "Test samples of the best trials"
    samples, reasons = [], []
    for _, trial in best_trials(trials, candidates(n_trials)).iterrows():
        if len(samples) == n_trials:
            break
        try:
            samples.append(trial_samples(run_dir, trial, spec, max_samples=max_samples,
                                         data_dir=data_dir))
        except Exception as exc:  # noqa: BLE001 - one unreadable trial must not end the report
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reasons.append(f"trial {short_id(trial['trial_id'])}: {msg}")
    if not samples:
        why = "; ".join(reasons[:2]) or "no trial with a validation loss yet"
        return _empty(title, f"no pictures: {why}")
    return pictures_figure(samples, task_name(spec, trials))
