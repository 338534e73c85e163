"""Exact conversion between OpenCLIP's ``CLIP`` and transformers' ``CLIPModel`` / ``CLIPVisionModel``.

Why convert instead of merging in OpenCLIP's module tree: every merging method here and in the host
(StatsMerging, SAMerging, TIES, task arithmetic, ...), the host's zero-shot heads
(``CLIPClassificationMixin``) and its CLIP task pool read transformers' CLIP. A standard OpenCLIP ViT
is the same network under other names, so an exact renaming lets all of them run unchanged.

What differs, and how it maps (OpenCLIP -> transformers):

- the fused attention input projection ``attn.in_proj_weight`` (3w x w, rows q|k|v) -> three
  ``q_proj`` / ``k_proj`` / ``v_proj`` (split, or concatenated back);
- ``visual.proj`` (w x d, used as ``x @ proj``) -> ``visual_projection.weight`` (d x w): transposed;
  the same for ``text_projection``;
- ``conv1`` -> ``patch_embedding``, ``class_embedding``, ``positional_embedding`` ->
  ``position_embedding.weight``, ``ln_pre``/``ln_post`` -> ``pre_layrnorm``/``post_layernorm``,
  ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``, ``mlp.c_fc``/``c_proj`` -> ``mlp.fc1``/``fc2``,
  ``ln_final`` -> ``final_layer_norm``; ``logit_scale`` is shared;
- the activation: OpenCLIP's ``quick_gelu`` flag -> ``hidden_act`` (``quick_gelu`` or ``gelu``).

Only the standard OpenCLIP ViT (class-token pooling, LayerNorm before the transformer, no layer
scale, no attentional pooler, a plain projection matrix, argmax text pooling) has an exact
counterpart; anything else is refused by name before any weight is touched.
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ...utils.errors import UserError
from ...utils.torchvision_compat import install_import_hook

# open_clip imports torchvision: let it import even where the venv's start-up file is missing
# (torchvision_compat's docstring); stdlib only until torchvision is really imported.
install_import_hook()

StateDict = Dict[str, Tensor]

BLOCK_RENAMES = (  # inside one residual block: OpenCLIP name -> transformers name
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
VISION_RENAMES = (
    ("class_embedding", "embeddings.class_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("ln_pre.weight", "pre_layrnorm.weight"),
    ("ln_pre.bias", "pre_layrnorm.bias"),
    ("ln_post.weight", "post_layernorm.weight"),
    ("ln_post.bias", "post_layernorm.bias"),
)
TEXT_RENAMES = (
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.weight", "final_layer_norm.weight"),
    ("ln_final.bias", "final_layer_norm.bias"),
)
QKV = ("q_proj", "k_proj", "v_proj")
OC_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
HF_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


class ConversionError(UserError):
    """An OpenCLIP or transformers CLIP that has no exact counterpart on the other side, or a state dict
    that does not fit the architecture; the message names the tensor or the setting."""


# --------------------------------------------------------------------------- towers (state dicts)
def _block_to_hf(rest: str, value: Tensor, prefix: str) -> Iterator[Tuple[str, Tensor]]:
    """One OpenCLIP residual-block tensor as transformers tensors (q|k|v split off the fused projection)."""
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        for name, part in zip(QKV, value.chunk(3, dim=0)):
            yield f"{prefix}self_attn.{name}.{kind}", part.clone()
        return
    for ours, theirs in BLOCK_RENAMES:
        if rest.startswith(ours):
            yield prefix + theirs + rest[len(ours):], value
            return
    raise ConversionError(f"OpenCLIP tensor '...{rest}' has no transformers counterpart (layer scale or another "
                          "block variant); only the standard OpenCLIP ViT block converts exactly.")


def _tower_to_hf(state: Mapping[str, Tensor], renames, hf_prefix: str, what: str) -> StateDict:
    """Convert one tower (keys without its OpenCLIP prefix) to transformers names under ``hf_prefix``."""
    simple = dict(renames)
    out: StateDict = {}
    for key, value in state.items():
        block = OC_BLOCK.match(key)
        if block:
            out.update(_block_to_hf(block.group(2), value, f"{hf_prefix}encoder.layers.{block.group(1)}."))
        elif key in simple:
            out[hf_prefix + simple[key]] = value
        else:
            raise ConversionError(f"{what} tensor '{key}' has no transformers counterpart; this OpenCLIP "
                                  "architecture is not the standard ViT CLIP (see openclip_convert's docstring).")
    return out


def _tower_to_openclip(state: Mapping[str, Tensor], renames, hf_prefix: str, what: str) -> StateDict:
    """The inverse of :func:`_tower_to_hf` for keys under ``hf_prefix`` (q, k, v concatenated back)."""
    simple = {theirs: ours for ours, theirs in renames}
    block_renames = {theirs: ours for ours, theirs in BLOCK_RENAMES}
    out: StateDict = {}
    fused: Dict[Tuple[str, str], Dict[str, Tensor]] = {}
    for key, value in state.items():
        name = key[len(hf_prefix):]
        block = HF_BLOCK.match(name)
        if block is None:
            if name not in simple:
                raise ConversionError(f"{what} tensor '{key}' has no OpenCLIP counterpart.")
            out[simple[name]] = value
            continue
        index, rest = block.groups()
        parts = rest.split(".")
        if len(parts) == 3 and parts[0] == "self_attn" and parts[1] in QKV:
            fused.setdefault((index, parts[2]), {})[parts[1]] = value
            continue
        for theirs, ours in block_renames.items():
            if rest.startswith(theirs):
                out[f"transformer.resblocks.{index}.{ours}{rest[len(theirs):]}"] = value
                break
        else:
            raise ConversionError(f"{what} tensor '{key}' has no OpenCLIP counterpart.")
    for (index, kind), parts in fused.items():
        if set(parts) != set(QKV):
            raise ConversionError(f"{what} layer {index}: {kind} of q, k and v are not all present ({sorted(parts)}).")
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in QKV], dim=0)
    return out


def openclip_visual_to_hf(visual: Mapping[str, Tensor]) -> Tuple[StateDict, Tensor]:
    """An OpenCLIP visual tower's state dict (keys as in ``model.visual``) as a ``CLIPVisionModel`` state dict
    and the ``visual_projection.weight`` (the transposed ``proj``)."""
    if "proj" not in visual:
        raise ConversionError("The OpenCLIP visual state dict has no 'proj' (the image projection).")
    rest = {k: v for k, v in visual.items() if k != "proj"}
    return _tower_to_hf(rest, VISION_RENAMES, "vision_model.", "OpenCLIP visual"), visual["proj"].t().contiguous()


def hf_vision_to_openclip(vision: Mapping[str, Tensor], projection: Tensor) -> StateDict:
    """A ``CLIPVisionModel`` state dict and ``visual_projection.weight`` as an OpenCLIP ``model.visual`` state dict."""
    tensors = {k: v for k, v in vision.items() if not k.endswith("position_ids")}
    out = _tower_to_openclip(tensors, VISION_RENAMES, "vision_model.", "transformers vision")
    out["proj"] = projection.t().contiguous()
    return out


def openclip_to_hf_state_dict(state: Mapping[str, Tensor]) -> StateDict:
    """A whole OpenCLIP ``CLIP`` state dict as a ``CLIPModel`` state dict (both towers, projections, logit scale)."""
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    vision, projection = openclip_visual_to_hf(visual)
    text = {k: v for k, v in state.items()
            if not k.startswith("visual.") and k not in ("text_projection", "logit_scale", "attn_mask")}
    out = {**vision, **_tower_to_hf(text, TEXT_RENAMES, "text_model.", "OpenCLIP text")}
    for needed in ("text_projection", "logit_scale"):
        if needed not in state:
            raise ConversionError(f"The OpenCLIP state dict has no '{needed}'.")
    out.update({"visual_projection.weight": projection,
                "text_projection.weight": state["text_projection"].t().contiguous(),
                "logit_scale": state["logit_scale"]})
    return out


def hf_to_openclip_state_dict(state: Mapping[str, Tensor]) -> StateDict:
    """The inverse of :func:`openclip_to_hf_state_dict`."""
    vision = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    text = {k: v for k, v in state.items() if k.startswith("text_model.") and not k.endswith("position_ids")}
    out = {"visual." + k: v for k, v in hf_vision_to_openclip(vision, state["visual_projection.weight"]).items()}
    out.update(_tower_to_openclip(text, TEXT_RENAMES, "text_model.", "transformers text"))
    out["text_projection"] = state["text_projection.weight"].t().contiguous()
    out["logit_scale"] = state["logit_scale"]
    return out


# --------------------------------------------------------------------------- configurations
def _uses_quick_gelu(block: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return isinstance(block.mlp.gelu, QuickGELU)


def check_standard_openclip(model: nn.Module) -> None:
    """Refuse, by name, an OpenCLIP model whose network has no exact ``CLIPModel`` counterpart."""
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    if type(model) is not CLIP:
        raise ConversionError(f"OpenCLIP model of type {type(model).__name__} (custom text tower or CoCa) is not "
                              "supported; only open_clip.model.CLIP with its own text transformer converts exactly.")
    visual = model.visual
    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"image tower {type(visual).__name__} (timm or ResNet) instead of a ViT")
    else:
        if getattr(visual, "attn_pool", None) is not None:
            problems.append("an attentional pooler")
        if visual.pool_type != "tok" or getattr(visual, "final_ln_after_pool", False):
            problems.append(f"image pooling '{visual.pool_type}' (class token expected)")
        if isinstance(visual.ln_pre, nn.Identity):
            problems.append("no LayerNorm before the image transformer")
        if not isinstance(visual.proj, nn.Parameter):
            problems.append("an image projection that is not a plain matrix")
        blocks = list(visual.transformer.resblocks) + list(model.transformer.resblocks)
        if any(not isinstance(b.ls_1, nn.Identity) or not isinstance(getattr(b, "ln_attn", nn.Identity()), nn.Identity)
               for b in blocks):
            problems.append("layer scale or extra attention LayerNorms in the residual blocks")
        if len({_uses_quick_gelu(b) for b in blocks}) > 1:
            problems.append("different activations in the two towers")
    if model.text_pool_type != "argmax":
        problems.append(f"text pooling '{model.text_pool_type}' (argmax over token ids expected)")
    if not isinstance(model.text_projection, nn.Parameter):
        problems.append("a text projection that is not a plain matrix")
    if problems:
        raise ConversionError("This OpenCLIP model has no exact transformers CLIP counterpart: "
                              + "; ".join(problems) + ".")


UNSUPPORTED_TOP = ("custom_text", "multimodal_cfg", "init_logit_bias")
UNSUPPORTED_TOWER = ("timm_model_name", "hf_model_name", "ls_init_value", "attentional_pool", "no_ln_pre",
                     "final_ln_after_pool", "proj_bias", "no_causal_mask", "embed_cls", "norm_kwargs", "act_kwargs")


def check_openclip_config(config: Mapping, label: str) -> None:
    """The same refusal as :func:`check_standard_openclip`, read from an OpenCLIP model config, so that an
    unsupported model is named before its weights are downloaded or loaded."""
    problems = [key for key in UNSUPPORTED_TOP if config.get(key)]
    for tower in ("vision_cfg", "text_cfg"):
        cfg = config.get(tower) or {}
        problems += [f"{tower}.{key}" for key in UNSUPPORTED_TOWER if cfg.get(key)]
        if isinstance(cfg.get("layers"), (list, tuple)):
            problems.append(f"{tower}.layers {list(cfg['layers'])} (a ResNet)")
    pools = {"vision_cfg": "tok", "text_cfg": "argmax"}
    problems += [f"{t}.pool_type '{(config.get(t) or {})['pool_type']}'" for t, ok in pools.items()
                 if (config.get(t) or {}).get("pool_type", ok) != ok]
    if problems:
        raise ConversionError(f"OpenCLIP model {label} has no exact transformers CLIP counterpart: "
                              + ", ".join(problems) + " (standard ViT CLIP models only).")


def hf_config_from_openclip(model: nn.Module):
    """The ``CLIPConfig`` of a standard OpenCLIP ``CLIP``, read off the module itself (so '-quickgelu' names,
    'openai' tags and custom configs all give the network they built)."""
    from transformers import CLIPConfig

    check_standard_openclip(model)
    visual = model.visual
    v_block, t_block = visual.transformer.resblocks[0], model.transformer.resblocks[0]
    vocab_size, text_width = model.token_embedding.weight.shape
    patch = visual.conv1.kernel_size[0]
    image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    act = "quick_gelu" if _uses_quick_gelu(v_block) else "gelu"
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=text_width,
                         intermediate_size=t_block.mlp.c_fc.out_features,
                         num_hidden_layers=len(model.transformer.resblocks), num_attention_heads=t_block.attn.num_heads,
                         max_position_embeddings=model.positional_embedding.shape[0], hidden_act=act,
                         layer_norm_eps=model.ln_final.eps,
                         # argmax pooling = the first end-of-text token, the highest id of the vocabulary
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=visual.conv1.out_channels, intermediate_size=v_block.mlp.c_fc.out_features,
                           num_hidden_layers=len(visual.transformer.resblocks),
                           num_attention_heads=v_block.attn.num_heads, image_size=image_size, patch_size=patch,
                           hidden_act=act, layer_norm_eps=visual.ln_pre.eps),
        projection_dim=visual.proj.shape[1],
    )


def openclip_config_from_hf(config) -> dict:
    """An OpenCLIP model config (the ``model_configs/*.json`` form) for a transformers ``CLIPConfig``."""
    text, vision = config.text_config, config.vision_config
    if text.hidden_act != vision.hidden_act or vision.hidden_act not in ("quick_gelu", "gelu"):
        raise ConversionError(f"Activations '{vision.hidden_act}' (vision) / '{text.hidden_act}' (text): OpenCLIP has "
                              "one flag for both towers, quick_gelu or gelu.")
    if text.eos_token_id != text.vocab_size - 1:
        raise ConversionError(f"Text end-of-text id {text.eos_token_id} is not the highest id ({text.vocab_size - 1}); "
                              "OpenCLIP's argmax pooling would read another token.")
    if abs(text.layer_norm_eps - 1e-5) > 1e-12 or abs(vision.layer_norm_eps - 1e-5) > 1e-12:
        raise ConversionError("OpenCLIP's LayerNorms use eps 1e-5; this CLIP uses another.")

    def tower(c):
        return dict(width=c.hidden_size, layers=c.num_hidden_layers, mlp_ratio=c.intermediate_size / c.hidden_size)

    return {"embed_dim": config.projection_dim, "quick_gelu": vision.hidden_act == "quick_gelu",
            "vision_cfg": dict(tower(vision), image_size=vision.image_size, patch_size=vision.patch_size,
                               head_width=vision.hidden_size // vision.num_attention_heads),
            "text_cfg": dict(tower(text), heads=text.num_attention_heads, context_length=text.max_position_embeddings,
                             vocab_size=text.vocab_size)}


# --------------------------------------------------------------------------- models
def openclip_to_hf_clip(model: nn.Module):
    """A transformers ``CLIPModel`` computing exactly what the OpenCLIP ``CLIP`` computes."""
    from transformers import CLIPModel

    config = hf_config_from_openclip(model)
    clip_model = CLIPModel(config)
    load_exactly(clip_model, openclip_to_hf_state_dict(model.state_dict()), "converted OpenCLIP model")
    return clip_model.eval()


def hf_clip_to_openclip(clip_model: nn.Module) -> Tuple[nn.Module, dict]:
    """An OpenCLIP ``CLIP`` (and its model config) computing exactly what the transformers ``CLIPModel`` computes."""
    from open_clip.model import CLIP

    config = openclip_config_from_hf(clip_model.config)
    model = CLIP(**config)
    model.load_state_dict(hf_to_openclip_state_dict(clip_model.state_dict()), strict=True)
    return model.eval(), config


def load_exactly(module: nn.Module, state: Mapping[str, Tensor], label: str) -> None:
    """``load_state_dict`` that names what is missing, unexpected or of the wrong shape (buffers such as
    ``position_ids`` that transformers rebuilds itself are not required)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ConversionError(f"{label} does not fit the architecture: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shape mismatches {shapes[:5]}.")
    module.load_state_dict(dict(state), strict=False)


def vision_model_from_openclip_visual(visual: Mapping[str, Tensor], vision_config, label: str,
                                      ) -> Tuple[nn.Module, Tensor]:
    """A ``CLIPVisionModel`` holding an OpenCLIP image encoder's weights, and the encoder's projection."""
    from transformers import CLIPVisionModel

    state, projection = openclip_visual_to_hf(visual)
    model = CLIPVisionModel(vision_config)
    load_exactly(model, state, label)
    return model.eval(), projection


__all__ = ["ConversionError", "check_openclip_config", "check_standard_openclip", "hf_clip_to_openclip",
           "hf_config_from_openclip",
           "hf_to_openclip_state_dict", "hf_vision_to_openclip", "load_exactly", "openclip_config_from_hf",
           "openclip_to_hf_clip", "openclip_to_hf_state_dict", "openclip_visual_to_hf",
           "vision_model_from_openclip_visual"]
