"""A run says its steps over every phase before the first, and the time left once the first are timed."""

import itertools

from fusion_bench_statsmerging.engine.progress import RunProgress, duration


def test_plan_counts_every_phase_and_the_estimate_comes_once_from_the_steady_steps():
    ticks = itertools.count(10.0, 0.5)  # the first step ends at 10 s (its time is left out), then 0.5 s a step
    progress = RunProgress("R", {"start probes": 600, "training": 3000, "empty": 0}, estimate_after=4,
                           clock=lambda: next(ticks))
    assert progress.plan() == "R: 3600 optimisation steps in all (start probes 600, training 3000)"
    assert progress.postfix() == {}
    lines = [progress.step() for _ in range(8)]
    assert lines[:4] == [None] * 4 and lines[5:] == [None] * 3
    assert lines[4].startswith("R: 500.0 ms a step over steps 2-5; the remaining 3595 of 3600 steps: about 29m58s")
    assert progress.postfix() == {"run_left": "29m56s"}


def test_duration_is_short():
    assert [duration(s) for s in (42, 725, 3720)] == ["42s", "12m05s", "1h02m"]


def test_end_to_end_plans_each_configuration_with_its_own_schedule():
    """benchmarks/end_to_end.py --schedule real: the paper's 500 epochs and StatsMerging-R's probes, on a
    suite without a validation split (256 train images per task held out); --schedule fixed: N steps."""
    import sys

    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import end_to_end as e2e

    plan = lambda v, schedule="real", n=73257: e2e.planned_steps(  # noqa: E731
        *e2e.method_and_overrides(e2e.VARIANTS[v], schedule, 7, n), n, 8, False)
    assert plan("default") == {"fit_images_per_task": 733, "training": 23000}
    assert plan("residual", n=400) == {"fit_images_per_task": 144, "start probes": 600, "training": 3000}
    assert plan("residual", "fixed", 400) == {"fit_images_per_task": 144, "start probes": 14, "training": 7}
