"""Shared bits of the benchmarks: the machine record, the results file, a plain table.

Every benchmark measures a ratio against a baseline inside one run and writes
``benchmarks/results/NAME.json`` (``NAME-quick.json`` with ``--quick``) holding the machine,
the date, the exact command and its figures; docs/performance.md quotes those files.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
if str(ROOT) not in sys.path:  # run as `python benchmarks/NAME.py` from a fresh clone
    sys.path.insert(0, str(ROOT))


def command_line() -> str:
    """The command as typed from the repository root: ``python benchmarks/NAME.py ...``."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001 - a machine record must never fail
        return None
    return None


def machine() -> dict:
    """Where the figures were taken: OS, CPU, cores, versions, GPU, load when starting.

    Never fails: a library that cannot be imported (missing, or built for another torch,
    whose import may raise any error) is recorded as None, with the error beside it."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    for mod in ("torch", "torchvision", "ray"):
        info[mod], error = _version(mod)
        if error:
            info[f"{mod}_error"] = error
    try:
        import torch

        info["torch_threads_default"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - recorded above as torch_error
        info["torch_threads_default"] = None
    info["gpu"] = _gpu()
    info["device"] = "cuda" if info["gpu"] else "cpu"
    info["load_avg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _version(mod: str) -> tuple[str | None, str | None]:
    """A module's version, or None and why (its import may fail in any way)."""
    try:
        return str(__import__(mod).__version__), None
    except ModuleNotFoundError as exc:
        if exc.name == mod:
            return None, None  # not installed: nothing to explain
        return None, f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:  # noqa: BLE001 - a machine record must never fail
        return None, f"{type(exc).__name__}: {exc}"[:300]


def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def results_path(name: str, quick: bool, tag: str | None = None) -> Path:
    suffix = ("-" + tag if tag else "") + ("-quick" if quick else "")
    return RESULTS / f"{name}{suffix}.json"


def write_results(path: Path, name: str, info: dict, figures: dict, started: str) -> Path:
    """The results file: benchmark, date, command, machine, then the figures."""
    info = dict(info)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    record = {"benchmark": name, "date": started, "finished": now(), "command": command_line(),
              "machine": info, **figures}
    path.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all: a kill in the middle of a write leaves the file before it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def table(rows: list[tuple], header: tuple | None = None) -> str:
    """A left/right aligned text table: text columns left, numbers right."""
    all_rows = ([header] if header else []) + [tuple(map(_cell, r)) for r in rows]
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(all_rows[0]))]
    lines = []
    for k, r in enumerate(all_rows):
        cells = []
        for i, c in enumerate(r):
            c = str(c)
            numeric = c.replace(",", "").replace(".", "").replace("-", "").replace("x", "") \
                .replace("%", "").strip().isdigit()
            cells.append(c.rjust(widths[i]) if numeric and i else c.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
        if header and k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(x) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3f}" if abs(x) >= 0.01 else (f"{x:.4f}" if abs(x) >= 1e-4 else f"{x:.2e}")
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def median(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


class CompileCounts:
    """What ``torch.compile`` did from now on, read from torch._dynamo's own records:
    frames compiled, recompiles (a compile of code compiled before, with dynamo's reason:
    a new shape, grad mode, a tensor's requires_grad), graph breaks (with their reasons)
    and the seconds spent compiling (forward graphs: dynamo's whole compile; backward
    graphs: inductor's). Imports torch._dynamo (a second or two, once): make one outside
    a timed window. Never fails: a torch without these records gives ``error``."""

    def __init__(self):
        try:
            from torch._dynamo import utils

            # keep every compile's record (by default the last 64), so that counts from
            # two moments subtract
            utils.set_compilation_metrics_limit(100_000)
            self._start = self._raw()
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not stop a benchmark
            self._start = exc

    @staticmethod
    def _raw() -> tuple[list, dict]:
        from torch._dynamo import utils

        return utils.get_compilation_metrics(), dict(utils.counters["graph_break"])

    def now(self) -> dict:
        """The counts since this object was made."""
        try:
            if isinstance(self._start, Exception):
                raise self._start
            (old, breaks0), (records, breaks) = self._start, self._raw()
            frames, backward = [], []
            for m in records[len(old):]:
                # a backward graph (compiled at the first backward) has no frame of its own
                (frames if m.co_name is not None else backward).append(m)
            new_breaks = {k: v - breaks0.get(k, 0) for k, v in breaks.items()
                          if v > breaks0.get(k, 0)}
            reasons = [m.recompile_reason for m in frames if m.recompile_reason]
            seconds = (sum(m.entire_frame_compile_time_s or 0.0 for m in frames)
                       + sum(m.inductor_compile_time_s or 0.0 for m in backward))
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not stop a benchmark
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"compiles": len(frames), "recompiles": len(reasons),
                "graph_breaks": sum(new_breaks.values()),
                "graph_break_reasons": [str(k)[:200] for k in new_breaks][:5],
                "recompile_reasons": sorted({r[:160] for r in reasons})[:8],
                "compile_s": round(seconds, 2)}


def shared_data_dir() -> Path | None:
    """The read-only datasets beside the repository (``../shared/data``), or
    ``$CAE_SHARED_DATA``; None when neither exists."""
    env = os.environ.get("CAE_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data",
                                                 Path(__file__).resolve().parents[2] / "shared"
                                                 / "data"]:
        if cand.is_dir():
            return cand
    return None


def writable_data_copy(dataset_folder: str, tmp: Path) -> Path | None:
    """Copy ``shared/data/<folder>/raw`` into ``tmp`` (never write into shared/); the copy's
    root, or None when the shared folder lacks it. torchvision extracts the archives there."""
    src = shared_data_dir()
    if src is None or not (src / dataset_folder / "raw").is_dir():
        return None
    dst = tmp / "data"
    shutil.copytree(src / dataset_folder / "raw", dst / dataset_folder / "raw",
                    dirs_exist_ok=True)
    for f in (dst / dataset_folder / "raw").iterdir():
        f.chmod(0o644)
    return dst


def tempdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"cae-bench-{prefix}-"))


def cae_command() -> list[str]:
    """How to run the ``cae`` CLI in a subprocess from this interpreter."""
    return [sys.executable, "-m", "cae.cli"]


def run_timed(cmd: list[str], cwd: Path | None = None, env: dict | None = None
              ) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command to the end; its wall time (Python start included) and the process."""
    import time

    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=cwd or ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - t0, proc


def sweep_in_process(argv: list[str], storage: Path, name: str):
    """``cae sweep`` through ``cae.cli.main`` in this process (its output to
    ``STORAGE/NAME.log``); the run's trials frame and the wall time in seconds."""
    import contextlib
    import io
    import time

    import pandas as pd

    from cae import cli

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    wall = time.perf_counter() - t0
    (storage / f"{name}.log").write_text(buf.getvalue())
    if rc != 0:
        raise SystemExit(f"sweep {name} failed (exit {rc}); see {storage / name}.log")
    return pd.read_parquet(storage / name / "trials.parquet"), wall
