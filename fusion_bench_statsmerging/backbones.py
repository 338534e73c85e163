"""Old path of :mod:`fusion_bench_statsmerging.models.backbones`, kept for what was written with it (docs/results, built suites)."""
# relayout shim: written by tools/relayout.py

from fusion_bench_statsmerging.models.backbones import *  # noqa: F401,F403
