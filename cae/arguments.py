"""The ``cae`` command's arguments: one subcommand each for train, models, data, sweep,
resume, status, extend, compare, export, report, track, export-models and encode
(``cae.cli`` runs them)."""

from __future__ import annotations

import argparse

from cae.config.catalog import DATASETS, USER_DATASETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cae",
        description="Hyperparameter sweeps of convolutional autoencoders on Ray Tune.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (also CAE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model from a trial config (no Ray)")
    p.add_argument("config", help="trial config YAML, e.g. sweeps/single.yaml")
    _set(p, "override a setting, dotted keys allowed (model.latent_dim=8)")
    _data_dir(p)
    p.add_argument("--out", help="directory to save the trained model and its history")
    _refresh_option(p)

    p = sub.add_parser("models", help="list the named model presets")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("data", help="fetch or check a dataset (or read your own images) and "
                                    "print its size")
    p.add_argument("dataset", choices=[*DATASETS, *USER_DATASETS])
    _data_dir(p)
    p.add_argument("--no-download", action="store_true", help="only look on disk")
    p.add_argument("--path", help="folder or arrays: the folder of images or the array file")
    _set(p, "another data setting: image_size=28, channels=1, test_path=DIR, ...")
    _refresh_option(p)

    p = sub.add_parser("sweep", help="run a sweep spec on Ray Tune (local or on a cluster)")
    p.add_argument("config", help="sweep spec YAML, e.g. sweeps/quickstart.yaml")
    _set(p, "override the spec: trial.lr=0.01, space.model.latent_dim=[4, 8], num_samples=2")
    p.add_argument("--storage", help="where run directories go: a path, s3:// or gs:// "
                                     "(default: the spec's storage, ./runs)")
    p.add_argument("--name", help="run directory name (default: SPEC_NAME-TIMESTAMP)")
    p.add_argument("--address", help="Ray cluster to attach to (default: start Ray locally; "
                                     "a Ray job attaches to its own cluster)")
    _data_dir(p)
    p.add_argument("--dashboard", action="store_true",
                   help="local runs: start Ray's dashboard on http://127.0.0.1:8265")
    p.add_argument("--smoke", action="store_true",
                   help="a smoke run of the spec: two trials, one epoch, a few hundred images "
                        "(checks an install end to end in about a minute)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every grid point, print trials, architectures, memory and "
                        "storage needed; start nothing, write nothing")
    _console_options(p)
    _refresh_option(p)

    p = sub.add_parser("resume", help="continue an interrupted sweep")
    _run_dir(p)
    p.add_argument("--address", help="Ray cluster to attach to")
    _data_dir(p, recorded=True)
    _console_options(p)
    _refresh_option(p)

    p = sub.add_parser("status", help="how far a run is (running, finished or interrupted): "
                                      "trials, trial-epochs, the best so far; no Ray")
    _run_dir(p)
    p.add_argument("--importance", action="store_true",
                   help="also the importance of each swept axis (PED-ANOVA, with its "
                        "bootstrap interval)")

    p = sub.add_parser("extend", help="train chosen trials of a finished run N more epochs, "
                                      "from their checkpoints, as a new run")
    _run_dir(p)
    p.add_argument("--epochs", type=int, required=True, metavar="N",
                   help="epochs to train each chosen trial on from its last one")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--best-per", metavar="COLUMN",
                       help="the best trial trained to the end at each value of a "
                            "trials.parquet column (latent_size, model.channels, ...)")
    which.add_argument("--trial", nargs="+", metavar="ID",
                       help="these trials (default: the best)")
    p.add_argument("--name", help="the new run directory's name (default: "
                                  "RUN-extend-TIMESTAMP)")
    p.add_argument("--storage", help="where the new run directory goes (default: beside the "
                                     "old one)")
    p.add_argument("--address", help="Ray cluster to attach to")
    _data_dir(p, recorded=True)
    _console_options(p)
    _refresh_option(p)

    p = sub.add_parser("compare", help="runs side by side in one HTML page: best per latent "
                                       "size with PCA, the winners' curves, importance, "
                                       "spec differences; no Ray")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    p.add_argument("-o", "--output", required=True, help="the HTML file to write")

    p = sub.add_parser("export", help="write trials.parquet and epochs.parquet of a run "
                                      "(finished, running or interrupted)")
    _run_dir(p)

    p = sub.add_parser("report", help="write the HTML report of a run (finished, running or "
                                      "interrupted)")
    _run_dir(p)
    p.add_argument("-o", "--output", help="the HTML file (default: RUN_DIR/report.html)")
    _data_dir(p, recorded=True)
    p.add_argument("--no-pictures", action="store_true",
                   help="leave out the test-sample pictures and, if the run has none yet, the "
                        "reference errors (no dataset or checkpoints loaded)")
    _refresh_option(p)

    p = sub.add_parser("track", help="send a run's trials to MLflow or W&B (finished, running "
                                     "or interrupted; only what the tracker lacks); no Ray")
    _run_dir(p)
    p.add_argument("--mlflow", metavar="URI",
                   help="MLflow tracking server or database (http://127.0.0.1:5000, "
                        "sqlite:///mlflow.db); default: the spec's tracking: block")
    p.add_argument("--experiment", help="MLflow experiment (default: the sweep's name)")
    p.add_argument("--wandb-project", metavar="PROJECT", help="W&B project")
    p.add_argument("--wandb-entity", metavar="ENTITY", help="W&B entity (team or user)")
    p.add_argument("--wandb-mode", choices=["online", "offline"],
                   help="W&B online, or offline: runs written under RUN_DIR/wandb for "
                        "`wandb sync` (default: the spec's, else online)")

    p = sub.add_parser("export-models", help="write trained models of a run: torch.export "
                                             "programs, weights, config and a card per trial")
    _run_dir(p)
    p.add_argument("-o", "--output", required=True, help="folder to write OUT/<trial_id>/ into")
    p.add_argument("--best-per", metavar="COLUMN",
                   help="the best trial trained to the end at each value of a trials.parquet "
                        "column (latent_size, model.channels, ...)")
    p.add_argument("--trial", nargs="+", metavar="ID", help="these trials (default: the best)")

    p = sub.add_parser("encode", help="turn a folder or array file of images into latents")
    p.add_argument("source", help="a model folder written by export-models, or a run directory")
    p.add_argument("--images", required=True, help="a folder of images or a .npy/.npz file")
    p.add_argument("-o", "--output", required=True, help="the .npz file to write")
    p.add_argument("--trial", help="with a run directory: 'best' (default), a trial id, or "
                                   "COLUMN=VALUE (the best trained to the end with it)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out image files that cannot be read (default: refuse them)")
    _refresh_option(p)
    return parser


def _run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory of the sweep (a path, s3:// or gs://)")


def _set(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=text)


def _data_dir(p: argparse.ArgumentParser, recorded: bool = False) -> None:
    p.add_argument("--data-dir", help="dataset root (default: " + (
        "where the sweep read its data, as recorded in the run)" if recorded
        else "$CAE_DATA_DIR or a cache dir)"))


def _refresh_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refresh-data", action="store_true",
                   help="decode your own images (dataset folder) again instead of reading "
                        "the cache of their decoded pixels, and rewrite the cache")


def _console_options(p: argparse.ArgumentParser) -> None:
    """What ``cae sweep`` and ``cae resume`` show and write while they run."""
    p.add_argument("--no-report", action="store_true",
                   help="skip the full HTML report at the end (a live report written during "
                        "the run is brought up to date instead)")
    p.add_argument("--report-every", type=_seconds, default=300.0, metavar="SECONDS",
                   help="rewrite RUN_DIR/report.html (without pictures) this often while the "
                        "sweep runs (default 300; 0: only at the end)")
    p.add_argument("--verbose", action="store_true",
                   help="Ray Tune's own output (a box per trial start and result, status "
                        "tables) instead of the progress bar")
    p.add_argument("--force", action="store_true",
                   help="take the run directory over from the driver that holds it, even if "
                        "that driver looks alive")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value
