"""The host's RegMean++ for CLIP, made constructible in ``fusion-bench`` 0.2.33.

Why. ``RegMeanAlgorithmForCLIPPlusPlus`` declares ``_config_mapping`` as a plain ``dict``
while its base class is decorated with ``auto_register_config``, whose ``__init__`` looks
names up through ``_config_mapping.inverse`` (a ``bidict``). Hydra's instantiation of
``method=regmean_plusplus/clip_regmean_plusplus`` therefore stops with ``AttributeError:
'dict' object has no attribute 'inverse'`` before anything runs. This subclass only gives
the class the mapping its base expects (the base's keys plus ``dataloader_kwargs``);
the algorithm, its data (layer inputs of train images, ``images, _ = batch``: labels are
dropped) and every option are the host's.

    fusion_bench method=regmean_plusplus_clip modelpool=clip_suite taskpool=clip_suite
"""

from __future__ import annotations

from bidict import bidict

from fusion_bench.method.regmean_plusplus.clip_regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus
from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus


class CLIPRegMeanPlusPlus(RegMeanAlgorithmForCLIPPlusPlus):
    """The host's CLIP RegMean++ with a ``bidict`` config mapping (see the module docstring)."""

    pool_family = "clip"  # method/hints.pool_family

    _config_mapping = bidict({**RegMeanAlgorithmPlusPlus._config_mapping,
                              **RegMeanAlgorithmForCLIPPlusPlus._config_mapping})
