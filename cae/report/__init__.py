"""Reading sweep results: Plotly figures, the HTML report, the notebook.

Everything here takes the ``trials`` and ``epochs`` frames of :mod:`cae.results.tables` (through
:func:`load_run`) and draws them; nothing here trains or starts Ray.

>>> from cae.report import load_run, loss_evolution
>>> run = load_run("runs/quickstart-20250101-120000")
>>> loss_evolution(run.trials, run.epochs).show()
"""

from cae.report.axes import axis_effects, axis_importance, parallel_coordinates
from cae.report.curves import loss_evolution
from cae.report.figures import distortion_errors, latent_vs_error, pareto_front
from cae.report.page import build_report, write_report
from cae.report.pictures import sample_pictures, trial_samples
from cae.report.run import Run, best_trials, load_run, swept_axes
from cae.report.table import table_frame, table_html, trials_table

__all__ = [
    "Run", "load_run", "swept_axes", "best_trials",
    "loss_evolution", "latent_vs_error", "pareto_front", "parallel_coordinates",
    "axis_effects", "axis_importance", "distortion_errors", "trials_table", "table_frame",
    "table_html", "sample_pictures", "trial_samples", "build_report", "write_report",
]
