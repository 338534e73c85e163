"""StatsMerging-R's ablation: the choice reads validation scores only and writes into no comparison folder."""

import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
import ablation  # noqa: E402


def _suite(tmp_path, name, scores):
    """A compare folder whose runs report (validation, test) averages; results.json lists the rows."""
    root = tmp_path / name
    for key, (val, test) in scores.items():
        run = root / "runs" / key
        run.mkdir(parents=True)
        run.joinpath("program_report.json").write_text(json.dumps(
            {"average": {"accuracy": test}, "validation_split": {"average": {"accuracy": val}}}))
    rows = [{"key": k, "label": k} for k in scores]
    (root / "results.json").write_text(json.dumps({"tasks": [], "rows": rows}))
    return root


def test_the_choice_follows_validation_not_test(tmp_path):
    keys = [ablation.MAIN_KEY, *ablation.CANDIDATES]
    a, b = keys[0], keys[1]
    # b is better on test everywhere, a on validation: a must be chosen
    scores = {k: (0.1, 0.1) for k in keys}
    scores[a], scores[b] = (0.6, 0.5), (0.5, 0.9)
    dirs = [_suite(tmp_path, "vision", scores), _suite(tmp_path, "text", scores)]
    collected = ablation.collect(dirs)
    assert ablation.choose(collected) == a
    assert f"**{a}** (chosen)" in ablation.markdown(collected, a)


def test_only_limits_the_candidate_rows():
    keys = list(ablation.CANDIDATES)[:2]
    args = ablation.add_args(keys)
    assert args[::2] == ["--add", "--add"]
    assert [a.split("=", 1)[0] for a in args[1::2]] == keys
    assert len(ablation.add_args()) == 2 * len(ablation.CANDIDATES)
    with pytest.raises(SystemExit, match="unknown"):
        ablation.add_args(["no_such_candidate"])


@pytest.mark.parametrize("key", list(ablation.CANDIDATES))
def test_every_candidate_composes_over_the_committed_configuration_to_a_schedule(key):
    """A candidate's overrides are valid Hydra overrides of the committed configuration, each key once, of
    keys it has, and changing it (a candidate equal to the committed configuration would compare it with
    itself); what they compose to resolves to a training schedule (so a rerun runs what the tables report)."""
    from hydra import compose, initialize_config_dir

    from fusion_bench_statsmerging.engine.schedule import resolve_schedule

    overrides = list(ablation.CANDIDATES[key][1])
    assert len({o.split("=", 1)[0] for o in overrides}) == len(overrides)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        base = compose(overrides=["+" + ablation.BASE_CONFIG]).method
        cfg = compose(overrides=["+" + ablation.BASE_CONFIG, *overrides]).method
    assert all(o.split("=", 1)[0].split(".", 1)[1] in base for o in overrides)
    assert any(not ablation.override_holds(base, o) for o in overrides), "the candidate is the committed configuration"
    schedule = resolve_schedule({"a": 1600, "b": 100}, cfg.batch_size, cfg.max_steps, cfg.max_epochs,
                                cfg.lr_step_size, cfg.lr_step_epochs)
    assert schedule.max_steps == (3000 if "3k" in key or key.startswith(ablation.TWO_STARTS) else 1000)
    assert len(cfg.starts or []) == (2 if key.startswith(ablation.TWO_STARTS) else 0)  # the others: one start


def test_override_holds_reads_null_numbers_strings_and_booleans():
    config = {"a": None, "b": 3000, "c": "sigmoid", "d": False, "e": 0.3}
    assert all(ablation.override_holds(config, o) for o in
               ("method.a=null", "method.b=3000", "method.c=sigmoid", "method.d=false", "method.e=0.3"))
    assert not any(ablation.override_holds(config, o) for o in
                   ("method.a=1", "method.b=null", "method.b=2000", "method.c=unbounded", "method.d=true", "method.e=0"))


def test_ablation_writes_into_no_comparison_folder(tmp_path, capsys):
    """Results are records: choosing reads the folders and changes no file in them."""
    keys = [ablation.MAIN_KEY, *ablation.CANDIDATES][:2]
    root = _suite(tmp_path, "vision", {keys[0]: (0.5, 0.5), keys[1]: (0.6, 0.4)})
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    ablation.main(["--choose", str(root)])
    assert f"chosen on validation: {keys[1]}" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit):
        ablation.main(["--promote", keys[1], str(root)])
