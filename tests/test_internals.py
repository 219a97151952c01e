"""Every private part of Ray that cae uses (``cae.sweep.internals``), exercised against the
installed Ray: when a Ray release renames or reshapes one, these fail with its name."""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from cae.run import tunefiles
from cae.sweep import internals as ri


@pytest.mark.parametrize("what,ok", ri.CHECKS, ids=[w for w, _ in ri.CHECKS])
def test_every_private_name_is_where_cae_expects_it(what, ok):
    assert ok(), what


def test_importing_the_module_does_not_import_ray():
    # LOOPBACK_ENV must be settable before Ray's first import
    code = "import sys, cae.sweep.internals; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_a_ray_without_a_name_is_refused_with_the_name(monkeypatch):
    monkeypatch.setattr(ri, "CHECKS", ri.CHECKS + (("Foo._bar(self)", lambda: False),))
    with pytest.raises(ri.RayInternalsError, match=r"Foo\._bar\(self\)"):
        ri.check()


def test_a_ray_version_outside_the_admitted_range_is_refused(monkeypatch):
    monkeypatch.setattr(metadata, "version", lambda name: "2.61.0")
    with pytest.raises(ri.RayInternalsError, match=r"ray 2\.61\.0 is installed"):
        ri.check()


def test_the_checks_can_fail():
    assert not ri._has_method(ri.CONTROLLER, "TuneController", "_mark_trial_to_checkpoint",
                              ("self", "trial", "extra"))
    assert not ri._mentions(ri.CONTROLLER, "NO_SUCH_VARIABLE")
    with pytest.raises(ri.RayInternalsError, match="is gone"):
        ri._class(ri.CONTROLLER, "NoSuchClass")


def test_marking_goes_through_the_wrapper_tune_hands_schedulers():
    from ray.tune.execution.tune_controller import TrialRunnerWrapper

    class Controller:
        marked = []

        def _mark_trial_to_checkpoint(self, trial):
            self.marked.append(trial)

    inner = Controller()
    wrapper = TrialRunnerWrapper(inner, trial_executor=None)
    ri.mark_for_experiment_state(wrapper, "trial-1")
    assert inner.marked == ["trial-1"]


def test_the_experiment_state_of_a_real_trial_is_read():
    from ray.tune.experiment import Trial

    trial = Trial("fn", config={"lr": 0.1}, trial_id="abc_00001", stub=True)
    trial.relative_logdir = "fn_abc_00001_0_lr=0.1"
    trial.set_status(Trial.PAUSED)
    trial.run_metadata.num_failures = 2
    text = json.dumps({"trial_data": [list(trial.get_json_state())],
                       "runner_data": {}, "stats": {"start_time": 123.5}})
    trials, start = tunefiles.read_experiment_state(text)
    assert start == 123.5
    assert trials == {"fn_abc_00001_0_lr=0.1": tunefiles.TrialState("PAUSED", "abc_00001", 2)}
    with pytest.raises(tunefiles.StateFormatError):
        # cut short, as a full disk leaves it
        tunefiles.read_experiment_state(text[: len(text) // 2])


def test_the_run_config_of_a_restored_tuner_is_reachable(tmp_path):
    from ray import tune

    tuner = tune.Tuner(lambda config: None,
                       run_config=tune.RunConfig(name="probe", storage_path=str(tmp_path)))
    assert ri.restored_run_config(tuner).name == "probe"


def test_the_loopback_switch_makes_a_local_ray_use_127_0_0_1():
    code = ("import ray._private.services as s; "
            "print(s.get_node_ip_address())")
    env = {**os.environ, ri.LOOPBACK_ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "127.0.0.1"


def test_a_sweep_checks_the_internals_before_ray_starts(monkeypatch, tmp_path, capsys):
    """The check runs when a sweep starts (not when a run is read): one line, exit 2."""
    from cae.cli import main

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "2.61.0" if name == "ray"
                        else real(name))
    quickstart = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
    rc = main(["sweep", str(quickstart), "--smoke", "--storage", str(tmp_path),
               "--name", "r", "--no-report"])
    err = capsys.readouterr().err
    assert rc == 2 and "ray 2.61.0 is installed" in err and "Traceback" not in err


def test_a_scheduler_taking_results_one_at_a_time_says_so_to_tune():
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    @ri.results_one_at_a_time
    class OneByOne(TrialScheduler):
        pass

    assert not OneByOne().supports_buffered_results
    assert FIFOScheduler().supports_buffered_results  # Tune's default is left alone
    scheduler = FIFOScheduler()
    ri.set_buffered_results(scheduler, False)
    assert not scheduler.supports_buffered_results and FIFOScheduler().supports_buffered_results


def test_the_optuna_study_of_a_searcher_is_reachable():
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space={"lr": tune.uniform(0.0, 1.0)}, metric="loss", mode="min")
    searcher.suggest("t1")
    study = ri.optuna_study(searcher)
    assert isinstance(study, optuna.Study) and len(study.trials) == 1
