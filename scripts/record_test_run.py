"""Record the small real run directory the fast tests read: ``tests/data/recorded-run``.

A sweep of two tiny CAEs (latent 2 and 4, one stage of 2 channels) for two epochs on 240
images of the embedded sample, run by ``cae sweep`` with Ray Tune as usual: Ray's own
files (experiment state, params.json, result.json, checkpoints), cae's (spec.yaml, each
trial's trial.json, history.json in each checkpoint, the state copy in .cae-state/) and the
tables. The fast tests copy it and read it (``cae.results.tables``, ``cae.run.state``,
``cae.run.checkpoints``) without starting Ray, so a change in what Ray or cae writes shows in
the fast tier. Run it again when that changes:

    python scripts/record_test_run.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "tests" / "data" / "recorded-run"
SPEC = {
    "name": "recorded",
    "trial": {"data": {"dataset": "sample", "train_limit": 240, "test_limit": 100},
              "model": {"channels": [2], "dense": [], "latent_dim": 2}, "max_epochs": 2,
              "patience": None, "batch_size": 64},
    "space": {"model.latent_dim": {"grid": [2, 4]}},
    "scheduler": {"kind": "fifo"},
    "seed": 0,
}


def main() -> int:
    from cae.cli import main as cae

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "recorded.yaml"
        spec.write_text(yaml.safe_dump(SPEC))
        rc = cae(["sweep", str(spec), "--storage", tmp, "--name", "run", "--no-report",
                  "--report-every", "0"])
        if rc != 0:
            return rc
        run = Path(tmp) / "run"
        for junk in run.glob("*/events.out.tfevents.*"):  # Tensorboard's copy: not read
            junk.unlink()
        shutil.rmtree(DEST, ignore_errors=True)
        shutil.copytree(run, DEST)
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"{DEST}: {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
