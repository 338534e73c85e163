"""Every model pool we ship names a task pool that evaluates it, and that pair composes.

The dummy-task-pool hint (``method/hints.taskpool_hint``) tells users which ``taskpool=`` to add;
a CLIP pool must be scored with the zero-shot heads of its own CLIP size, or the task pool's
text tower would not fit the merged vision tower.
"""

from pathlib import Path

import pytest

from fusion_bench_statsmerging.method.hints import EVALUATING_TASKPOOL

from conftest import REPO_ROOT

OUR_MODELPOOLS = sorted(p.stem for p in (REPO_ROOT / "config" / "modelpool").glob("*.yaml"))


@pytest.fixture(scope="module")
def compose():
    import fusion_bench_config
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(list(fusion_bench_config.__path__)[0])), version_base=None):
        yield lambda overrides: hydra_compose("fabric_model_fusion", overrides=overrides)


@pytest.mark.parametrize("modelpool", OUR_MODELPOOLS)
def test_each_modelpool_composes_with_its_evaluating_taskpool(compose, modelpool):
    assert modelpool in EVALUATING_TASKPOOL, f"no evaluating task pool named for modelpool={modelpool}"
    cfg = compose(["method=dummy", f"modelpool={modelpool}", f"taskpool={EVALUATING_TASKPOOL[modelpool]}"])
    pretrained = cfg.modelpool.get("models", {}).get("_pretrained_")
    if isinstance(pretrained, str) and pretrained.startswith("openai/clip-vit"):
        assert cfg.taskpool.base_model == pretrained
        assert cfg.taskpool.test_datasets.keys() == {k for k in cfg.modelpool.models if k != "_pretrained_"}


OUR_METHODS = sorted(p.stem for p in (REPO_ROOT / "config" / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", OUR_METHODS)
def test_each_method_config_builds_its_algorithm(compose, method):
    """Config keys are the constructor's arguments: a key the class does not take fails here, not in a run."""
    from hydra.utils import instantiate

    cfg = compose([f"method={method}", "modelpool=clip-vit-base-patch32_TA8"])
    if method == "statsmerging_reuse":  # its one mandatory key: the learner file, checked on construction
        cfg.method.learner_path = "missing/learner.pt"
        with pytest.raises(Exception, match="does not exist; point it at the learner.pt of a finished"):
            instantiate(cfg.method)
        return
    algorithm = instantiate(cfg.method)
    assert callable(getattr(algorithm, "run", None))  # BaseAlgorithm, or the host's AdaMerging compat base
    assert type(algorithm).__module__.startswith("fusion_bench_statsmerging.")


# the host's Flan-T5 pools our seq2seq methods are documented with, beside every pool alias we ship
PAIR_MODELPOOLS = OUR_MODELPOOLS + ["Seq2SeqLMPool/flan-t5-base_glue", "Seq2SeqLMPool/flan-t5-base_glue_lora16"]


def test_every_method_config_composes_with_every_pool_and_a_pair_that_cannot_apply_says_so_in_one_line(
        compose, monkeypatch, tmp_path):
    """All `method=` configs x all shipped pools (TA8/TALL14/TALL20 at B/32, B/16, L/14, OpenCLIP, LoRA,
    heads, Flan-T5): each pair composes; where the method's model family is not the pool's, the check
    every run of ours makes before loading anything gives one line naming the methods that fit.

    A method config and a pool config do not refer to each other (checked below), so a pair composes
    when each does: each config is composed once (the full product took minutes on two cores), the
    README's pairs as pairs, and every pair goes through the family check."""
    from hydra.utils import get_class, instantiate

    from fusion_bench_statsmerging.method.hints import family_mismatch, pool_family

    for var in ("STATSMERGING_SUITE_DIR", "STATSMERGING_HEADS_SUITE_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    for folder, other in (("method", "${modelpool"), ("modelpool", "${method")):
        for path in (REPO_ROOT / "config" / folder).rglob("*.yaml"):
            assert other not in path.read_text(), path
    methods = [m for m in OUR_METHODS if m != "statsmerging_reuse"] + sorted(
        f"conv_as_matrix/{p.stem}" for p in (REPO_ROOT / "config" / "method" / "conv_as_matrix").glob("*.yaml"))
    families = {m: getattr(type(instantiate(compose([f"method={m}"]).method)), "pool_family", None) for m in methods}
    assert {families["statsmerging_residual"], families["statsmerging_residual_heads"],
            families["statsmerging_flan_t5"], families["conv_as_matrix/wudi"]} == {"clip", "heads", "seq2seq", None}
    pools = {p: get_class(compose(["method=dummy", f"modelpool={p}"]).modelpool._target_) for p in PAIR_MODELPOOLS}
    for method, pool in (("statsmerging_residual", "clip-vit-base-patch32_TA8"), ("statsmerging", "clip_suite_lora"),
                         ("statsmerging_heads", "heads_suite"), ("statsmerging_flan_t5", PAIR_MODELPOOLS[-1])):
        cfg = compose([f"method={method}", f"modelpool={pool}"])
        assert get_class(cfg.modelpool._target_) is pools[pool] and cfg.method._target_
    applies = {}
    for pool, pool_class in pools.items():
        assert pool_family(pool_class) is not None, pool
        for method in methods:
            problem = family_mismatch(method, families[method], pool_class)
            applies[method, pool] = problem is None
            if problem is not None:
                assert "\n" not in problem and problem.startswith(f"{method} merges {families[method]} model pools")
                assert "use method=" in problem, problem
    # the README's command, and each family's own pools
    assert applies["statsmerging_residual", "clip-vit-base-patch32_TA8"]
    assert all(applies["statsmerging", p] for p in ("clip-vit-large-patch14_TALL20", "openclip-vit-b-32_TA8",
                                                   "clip_suite_lora", "clip-vit-base-patch32_TA8_hetero"))
    assert applies["statsmerging_heads", "heads_suite_hetero"] and not applies["statsmerging_heads", "clip_suite"]
    assert applies["statsmerging_flan_t5", "Seq2SeqLMPool/flan-t5-base_glue"]
    assert not applies["statsmerging", "Seq2SeqLMPool/flan-t5-base_glue"] and not applies["samerging", "heads_suite"]


def test_a_clip_method_on_a_heads_pool_stops_with_the_one_line_before_loading(tmp_path, cpu_fabric):
    from conftest import make_algorithm
    from fusion_bench_statsmerging.utils.errors import PoolError

    from fusion_bench_statsmerging.modelpool.heads import PerTaskHeadsModelPool

    pool = PerTaskHeadsModelPool.__new__(PerTaskHeadsModelPool)  # the check reads the pool's class, nothing else
    with pytest.raises(PoolError, match=r"StatsMerging merges clip model pools, and PerTaskHeadsModelPool is a heads "
                                        r"pool: use method=statsmerging_heads"):
        make_algorithm(tmp_path, cpu_fabric).check_pool(pool)
