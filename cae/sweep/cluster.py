"""Sweeps on a Ray cluster: is ``--storage`` shared by every node; run directories at URIs.

On a cluster each trial writes its checkpoints from whichever node runs it, and a trial
that loses its node resumes from them on another: ``--storage`` must be a URI (s3://,
gs://, ...) or a path on a mount that every node shares. A local path is checked for real
before any trial starts: the driver writes a marker file there, and a tiny task pinned to
each alive node looks for it. A node that cannot see it is named in the refusal.

When no alive node can run a trial yet (a CPU-only head whose GPU workers the autoscaler
adds on demand), the nodes the trials will run on cannot be asked; a local path is then
accepted only on a network filesystem (NFS, CIFS, a FUSE mount, ...).

Run directories at URIs are ``cae.run.directory``'s business.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from cae.config.errors import UserError
from cae.run.directory import is_shared_uri, local_path

CHECK_TIMEOUT_S = 120.0
# Filesystem types that are shared between machines when mounted on each of them.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs",
              "beegfs", "fuse")
ADVICE = ("use s3://BUCKET/PATH, gs://BUCKET/PATH or a path on a mount shared by every node "
          "(NFS, EFS, Filestore, ...)")


class SharedStorageError(UserError):
    """``--storage`` is a path that some node of the cluster cannot see."""


def mount_fstype(path: Path) -> str | None:
    """The filesystem type of the mount ``path`` lives on (Linux; None elsewhere)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, parts[2]
    return fstype


def _is_network_fs(path: Path) -> bool:
    fstype = mount_fstype(path) or ""
    return fstype.split(".")[0] in NETWORK_FS


def _node_name(node: dict) -> str:
    return (f"{node.get('NodeManagerAddress', '?')} "
            f"({node.get('NodeManagerHostname', '?')}, node {node['NodeID'][:8]})")


def _can_host(node: dict, trial_resources: dict[str, float]) -> bool:
    have = node.get("Resources", {})
    return all(have.get(k, 0) >= v for k, v in trial_resources.items() if v > 0)


def _sees_marker(path: str, token: str) -> bool:
    """Run on one node: does the marker file hold the driver's token here?"""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def blind_nodes(directory: Path, nodes: list[dict]) -> list[tuple[dict, str]]:
    """The nodes that cannot read a marker file written into ``directory`` here, each with
    why (``not there`` or ``no answer``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    marker = directory / f".cae-storage-check-{token[:12]}"
    marker.write_text(token)
    check = ray.remote(num_cpus=0, max_retries=0)(_sees_marker)
    try:
        refs = {
            check.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                name="cae-storage-check",
            ).remote(str(marker), token): n
            for n in nodes
        }
        ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
        blind = [(refs[r], "no answer") for r in not_ready]
        for ref in ready:
            try:
                ok = ray.get(ref)
            except Exception:  # noqa: BLE001 - a node that fails the check cannot be trusted
                ok = False
            if not ok:
                blind.append((refs[ref], "not there"))
        for ref in not_ready:
            ray.cancel(ref, force=True)
        return blind
    finally:
        marker.unlink(missing_ok=True)


def check_shared_storage(storage: str, trial_resources: dict[str, float] | None = None) -> None:
    """Refuse a ``--storage`` path that not every node of the attached cluster can see.

    URIs pass; with a single node that can run the trials there is nothing to check.
    ``trial_resources`` (``{"CPU": 1, "GPU": 0.25}``) tells whether the alive nodes can run
    a trial at all; if none can, the trials will run on nodes yet to be added.
    Raises SharedStorageError (a ValueError) naming the nodes that cannot see the path.
    """
    import ray

    if is_shared_uri(storage):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    hosts = [n for n in nodes if _can_host(n, trial_resources or {})]
    if len(nodes) <= 1 and hosts:
        return
    path = local_path(storage)
    made = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    path.mkdir(parents=True, exist_ok=True)
    blind = blind_nodes(path, nodes)
    if blind:
        _remove_made(path, made)
        names = "; ".join(f"{_node_name(n)}: {why}" for n, why in blind)
        raise SharedStorageError(
            f"storage: {storage!r} is a local path that {len(blind)} of the cluster's "
            f"{len(nodes)} nodes cannot see ({names}); every trial writes its checkpoints "
            f"there from the node it runs on: {ADVICE}"
        )
    if not hosts and not _is_network_fs(path):
        _remove_made(path, made)
        raise SharedStorageError(
            f"storage: {storage!r} is a local path ({mount_fstype(path) or 'local'} "
            f"filesystem), and no node of the cluster can run a trial yet: the trials will "
            f"run on nodes the autoscaler adds, which would not see it: {ADVICE}"
        )


def _remove_made(path: Path, made: Path | None) -> None:
    """Remove the (empty) directories this check created, up to ``made``."""
    if made is None:
        return
    for p in [path, *path.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == made:
            return
