"""The ``cae`` command: parses arguments and calls the library.

A user error (a malformed spec, an impossible architecture, a missing dataset, a path that
is not a run directory, a full storage: :class:`cae.config.UserError`) becomes one message
on stderr and exit status 2. ``cae sweep`` and ``cae resume`` exit with 3 when the sweep was
stopped with trials left to run (``cae resume`` continues it). Anything else is a bug: a
short message naming the exception and exit status 1, with the traceback under ``--debug``
(or ``CAE_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cae.catalog import DATASETS, USER_DATASETS
from cae.config import UserError, format_validation_error

EXIT_USAGE, EXIT_BUG = 2, 1


# ---- cae models / train / data -----------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from cae.models import presets_table

    print(presets_table(as_json=args.json))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cae.config import load_trial
    from cae.train import train_and_print

    cfg = load_trial(args.config, args.set)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    return train_and_print(cfg, args.out)


def cmd_data(args: argparse.Namespace) -> int:
    from cae.config import DataConfig, parse_overrides, validate
    from cae.data import describe

    fields = {"dataset": args.dataset, "data_dir": args.data_dir,
              "download": not args.no_download, "path": args.path}
    fields.update(parse_overrides(args.set))
    print(describe(validate(DataConfig, {k: v for k, v in fields.items() if v is not None},
                            "cae data")))
    return 0


# ---- cae sweep / resume / status / export / report ------------------------------------


def _console(args: argparse.Namespace):
    from cae.driver import Console

    return Console(report_every=args.report_every, no_report=args.no_report,
                   verbose=args.verbose, dashboard=getattr(args, "dashboard", False))


def cmd_sweep(args: argparse.Namespace) -> int:
    from cae import driver, dryrun, plan, rundir
    from cae.config import load_spec

    spec = load_spec(args.config, args.set)
    if args.smoke:
        spec = plan.smoke(spec)
    if args.storage:
        spec.storage = args.storage
    if args.dry_run:
        attach = bool(args.address or os.environ.get("RAY_ADDRESS"))
        print(dryrun.summarize(plan.check_spec(spec, None if attach else
                                                plan.local_budget(spec))))
        return 0
    return driver.new_sweep(spec, args.name or rundir.run_name(spec), address=args.address,
                            data_dir=args.data_dir, force=args.force, console=_console(args))


def cmd_resume(args: argparse.Namespace) -> int:
    from cae import driver

    return driver.resume_sweep(args.run_dir, address=args.address, data_dir=args.data_dir,
                               force=args.force, console=_console(args))


def cmd_report(args: argparse.Namespace) -> int:
    from cae.finish import finish

    if args.output and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise UserError(f"--output {args.output}: its folder does not exist")
    done = finish(args.run_dir, pictures=not args.no_pictures, out=args.output,
                  references=not args.no_pictures, data_dir=args.data_dir)
    print(f"report: {done.report_at}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cae.status import run_status

    print(run_status(args.run_dir).text())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cae.finish import finish

    finish(args.run_dir, report=False, references=False)
    where = args.run_dir.rstrip("/")
    print(f"wrote {where}/trials.parquet and {where}/epochs.parquet")
    return 0


# ---- cae export-models / encode -----------------------------------------------------------


def cmd_export_models(args: argparse.Namespace) -> int:
    from cae.export import export_models

    for path in export_models(args.run_dir, args.output, args.best_per, args.trial):
        print(f"wrote {path}/ (encoder.pt2, decoder.pt2, weights.pt, config.json, card.md)")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from cae.config import parse_overrides
    from cae.export import encode

    trial = args.trial
    if trial not in (None, "best") and "=" in trial:  # a filter: latent_size=8
        trial = parse_overrides([trial])
    out, n = encode(args.source, args.images, args.output, trial or "best",
                    skip_unreadable=args.skip_unreadable)
    print(f"wrote {out}: latents of {n:,} images")
    return 0


# ---- parser -----------------------------------------------------------------------------


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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, dotted keys allowed (model.latent_dim=8)")
    p.add_argument("--data-dir", help="dataset root (default: $CAE_DATA_DIR or a cache dir)")
    p.add_argument("--out", help="directory to save the trained model and its history")
    _refresh_option(p)
    p.set_defaults(func=(cmd_train))

    p = sub.add_parser("models", help="list the named model presets")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=(cmd_models))

    p = sub.add_parser("data", help="fetch or check a dataset (or read your own images) and "
                                    "print its size")
    p.add_argument("dataset", choices=[*DATASETS, *USER_DATASETS])
    p.add_argument("--data-dir", help="dataset root (default: $CAE_DATA_DIR or a cache dir)")
    p.add_argument("--no-download", action="store_true", help="only look on disk")
    p.add_argument("--path", help="folder or arrays: the folder of images or the array file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another data setting: image_size=28, channels=1, test_path=DIR, ...")
    _refresh_option(p)
    p.set_defaults(func=(cmd_data))

    p = sub.add_parser("sweep", help="run a sweep spec on Ray Tune (local or on a cluster)")
    p.add_argument("config", help="sweep spec YAML, e.g. sweeps/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the spec: trial.lr=0.01, space.model.latent_dim=[4, 8], "
                        "num_samples=2")
    p.add_argument("--storage", help="where run directories go: a path, s3:// or gs:// "
                                     "(default: the spec's storage, ./runs)")
    p.add_argument("--name", help="run directory name (default: SPEC_NAME-TIMESTAMP)")
    p.add_argument("--address", help="Ray cluster to attach to (default: start Ray locally; "
                                     "a Ray job attaches to its own cluster)")
    p.add_argument("--data-dir", help="dataset root (default: $CAE_DATA_DIR or a cache dir)")
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
    p.set_defaults(func=(cmd_sweep))

    p = sub.add_parser("resume", help="continue an interrupted sweep")
    p.add_argument("run_dir", help="the run directory of the sweep")
    p.add_argument("--address", help="Ray cluster to attach to")
    p.add_argument("--data-dir", help="dataset root (default: where the sweep read its data, "
                                      "as recorded in the run)")
    _console_options(p)
    _refresh_option(p)
    p.set_defaults(func=(cmd_resume))

    p = sub.add_parser("status", help="how far a run is (running, finished or interrupted): "
                                      "trials, trial-epochs, the best so far; no Ray")
    p.add_argument("run_dir", help="the run directory of the sweep (a path, s3:// or gs://)")
    p.set_defaults(func=(cmd_status))

    p = sub.add_parser("export", help="write trials.parquet and epochs.parquet of a run "
                                      "(finished, running or interrupted)")
    p.add_argument("run_dir", help="the run directory of the sweep")
    p.set_defaults(func=(cmd_export))

    p = sub.add_parser("report", help="write the HTML report of a run (finished, running or "
                                      "interrupted)")
    p.add_argument("run_dir", help="the run directory of the sweep")
    p.add_argument("-o", "--output", help="the HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--data-dir", help="dataset root for the pictures (default: where the "
                                      "sweep read its data, as recorded in the run)")
    p.add_argument("--no-pictures", action="store_true",
                   help="leave out the test-sample pictures and, if the run has none yet, the "
                        "reference errors (no dataset or checkpoints loaded)")
    _refresh_option(p)
    p.set_defaults(func=(cmd_report))

    p = sub.add_parser("export-models", help="write trained models of a run: torch.export "
                                             "programs, weights, config and a card per trial")
    p.add_argument("run_dir", help="the run directory of the sweep (a path, s3:// or gs://)")
    p.add_argument("-o", "--output", required=True, help="folder to write OUT/<trial_id>/ into")
    p.add_argument("--best-per", metavar="COLUMN",
                   help="the best trial trained to the end at each value of a trials.parquet "
                        "column (latent_size, model.channels, ...)")
    p.add_argument("--trial", nargs="+", metavar="ID", help="these trials (default: the best)")
    p.set_defaults(func=(cmd_export_models))

    p = sub.add_parser("encode", help="turn a folder or array file of images into latents")
    p.add_argument("source", help="a model folder written by export-models, or a run directory")
    p.add_argument("--images", required=True, help="a folder of images or a .npy/.npz file")
    p.add_argument("-o", "--output", required=True, help="the .npz file to write")
    p.add_argument("--trial", help="with a run directory: 'best' (default), a trial id, or "
                                   "COLUMN=VALUE (the best trained to the end with it)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out image files that cannot be read (default: refuse them)")
    _refresh_option(p)
    p.set_defaults(func=(cmd_encode))
    return parser


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


def _debug() -> bool:
    return os.environ.get("CAE_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["CAE_DEBUG"] = "1"
    if getattr(args, "refresh_data", False):
        from cae.userdata import refresh_cache

        refresh_cache()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"cae: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:  # a config built from user input outside config.validate
        print(f"cae: error: {format_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cae: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cae ... | head`: the reader has gone, nothing to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 141
    except Exception as exc:
        if _debug():
            raise
        print(f"cae: internal error: {type(exc).__name__}: {exc}\n(this is a bug in cae, not "
              "in your input; run again with --debug or CAE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
