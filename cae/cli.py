"""The ``cae`` command: parses arguments and calls the library.

A user error (a malformed spec, an impossible architecture, a missing dataset, a path that
is not a run directory, a full storage: :class:`cae.config.errors.UserError`) becomes one message
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

from cae.config.errors import UserError, debug, format_validation_error

EXIT_USAGE, EXIT_BUG = 2, 1


# ---- cae models / train / data -----------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from cae.model.network import presets_table

    print(presets_table(as_json=args.json))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cae.config.yamlfile import load_trial
    from cae.train.trainer import train_and_print

    cfg = load_trial(args.config, args.set)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    return train_and_print(cfg, args.out)


def cmd_data(args: argparse.Namespace) -> int:
    from cae.config.errors import validate
    from cae.config.points import parse_overrides
    from cae.config.trial import DataConfig
    from cae.data.datasets import describe

    fields = {"dataset": args.dataset, "data_dir": args.data_dir,
              "download": not args.no_download, "path": args.path}
    fields.update(parse_overrides(args.set))
    print(describe(validate(DataConfig, {k: v for k, v in fields.items() if v is not None},
                            "cae data")))
    return 0


# ---- cae sweep / resume / status / export / report / track ---------------------------------


def _console(args: argparse.Namespace):
    from cae.sweep.driver import Console

    return Console(report_every=args.report_every, no_report=args.no_report,
                   verbose=args.verbose, dashboard=getattr(args, "dashboard", False))


def cmd_sweep(args: argparse.Namespace) -> int:
    from cae.config.spec import load_spec
    from cae.sweep import dryrun, plan

    spec = load_spec(args.config, args.set)
    if args.smoke:
        spec = plan.smoke(spec)
    if args.storage:
        spec.storage = args.storage
    if args.dry_run:
        checked = plan.check_spec(spec, plan.budget_for(spec, args.address))
        print(dryrun.summarize(checked))
        if spec.fusion():  # the packs come from the trials Ray's grid search makes
            from cae.sweep.packplan import describe
            from cae.sweep.tuner import param_space

            print("\n".join(describe(spec, param_space(spec), checked.budget)))
        return 0
    from cae.run import directory as rundir
    from cae.sweep import driver

    return driver.new_sweep(spec, args.name or rundir.run_name(spec), address=args.address,
                            data_dir=args.data_dir, force=args.force, console=_console(args))


def cmd_resume(args: argparse.Namespace) -> int:
    from cae.sweep import driver

    return driver.resume_sweep(args.run_dir, address=args.address, data_dir=args.data_dir,
                               force=args.force, console=_console(args))


def cmd_report(args: argparse.Namespace) -> int:
    from cae.results.finish import finish

    if args.output and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise UserError(f"--output {args.output}: its folder does not exist")
    done = finish(args.run_dir, pictures=not args.no_pictures, out=args.output,
                  references=not args.no_pictures, data_dir=args.data_dir)
    print(f"report: {done.report_at}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cae.results.status import run_status

    print(run_status(args.run_dir).text())
    if args.importance:
        from cae.results.importance import importance_of, importance_text

        print(importance_text(importance_of(args.run_dir)))
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from cae.sweep.extend import extend_run

    return extend_run(args.run_dir, args.epochs, best_per=args.best_per, trial_ids=args.trial,
                      name=args.name, storage=args.storage, address=args.address,
                      data_dir=args.data_dir, force=args.force, console=_console(args))


def cmd_compare(args: argparse.Namespace) -> int:
    from cae.report.compare import write_compare

    if not Path(args.output).expanduser().resolve().parent.is_dir():
        raise UserError(f"--output {args.output}: its folder does not exist")
    print(f"compare: {write_compare(args.run_dirs, args.output)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cae.results.finish import finish

    finish(args.run_dir, report=False, references=False)
    where = args.run_dir.rstrip("/")
    print(f"wrote {where}/trials.parquet and {where}/epochs.parquet")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from cae.track.send import track_run

    track_run(args.run_dir, mlflow=args.mlflow, experiment=args.experiment,
              wandb_project=args.wandb_project, wandb_entity=args.wandb_entity,
              wandb_mode=args.wandb_mode)
    return 0


# ---- cae export-models / encode -----------------------------------------------------------


def cmd_export_models(args: argparse.Namespace) -> int:
    from cae.export import export_models

    for path in export_models(args.run_dir, args.output, args.best_per, args.trial):
        print(f"wrote {path}/ (encoder.pt2, decoder.pt2, weights.pt, config.json, card.md)")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from cae.export import encode

    out, n = encode(args.source, args.images, args.output, args.trial or "best",
                    skip_unreadable=args.skip_unreadable)
    print(f"wrote {out}: latents of {n:,} images")
    return 0


COMMANDS = {"train": cmd_train, "models": cmd_models, "data": cmd_data, "sweep": cmd_sweep,
            "resume": cmd_resume, "status": cmd_status, "extend": cmd_extend,
            "compare": cmd_compare, "export": cmd_export,
            "report": cmd_report, "track": cmd_track, "export-models": cmd_export_models,
            "encode": cmd_encode}


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from cae.arguments import build_parser

    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["CAE_DEBUG"] = "1"
    if getattr(args, "refresh_data", False):
        from cae.data.userdata import refresh_cache

        refresh_cache()
    try:
        return COMMANDS[args.command](args)
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
        if debug():
            raise
        print(f"cae: internal error: {type(exc).__name__}: {exc}\n(this is a bug in cae, not "
              "in your input; run again with --debug or CAE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
