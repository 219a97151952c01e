"""A finished run opens where Ray cannot be imported at all (a notebook, a serving box, a
colleague's laptop with another Ray): ``load_model``, ``cae report``, ``cae status`` (with
``--importance``), ``cae export``, ``cae compare``, ``cae export-models`` and ``cae encode``
run in a fresh interpreter whose ``import ray`` fails. And a run made before cae's modules
moved still opens."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_resumed_losses, epochs_trained

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "tests" / "data" / "recorded-run"
INTERRUPTED = REPO / "tests" / "data" / "interrupted-run"
# stopped half-way (2 of 4 trials trained 3 of 6 epochs, 2 not started) by cae at
# commit b5af075, whose plain trials drew dropout masks from torch's global generator
OLD_DROPOUT = REPO / "tests" / "data" / "interrupted-dropout-run"

# `import ray` (and any `from ray...`) raises ImportError in this interpreter, and every
# attempt is counted in `sys.ray_imports` (a reader that tries Ray and falls back still
# tried it)
NO_RAY = """import sys
sys.ray_imports = []
class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            sys.ray_imports.append(name)
            raise ImportError("import of ray halted (this test runs without Ray)")
sys.meta_path.insert(0, _NoRay())
"""


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_RAY + code], cwd=cwd, text=True,
                          capture_output=True, timeout=600)


@pytest.fixture
def run(tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(RECORDED, dest)
    return dest


def test_ray_is_really_unimportable_there(tmp_path):
    out = _run("import ray", tmp_path)
    assert out.returncode != 0 and "import of ray halted" in out.stderr


def test_load_model_without_ray(run, tmp_path):
    code = (f"from cae import load_model\nimport torch\n"
            f"m, cfg = load_model({str(run)!r}, 'best')\n"
            f"x = torch.rand(2, 1, 28, 28)\n"
            f"print(tuple(m(x).shape), tuple(m.encode(x).shape) == (2, cfg.model.latent_dim))\n"
            f"print(sys.ray_imports)")
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["(2, 1, 28, 28) True", "[]"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _run(f"from cae.cli import main\nsys.exit(main({args!r}))", cwd)


def test_status_report_and_export_without_ray(run, tmp_path):
    out = _cli(["status", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "finished" in out.stdout and "2/2" in out.stdout

    (run / "trials.parquet").unlink()  # export rebuilds the tables from Ray's own files
    out = _cli(["export", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (run / "trials.parquet").is_file()

    out = _cli(["report", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr
    page = (run / "report.html").read_text()
    assert "latent" in page and len(page) > 10_000


def test_importance_and_compare_without_ray(run, tmp_path):
    """The new readers of a run: ``cae status --importance`` (and the importance.parquet
    ``cae export`` writes) and ``cae compare`` of two runs."""
    out = _cli(["status", str(run), "--importance"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "importance of the swept axes" in out.stdout
    out = _cli(["export", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (run / "importance.parquet").is_file()
    other = tmp_path / "other"
    shutil.copytree(RECORDED, other)
    page = tmp_path / "compare.html"
    out = _cli(["compare", str(run), str(other), "-o", str(page)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert page.read_text().count('class="plotly-graph-div"') == 2  # two figures


def test_export_models_and_encode_without_ray(run, tmp_path):
    models = tmp_path / "models"
    out = _cli(["export-models", str(run), "-o", str(models)], tmp_path)
    assert out.returncode == 0, out.stderr
    exported = sorted(p.name for p in models.rglob("*.pt2"))
    assert "encoder.pt2" in exported and "decoder.pt2" in exported
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8))
    target = tmp_path / "latents.npz"
    out = _cli(["encode", str(run), "--images", str(images), "-o", str(target)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert np.load(target)["latents"].shape[0] == 5


def test_an_interrupted_run_of_the_old_layout_reads_without_ray(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(INTERRUPTED, run)
    out = _cli(["status", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "interrupted" in out.stdout and "cae resume" in out.stdout
    out = _cli(["report", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (run / "report.html").stat().st_size > 10_000


def test_every_moved_name_of_the_old_layout_resolves():
    """Tune's pickles of a run made before the move (``tuner.pkl``) load through the table
    of moved names, and each entry of the table points at a module that exists."""
    import importlib

    from cae.sweep.moved import MOVED_MODULES, RENAMED, old_names

    for new in MOVED_MODULES.values():
        importlib.import_module(new)
    for (_, _), (module, name) in RENAMED.items():
        assert hasattr(importlib.import_module(module), name)
    data = (INTERRUPTED / "tuner.pkl").read_bytes()
    assert b"cae.halving" in data  # the fixture really names the old paths
    import ray.cloudpickle  # noqa: F401  (Tune's pickles need Ray's classes too)

    with pytest.raises(ModuleNotFoundError):
        pickle.loads(data)
    with old_names():
        state = pickle.loads(data)
    assert "cae.halving" not in sys.modules
    text = json.dumps(str(state))
    assert "cae.schedule" in text or "Scheduler" in text


@pytest.mark.slow
def test_an_interrupted_run_of_the_old_layout_resumes_to_the_end(tmp_path, capsys):
    """``tests/data/interrupted-run`` was stopped half-way by the code before cae's modules
    moved (its ``tuner.pkl`` names ``cae.halving``, ``cae.schedulers``, ...): it resumes,
    every trial ends, and each epoch's loss is that of the same spec run undisturbed then:
    bit for bit for the epochs it had trained, and for those trained after the resume on the
    machine that made it; elsewhere those within 1e-5 (another CPU's kernels round
    differently, and training grows it)."""
    import pandas as pd

    from cae.cli import main

    run = tmp_path / "run"
    shutil.copytree(INTERRUPTED, run)
    before = pd.read_parquet(run / "trials.parquet")
    assert set(before["status"]) != {"TERMINATED"}  # it really was interrupted
    assert main(["resume", str(run), "--no-report", "--report-every", "0"]) == 0
    capsys.readouterr()
    trials = pd.read_parquet(run / "trials.parquet")
    epochs = pd.read_parquet(run / "epochs.parquet").merge(
        trials[["trial_id", "model.latent_dim", "model.convs"]], on="trial_id")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    got = {(int(a), int(b), int(c)): float(v) for a, b, c, v in zip(
        epochs["model.latent_dim"], epochs["model.convs"], epochs["epoch"], epochs["val_loss"])}
    expected = json.loads((REPO / "tests" / "data" / "interrupted-run-losses.json").read_text())
    trained = epochs_trained(before, pd.read_parquet(INTERRUPTED / "epochs.parquet"),
                              ["model.latent_dim", "model.convs"])
    assert_resumed_losses(got, {tuple(row[:3]): row[3] for row in expected}, trained)



@pytest.mark.slow
def test_a_run_whose_dropout_drew_from_the_global_generator_goes_on_and_says_so(tmp_path,
                                                                               capsys):
    """``tests/data/interrupted-dropout-run`` (dropout 0.2) was made by a cae that drew a
    plain trial's dropout masks from torch's global generator: it resumes to the end, the
    epochs it had trained are kept as they were, and one line says that the trials it had
    started go on with masks from their seeds, so their later epochs differ from what that
    cae would have trained."""
    import pandas as pd

    from cae.cli import main
    from cae.run.checkpoints import newest_history

    run = tmp_path / "run"
    shutil.copytree(OLD_DROPOUT, run)
    before = {d.name: newest_history(d).get("epochs") or [] for d in run.glob("run_trial_*")}
    # (the two trials not started have no directory yet: git keeps no empty folder)
    assert sorted(len(e) for e in before.values() if e) == [3, 3]
    assert main(["resume", str(run), "--no-report", "--report-every", "0"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "global generator" in line]
    assert len(notes) == 1 and notes[0].startswith("cae: note: 2 trial(s) with dropout"), err
    trials = pd.read_parquet(run / "trials.parquet")
    epochs = pd.read_parquet(run / "epochs.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    assert set(epochs.groupby("trial_id")["epoch"].max()) == {6}
    for name, old in before.items():
        rows = epochs[epochs["trial_id"] == trials.set_index("trial_dir").loc[name, "trial_id"]]
        got = rows.sort_values("epoch")["val_loss"].tolist()[:len(old)]
        assert got == [e["val_loss"] for e in old], name  # kept as that cae trained them
    assert main(["resume", str(run)]) == 0  # finished: nothing said again
    assert "global generator" not in capsys.readouterr().err
