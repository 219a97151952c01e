"""The parts of Ray Tune that cae needs and Ray does not publish, in one place.

Each entry below is used because no public API does its job (each says why). ``check()``,
called when a sweep or a resume starts (``cae.sweep.driver``), makes sure, without importing
Ray, that the installed Ray is a version the project admits (``ADMITTED``, as in
pyproject.toml) and that every private name is still there with the form cae uses, by
reading Ray's own source files; anything else raises :class:`RayInternalsError` naming what
changed. So a new Ray that renames one of them stops a sweep at once with the reason,
instead of cae going on and writing wrong results (a stopped trial left PAUSED on disk, a
resumed sweep with the wrong console settings). Reading a finished run needs none of this
(``cae.run.tunefiles`` reads Tune's files). ``tests/test_internals.py`` exercises each one
for real.

Nothing here imports Ray at module level: ``LOOPBACK_ENV`` must be set before Ray is
first imported.
"""

from __future__ import annotations

import ast
import os
import signal
from contextlib import contextmanager
from functools import cache
from importlib import metadata, util
from pathlib import Path
from typing import Any

from cae.config.errors import UserError
from cae.run.tunefiles import EXPERIMENT_STATE, STATE_FILES

# The Ray versions cae admits (inclusive minor versions), as pyproject.toml's
# ``ray[tune]>=2.50,<2.61``: the experiment-state format and the names below were read
# from these.
ADMITTED = ((2, 50), (2, 60))

# Ray's single-machine mode: set to "0" before Ray is imported, every server of a local
# Ray binds to 127.0.0.1 only (``ray._private.services.get_node_ip_address``). Ray has no
# public switch for a loopback-only local instance.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Tune's console: its new output engine prints a configuration box even at verbose=0
# ("0" turns it off), and every trial failure is logged with its traceback ("0" turns
# that off; cae prints one line per failure instead).
NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
PRINT_TRIAL_ERRORS_ENV = "TUNE_PRINT_ALL_TRIAL_ERRORS"
# How many trials Tune keeps waiting for resources; for a custom searcher Ray allows one.
MAX_PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"
# Tune warns when experiment-state snapshots come within seconds of each other.
SYNC_WARNING_ENV = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"
# Ray prints the traceback of every failed task whose result nobody fetched ("1" turns it
# off; cae prints one line per failed trial instead).
UNHANDLED_ERRORS_ENV = "RAY_IGNORE_UNHANDLED_ERRORS"
# What Tune logs that cae says itself, in a quiet console (logger -> its messages' starts):
# the interruption (cae's last lines say how to resume: ``cae resume``, not Tuner.restore),
# result rows Ray could not copy back (cae takes them from the checkpoints), and a state
# snapshot lost to a full disk (cae stops the sweep with one line).
TUNE_SAID_BY_CAE = {
    "ray.tune.tune": ("Stop signal received", "Trials did not complete",
                      "Experiment has been interrupted", "Training has been interrupted"),
    "ray.tune.logger.logger": ("Remote file not found",),
    "ray.tune.execution.experiment_state": ("Saving experiment state to storage",),
}

class RayInternalsError(UserError):
    """The installed Ray is not one cae admits, or lacks a private name cae needs: a sweep
    or a resume cannot start (one line, exit status 2: install an admitted Ray)."""


# ---- the checks, against Ray's source, without importing it --------------------------------


@cache
def _tree(module: str) -> ast.Module:
    """The syntax tree of one of Ray's modules, found without importing Ray (importing a
    submodule would import the package)."""
    spec = util.find_spec("ray")
    if spec is None or spec.origin is None:
        raise RayInternalsError("cae needs ray[tune], which is not installed")
    path = Path(spec.origin).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.is_file():
        raise RayInternalsError(f"cae needs {module}, which this Ray does not have")
    return ast.parse(path.read_text(encoding="utf-8"))


def _class(module: str, name: str) -> ast.ClassDef:
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise RayInternalsError(f"{module}.{name} is gone")


def _has_method(module: str, cls: str, method: str, args: tuple[str, ...]) -> bool:
    for node in _class(module, cls).body:
        if isinstance(node, ast.FunctionDef) and node.name == method:
            return tuple(a.arg for a in node.args.args) == args
    return False


def _assigns(node: ast.AST, name: str, value: Any) -> bool:
    """Whether ``name = value`` (a constant) is assigned directly in ``node``'s body."""
    for stmt in getattr(node, "body", []):
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
            if any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return stmt.value.value == value
    return False


def _mentions(module: str, text: str) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == text for n in ast.walk(_tree(module)))


def _says(module: str, start: str) -> bool:
    """Whether a string in the module (an f-string's text included) starts with ``start``."""
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str)
               and n.value.startswith(start) for n in ast.walk(_tree(module)))


def _sets_attribute(module: str, cls: str, attribute: str) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == attribute
               and isinstance(n.ctx, ast.Store) for n in ast.walk(_class(module, cls)))


def _returns_attribute(module: str, cls: str, method: str, attribute: str) -> bool:
    """Whether ``cls.method`` returns ``self.<attribute>``."""
    for node in _class(module, cls).body:
        if isinstance(node, ast.FunctionDef) and node.name == method:
            return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Attribute)
                       and n.value.attr == attribute for n in ast.walk(node))
    return False


CONTROLLER = "ray.tune.execution.tune_controller"
SCHEDULER = "ray.tune.schedulers.trial_scheduler"
OPTUNA = "ray.tune.search.optuna.optuna_search"
# Tune asks a scheduler whether it may be handed several results of a trial at once through
# the property ``TrialScheduler.supports_buffered_results``, which reads this class
# attribute and has no setter.
BUFFERED_RESULTS = "_supports_buffered_results"


def _status_read_after_on_trial_add() -> bool:
    """In ``TuneController.add_trial``, the scheduler's ``on_trial_add`` comes before the
    trial is filed under its status (``status_str_map[trial.status]``)."""
    for node in _class(CONTROLLER, "TuneController").body:
        if isinstance(node, ast.FunctionDef) and node.name == "add_trial":
            text = ast.unparse(node)
            add, filed = text.find("on_trial_add"), text.find("status_str_map[trial.status]")
            return 0 <= add < filed
    return False
# (what cae relies on, check) for every private name above and below.
CHECKS: tuple[tuple[str, Any], ...] = (
    ("TuneController._mark_trial_to_checkpoint(self, trial)",
     lambda: _has_method(CONTROLLER, "TuneController", "_mark_trial_to_checkpoint",
                         ("self", "trial"))),
    ("TrialRunnerWrapper._tune_controller",
     lambda: _sets_attribute(CONTROLLER, "TrialRunnerWrapper", "_tune_controller")),
    ("Tuner._local_tuner", lambda: _sets_attribute("ray.tune.tuner", "Tuner", "_local_tuner")),
    ("TunerInternal.get_run_config(self)",
     lambda: _has_method("ray.tune.impl.tuner_internal", "TunerInternal", "get_run_config",
                         ("self",))),
    (f"TuneController.CKPT_FILE_TMPL == {EXPERIMENT_STATE!r}",
     lambda: _assigns(_class(CONTROLLER, "TuneController"), "CKPT_FILE_TMPL",
                      EXPERIMENT_STATE)),
    ("the experiment state's trial_data and stats",
     lambda: _mentions(CONTROLLER, "trial_data") and _mentions(CONTROLLER, "start_time")),
    ("Searcher.CKPT_FILE_TMPL", lambda: _assigns(
        _class("ray.tune.search.searcher", "Searcher"), "CKPT_FILE_TMPL", STATE_FILES[1])),
    ("SearchGenerator.CKPT_FILE_TMPL", lambda: _assigns(
        _class("ray.tune.search.search_generator", "SearchGenerator"), "CKPT_FILE_TMPL",
        STATE_FILES[2])),
    ("BasicVariantGenerator.CKPT_FILE_TMPL", lambda: _assigns(
        _class("ray.tune.search.basic_variant", "BasicVariantGenerator"), "CKPT_FILE_TMPL",
        STATE_FILES[3])),
    ("CallbackList.CKPT_FILE_TMPL", lambda: _assigns(
        _class("ray.tune.callback", "CallbackList"), "CKPT_FILE_TMPL", STATE_FILES[4])),
    (f"{LOOPBACK_ENV} (ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)",
     lambda: _assigns(_tree("ray._private.ray_constants"), "ENABLE_RAY_CLUSTERS_ENV_VAR",
                      LOOPBACK_ENV)),
    (NEW_OUTPUT_ENV, lambda: _mentions("ray.tune.experimental.output", NEW_OUTPUT_ENV)),
    (PRINT_TRIAL_ERRORS_ENV, lambda: _mentions(CONTROLLER, PRINT_TRIAL_ERRORS_ENV)),
    (MAX_PENDING_ENV, lambda: _mentions(CONTROLLER, MAX_PENDING_ENV)),
    (SYNC_WARNING_ENV,
     lambda: _mentions("ray.tune.execution.experiment_state", SYNC_WARNING_ENV)),
    (UNHANDLED_ERRORS_ENV, lambda: _mentions("ray._private.worker", UNHANDLED_ERRORS_ENV)),
    *((f"{logger} logs {start!r}", lambda m=logger, s=start: _says(m, s))
      for logger, starts in TUNE_SAID_BY_CAE.items() for start in starts),
    ("TuneController.add_trial files a trial by its status after on_trial_add",
     lambda: _status_read_after_on_trial_add()),
    (f"TrialScheduler.supports_buffered_results returns self.{BUFFERED_RESULTS}",
     lambda: _returns_attribute(SCHEDULER, "TrialScheduler", "supports_buffered_results",
                                BUFFERED_RESULTS)),
    ("OptunaSearch._ot_study", lambda: _sets_attribute(OPTUNA, "OptunaSearch", "_ot_study")),
    ("tune.fit stops gracefully on SIGUSR1",
     lambda: any(isinstance(n, ast.Attribute) and n.attr == "SIGUSR1"
                 for n in ast.walk(_tree("ray.tune.tune")))),
)


def ray_version() -> tuple[int, int]:
    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        raise RayInternalsError("cae needs ray[tune], which is not installed") from None
    major, minor = (int(p) for p in version.split(".")[:2])
    return major, minor


def check() -> None:
    """Raise :class:`RayInternalsError` unless Ray is admitted and has every name cae uses."""
    found = ray_version()
    low, high = ADMITTED
    if not low <= found <= high:
        raise RayInternalsError(
            f"cae reads Ray Tune's private files and names, checked for ray "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]}; ray {metadata.version('ray')} is "
            f"installed: pip install 'ray[tune]>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}'")
    missing = [what for what, ok in CHECKS if not ok()]
    if missing:
        raise RayInternalsError(
            f"ray {metadata.version('ray')} lacks what cae uses of its internals: "
            f"{'; '.join(missing)}. Install a Ray version cae admits (see pyproject.toml)")



# ---- the internals ---------------------------------------------------------------------


def mark_for_experiment_state(controller: Any, trial: Any) -> None:
    """Have Tune write ``trial``'s new status into the next experiment-state snapshot.

    Tune does this only for trials with an actor: a PAUSED trial that a scheduler
    stops would stay PAUSED on disk (and read as unfinished) though it is TERMINATED.
    ``controller`` is what Tune hands a scheduler (a wrapper around the TuneController)."""
    inner = getattr(controller, "_tune_controller", controller)
    inner._mark_trial_to_checkpoint(trial)


def set_buffered_results(scheduler: Any, supported: bool) -> None:
    """Tell Tune whether ``scheduler`` (a scheduler class or one scheduler) may be handed
    several results of a trial at once; a scheduler that pauses a trial exactly at a rung
    must see each result before the next epoch is trained."""
    setattr(scheduler, BUFFERED_RESULTS, supported)


def results_one_at_a_time(cls: type) -> type:
    """Class decorator: Tune hands the scheduler each result on its own
    (``set_buffered_results``)."""
    set_buffered_results(cls, False)
    return cls


def optuna_study(searcher: Any) -> Any:
    """The Optuna study behind one of Tune's ``OptunaSearch`` (the trials TPE has seen),
    which Tune keeps in a private attribute."""
    return searcher._ot_study


def keep_paused(trial: Any) -> None:
    """From a scheduler's ``on_trial_add``: file a restored trial as PAUSED, not PENDING.

    ``Tuner.restore`` re-adds every unfinished trial as PENDING, and Tune starts PENDING
    trials without asking the scheduler; a trial that was paused at an undecided rung would
    train on past it. Tune files the trial under its status right after ``on_trial_add``,
    so setting it there keeps it paused until the scheduler chooses it."""
    from ray.tune.experiment import Trial

    trial.set_status(Trial.PAUSED)


def restored_run_config(tuner: Any) -> Any:
    """The RunConfig a ``Tuner.restore``d run will use (``Tuner.restore`` takes none of its
    own; cae replaces the callbacks and console settings of the original run with this
    resume's)."""
    return tuner._local_tuner.get_run_config()


class _SaidByCae:
    """Drops the records of ``TUNE_SAID_BY_CAE`` (a state snapshot's failure only when the
    disk is full: other storage failures still show)."""

    def __init__(self, starts: tuple[str, ...]):
        self.starts = starts

    def filter(self, record) -> bool:
        message = str(record.msg)
        if not message.startswith(self.starts):
            return True
        if message.startswith("Saving experiment state"):
            from cae.run.diskspace import is_full_error

            exc = record.exc_info[1] if record.exc_info else None
            return not (exc is not None and is_full_error(exc))
        return False


@contextmanager
def quiet_tune_logs():
    """For the length of a block, Tune's log lines that cae says itself are left out."""
    import logging

    added = [(logging.getLogger(name), _SaidByCae(starts))
             for name, starts in TUNE_SAID_BY_CAE.items()]
    for logger, f in added:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in added:
            logger.removeFilter(f)


def request_graceful_stop() -> None:
    """Stop the Tune run of this process as Ctrl-C does: Tune saves the experiment state,
    the trials keep their checkpoints, and ``cae resume`` continues them. Tune listens for
    SIGUSR1 while ``Tuner.fit`` runs in the main thread."""
    os.kill(os.getpid(), signal.SIGUSR1)


def trial_dir_name() -> str:
    """Inside a trial: the name of its directory in the run directory. Tune's context gives
    only the trial's local working directory; its name is the same."""
    from ray import tune

    return Path(tune.get_context().get_trial_dir()).name
