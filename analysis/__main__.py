"""``python -m analysis RUN_DIR [-o FILE] [--no-pictures]``: write a run's HTML report
(what ``cae report`` does)."""

import sys

from analysis.report import main

sys.exit(main())
