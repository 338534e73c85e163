"""The host's AdaMerging on per-task-head pools (CNNs with BatchNorm, BERT-style encoders).

The host ships AdaMerging for CLIP (zero-shot heads) and a few other families, not for a
shared backbone with one fine-tuned head per task. Its generic classes,
``LayerWiseAdaMergingAlgorithm`` and ``TaskWiseAdaMergingAlgorithm``, leave three hooks
open; here they are filled for :class:`~fusion_bench_statsmerging.modelpool.heads.PerTaskHeadsModelPool`:

- ``on_test_time_adaptation_start``: load each task's frozen head and the input processor;
- ``get_shuffled_test_loader_iter``: an endless shuffled loader over one task's inputs of
  the split the ``protocol`` names, reading the input column only (labels are never decoded);
- ``compute_logits``: the task's head on the merged backbone's features.

Everything else (entropy loss, Adam on the merge weights, 1000 steps, the host's merged-model
wrappers) is the host's. The protocol defaults to label-free *train* inputs, the comparison's
shared protocol; ``test_time_adaptation`` (the unlabeled test inputs AdaMerging's paper adapts
on) must be asked for by name. BatchNorm: the host puts the merged model in training mode, so
adaptation normalises with each task batch's own statistics; what the result's running
statistics should be is left to the evaluation (``taskpool.batchnorm_reestimate``), as for the
host's other baselines.

    fusion_bench method=adamerging_heads method.name=layer_wise modelpool=heads_suite taskpool=heads_suite
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fusion_bench.method.adamerging.layer_wise_adamerging import LayerWiseAdaMergingAlgorithm
from fusion_bench.method.adamerging.task_wise_adamerging import TaskWiseAdaMergingAlgorithm
from fusion_bench.utils.data import InfiniteDataLoader

from ..models.heads import _value_of, column_only_view, inputs_to
from ..utils.errors import PoolError, UserError
from .adamerging_protocol import NO_LABEL, SPLIT_LOADERS, as_adamerging_config
from .heads import require_heads_pool

log = logging.getLogger(__name__)

# protocol -> the model pool's dataset loader; the test split only when named
PROTOCOL_LOADERS = {**SPLIT_LOADERS, "test_time_adaptation": "load_test_dataset"}


class _ProcessInputs:
    """Collate rows of the input column into one preprocessed batch (picklable, for loader workers)."""

    def __init__(self, processor: Any, column: str):
        self.processor, self.column = processor, column

    def __call__(self, rows: List[Any]):
        return self.processor([_value_of(row, self.column) for row in rows]), NO_LABEL


class _HeadsHooks:
    """The three hooks of the host's AdaMerging classes, for per-task-head pools."""

    modelpool: Any
    pool_family = "heads"  # method/hints.pool_family

    def _device(self):
        raise NotImplementedError

    def on_test_time_adaptation_start(self) -> None:
        pool = self.modelpool
        require_heads_pool(pool, "method=adamerging/clip")
        device = self._device()
        self._heads = {t: pool.load_head(t).requires_grad_(False).eval().to(device) for t in pool.model_names}
        self._processor = pool.load_processor()
        self._column = pool.input_column

    @functools.cache
    def get_shuffled_test_loader_iter(self, task: str) -> Iterator:
        protocol = self.config.get("protocol", "train_unlabeled")
        dataset = getattr(self.modelpool, PROTOCOL_LOADERS[protocol])(task)
        if len(dataset) == 0:
            raise PoolError(f"task '{task}' has no inputs in the split that protocol '{protocol}' reads.")
        log.info("AdaMerging (%s): adapting on %d '%s' inputs of '%s', labels not read",
                 protocol, len(dataset), self._column, task)
        # drop_last: the merged model adapts in training mode, where BatchNorm cannot normalise
        # an epoch's last batch if it holds a single sample
        batch_size = self.config.batch_size
        loader = DataLoader(column_only_view(dataset, self._column), batch_size=batch_size, shuffle=True,
                            drop_last=len(dataset) > batch_size, num_workers=self.config.get("num_workers", 0),
                            collate_fn=_ProcessInputs(self._processor, self._column))
        return iter(InfiniteDataLoader(loader))

    def compute_logits(self, module: nn.Module, batch, task: str) -> Tensor:
        # the host's layer-wise loop passes ``batch[0]``, its task-wise loop the whole batch
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs = inputs_to(inputs, self._device())
        return self._heads[task](module(inputs))


class HeadsLayerWiseAdaMerging(_HeadsHooks, LayerWiseAdaMergingAlgorithm):
    """Layer-wise AdaMerging (one coefficient per expert and parameter tensor), per-task heads."""

    def __init__(self, algorithm_config: Optional[DictConfig] = None, **kwargs):
        super().__init__(as_adamerging_config(algorithm_config, kwargs, PROTOCOL_LOADERS, ""))

    def _device(self):
        return self.fabric.device


class HeadsTaskWiseAdaMerging(_HeadsHooks, TaskWiseAdaMergingAlgorithm):
    """Task-wise AdaMerging (one coefficient per expert), per-task heads."""

    def __init__(self, algorithm_config: Optional[DictConfig] = None, **kwargs):
        super().__init__(as_adamerging_config(algorithm_config, kwargs, PROTOCOL_LOADERS, ""))

    def _device(self):
        return self._fabric.device


VARIANTS = {"layer_wise": HeadsLayerWiseAdaMerging, "task_wise": HeadsTaskWiseAdaMerging}


def heads_adamerging(name: str = "layer_wise", **config):
    """Hydra target of ``config/method/adamerging_heads.yaml``: ``name`` picks the variant."""
    if name not in VARIANTS:
        raise UserError(f"name must be one of {sorted(VARIANTS)}, got '{name}'.")
    return VARIANTS[name](OmegaConf.create({"name": name, **config}))
