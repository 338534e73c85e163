"""A pool shaped like the host's TA8/TALL pools (train and test splits, no validation split): label-free
selection and StatsMerging-R's start probes read a held-out slice of train, never a fit image, never a label."""

import json
from pathlib import Path

import datasets
import pytest

from conftest import make_algorithm, run_suite_cli_and_check_reports
from fusion_bench_statsmerging.engine.distillation import sample_indices
from fusion_bench_statsmerging.engine.holdout import hold_out, held_out_slices, sample_rows
from fusion_bench_statsmerging.engine.selection import SELECTION_IMAGES
from fusion_bench_statsmerging.utils.errors import PoolError

TWO_STARTS = [{"output": "sigmoid", "init_coefficient": 0.3}, {"output": "unbounded", "init_coefficient": 0.0}]


def test_hold_out_splits_every_row_once_and_is_fixed_by_its_seed():
    slice_ = hold_out(100, 30, seed=5)
    assert len(slice_.held_out) == 30 and not set(slice_.held_out) & set(slice_.fit_rows)
    assert sorted(slice_.held_out + slice_.fit_rows) == list(range(100))
    assert slice_ == hold_out(100, 30, seed=5) and slice_ != hold_out(100, 30, seed=6)
    assert slice_.as_dict() == {"held_out_for_selection": 30, "fit_candidates": 70}
    with pytest.raises(ValueError):
        hold_out(10, 10, seed=0)


def test_held_out_slices_differ_per_task_and_refuse_a_split_too_small_to_spare_them():
    slices = held_out_slices({"a": 50, "b": 50}, size=10, batch_size=8, seed=0)
    assert slices["a"].held_out != slices["b"].held_out
    with pytest.raises(PoolError, match=r"select_samples.*\{'b': 12\}"):
        held_out_slices({"a": 50, "b": 12}, size=10, batch_size=8, seed=0)


def test_sample_rows_over_every_row_is_the_draw_without_a_slice():
    assert sample_rows(range(40), 12, seed=3) == sample_indices(40, 12, 3)
    rows = hold_out(40, 10, seed=1).fit_rows
    assert set(sample_rows(rows, 12, seed=3)) <= set(rows)


def host_shaped(suite: Path, out: Path, drop_train_labels: bool = False) -> Path:
    """The tiny suite as the host's CLIP pools are: train and test splits only (links to its models);
    with ``drop_train_labels`` the train splits have no label column, so reading one fails."""
    out.mkdir()
    for name in ("pretrained", "experts", "tasks.json"):
        (out / name).symlink_to(suite / name)
    for task in json.loads((suite / "tasks.json").read_text()):
        (out / "data" / task).mkdir(parents=True)
        (out / "data" / task / "test").symlink_to(suite / "data" / task / "test")
        train = suite / "data" / task / "train"
        if drop_train_labels:
            datasets.load_from_disk(str(train)).remove_columns("label").save_to_disk(str(out / "data" / task / "train"))
        else:
            (out / "data" / task / "train").symlink_to(train)
    return out


def test_selection_and_probes_read_a_held_out_train_slice_disjoint_from_the_fit(tmp_path, suite_dir, cpu_fabric,
                                                                              monkeypatch, single_thread):
    from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool
    from test_training import LabelTrap

    pool = CLIPSuiteModelPool(suite_dir=str(host_shaped(suite_dir, tmp_path / "suite")))
    assert not pool.val_dataset_names
    real = pool.load_train_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: LabelTrap(real(name)))
    monkeypatch.setattr(pool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=2, data_fraction=1.0, select_by="validation_agreement",
                               select_every=1, select_samples=24, starts=TWO_STARTS, start_probe_steps=1)
    read = {"fit": {}, "selection": {}}
    from fusion_bench_statsmerging.engine import fit_data
    original = fit_data.labelled_inputs

    def spy(family, task, dataset, indices, expert, device, *rest):
        read["fit" if rest else "selection"][task] = list(indices)  # the fit passes its protocol's options
        return original(family, task, dataset, indices, expert, device, *rest)

    monkeypatch.setattr(fit_data, "labelled_inputs", spy)
    algorithm.run(pool)

    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    for task, fit in read["fit"].items():
        size = report["fit_data"][task]["dataset_size"]
        selection = read["selection"][task]
        assert len(selection) == 24 and not set(fit) & set(selection)
        assert sorted(fit + selection) == list(range(size))  # data_fraction 1.0: every row not held out
        assert report["fit_data"][task]["held_out_for_selection"] == 24
    assert report["config"]["select_samples"] == 24 and report["planned_steps"] == {"start probes": 2, "training": 2}
    assert report["start_probe"]["images"] == SELECTION_IMAGES and len(report["start_probe"]["results"]) == 2


def test_a_pool_with_a_validation_split_fits_on_the_draw_it_always_made(tmp_path, modelpool, cpu_fabric, monkeypatch):
    from fusion_bench_statsmerging.engine import fit_data
    original, drawn = fit_data.labelled_inputs, {}

    def spy(family, task, dataset, indices, expert, device, *rest):
        if rest:  # the fit's draw (selection passes no protocol options)
            drawn[task] = list(indices)
        return original(family, task, dataset, indices, expert, device, *rest)

    monkeypatch.setattr(fit_data, "labelled_inputs", spy)
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=1, select_by="validation_agreement", select_samples=8)
    algorithm.run(modelpool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    for t_idx, (task, info) in enumerate(report["fit_data"].items()):
        assert "held_out_for_selection" not in info
        assert drawn[task] == sample_indices(info["dataset_size"], info["num_samples"], t_idx)


def test_statsmerging_r_runs_through_the_cli_on_a_pool_without_validation_split(tmp_path, suite_dir):
    """The README's command shape (`method=statsmerging_residual`) on a train/test-only pool whose train
    splits carry no label column: it completes and says where its selection images came from."""
    suite = host_shaped(suite_dir, tmp_path / "suite", drop_train_labels=True)
    overrides = ["method.max_steps=2", "method.start_probe_steps=1", "method.select_every=1", "method.batch_size=8",
                 "method.select_samples=16", "method.lr_step_size=null"]
    run_suite_cli_and_check_reports({"residual": ["method=statsmerging_residual", *overrides]},
                                    ["modelpool=clip_suite", "taskpool=clip_suite", "fabric.accelerator=cpu"],
                                    suite, tmp_path)
    report = json.loads((tmp_path / "residual" / "statsmerging_report.json").read_text())
    assert {info["held_out_for_selection"] for info in report["fit_data"].values()} == {16}
    assert report["start_probe"]["images"] == SELECTION_IMAGES
