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
