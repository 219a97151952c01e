"""Memory estimate against the memory a trial really uses, for three architectures.

``cae.model.memory.estimate`` is what the dry run uses to refuse grid points that cannot fit
their device. Here each architecture is trained for one epoch (and evaluated on the test
split, as a finished trial is) in a fresh process on the CPU; the measured figure is the
peak resident memory of that process (``ru_maxrss``) minus its resident memory after
importing torch and cae, against the estimate without its fixed runtime part. The ratio
estimate / measured should be >= 1 (the estimate is an upper bound) and not far above it.

    python benchmarks/memory.py            # three architectures (needs ../shared/data)
    python benchmarks/memory.py --quick    # the same on the embedded sample
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

CASES = {
    "quickstart dense, batch 128": {
        "model": {"channels": [8, 16], "convs": 2, "dense": [64], "latent_dim": 16},
        "batch_size": 128},
    "study_b_model12, batch 512": {
        "model": {"preset": "study_b_model12"}, "batch_size": 512},
    "wide conv bottleneck, batch 1024": {
        "model": {"channels": [64, 128], "bottleneck": "conv", "latent_channels": 8},
        "batch_size": 1024},
}

CHILD = r"""
import json, resource, sys
import torch
from cae.config.trial import TrialConfig
from cae.train.trainer import Trainer
from cae.data.datasets import load
torch.set_num_threads(1)
cfg = TrialConfig.model_validate(json.loads(sys.argv[1]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
data = load(cfg.data)
trainer = Trainer(cfg, data)
trainer.fit()
trainer.test()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="on the embedded sample")
    args = p.parse_args()
    started = common.now()
    from cae.config.trial import TrialConfig
    from cae.model.memory import estimate

    data = {"dataset": "sample"}
    tmp = common.tempdir("memory")
    if not args.quick:
        root = common.writable_data_copy("FashionMNIST", tmp)
        if root is None:
            print("memory.py needs ../shared/data (or run with --quick)", file=sys.stderr)
            return 2
        data = {"dataset": "fashion_mnist", "data_dir": str(root), "download": True}
    rows, figures = [], {}
    for name, case in CASES.items():
        trial = {"data": data, "max_epochs": 1, "patience": None, **case}
        cfg = TrialConfig.model_validate(trial)
        est = estimate(cfg)
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(trial)], check=True,
                             capture_output=True, text=True, cwd=common.ROOT).stdout
        m = json.loads(out.strip().splitlines()[-1])
        measured = m["peak"] - m["base"]
        predicted = est.total - est.runtime
        ratio = predicted / measured
        figures[name] = {"estimate_bytes": predicted, "measured_bytes": measured,
                         "ratio": round(ratio, 3), "breakdown": str(est),
                         "runtime_measured_bytes": m["base"]}
        rows.append((name, f"{predicted / 2**20:,.0f}", f"{measured / 2**20:,.0f}",
                     f"{ratio:.2f}x"))
    print(common.table(rows, ("architecture", "estimate MiB", "measured MiB", "ratio")))
    ratios = [f["ratio"] for f in figures.values()]
    summary = {"cases": figures, "min_ratio": min(ratios), "max_ratio": max(ratios),
               "dataset": data["dataset"]}
    path = common.write_results(common.results_path("memory", args.quick), "memory",
                                common.machine(), summary, started)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
