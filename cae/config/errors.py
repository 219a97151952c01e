"""The one exception type for errors in what the user asked for.

It lives in a module of its own, with no imports, so that every module that reads user
input (the configs, the datasets, the command line) can raise it without importing the
others. ``cae.config.trial`` re-exports it, where most callers import it from.
"""


class UserError(Exception):
    """An error in what the user asked for (a spec, a path, a dataset, a run directory):
    the CLI prints its message as one line and exits with status 2."""
