"""``python -m fusion_bench_statsmerging.compare``: the comparison CLI, and the child launcher of its rows."""

import sys

from .cli import main

sys.exit(main())
