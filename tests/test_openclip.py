"""OpenCLIP experts (issue 18): the exact OpenCLIP <-> transformers mapping, the OpenCLIP pools, and CLI merges."""

import json
import warnings

import pytest
import torch

from conftest import run_suite_cli_and_check_reports

ATOL = 1e-5
TINY = dict(embed_dim=16, vision_cfg=dict(image_size=16, layers=2, width=32, patch_size=4, head_width=8, mlp_ratio=2.0),
            text_cfg=dict(context_length=24, vocab_size=100, width=32, heads=4, layers=2, mlp_ratio=2.0))


def _tiny_openclip(tmp_path, quick_gelu: bool, seed: int = 0):
    """A tiny OpenCLIP model from a custom config registered with open_clip, random weights saved to disk and
    read back (no hub)."""
    import open_clip

    name = f"tiny-openclip-test-{'quickgelu' if quick_gelu else 'gelu'}"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(dict(TINY, quick_gelu=quick_gelu)))
    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():  # off their tidy initial values, so every mapped tensor matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save(model.state_dict(), tmp_path / f"{name}.pt")
    return open_clip.create_model(name, pretrained=str(tmp_path / f"{name}.pt")).eval(), config


def _inputs(vocab: int = 100, length: int = 24):
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(4, 3, 16, 16, generator=gen)
    ids = torch.randint(1, vocab - 2, (3, length), generator=gen)
    ids[:, 0] = vocab - 2
    for row, end in enumerate((5, 11, length - 1)):  # end-of-text (the highest id) then padding
        ids[row, end] = vocab - 1
        ids[row, end + 1:] = 0
    return pixels, ids


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_openclip_to_transformers_and_back_is_exact(tmp_path, quick_gelu, single_thread):
    from fusion_bench_statsmerging.modelpool.openclip.convert import (
        hf_clip_to_openclip, hf_to_openclip_state_dict, openclip_to_hf_clip,
    )

    openclip_model, _ = _tiny_openclip(tmp_path, quick_gelu)
    hf = openclip_to_hf_clip(openclip_model)
    assert hf.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    pixels, ids = _inputs()
    with torch.no_grad():
        image, text = openclip_model.encode_image(pixels), openclip_model.encode_text(ids)
        torch.testing.assert_close(hf.get_image_features(pixel_values=pixels), image, rtol=0, atol=ATOL)
        attention = (torch.arange(ids.shape[1])[None] <= (ids == 99).int().argmax(-1)[:, None]).long()
        torch.testing.assert_close(hf.get_text_features(input_ids=ids, attention_mask=attention), text, rtol=0, atol=ATOL)
        logits_oc = openclip_model.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ \
            torch.nn.functional.normalize(text, dim=-1).t()
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels, attention_mask=attention).logits_per_image,
                                   logits_oc, rtol=0, atol=ATOL)
        back, config = hf_clip_to_openclip(hf)
        assert config["quick_gelu"] is quick_gelu
        torch.testing.assert_close(back.encode_image(pixels), image, rtol=0, atol=ATOL)
        torch.testing.assert_close(back.encode_text(ids), text, rtol=0, atol=ATOL)
    original, round_trip = openclip_model.state_dict(), hf_to_openclip_state_dict(hf.state_dict())
    assert original.keys() == round_trip.keys()
    assert all(torch.equal(original[k], round_trip[k]) for k in original)  # a renaming: bit-exact


def test_transformers_clip_to_openclip_and_back_is_exact(suite_dir, single_thread):
    """The other direction on the tiny suite's CLIPModel and one of its fine-tuned CLIPVisionModel experts."""
    from transformers import CLIPModel, CLIPVisionModel

    from fusion_bench_statsmerging.modelpool.openclip.convert import (
        hf_clip_to_openclip, hf_vision_to_openclip, openclip_to_hf_clip, vision_model_from_openclip_visual,
    )

    hf = CLIPModel.from_pretrained(suite_dir / "pretrained").eval()
    expert = CLIPVisionModel.from_pretrained(suite_dir / "experts" / "tiny_stripes").eval()
    openclip_model, _ = hf_clip_to_openclip(hf)
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(openclip_model.encode_image(pixels), hf.get_image_features(pixel_values=pixels),
                                   rtol=0, atol=ATOL)
        visual = hf_vision_to_openclip(expert.state_dict(), hf.visual_projection.weight)
        openclip_model.visual.load_state_dict(visual)
        expert_features = hf.visual_projection(expert(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(openclip_model.encode_image(pixels), expert_features, rtol=0, atol=ATOL)
        again, projection = vision_model_from_openclip_visual(visual, hf.config.vision_config, "round trip")
        assert torch.equal(projection, hf.visual_projection.weight)
        assert all(torch.equal(v, expert.state_dict()[k]) for k, v in again.state_dict().items())
        hf_again = openclip_to_hf_clip(openclip_model)
        torch.testing.assert_close(hf_again.get_image_features(pixel_values=pixels), expert_features, rtol=0, atol=ATOL)


def test_non_standard_openclip_architectures_are_refused_by_name():
    from open_clip.model import CLIP

    from fusion_bench_statsmerging.modelpool.openclip.convert import ConversionError, openclip_to_hf_clip

    layer_scale = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], ls_init_value=0.1))
    with pytest.raises(ConversionError, match="layer scale"):
        openclip_to_hf_clip(CLIP(**layer_scale))
    avg_pool = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], pool_type="avg"))
    with pytest.raises(ConversionError, match="image pooling 'avg'"):
        openclip_to_hf_clip(CLIP(**avg_pool))


@pytest.mark.parametrize("model_name, named", [("ViT-B-32-SigLIP2-256", "custom_text"), ("RN50", "a ResNet"),
                                              ("coca_ViT-B-32", "multimodal_cfg"), ("ViT-B-32-nonexistent", "Unknown")])
def test_unsupported_openclip_models_are_named_before_any_weight_is_loaded(model_name, named):
    from fusion_bench_statsmerging.modelpool.openclip.pool import OpenCLIPSource

    with pytest.raises(Exception, match=named):
        OpenCLIPSource(model_name, "some-tag").check()  # no download: the tag is never looked up
    OpenCLIPSource("ViT-B-32", "openai").check()
    OpenCLIPSource("ViT-L-14-quickgelu", "dfn2b").check()


def test_exported_tokenizer_gives_openclip_token_ids(tmp_path):
    import open_clip
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates

    from fusion_bench_statsmerging.modelpool.openclip.pool import export_openclip_tokenizer

    hf_tokenizer = export_openclip_tokenizer("ViT-B-32", 77, tmp_path / "tok")
    classnames, templates = get_classnames_and_templates("dtd")
    texts = [t(c) for c in classnames[:6] for t in templates[:3]] + ["A photo of a Banded texture, isn't it?"]
    ours = hf_tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    theirs = open_clip.get_tokenizer("ViT-B-32")(texts)
    eot = theirs.argmax(-1)
    for row, end in enumerate(eot.tolist()):
        assert torch.equal(ours[row, : end + 1], theirs[row, : end + 1]), texts[row]
    assert torch.equal(ours.argmax(-1), eot)  # both pool the same position


# --------------------------------------------------------------------------- pools
@pytest.fixture(scope="module")
def openclip_suite(suite_dir, tmp_path_factory):
    """The tiny CLIP suite (linked, not copied) with its OpenCLIP export under ``openclip/``."""
    from fusion_bench_statsmerging.fixtures.openclip import export_suite_to_openclip

    root = tmp_path_factory.mktemp("tiny_openclip_suite")
    for name in ("pretrained", "experts", "data", "tasks.json"):
        (root / name).symlink_to(suite_dir / name)
    export_suite_to_openclip(root)
    return root


def _generic_pool(openclip_suite, tmp_path, experts=None, **kwargs):
    from fusion_bench_statsmerging.modelpool.openclip.pool import OpenCLIPVisionModelPool

    folder = openclip_suite / "openclip"
    experts = experts or {t: f"{t}.pt" for t in json.loads((openclip_suite / "tasks.json").read_text())}
    return OpenCLIPVisionModelPool(experts=experts, experts_dir=str(folder / "experts"),
                                   model_config=str(folder / "model_config.json"), pretrained=str(folder / "pretrained.pt"),
                                   processor_dir=str(openclip_suite / "pretrained"), cache_dir=str(tmp_path / "cache"),
                                   **kwargs)


def _assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generic_pool_loads_openclip_files_as_the_suite_models(openclip_suite, tmp_path, modelpool):
    pool = _generic_pool(openclip_suite, tmp_path)
    assert sorted(pool.model_names) == sorted(modelpool.model_names)
    for task in pool.model_names:
        expert = pool.load_model(task)
        assert type(expert).__name__ == "CLIPVisionModel"
        _assert_same_weights(expert, modelpool.load_model(task))
    _assert_same_weights(pool.load_clip_model("_pretrained_"), modelpool.load_clip_model("_pretrained_"))
    assert pool.load_processor().tokenizer("a photo of red.")["input_ids"] == \
        modelpool.load_processor().tokenizer("a photo of red.")["input_ids"]
    round_trip = pool.to_openclip_visual(pool.load_model("tiny_colors"))
    saved = torch.load(openclip_suite / "openclip" / "experts" / "tiny_colors.pt", weights_only=True)
    assert all(torch.equal(round_trip[k], saved[k]) for k in saved)
    cached = _generic_pool(openclip_suite, tmp_path)  # second construction: the cache, same folders
    assert dict(cached._models) == dict(pool._models)


def test_expert_files_in_other_layouts_load_the_same(openclip_suite, tmp_path):
    """A whole CLIP's state dict behind DDP / ImageEncoder prefixes gives the same expert."""
    visual = torch.load(openclip_suite / "openclip" / "experts" / "tiny_quadrant.pt", weights_only=True)
    full = torch.load(openclip_suite / "openclip" / "pretrained.pt", weights_only=True)
    full.update({"visual." + k: v for k, v in visual.items()})
    torch.save({"state_dict": {"module.model." + k: v for k, v in full.items()}}, tmp_path / "wrapped.pt")
    pool = _generic_pool(openclip_suite, tmp_path, experts={"tiny_quadrant": str(tmp_path / "wrapped.pt")})
    plain = _generic_pool(openclip_suite, tmp_path, experts={"tiny_quadrant": "tiny_quadrant.pt"})
    _assert_same_weights(pool.load_model("tiny_quadrant"), plain.load_model("tiny_quadrant"))


def test_missing_expert_file_is_named_before_loading(openclip_suite, tmp_path):
    from fusion_bench_statsmerging.modelpool.openclip.pool import OpenCLIPError

    with pytest.raises(OpenCLIPError, match="Expert 'tiny_colors': state-dict file '.*nowhere.pt' does not exist"):
        _generic_pool(openclip_suite, tmp_path, experts={"tiny_colors": "nowhere.pt"})
    assert not (tmp_path / "cache").exists()  # nothing converted


def test_expert_of_another_architecture_is_named(openclip_suite, tmp_path):
    from fusion_bench_statsmerging.modelpool.openclip.pool import OpenCLIPError

    visual = torch.load(openclip_suite / "openclip" / "experts" / "tiny_colors.pt", weights_only=True)
    visual = {k: v for k, v in visual.items() if "resblocks.1." not in k}  # one layer fewer
    visual["positional_embedding"] = torch.zeros(5, 32)
    torch.save(visual, tmp_path / "shallow.pt")
    with pytest.raises(OpenCLIPError, match="'tiny_colors' is not an image encoder of the pretrained OpenCLIP "
                                            "architecture: missing .*resblocks.1.*positional_embedding"):
        _generic_pool(openclip_suite, tmp_path, experts={"tiny_colors": str(tmp_path / "shallow.pt")})


def test_expert_with_another_projection_warns(openclip_suite, tmp_path):
    visual = torch.load(openclip_suite / "openclip" / "experts" / "tiny_colors.pt", weights_only=True)
    visual["proj"] = visual["proj"] + 0.1
    torch.save(visual, tmp_path / "projected.pt")
    for _ in range(2):  # converted, then from the cache: it warns both times
        with pytest.warns(UserWarning, match="'tiny_colors' carries a different visual projection"):
            _generic_pool(openclip_suite, tmp_path, experts={"tiny_colors": str(tmp_path / "projected.pt")})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _generic_pool(openclip_suite, tmp_path, experts={"tiny_colors": "tiny_colors.pt"})


def test_host_data_free_merge_of_the_openclip_suite_equals_the_transformers_suite(openclip_suite, modelpool):
    from fusion_bench.method import TiesMergingAlgorithm

    from fusion_bench_statsmerging.modelpool.openclip.pool import OpenCLIPSuiteModelPool

    pool = OpenCLIPSuiteModelPool(suite_dir=str(openclip_suite))
    assert pool.load_clip_model("_pretrained_").name_or_path.startswith(str(openclip_suite / "openclip" / "converted"))
    ties = dict(scaling_factor=0.5, threshold=20, remove_keys=[], merge_func="sum")
    _assert_same_weights(TiesMergingAlgorithm(**ties).run(pool), TiesMergingAlgorithm(**ties).run(modelpool))


def test_suite_pool_without_export_names_the_command(suite_dir, tmp_path):
    from fusion_bench_statsmerging.modelpool.openclip.pool import OpenCLIPSuiteModelPool
    from fusion_bench_statsmerging.modelpool.clip_suite import SuiteError

    with pytest.raises(SuiteError, match=r"fusion_bench_statsmerging\.fixtures\.openclip"):
        OpenCLIPSuiteModelPool(suite_dir=str(suite_dir), openclip_dir="no_export_here")


def test_cli_merges_the_openclip_suite_and_evaluates(openclip_suite, tmp_path):
    common = ["modelpool=openclip_suite", "taskpool=openclip_suite", "fabric.accelerator=cpu"]
    trained = ["method.max_steps=3", "method.batch_size=8"]
    runs = {"statsmerging": ["method=statsmerging", "method.data_fraction=0.25", *trained],
            "statsmerging_plusplus": ["method=statsmerging_plusplus", "method.data_fraction=0.25", *trained],
            "samerging": ["method=samerging", "method.num_batches_per_task=2", *trained],
            "ties_merging": ["method=ties_merging"]}
    run_suite_cli_and_check_reports(runs, common, openclip_suite, tmp_path)


def _compose(overrides):
    """The CLI's config for ``overrides``, composed as ``fusion_bench`` does (the host's tree, our plugin's groups)."""
    from pathlib import Path

    import fusion_bench_config
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(list(fusion_bench_config.__path__)[0])), version_base=None):
        return compose("fabric_model_fusion", overrides=overrides)


@pytest.mark.parametrize("modelpool, taskpool", [("openclip-vit-b-32_TA8", "openclip-vit-classification_TA8"),
                                                 ("openclip", "openclip"), ("openclip_suite", "openclip_suite")])
def test_openclip_configs_name_constructor_arguments(modelpool, taskpool):
    import inspect

    from hydra.utils import get_class

    cfg = _compose(["method=dummy", f"modelpool={modelpool}", f"taskpool={taskpool}"])
    for section in (cfg.modelpool, cfg.taskpool):
        cls = get_class(section._target_)
        accepted = set()
        for klass in cls.__mro__:  # **kwargs reach the host's pool constructors
            if "__init__" in vars(klass):
                accepted |= set(inspect.signature(klass.__init__).parameters)
        keys = {k for k in section if not k.startswith("_")}
        assert keys <= accepted, f"{section._target_}: {sorted(keys - accepted)} are not constructor arguments"


def test_ta8_pool_names_the_missing_expert_before_loading_anything(tmp_path):
    from hydra.utils import instantiate

    cfg = _compose(["method=dummy", "modelpool=openclip-vit-b-32_TA8", f"modelpool.experts_dir={tmp_path}",
                    f"modelpool.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(Exception, match=f"Expert 'sun397': state-dict file '{tmp_path}/sun397.pt' does not exist"):
        instantiate(cfg.modelpool)
    cfg.modelpool.pretrained = str(tmp_path / "ViT-B-32-openai.pt")
    with pytest.raises(Exception, match="`pretrained` checkpoint '.*ViT-B-32-openai.pt' does not exist"):
        instantiate(cfg.modelpool)
    assert not (tmp_path / "cache").exists()


def test_torchvision_and_open_clip_import_in_a_fresh_interpreter_without_loading_torch_at_start_up():
    """The start-up file (written by conftest, as README's compat step does) fixes every new interpreter of the
    venv, the fusion_bench CLI's included, and costs nothing until torchvision is imported."""
    import subprocess
    import sys

    from fusion_bench_statsmerging.utils import torchvision_compat

    path = torchvision_compat.pth_path()
    assert path.is_file() and path.read_text() == torchvision_compat.PTH_LINE and path.read_text().startswith("import ")
    started = subprocess.run([sys.executable, "-c", "import sys; print('torch' in sys.modules)"],
                             capture_output=True, text=True)
    assert started.stdout.strip() == "False", started.stderr
    imported = subprocess.run([sys.executable, "-c", "import torchvision, open_clip"], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-2000:]


def test_compare_on_an_openclip_suite_without_export_names_the_command(suite_dir, tmp_path, capsys):
    """``statsmerging-compare --suite DIR --modelpool openclip_suite --taskpool openclip_suite`` runs the CLIP
    family's rows on the OpenCLIP export; a suite without one stops before any row, naming how to export."""
    from fusion_bench_statsmerging import compare

    args = ["--suite", str(suite_dir), "--modelpool", "openclip_suite", "--taskpool", "openclip_suite",
            "--out", str(tmp_path / "results")]
    assert compare.main(args) == 2
    err = capsys.readouterr().err
    assert "openclip/model_config.json' is missing" in err and "fusion_bench_statsmerging.fixtures.openclip" in err
    assert not (tmp_path / "results").exists()


def test_compare_rows_on_the_openclip_suite_use_its_pools(openclip_suite, tmp_path, capsys):
    from fusion_bench_statsmerging import compare

    args = ["--suite", str(openclip_suite), "--modelpool", "openclip_suite", "--taskpool", "openclip_suite",
            "--methods", "task_arithmetic,statsmerging_layer,samerging", "--dry-run", "--out", str(tmp_path / "r")]
    assert compare.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "fusion_bench " in line]
    assert len(lines) == 3 and all("modelpool=openclip_suite taskpool=openclip_suite" in line for line in lines)
