"""cluster.yaml checked offline with Ray's own cluster-launcher validation.

``ray up`` runs ``prepare_config`` (defaults, setup-command merging, docker checks, per-type
min/max workers) and then ``validate_config`` (the JSON schema and node-type rules) before
it talks to any cloud; these tests run the same two functions, with no cloud call (boto3 is
not even installed here), on cluster.yaml and on the GCP and local-provider variants its
comments describe. The rest are the rules this project adds: a head that runs no trials,
autoscaling GPU workers, the image of our Ray, token authentication, nothing listening
beyond the head's loopback.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def _raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _variant(name: str) -> dict:
    """The commented block between ``# >>> name`` and ``# <<< name``, as YAML."""
    text = CLUSTER_YAML.read_text()
    m = re.search(rf"^# >>> {name}\n(.*?)^# <<< {name}$", text, re.DOTALL | re.MULTILINE)
    assert m, f"cluster.yaml has no '# >>> {name}' block"
    lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in m.group(1).splitlines()]
    return yaml.safe_load("\n".join(lines))


def _launcher_checks(raw: dict) -> dict:
    """What `ray up` does to a config before its first cloud call."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cfg() -> dict:
    return _launcher_checks(_raw())


def test_ray_schema_and_node_type_rules(cfg):
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert cfg["provider"]["type"] == "aws"
    total_min = sum(t.get("min_workers", 0) for t in types.values())
    assert total_min <= cfg["max_workers"]
    for name, t in types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name


def test_head_runs_no_trials(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    # the local provider ignores `resources`: the start command says it too
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in start


def test_autoscaling_gpu_workers(cfg):
    workers = {n: t for n, t in cfg["available_node_types"].items()
               if n != cfg["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no worker type with a GPU"
    for name, t in gpu.items():
        assert t["min_workers"] == 0, f"{name}: GPU workers should scale from zero"
        assert 1 <= t["max_workers"] <= 64, f"{name}: max_workers {t['max_workers']}"
        assert t["resources"].get("CPU", 0) >= 1
        assert t["node_config"]["InstanceType"].startswith(("g", "p")), "not a GPU instance"


def test_image_is_the_newest_ray_the_project_admits(cfg):
    """The image's Ray is the newest minor version pyproject.toml admits (the one the
    suite runs on, unless it checks the floors), and installing the project on it pins that
    Ray so that it does not move."""
    import tomllib
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    admitted = next(r for r in map(Requirement, pyproject["project"]["dependencies"])
                    if r.name == "ray").specifier
    images = {cfg["docker"]["image"]}
    images |= {cfg["docker"][k] for k in ("head_image", "worker_image") if k in cfg["docker"]}
    versions = set()
    for image in images:
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cpu|cu\d+)", image)
        assert m, f"{image}: not a pinned rayproject/ray image"
        versions.add(m.group(1))
    assert len(versions) == 1
    version = versions.pop()
    major, minor, _ = map(int, version.split("."))
    assert version in admitted and f"{major}.{minor + 1}.0" not in admitted, (version, admitted)
    assert re.search(r"-(gpu|cu\d+)$", cfg["docker"].get("worker_image", cfg["docker"]["image"]))
    # installing the project must not move the image's Ray
    setup = " ".join(cfg["setup_commands"])
    assert f"=={version}" in setup


def test_setup_installs_this_project(cfg):
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "cae-sweep" in setup
    mounts = cfg["file_mounts"]
    for remote, local in mounts.items():
        if "auth_token" in remote:
            continue
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    local = {Path(v).name for v in mounts.values()}
    assert {"cae", "pyproject.toml", "README.md"} <= local  # what `pip install` needs
    assert not local & {".venv", ".git", "runs", "."}


def test_token_authentication(cfg):
    assert any(remote.endswith(".ray/auth_token") and local == "~/.ray/auth_token"
               for remote, local in cfg["file_mounts"].items())
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        starts = [c for c in cmds if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


def test_nothing_exposed(cfg):
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in re.sub(r"#.*", "", text)
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))


def test_gcp_variant_is_valid():
    raw = _raw()
    raw.update(_variant("gcp"))
    cfg = _launcher_checks(raw)
    assert cfg["provider"]["type"] == "gcp"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


def test_local_variant_is_valid():
    raw = _raw()
    raw.update(_variant("local"))
    del raw["available_node_types"], raw["head_node_type"]  # as the comment says
    cfg = _launcher_checks(raw)
    assert cfg["provider"]["type"] == "local"
    (node_type,) = cfg["available_node_types"].values()
    assert node_type["max_workers"] == len(cfg["provider"]["worker_ips"])
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])


def test_broken_configs_are_refused():
    """The validation these tests lean on does refuse what it should."""
    raw = _raw()
    raw["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _launcher_checks(raw)
    raw = _raw()
    raw["available_node_types"]["gpu_worker"]["min_workers"] = 99
    with pytest.raises(ValueError, match="min_workers"):
        _launcher_checks(raw)
    raw = _raw()
    raw["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # schema: integers
    with pytest.raises(Exception, match="not of type 'integer'"):
        _launcher_checks(raw)
    raw = _raw()
    raw["docker"]["imagee"] = "typo"
    with pytest.raises(Exception, match="Additional properties"):
        _launcher_checks(raw)
