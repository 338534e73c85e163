"""AdaMerging on label-free train images: it must never read the test split nor a label."""

import lightning as L
import pytest
import torch
from lightning.fabric.loggers import TensorBoardLogger

from fusion_bench_statsmerging.method.adamerging_protocol import (
    NO_LABEL, CLIPLayerWiseAdaMergingTrainSplit, CLIPTaskWiseAdaMergingTrainSplit, UnlabeledImages,
    clip_adamerging_unlabeled_split)
from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool


class TestSplitForbidden(CLIPSuiteModelPool):
    """A model pool whose test (and validation) split cannot be read."""

    __test__ = False

    def load_test_dataset(self, *args, **kwargs):
        raise AssertionError("the test split was read")

    def load_val_dataset(self, *args, **kwargs):
        raise AssertionError("the validation split was read")


def _config(name, tmp_path):
    return dict(name=name, protocol="train_unlabeled", weights=None, optimizer="adam", lr=1e-3,
                init_values=0.3, clamp_weights=False, tie_weights=True, strict=False, devices=1,
                batch_size=4, num_workers=0, max_steps=2, fast_dev_run=False, save_merging_weights=False,
                cache_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["clip_layer_wise_adamerging", "clip_task_wise_adamerging"])
def test_train_split_variant_never_reads_test_split(name, suite_dir, tmp_path):
    pool = TestSplitForbidden(suite_dir=str(suite_dir))
    algorithm = clip_adamerging_unlabeled_split(**_config(name, tmp_path))
    expected = {"clip_layer_wise_adamerging": CLIPLayerWiseAdaMergingTrainSplit,
                "clip_task_wise_adamerging": CLIPTaskWiseAdaMergingTrainSplit}[name]
    assert type(algorithm) is expected
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(tmp_path / "logs")))
    algorithm.fabric = fabric  # what the fusion_bench program sets on either class
    algorithm._fabric = fabric
    merged = algorithm.run(pool)
    assert isinstance(merged, torch.nn.Module)
    task = pool.model_names[0]
    images, labels = next(algorithm.get_shuffled_test_loader_iter(task))
    assert images.shape[0] == 4 and torch.all(labels == NO_LABEL)


def test_unlabeled_images_drop_the_label_column(modelpool):
    task = modelpool.model_names[0]
    ds = UnlabeledImages(modelpool.load_train_dataset(task), modelpool.load_processor())
    assert ds.dataset.column_names == ["image"]
    pixels, label = ds[0]
    assert pixels.ndim == 3 and label == NO_LABEL


def test_test_split_protocol_is_refused(tmp_path):
    with pytest.raises(ValueError, match="adamerging/clip"):
        clip_adamerging_unlabeled_split(**{**_config("clip_layer_wise_adamerging", tmp_path),
                                           "protocol": "test_time_adaptation"})
