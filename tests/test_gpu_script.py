"""benchmarks/gpu.py, the script a GPU session runs first, read as the device would meet it:
its plan and deadlines, its worker processes, its like-for-like data-path case, its machine
record; and the compiled paths it times (a trial's and a pack's steps), compiled here first.
Everything on the CPU: CI has no GPU."""

import builtins
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402 (from benchmarks/, put on the path above)
import gpu  # noqa: E402

# ---- (a) the device check --------------------------------------------------------------


def test_devices_compare_as_torch_devices_cuda_is_cuda_0():
    """A CUDA trial reports "cuda" and its tensors "cuda:0": the same device. Built without
    a GPU: torch.device("cuda") needs none."""
    assert gpu.same_device("cuda", "cuda:0")
    assert gpu.same_device(torch.device("cuda", 0), torch.device("cuda"))
    assert gpu.same_device("cpu", torch.device("cpu"))
    assert not gpu.same_device("cuda", "cuda:1")
    assert not gpu.same_device("cuda:0", "cpu")
    assert gpu.check_passed(torch.device("cuda"), torch.device("cuda:0"),
                            torch.device("cuda:0"), "bf16", [0.09, 0.05])
    assert not gpu.check_passed("cuda", "cuda:0", "cpu", "bf16", [0.09, 0.05])
    assert not gpu.check_passed("cuda", "cuda:0", "cuda:0", "fp32", [0.09, 0.05])
    assert not gpu.check_passed("cpu", "cpu", "cpu", "fp32", [0.05, 0.09])


# ---- the plan: budgets, deadlines, --dry -------------------------------------------------


@pytest.mark.parametrize("total", [360, 420, 600, 241.5, 30])
def test_budgets_add_up_to_the_total_less_the_reserve(total):
    p = gpu.plan(total)
    assert list(p) == gpu.ORDER
    assert sum(c["budget"] for c in p.values()) == pytest.approx(total - gpu.RESERVE_S)
    assert p[gpu.ORDER[-1]]["ends_at"] == pytest.approx(total - gpu.RESERVE_S)
    ends = [c["ends_at"] for c in p.values()]
    assert ends == sorted(ends) and all(c["budget"] > 0 for c in p.values())
    some = gpu.plan(total, names=["d_graphs", "a_check"])  # a second try: in the run's order
    assert list(some) == ["a_check", "d_graphs"]
    assert sum(c["budget"] for c in some.values()) == pytest.approx(total - gpu.RESERVE_S)


def test_dry_prints_the_plan_and_runs_nothing(tmp_path):
    for extra in ([], ["--smoke"]):
        proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry", *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        for name in gpu.ORDER:
            assert name in proc.stdout
        assert "reserve" in proc.stdout and "sizes:" in proc.stdout


# an interpreter where pydantic does not import (carried wheels that do not install, say)
NO_PYDANTIC = ("import runpy, sys; sys.modules['pydantic'] = None; "
               "sys.argv = ['benchmarks/gpu.py', *sys.argv[1:]]; "
               "runpy.run_path('benchmarks/gpu.py', run_name='__main__')")


@pytest.mark.parametrize("smoke", [True, False])
def test_every_batch_divides_its_split_so_each_pass_compiles_one_graph(smoke):
    """On the device as in the smoke run: the training batches divide the training split,
    the evaluation batches the validation and test splits (of the sample, 4,000 training
    and 1,000 test images, split as cae splits them)."""
    from cae.config.trial import DataConfig
    from cae.data.userdata import held_out

    s = gpu.sizes(smoke)
    n = s["train_limit"] or 4000
    val = held_out(n, DataConfig.model_fields["val_fraction"].default)
    test = s["test_limit"] or 1000
    assert (n - val) % s["batch_size"] == 0, (n - val, s["batch_size"])
    assert val % s["eval_batch_size"] == 0 and test % s["eval_batch_size"] == 0
    assert n <= 4000 and test <= 1000


def test_the_preflight_says_in_seconds_what_imports_and_which_gpu(tmp_path):
    out = tmp_path / "preflight.txt"
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--preflight", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["python", "pydantic", "torch",
                                                     "torchvision", "cae.config.trial", "gpu"]
    assert lines[2] == f"torch {torch.__version__}"
    assert lines[-1].startswith("gpu none") or torch.cuda.is_available()

    proc = subprocess.run([sys.executable, "-c", NO_PYDANTIC, "--preflight", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    text = out.read_text()
    assert "pydantic FAILS" in text and "cae.config.trial FAILS" in text
    assert f"torch {torch.__version__}" in text  # what imports is still said


def test_a_cae_that_does_not_import_still_leaves_a_results_file(tmp_path):
    """The results file is written before cae is imported: wheels that do not import cost
    the cases, not the record of why."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-c", NO_PYDANTIC, "--smoke", "--budget", "30",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    record = json.loads(out.read_text())
    assert record["cases"]["import"]["status"] == "error"
    assert "pydantic" in record["cases"]["import"]["error"]
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, nothing left beside it


class _After(gpu.Deadline):
    """A deadline that passes after ``n`` checks (no clock: the test does not race)."""

    def __init__(self, n: int):
        super().__init__(at=float("inf"), budget=1.0)
        self.n = n

    def passed(self) -> bool:
        self.n -= 1
        return self.n < 0


def _grid(n: int, epochs: int) -> list[dict]:
    s = gpu.sizes(smoke=True) | {"epochs": epochs}
    return gpu.grid(n, s)


def test_a_deadline_between_epochs_stops_a_trial_and_keeps_its_epochs():
    """Checked before each trial and after each epoch: the second trial stops after its
    first epoch; the first trial and that epoch are counted (3 epochs: 1.5 trials)."""
    from cae.config.trial import DataConfig
    from cae.data.datasets import load

    dicts = _grid(3, epochs=2)
    data = load(DataConfig.model_validate(dicts[0]["data"]))
    # checks: before trial 1, its 2 epochs, before trial 2, its first epoch -> passed
    r = gpu.run_trials(dicts, data, _After(4))
    assert r["done"] == 1 and r["epochs"] == 3 and r["stopped"] == "deadline"
    assert r["trials_per_hour"] == pytest.approx(1.5 / r["wall_s"] * 3600, rel=0.05)


def test_a_deadline_between_epochs_stops_a_pack_and_keeps_its_figures():
    run = SimpleNamespace(s=gpu.sizes(smoke=True) | {"epochs": 3, "packs": [2],
                                                     "graph_packs": []},
                          busy=SimpleNamespace(between=lambda *_: None))
    from cae.config.trial import DataConfig
    from cae.data.datasets import load

    data = load(DataConfig.model_validate(gpu.grid(1, run.s)[0]["data"]))
    result: dict = {}
    gpu.case_packs(run, data, _After(0), result)  # the pack's first epoch, then out of time
    (row,) = result["packs"]
    assert row["status"] == "partial" and row["stopped"] == "deadline"
    assert row["epochs"] == 1 and row["trials_per_hour"] > 0


# ---- (c) worker processes ------------------------------------------------------------------


def test_workers_are_killed_and_reaped_when_one_fails():
    procs: list = []
    cmds = [[sys.executable, "-c", "import sys; sys.exit(3)"],
            [sys.executable, "-c", "import time; time.sleep(120)"]]
    t0 = time.time()
    with pytest.raises(RuntimeError, match="worker failed"):
        gpu.run_workers(cmds, {}, time.time() + 100, procs)
    assert time.time() - t0 < 30
    assert len(procs) == 2 and all(p.returncode is not None for p in procs)
    assert not gpu.LIVE


def test_workers_are_killed_and_reaped_when_late():
    procs: list = []
    cmds = [[sys.executable, "-c", "import time; time.sleep(120)"]] * 2
    with pytest.raises(RuntimeError, match="still running"):
        gpu.run_workers(cmds, {}, time.time() + 2, procs)
    assert all(p.returncode is not None for p in procs) and not gpu.LIVE


def test_workers_are_killed_and_reaped_when_the_run_is_stopped():
    """SIGTERM (``timeout``) ends gpu.py through SystemExit: no worker outlives it."""
    procs: list = []
    cmds = [[sys.executable, "-c", "import time; time.sleep(120)"]] * 2
    old = signal.signal(signal.SIGALRM, lambda *_: sys.exit(143))
    signal.alarm(2)
    try:
        with pytest.raises(SystemExit):
            gpu.run_workers(cmds, {}, time.time() + 100, procs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert len(procs) == 2 and all(p.returncode is not None for p in procs) and not gpu.LIVE


def test_workers_report_their_last_line():
    cmds = [[sys.executable, "-c", f"print('noise'); print('{{\"n\": {i}}}')"] for i in range(3)]
    assert gpu.run_workers(cmds, {}, time.time() + 60) == [{"n": 0}, {"n": 1}, {"n": 2}]


# ---- (f) the data path, like for like ----------------------------------------------------------


def test_the_dataloader_side_warms_up_and_synchronises_once():
    """Its workers' first batches go through the step before the clock starts, and the loss
    is summed on the device: no .item() per step, one sync at the end (as ours)."""

    class Loss:
        def detach(self):
            return torch.ones(())

        def item(self):
            raise AssertionError("a host sync per step")

    steps, syncs = [], []
    loader = [(torch.zeros(4, 3), 0)] * 10
    seconds, images = gpu.loader_side(lambda x: steps.append(x) or Loss(), loader,
                                      lambda x: x, lambda: syncs.append(len(steps)),
                                      warmup=3, limit_s=60)
    assert images == 7 * 4 and len(steps) == 10 and seconds >= 0
    assert syncs == [3, 10]  # after the warm-up (the clock starts), at the end


# ---- the machine record and the busy share -------------------------------------------------------


def test_machine_survives_any_import_failure(monkeypatch):
    """A torchvision built for another torch raises at import (not only ImportError)."""
    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        if name == "ray":
            raise OSError("libray.so: cannot open shared object file")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    info = common.machine()
    assert info["torchvision"] is None and "nms does not exist" in info["torchvision_error"]
    assert info["ray"] is None and "OSError" in info["ray_error"]
    assert info["torch"] == torch.__version__ and "load_avg_start" in info


class _FakeNVML:
    """pynvml on a MIG instance: utilization.gpu is not supported, GPM's metrics are."""

    NVML_DEVICE_MIG_ENABLE, NVML_GPM_METRICS_GET_VERSION, NVML_GPM_METRIC_GRAPHICS_UTIL = 1, 1, 1

    def __init__(self):
        self.samples = 0

    def nvmlInit(self):  # noqa: N802 (pynvml's names)
        pass

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return "gpu0"

    def nvmlDeviceGetUtilizationRates(self, h):  # noqa: N802
        raise RuntimeError("Not Supported")

    def nvmlDeviceGetMigMode(self, h):  # noqa: N802
        return (1, 1)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, i):  # noqa: N802
        return "mig0"

    def nvmlDeviceGetGpuInstanceId(self, h):  # noqa: N802
        return 7

    def nvmlGpmSampleAlloc(self):  # noqa: N802
        return object()

    def nvmlGpmMigSampleGet(self, h, instance, sample):  # noqa: N802
        assert (h, instance) == ("gpu0", 7)
        self.samples += 1

    def c_nvmlGpmMetricsGet_t(self):  # noqa: N802
        return SimpleNamespace(metrics=[SimpleNamespace(metricId=0, value=0.0)])

    def nvmlGpmMetricsGet(self, get):  # noqa: N802
        assert get.sample1 is not get.sample2 and get.metrics[0].metricId == 1
        get.metrics[0].value = 62.5


def test_busy_under_mig_reads_gpm(monkeypatch):
    fake = _FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    busy = gpu.Busy(period=0.01)
    try:
        assert busy.source == "nvml-gpm (MIG)"
        deadline = time.time() + 10
        while len(busy.samples) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert busy.between(0, time.time() + 1) == 0.625
    finally:
        busy._stop.set()


# ---- the compiled paths: no graph break, nothing compiled after the first epoch ----------------


def _compiled_cfgs():
    from cae.config.trial import TrialConfig

    base = {"data": {"dataset": "sample", "train_limit": 120, "test_limit": 12},
            "lr": 0.003, "batch_size": 54, "eval_batch_size": 12, "max_epochs": 2,
            "patience": None, "device": "cpu", "compile": "default",
            "model": {"channels": [2], "dense": [8], "latent_dim": 4, "batchnorm": True,
                      "dropout": 0.2}}
    return [TrialConfig.model_validate(base | {"seed": s}) for s in (0, 1)]


# inductor builds C++ kernels with gcc: minutes on two cores (more under load), so slow
BACKENDS = ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow,
                                                         pytest.mark.timeout(1800)])]


@pytest.fixture
def backend(request, monkeypatch):
    """Trials and packs compile with ``request.param`` (``aot_eager``: dynamo and
    AOTAutograd trace what inductor compiles, in seconds), from a clean dynamo cache."""
    import torch._dynamo

    import cae.train.pack
    import cae.train.trainer

    if request.param != "inductor":
        for module in (cae.train.trainer, cae.train.pack):  # restored after the test
            monkeypatch.setattr(module, "compiler", module.compiler)
        gpu.use_backend(request.param)
    torch._dynamo.reset()
    return request.param


def _mark_first_epoch(marks: list):
    """An ``on_epoch`` that starts counting compiles when the first epoch ends."""
    return lambda *_: marks or marks.append(common.CompileCounts())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_trial_steps_compile_without_graph_breaks(backend):
    """A trial's training and evaluation steps with batchnorm and MaskedDropout (its hash,
    the step buffer it mutates): no graph break, nothing compiled after the first epoch,
    nothing for a second trial of the same shapes, and the eager trial's losses."""
    from cae.data.datasets import load
    from cae.train.trainer import Trainer

    cfgs = _compiled_cfgs()
    data = load(cfgs[0].data)
    eager = Trainer(cfgs[0].model_copy(update={"compile": "none"}), data)
    eager.fit()
    counts = common.CompileCounts()
    for i, cfg in enumerate(cfgs):
        before, marks = common.CompileCounts(), []
        trainer = Trainer(cfg, data)
        trainer.fit(_mark_first_epoch(marks))
        trainer.test()
        assert marks[0].now()["compiles"] == 0, marks[0].now()
        if i == 0:
            assert [h["val_loss"] for h in trainer.history] == pytest.approx(
                [h["val_loss"] for h in eager.history], rel=1e-4)
        else:
            assert before.now()["compiles"] == 0, before.now()  # no recompile per trial
    c = counts.now()
    assert c["graph_breaks"] == 0, c["graph_break_reasons"]
    assert c["compiles"] >= 2, c  # a training and an evaluation graph at least


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_pack_steps_compile_without_graph_breaks(backend):
    """A pack's vmapped steps (batchnorm per member, each member's dropout hash): no graph
    break, nothing compiled after the first epoch, and the eager pack's losses."""
    from cae.data.datasets import load
    from cae.train.pack import Pack

    cfgs = _compiled_cfgs()
    data = load(cfgs[0].data)
    eager = Pack([c.model_copy(update={"compile": "none"}) for c in cfgs], data)
    eager.fit()
    counts, marks = common.CompileCounts(), []
    pack = Pack(cfgs, data)
    pack.fit(_mark_first_epoch(marks))
    assert marks[0].now()["compiles"] == 0, marks[0].now()
    c = counts.now()
    assert c["graph_breaks"] == 0, c["graph_break_reasons"]
    assert c["compiles"] >= 2, c
    for a, b in zip(eager.members, pack.members):
        assert [h["val_loss"] for h in b.history] == pytest.approx(
            [h["val_loss"] for h in a.history], rel=1e-4)


# ---- the whole script on the CPU -------------------------------------------------------------


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_every_case(tmp_path):
    """benchmarks/gpu.py --smoke: every case of the device script runs (on the CPU, tiny),
    the compiled ones with inductor, with their compile counts: no graph break, nothing
    compiled after the first epoch."""
    out = tmp_path / "gpu-smoke.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(out)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert list(cases) == gpu.ORDER
    assert {c["status"] for c in cases.values()} == {"ok"}, cases
    assert result["backend"] == "inductor"
    assert cases["a_check"]["passed"]
    assert [(r["members"], r["compile"], r["status"]) for r in cases["e_packs"]["packs"]] == [
        (2, "none", "ok"), (4, "none", "ok"), (2, "reduce-overhead", "ok")]
    assert cases["b_one_per_gpu"]["done"] == cases["c_eighth_gpu"]["done"] == 4
    assert result["trials_per_hour_speedup"] > 0 and result["goals"] is None
    counts = result["compile_counts"]
    assert set(counts) == {"e_packs", "d_graphs"}
    for name, c in counts.items():
        assert c["graph_breaks"] == 0 and c["after_first_epoch"] == 0, (name, c)
    assert cases["d_graphs"]["compiles_per_trial"][1:] == [0]
    assert sum(result["plan"][n]["budget"] for n in gpu.ORDER) + gpu.RESERVE_S == 600
