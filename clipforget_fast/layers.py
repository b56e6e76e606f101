"""The one place that walks a CLIP model's module tree: which weights an edit may touch, their
layout, and where their input features can be observed.

open_clip stores editable weights in three layouts (DESIGN §2.6):

    "linear"  nn.Linear.weight and the fused attn.in_proj_weight: [d_out, d_in], y = x Wᵀ
    "in_out"  the raw visual.proj / text_projection Parameters:   [d_in, d_out], y = x P

Each ``Layer`` names its parameter (as in ``model.named_parameters()``), its tower, its layout and a
``tap``: the module whose forward input (or, for the projections, the tower's output with the
projection removed) is the layer's input ``x``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import TARGET_PRESETS


@dataclass
class Layer:
    name: str                 # parameter name, e.g. "visual.transformer.resblocks.11.mlp.c_proj.weight"
    tower: str                # "visual" or "text"
    kind: str                 # "proj", "mlp" or "attn_in"
    layout: str               # "linear" ([d_out, d_in]) or "in_out" ([d_in, d_out])
    param: nn.Parameter       # the weight itself
    tap: nn.Module | None     # module whose first forward input is x; None for raw projections
    batch_first: bool = True  # layout of the token features the tap sees ([B, L, D] if True)

    @property
    def d_in(self) -> int:
        return self.param.shape[1] if self.layout == "linear" else self.param.shape[0]

    @property
    def d_out(self) -> int:
        return self.param.shape[0] if self.layout == "linear" else self.param.shape[1]

    def weight_out_in(self) -> torch.Tensor:
        """The weight as a [d_out, d_in] view, whatever the layout."""
        return self.param if self.layout == "linear" else self.param.t()


def check_model(model: nn.Module) -> None:
    """Raise TypeError naming what is missing when ``model`` is not an editable open_clip CLIP."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an open_clip CLIP nn.Module, got {type(model).__name__}")
    for attr in ("visual", "encode_image", "encode_text", "transformer", "text_projection"):
        if not hasattr(model, attr):
            raise TypeError(f"model {type(model).__name__} has no '{attr}': expected an open_clip "
                            "CLIP model (open_clip.create_model(...)); CustomTextCLIP and CoCa are "
                            "not supported")
    vis = model.visual
    if not (hasattr(vis, "transformer") and hasattr(vis.transformer, "resblocks")):
        raise TypeError(f"model.visual is a {type(vis).__name__}; only VisionTransformer image "
                        "towers are supported")
    if getattr(vis, "proj", None) is None:
        raise TypeError("model.visual.proj is missing (None): the image projection is required")
    if model.text_projection is None:
        raise TypeError("model.text_projection is missing (None): the text projection is required")


def _proj_layer(name: str, tower: str, p) -> Layer:
    if isinstance(p, nn.Linear):
        return Layer(f"{name}.weight", tower, "proj", "linear", p.weight, p)
    return Layer(name, tower, "proj", "in_out", p, None)


def _block_layers(prefix: str, tower: str, transformer: nn.Module, last: int, attn: bool) -> list[Layer]:
    out = []
    blocks = list(transformer.resblocks)
    bf = getattr(transformer, "batch_first", True)
    for i in range(max(0, len(blocks) - last), len(blocks)):
        blk = blocks[i]
        base = f"{prefix}.resblocks.{i}"
        if attn:
            mha = getattr(blk, "attn", None)
            if isinstance(mha, nn.MultiheadAttention) and mha.in_proj_weight is not None:
                out.append(Layer(f"{base}.attn.in_proj_weight", tower, "attn_in", "linear",
                                 mha.in_proj_weight, mha, bf))
        c_proj = getattr(getattr(blk, "mlp", None), "c_proj", None)
        if not isinstance(c_proj, nn.Linear):
            raise TypeError(f"{base}.mlp.c_proj is not an nn.Linear; cannot edit this block type")
        out.append(Layer(f"{base}.mlp.c_proj.weight", tower, "mlp", "linear", c_proj.weight, c_proj, bf))
    return out


def find_layers(model: nn.Module, targets: str = "proj", last_blocks: int = 2) -> list[Layer]:
    """The layers of ``model`` that the ``targets`` preset edits, image tower first.

    Presets: "proj" (visual.proj and text_projection), "proj+mlp" (plus mlp.c_proj of the last
    ``last_blocks`` blocks of each tower), "proj+mlp+attn" (plus their attn.in_proj_weight),
    "mlp" (only the MLP outputs).
    """
    if targets not in TARGET_PRESETS:
        raise ValueError(f"targets={targets!r} is not one of {TARGET_PRESETS}")
    check_model(model)
    layers: list[Layer] = []
    if "mlp" in targets:
        attn = "attn" in targets
        layers += _block_layers("visual.transformer", "visual", model.visual.transformer, last_blocks, attn)
        layers += _block_layers("transformer", "text", model.transformer, last_blocks, attn)
    if targets.startswith("proj"):
        layers.append(_proj_layer("visual.proj", "visual", model.visual.proj))
        layers.append(_proj_layer("text_projection", "text", model.text_projection))
    names = dict(model.named_parameters())
    for layer in layers:
        assert names.get(layer.name) is layer.param, f"parameter name mismatch for {layer.name}"
    return layers


def image_geometry(model: nn.Module) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor]:
    """(H, W), per-channel mean [3] and std [3] the image tower expects (open_clip's defaults when
    the model does not carry its own)."""
    size = getattr(model.visual, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
    std = getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
    return size, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
