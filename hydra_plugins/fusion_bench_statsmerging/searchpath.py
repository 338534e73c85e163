"""Make this plugin's configs (and the host's) visible to every Hydra app, the fusion_bench CLI included.

Import-light on purpose: Hydra imports every plugin module at start-up.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class StatsMergingSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append("fusion-bench-statsmerging", "pkg://fusion_bench_statsmerging.config")
        # The fusion_bench CLI takes ./config as its primary tree when one exists in the
        # working directory (a checkout of this repository has one). Appending the host's
        # own tree keeps `fabric_model_fusion` and its groups reachable from there.
        search_path.append("fusion-bench", "pkg://fusion_bench_config")
        # The first thing Hydra does for a run: a run that cannot work ends here, in one line, before
        # Hydra creates its output folder (utils/startup.py).
        from fusion_bench_statsmerging.utils.startup import check_before_run

        check_before_run()
