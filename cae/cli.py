"""The ``cae`` command: train one model, run and resume sweeps, export and report results.

Every user error (a malformed spec, an impossible architecture, a missing dataset) becomes
one message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cae.config import UserError

EXIT_USAGE = 2


def format_validation_error(exc, source: str = "") -> str:
    """One readable message from a pydantic ValidationError, naming each field."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    head = f"invalid config{f' ({source})' if source else ''}: "
    return head + "; ".join(lines)


def _user_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command, turning known user errors into one line and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        try:
            return fn(args)
        except ValidationError as exc:
            print(f"cae: error: {format_validation_error(exc, getattr(args, 'config', ''))}",
                  file=sys.stderr)
        except (UserError, OSError, ValueError) as exc:  # OSError: a path or URI unreadable
            print(f"cae: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    return run


# ---- cae models -------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from cae.models import PRESETS, describe, get_preset

    rows = []
    for name in PRESETS:
        cfg = get_preset(name)
        info = describe(cfg)
        rows.append({"name": name, "bottleneck": cfg.bottleneck, **info})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':24} {'input':>10} {'bottleneck':>10} {'params':>10} {'latent':>8}")
    for r in rows:
        shape = "x".join(str(s) for s in r["input_shape"])
        print(f"{r['name']:24} {shape:>10} {r['bottleneck']:>10} {r['params']:>10,} "
              f"{r['latent_size']:>8}")
    return 0


# ---- cae train --------------------------------------------------------------------------


def _epoch_line(m: dict, max_epochs: int) -> str:
    extra = "  ".join(
        f"{k[4:]} {v:.4f}" for k, v in m.items() if k.startswith("val_") and k != "val_loss"
        and k != "best_val_loss"
    )
    return (f"epoch {m['epoch']:>3}/{max_epochs}  train {m['train_loss']:.5f}  "
            f"val {m['val_loss']:.5f}  {m['epoch_time_s']:.1f}s" + (f"  [{extra}]" if extra else ""))


def cmd_train(args: argparse.Namespace) -> int:
    from cae.config import load_trial
    from cae.models import describe
    from cae.train import Diverged, resolve_device, train

    cfg = load_trial(args.config, args.set)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    info = describe(cfg.model)
    device = resolve_device(cfg.device)
    print(f"model {cfg.model.preset or 'custom'}: {info['params']:,} params, latent "
          f"{info['latent_size']} {info['latent_shape']}; task {cfg.task.name} on "
          f"{cfg.data.dataset}; device {device}", flush=True)
    try:
        result = train(cfg, on_epoch=lambda m, _s: print(_epoch_line(m, cfg.max_epochs), flush=True))
    except Diverged as exc:
        print(f"cae: trial diverged: {exc}", file=sys.stderr)
        return 1
    test = "  ".join(f"{k} {v:.5f}" for k, v in result.test.items())
    print(f"done: best val {result.best_val:.5f} at epoch {result.best_epoch}; stopped by "
          f"{result.stop_reason}; {test}")
    if args.out:
        _save_run(args.out, cfg, result)
        print(f"saved to {args.out}")
    return 0


def _save_run(out: str, cfg, result) -> None:
    import torch
    import yaml

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    torch.save({"model": result.model.state_dict(), "config": cfg.model_dump(mode="json")},
               path / "model.pt")
    (path / "history.json").write_text(json.dumps(
        {"history": result.history, "test": result.test, "best_epoch": result.best_epoch,
         "stop_reason": result.stop_reason, "params": result.params,
         "latent_size": result.latent_size}, indent=2))


# ---- cae data ---------------------------------------------------------------------------


def cmd_data(args: argparse.Namespace) -> int:
    from cae.config import DataConfig
    from cae.data import data_root, load

    cfg = DataConfig(dataset=args.dataset, data_dir=args.data_dir, download=not args.no_download)
    data = load(cfg)
    where = "inside the package" if args.dataset == "sample" else str(data_root(args.data_dir))
    print(f"{args.dataset}: train {tuple(data.train.shape)}, test {tuple(data.test.shape)} "
          f"uint8, from {where}")
    return 0


# ---- cae sweep / resume / export ----------------------------------------------------------


def _load_data_for(spec, data_dir: str | None):
    """Load the sweep's dataset once on the driver; trials get it via Ray's object store."""
    from cae.config import DataConfig
    from cae.data import load

    datasets = {json.dumps(DataConfig.model_validate(spec.trial.get("data", {})).model_dump())}
    for key, (kind, _arg) in spec.axes().items():
        if key.startswith("data.") and kind != "fixed":
            raise UserError(f"space.{key}: sweeping the dataset is not supported; "
                            "run one sweep per dataset")
    cfg = DataConfig.model_validate(json.loads(datasets.pop()))
    if data_dir:
        cfg.data_dir = data_dir
    return load(cfg)


# A run directory is a local path or a URI (s3://, gs://, file://): one at a URI is read
# through a local mirror of its small files, and what is made from it goes back next to them.


def _local_copy(run_dir: str) -> Path:
    from cae.cluster import fetch_run, is_uri

    return fetch_run(run_dir) if is_uri(run_dir) else Path(run_dir)


def _write_report(run_dir: str, local: Path, out: str | None = None, pictures: bool = True,
                  trials=None) -> Path:
    """The HTML report of a run; for a run at a URI, the checkpoints its pictures need
    are fetched first (those of the best few trials only)."""
    from analysis.report import write_report
    from cae.cluster import fetch_checkpoints, is_uri

    if pictures and is_uri(run_dir):
        from analysis.run import best_trials
        from cae.results import load_frames

        trials = load_frames(local)[0] if trials is None else trials
        fetch_checkpoints(run_dir, best_trials(trials, 9)["trial_dir"], local)
    return write_report(local, out, pictures=pictures)


def _publish(run_dir: str, *files: Path) -> None:
    from cae.cluster import is_uri, publish

    if is_uri(run_dir):
        publish(run_dir, *files)


def _finish(run_dir: str, no_report: bool) -> None:
    """After a sweep or a resume: export the results, summarise them, write the report."""
    import pandas as pd

    from cae.cluster import is_uri
    from cae.results import EPOCHS_FILE, TRIALS_FILE, best_trial, export

    local = _local_copy(run_dir)
    made = list(export(local))
    _publish(run_dir, *made)
    trials = pd.read_parquet(made[0])
    counts = ", ".join(f"{n} {s.lower()}" for s, n in trials["status"].value_counts().items())
    print(f"\ntrials: {len(trials)} ({counts}); "
          f"trial-epochs: {int(trials['epochs'].sum())}")
    best = best_trial(trials)
    if best is not None:
        axes = {k: best[k] for k in trials.columns if k.startswith(("model.", "lr", "batch_size",
                                                                    "weight_decay", "task."))
                and not pd.isna(best[k])}
        print(f"best trial {best['trial_id']}: val {best['best_val_loss']:.5f}, test "
              f"{best.get('test_loss', float('nan')):.5f}, params {int(best['params']):,}, "
              f"latent {int(best['latent_size'])}")
        print("  " + ", ".join(f"{k}={v}" for k, v in axes.items()))
    print(f"results: {run_dir}/{TRIALS_FILE} and {EPOCHS_FILE}")
    unfinished = ~trials["status"].isin(["TERMINATED", "ERROR"])
    if unfinished.any():
        print(f"{int(unfinished.sum())} trials did not finish; continue with: cae resume {run_dir}")
    if not no_report:
        try:
            report = _write_report(run_dir, local, trials=trials)
            _publish(run_dir, report)
            print(f"report: {run_dir}/{report.name}" if is_uri(run_dir) else f"report: {report}")
        except Exception as exc:  # noqa: BLE001 - the results are safe; say why no report
            print(f"cae: the report could not be written ({exc}); the results are complete: "
                  f"try `cae report {run_dir}`", file=sys.stderr)
    print(f"run directory: {run_dir}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from cae import sweep
    from cae.config import load_spec

    spec = load_spec(args.config, args.set)
    if args.storage:
        spec.storage = args.storage
    checked = sweep.check_spec(spec)
    if args.dry_run:
        print(sweep.summarize(checked))
        return 0
    attach = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if not attach:
        sweep.check_local_resources(spec)
    data = _load_data_for(spec, args.data_dir)
    storage = sweep.storage_uri(spec.storage)
    name = args.name or sweep.run_name(spec)
    run_dir = f"{storage.rstrip('/')}/{name}"
    with sweep.ray_session(args.address, dashboard=args.dashboard):
        sweep.check_cluster(spec)
        sweep.save_spec(run_dir, spec)
        print(f"sweep {spec.name}: {checked.n_trials} trials -> {run_dir}", flush=True)
        sweep.fit(spec, data, name, storage, checked)
    _finish(run_dir, args.no_report)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from cae import sweep

    run_dir = sweep.storage_uri(args.run_dir)
    spec = sweep.load_run_spec(run_dir)
    data = _load_data_for(spec, args.data_dir)
    with sweep.ray_session(args.address):
        sweep.check_cluster(spec, run_dir)
        print(f"resuming {run_dir}", flush=True)
        sweep.resume(run_dir, spec, data)
    _finish(run_dir, args.no_report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cae.cluster import is_uri

    local = _local_copy(args.run_dir)
    report = _write_report(args.run_dir, local, args.output, not args.no_pictures)
    if args.output is None and is_uri(args.run_dir):
        _publish(args.run_dir, report)
        print(f"report: {args.run_dir.rstrip('/')}/{report.name} (local copy: {report})")
    else:
        print(f"report: {report}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cae.results import export

    made = export(_local_copy(args.run_dir))
    _publish(args.run_dir, *made)
    where = args.run_dir.rstrip("/")
    print(f"wrote {where}/{made[0].name} and {where}/{made[1].name}")
    return 0


# ---- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cae",
        description="Hyperparameter sweeps of convolutional autoencoders on Ray Tune.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model from a trial config (no Ray)")
    p.add_argument("config", help="trial config YAML, e.g. sweeps/single.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, dotted keys allowed (model.latent_dim=8)")
    p.add_argument("--data-dir", help="dataset root (default: $CAE_DATA_DIR or a cache dir)")
    p.add_argument("--out", help="directory to save the trained model and its history")
    p.set_defaults(func=_user_errors(cmd_train))

    p = sub.add_parser("models", help="list the named model presets")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=_user_errors(cmd_models))

    p = sub.add_parser("data", help="fetch or check a dataset and print its size")
    p.add_argument("dataset", choices=["sample", "mnist", "fashion_mnist", "kmnist", "cifar10"])
    p.add_argument("--data-dir", help="dataset root (default: $CAE_DATA_DIR or a cache dir)")
    p.add_argument("--no-download", action="store_true", help="only look on disk")
    p.set_defaults(func=_user_errors(cmd_data))

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
    p.add_argument("--dry-run", action="store_true",
                   help="validate every grid point, print trials, architectures and work; "
                        "start nothing, write nothing")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    p.set_defaults(func=_user_errors(cmd_sweep))

    p = sub.add_parser("resume", help="continue an interrupted sweep")
    p.add_argument("run_dir", help="the run directory of the sweep")
    p.add_argument("--address", help="Ray cluster to attach to")
    p.add_argument("--data-dir", help="dataset root (default: $CAE_DATA_DIR or a cache dir)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    p.set_defaults(func=_user_errors(cmd_resume))

    p = sub.add_parser("export", help="write trials.parquet and epochs.parquet of a run "
                                      "(finished, running or interrupted)")
    p.add_argument("run_dir", help="the run directory of the sweep")
    p.set_defaults(func=_user_errors(cmd_export))

    p = sub.add_parser("report", help="write the HTML report of a run (finished, running or "
                                      "interrupted)")
    p.add_argument("run_dir", help="the run directory of the sweep")
    p.add_argument("-o", "--output", help="the HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--no-pictures", action="store_true",
                   help="leave out the test-sample pictures (no dataset or checkpoints loaded)")
    p.set_defaults(func=_user_errors(cmd_report))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
