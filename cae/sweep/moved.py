"""Where cae's names went, for the files Ray Tune pickled before they moved.

Tune pickles a sweep's schedulers, searchers and callbacks into the run directory
(``tuner.pkl``, the searcher's and the callbacks' state) by module path and class name, and
``cae resume`` unpickles them. A run made before a name moved must still resume, so this is
the one table of moved modules (old -> new) and renamed names ((old module, old name) -> (new
module, new name): a name that left its module's new home, or a class whose calls a function
answers now), served to the unpickler by :func:`old_names` for the length of a resume.
An old module path that is a package now (``cae.config``, ``cae.data``, ``cae.train``,
``cae.sweep``, ``cae.results``) is not served: nothing of those modules was ever pickled by
Tune (the trainable is handed to ``Tuner.restore`` again, the configs are plain data).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MOVED_MODULES = {
    "cae.errors": "cae.config.errors", "cae.catalog": "cae.config.catalog",
    "cae.presets": "cae.config.presets", "cae.spec": "cae.config.spec",
    "cae.arch": "cae.model.plan", "cae.models": "cae.model.network",
    "cae.memory": "cae.model.memory",
    "cae.userdata": "cae.data.userdata", "cae.imagefolder": "cae.data.imagefolder",
    "cae.imagefiles": "cae.data.imagefiles",
    "cae.tasks": "cae.train.tasks",
    "cae.stacked": "cae.train.stacked", "cae.fused": "cae.train.pack",
    "cae.packs": "cae.train.packing",
    "cae.halving": "cae.schedule.halving", "cae.schedulers": "cae.schedule.schedulers",
    "cae.search": "cae.schedule.search",
    "cae.rundir": "cae.run.directory", "cae.checkpoints": "cae.run.checkpoints",
    "cae.runstate": "cae.run.state", "cae.lease": "cae.run.lease",
    "cae.record": "cae.run.record", "cae.outcomes": "cae.run.outcomes",
    "cae.diskspace": "cae.run.diskspace", "cae.packfiles": "cae.run.packfiles",
    "cae.driver": "cae.sweep.driver", "cae.trainable": "cae.sweep.trainable",
    "cae.packtrial": "cae.sweep.trainable", "cae.packplan": "cae.sweep.packplan",
    "cae.plan": "cae.sweep.plan", "cae.dryrun": "cae.sweep.dryrun",
    "cae.guard": "cae.sweep.guard", "cae.signals": "cae.sweep.signals",
    "cae.cluster": "cae.sweep.cluster", "cae.progress": "cae.sweep.progress",
    "cae.livereport": "cae.sweep.livereport", "cae.ray_internals": "cae.sweep.internals",
    "cae.status": "cae.results.status", "cae.finish": "cae.results.finish",
    "cae.baselines": "cae.results.baselines",
}

# (old module, old name) -> (new module, new name), where a name changed as it moved.
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    # the scheduler of kind sha took work_ahead=; working ahead is a subclass now, and an
    # old run's pickled factory calls the function that picks the class
    ("cae.halving", "SyncHalvingScheduler"): ("cae.schedule.workahead", "sync_halving"),
    ("cae.halving", "CostBook"): ("cae.schedule.workahead", "CostBook"),
    ("cae.schedulers", "ShuffledSearcher"): ("cae.schedule.grid", "ShuffledSearcher"),
    # after the move, before the registry: runs of those days pickled it here
    ("cae.schedule.schedulers", "ShuffledSearcher"): ("cae.schedule.grid", "ShuffledSearcher"),
}


def resolve(old_module: str, name: str) -> Any:
    """The object an old pickle's ``old_module.name`` stands for today."""
    renamed = RENAMED.get((old_module, name))
    new_module, new_name = renamed or (MOVED_MODULES[old_module], name)
    return getattr(importlib.import_module(new_module), new_name)


class _OldModule(types.ModuleType):
    """An old module path: each attribute asked for is looked up in the tables."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return resolve(self.__name__, name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return _OldModule(spec.name)

    def exec_module(self, module) -> None:
        pass


@contextmanager
def old_names() -> Iterator[None]:
    """For the length of a block, the old module paths import (as views of the tables), and
    a module of today that a name left holds it again under its old name."""
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    lent = []
    for (old_module, name), _ in RENAMED.items():
        if old_module not in MOVED_MODULES:
            module = importlib.import_module(old_module)
            if not hasattr(module, name):
                setattr(module, name, resolve(old_module, name))
                lent.append((module, name))
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for module, name in lent:
            delattr(module, name)
        for old in MOVED_MODULES:
            if isinstance(sys.modules.get(old), _OldModule):
                del sys.modules[old]
