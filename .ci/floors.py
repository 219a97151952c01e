"""Print pip constraints that pin each direct dependency of pyproject.toml to the lowest
version it admits (its ``>=``), torch and torchvision excepted (they come from this
machine's disk at the versions .ci/run installs). `.ci/run` installs the package under
these constraints in a venv of its own and runs the fast tier: a floor that the code
outgrew fails there, not on a user's machine."""

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch", "torchvision"}

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
lines = []
for requirement in project["project"]["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
    floor = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
    if name in SKIP:
        continue
    if floor is None:
        sys.exit(f"{requirement!r} in pyproject.toml has no '>=' floor to test")
    lines.append(f"{name}=={floor.group(1)}")
print("\n".join(lines))
