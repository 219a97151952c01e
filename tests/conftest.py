"""Shared test settings."""

import os

# Local Ray binds to 127.0.0.1 only (as `cae sweep` sets before importing ray); set here too
# because tests import ray before any sweep starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
