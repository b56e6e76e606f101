"""The one place that walks a CLIP model's module tree: which weights an edit may touch, their
layout, where their input features can be observed, and how each tower is run.

Two model families: open_clip ``CLIP`` (VisionTransformer image tower) and Hugging Face
``transformers.CLIPModel`` (recognized by its attributes; transformers is not imported here).

open_clip stores editable weights in three layouts (DESIGN §2.6):

    "linear"  nn.Linear.weight and the fused attn.in_proj_weight: [d_out, d_in], y = x Wᵀ
    "in_out"  the raw visual.proj / text_projection Parameters:   [d_in, d_out], y = x P

Each ``Layer`` names its parameter (as in ``model.named_parameters()``), its tower, its layout and a
``tap``: the module whose forward input (or, for the projections, the tower's output with the
projection removed) is the layer's input ``x``.

A Hugging Face CLIPModel keeps every editable weight in an ``nn.Linear`` ("linear" layout):
``visual_projection`` and ``text_projection`` (input: the pooled, normalized token),
``{vision,text}_model.encoder.layers.i.mlp.fc2`` (the MLP output, as open_clip's ``mlp.c_proj``) and the
separate ``self_attn.{q,k,v}_proj`` (the attention inputs, as open_clip's fused ``in_proj_weight``: three
layers that see the same input). Its image tower pools the class token; its text tower the first
end-of-text token (or the largest token id, for configs with the old ``eos_token_id = 2``).
"""
from __future__ import annotations

import hashlib
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
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


HF_ATTRS = ("vision_model", "text_model", "visual_projection", "text_projection", "get_image_features",
            "get_text_features")


# parameter-name prefixes of the image tower: open_clip's model.visual, Hugging Face's vision_model and
# visual_projection
IMAGE_PREFIXES = ("visual.", "vision_model.", "visual_projection.")
_FINGERPRINT_SAMPLES = 4096     # values hashed per tensor: cheap at ViT-H size, and a new checkpoint or a
                                # patched weight changes every value, so any sample tells them apart


def image_tower_fingerprint(model: nn.Module) -> dict:
    """{"architecture", "weights"}: SHA-256 digests of the image tower's parameter names, shapes and
    dtypes, and of a strided sample of each of its tensors (prototypes belong to the tower they were
    synthesized through)."""
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for name, p in model.named_parameters():
        if not name.startswith(IMAGE_PREFIXES):
            continue
        arch.update(f"{name}|{tuple(p.shape)}|{p.dtype};".encode())
        flat = p.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _FINGERPRINT_SAMPLES)].float().cpu().contiguous()
        weights.update(sample.numpy().tobytes())
    return {"architecture": arch.hexdigest(), "weights": weights.hexdigest()}


class TensorMemo:
    """Values attached to tensors in this process, each valid while its tensor's storage and version
    counter stay as they were when it was set: any write through torch (an in-place op,
    ``load_state_dict``, ``.to``, the library's kernels, which count their writes) makes it stale; a
    write through ``.data`` or a raw pointer does not. A value goes with its tensor when it is freed."""

    def __init__(self):
        self._held: dict[int, tuple] = {}     # id(tensor) -> (weakref to it, data_ptr, version, value)

    def get(self, t: torch.Tensor):
        """The value set on ``t``, None if none or stale."""
        got = self._held.get(id(t))
        if got is None or got[0]() is not t or got[1:3] != (t.data_ptr(), t._version):
            return None
        return got[3]

    def set(self, t: torch.Tensor, value) -> None:
        """Attach ``value`` to ``t`` as it is now (None: drop what it had)."""
        key = id(t)
        if value is None:
            self._held.pop(key, None)
            return
        self._held[key] = (weakref.ref(t, lambda _, k=key: self._held.pop(k, None)), t.data_ptr(), t._version,
                           value)


_DIGESTS = TensorMemo()      # weight -> patch.tensor_hash of its bytes


def _content_digest(t: torch.Tensor) -> str:
    """``patch.tensor_hash`` of ``t`` (all its bytes), computed again only when it went stale
    (``TensorMemo``)."""
    from .patch import tensor_hash

    digest = _DIGESTS.get(t)
    if digest is None:
        digest = tensor_hash(t)
        _DIGESTS.set(t, digest)
    return digest


def image_tower_digest(model: nn.Module, workers: int | None = None) -> str:
    """SHA-256 of the image tower's parameter names, shapes, dtypes and every byte of its weights: what
    the tower computes, as a key for results derived from it. A weight is hashed again only after its
    storage or version counter moved (the library's kernels count their writes there), so a second call
    on an unchanged tower costs little; a weight written through ``.data`` or a raw pointer since is not
    seen. The weights to hash are hashed by ``workers`` threads (None: the cores this process may use,
    at most 8; hashlib releases the GIL over large buffers)."""
    from .images import default_workers

    tower = [(name, p) for name, p in model.named_parameters() if name.startswith(IMAGE_PREFIXES)]
    stale = [p for _, p in tower if _DIGESTS.get(p) is None]
    workers = default_workers() if workers is None else workers
    if len(stale) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(stale))) as pool:
            list(pool.map(_content_digest, stale))      # each sets its memo
    h = hashlib.sha256()
    for name, p in tower:
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{_content_digest(p)};".encode())
    return h.hexdigest()


# the editable weights in both families (open_clip template, its layout, Hugging Face template; every HF
# weight is "linear", a bias "bias"): {i} a block, {p} one of q, k, v (open_clip fuses them into one
# attn.in_proj_weight, in that row order); open_clip holds the two projections as raw [d_in, d_out]
# parameters. The image MLPs' input weight and bias are edited by the domain gate only (gate.py).
_COUNTERPARTS = (
    ("visual.transformer.resblocks.{i}.mlp.c_fc.weight", "linear", "vision_model.encoder.layers.{i}.mlp.fc1.weight"),
    ("visual.transformer.resblocks.{i}.mlp.c_fc.bias", "bias", "vision_model.encoder.layers.{i}.mlp.fc1.bias"),
    ("visual.proj", "in_out", "visual_projection.weight"),
    ("text_projection", "in_out", "text_projection.weight"),
    ("visual.transformer.resblocks.{i}.mlp.c_proj.weight", "linear", "vision_model.encoder.layers.{i}.mlp.fc2.weight"),
    ("transformer.resblocks.{i}.mlp.c_proj.weight", "linear", "text_model.encoder.layers.{i}.mlp.fc2.weight"),
    ("visual.transformer.resblocks.{i}.attn.in_proj_weight", "linear",
     "vision_model.encoder.layers.{i}.self_attn.{p}_proj.weight"),
    ("transformer.resblocks.{i}.attn.in_proj_weight", "linear", "text_model.encoder.layers.{i}.self_attn.{p}_proj.weight"),
)


def _fields(template: str, name: str) -> dict | None:
    """The {i}/{p} values that make ``template`` read ``name``, or None."""
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[qkv])")
    m = re.fullmatch(pattern, name)
    return None if m is None else m.groupdict()


def hf_names(name: str) -> list[str]:
    """The Hugging Face CLIPModel weights that hold open_clip's editable weight ``name`` (three, q, k, v,
    for a fused ``attn.in_proj_weight``); ValueError for a weight no targets preset edits."""
    for oc, _, hf in _COUNTERPARTS:
        f = _fields(oc, name)
        if f is not None:
            return [hf.format(p=p, **f) for p in "qkv"] if "{p}" in hf else [hf.format(**f)]
    raise ValueError(f"{name!r} is not an editable open_clip weight (no Hugging Face counterpart known)")


def open_clip_name(name: str) -> tuple[str, str, int | None]:
    """(open_clip weight, its layout, row third 0/1/2 for q/k/v or None) holding Hugging Face's editable
    weight ``name``; ValueError for a weight no targets preset edits."""
    for oc, layout, hf in _COUNTERPARTS:
        f = _fields(hf, name)
        if f is not None:
            part = f.pop("p", None)
            return oc.format(**f), layout, (None if part is None else "qkv".index(part))
    raise ValueError(f"{name!r} is not an editable Hugging Face CLIPModel weight (no open_clip counterpart known)")


def is_hf_clip(model) -> bool:
    """Whether ``model`` looks like a Hugging Face ``CLIPModel`` (both towers and both projections)."""
    return isinstance(model, nn.Module) and all(hasattr(model, a) for a in HF_ATTRS)


def _check_hf(model: nn.Module) -> None:
    for attr in ("visual_projection", "text_projection"):
        if not isinstance(getattr(model, attr), nn.Linear):
            raise TypeError(f"model.{attr} is a {type(getattr(model, attr)).__name__}, expected nn.Linear")
    for tower in ("vision_model", "text_model"):
        layers = getattr(getattr(getattr(model, tower), "encoder", None), "layers", None)
        if layers is None or len(layers) == 0:
            raise TypeError(f"model.{tower}.encoder.layers is missing: expected a Hugging Face CLIPModel")


def check_model(model: nn.Module) -> None:
    """Raise TypeError naming what is missing when ``model`` is not an editable open_clip CLIP or
    Hugging Face CLIPModel."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an open_clip CLIP or Hugging Face CLIPModel nn.Module, got "
                        f"{type(model).__name__}")
    if is_hf_clip(model):
        _check_hf(model)
        return
    for attr in ("visual", "encode_image", "encode_text", "transformer", "text_projection"):
        if not hasattr(model, attr):
            raise TypeError(f"model {type(model).__name__} has no '{attr}': expected an open_clip "
                            "CLIP model (open_clip.create_model(...)) or a Hugging Face CLIPModel; "
                            "CustomTextCLIP and CoCa are not supported")
    vis = model.visual
    if not (hasattr(vis, "transformer") and hasattr(vis.transformer, "resblocks")):
        raise TypeError(f"model.visual is a {type(vis).__name__}; only VisionTransformer image "
                        "towers are supported")
    if getattr(vis, "proj", None) is None:
        raise TypeError("model.visual.proj is missing (None): the image projection is required")
    if model.text_projection is None:
        raise TypeError("model.text_projection is missing (None): the text projection is required")
    pool = getattr(vis, "pool_type", "tok")
    if getattr(vis, "attn_pool", None) is None and pool not in IMAGE_POOLS:
        raise TypeError(f"model.visual pools its tokens by {pool!r}; the capture knows {IMAGE_POOLS}")
    pool = getattr(model, "text_pool_type", "argmax")
    if pool not in TEXT_POOLS:
        raise TypeError(f"the text tower pools by {pool!r}; the capture knows {TEXT_POOLS}")


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


def _hf_block_layers(prefix: str, tower: str, encoder: nn.Module, last: int, attn: bool) -> list[Layer]:
    out = []
    blocks = list(encoder.layers)
    for i in range(max(0, len(blocks) - last), len(blocks)):
        blk, base = blocks[i], f"{prefix}.layers.{i}"
        if attn:
            for p in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(getattr(blk, "self_attn", None), p, None)
                if not isinstance(lin, nn.Linear):
                    raise TypeError(f"{base}.self_attn.{p} is not an nn.Linear; cannot edit this block type")
                out.append(Layer(f"{base}.self_attn.{p}.weight", tower, "attn_in", "linear", lin.weight, lin))
        fc2 = getattr(getattr(blk, "mlp", None), "fc2", None)
        if not isinstance(fc2, nn.Linear):
            raise TypeError(f"{base}.mlp.fc2 is not an nn.Linear; cannot edit this block type")
        out.append(Layer(f"{base}.mlp.fc2.weight", tower, "mlp", "linear", fc2.weight, fc2))
    return out


def find_layers(model: nn.Module, targets: str = "proj", last_blocks: int = 2) -> list[Layer]:
    """The layers of ``model`` that the ``targets`` preset edits, image tower first.

    Presets: "proj" (visual.proj and text_projection), "proj+mlp" (plus mlp.c_proj of the last
    ``last_blocks`` blocks of each tower), "proj+mlp+attn" (plus their attn.in_proj_weight),
    "mlp" (only the MLP outputs); on a Hugging Face CLIPModel the same with visual_projection,
    mlp.fc2 and self_attn.{q,k,v}_proj.
    """
    if targets not in TARGET_PRESETS:
        raise ValueError(f"targets={targets!r} is not one of {TARGET_PRESETS}")
    check_model(model)
    hf = is_hf_clip(model)
    vis, txt = ((model.vision_model.encoder, model.text_model.encoder) if hf
                else (model.visual.transformer, model.transformer))
    vis_name, txt_name = ("vision_model.encoder", "text_model.encoder") if hf else ("visual.transformer", "transformer")
    blocks = _hf_block_layers if hf else _block_layers
    layers: list[Layer] = []
    if "mlp" in targets:
        attn = "attn" in targets
        layers += blocks(vis_name, "visual", vis, last_blocks, attn)
        layers += blocks(txt_name, "text", txt, last_blocks, attn)
    if targets.startswith("proj"):
        if hf:
            layers.append(_proj_layer("visual_projection", "visual", model.visual_projection))
        else:
            layers.append(_proj_layer("visual.proj", "visual", model.visual.proj))
        layers.append(_proj_layer("text_projection", "text", model.text_projection))
    names = dict(model.named_parameters())
    for layer in layers:
        assert names.get(layer.name) is layer.param, f"parameter name mismatch for {layer.name}"
    return layers


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def image_geometry(model: nn.Module) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor]:
    """(H, W), per-channel mean [3] and std [3] the image tower expects (the OpenAI CLIP values when
    the model does not carry its own: a Hugging Face CLIPModel keeps them in its image processor)."""
    if is_hf_clip(model):
        size = model.config.vision_config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return size, torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD)
    size = getattr(model.visual, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_STD
    return size, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _features(out) -> torch.Tensor:
    # transformers ≥ 5 returns the projected features as ``pooler_output`` of a model output, 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pixel_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the image tower's first floating weight (the dtype the tower was cast to): the dtype
    its pixels must come in when no autocast casts them (a bf16 or fp16 model on the CPU)."""
    tower = model.vision_model if is_hf_clip(model) else getattr(model, "visual", model)
    for p in tower.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def encode_image(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, D] image embeddings (not normalized) of normalized pixels ``images`` [B, 3, H, W], cast to the
    image tower's weight dtype (differentiably: pixel gradients come back in the pixels' dtype)."""
    dtype = _pixel_dtype(model)
    if dtype is not None and images.dtype != dtype:
        images = images.to(dtype)
    if is_hf_clip(model):
        return _features(model.get_image_features(pixel_values=images))
    return model.encode_image(images)


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, D] text embeddings (not normalized) of ``tokens`` [B, ctx]."""
    if is_hf_clip(model):
        return _features(model.get_text_features(input_ids=tokens))
    return model.encode_text(tokens)


def pools_first_token(model: nn.Module) -> bool:
    """Whether the image tower pools its first (class) token rather than averaging the tokens."""
    if is_hf_clip(model):
        return True
    return getattr(model.visual, "pool_type", "tok") == "tok"


TEXT_POOLS = ("argmax", "eos", "first", "last")   # open_clip text_pool_type values the capture knows
IMAGE_POOLS = ("tok", "avg")                      # open_clip VisionTransformer pool_type values it knows


def text_pool_positions(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B] index of the token the text tower pools: open_clip the largest token id (= EOT, "argmax"), the
    first EOT id ("eos"), the first or the last position ("first", "last": CLIPA); Hugging Face the first
    ``eos_token_id`` (the largest id for configs with the old ``eos_token_id = 2``)."""
    if is_hf_clip(model):
        eos = model.config.text_config.eos_token_id
        if eos is not None and eos != 2:
            return (tokens == eos).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)
    pool = getattr(model, "text_pool_type", "argmax")
    if pool in ("first", "last"):
        return torch.full((tokens.shape[0],), 0 if pool == "first" else tokens.shape[1] - 1,
                          dtype=torch.long, device=tokens.device)
    eos = getattr(model, "text_eos_id", None)
    if eos is not None and pool == "eos":
        return (tokens == eos).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def text_is_causal(model: nn.Module) -> bool:
    """Whether a text token reads only the tokens before it (a causal mask: OpenAI's and LAION's towers,
    Hugging Face's CLIPTextModel); CLIPA's towers read every position."""
    if is_hf_clip(model):
        return True
    return getattr(model, "attn_mask", None) is not None


def context_length(model: nn.Module) -> int | None:
    """The text tower's number of positions, where the model says."""
    if is_hf_clip(model):
        return model.config.text_config.max_position_embeddings
    return getattr(model, "context_length", None)


@dataclass
class GateSite:
    """The last block of an image tower that reads its embedding out of the class token, as the domain
    gate (gate.py) edits it: the class token's residual ``x`` enters the MLP as ``norm(x)``, and leaves
    the block as ``x + fc_out(act(fc_in(norm(x))))``; the embedding is ``post_norm(that) @ proj``."""
    prefix: str               # parameter-name prefix of the MLP, e.g. "visual.transformer.resblocks.11.mlp"
    in_name: str              # its input weight's suffix: "c_fc" (open_clip) or "fc1" (Hugging Face)
    out_name: str             # its output weight's suffix: "c_proj" or "fc2"
    norm: nn.Module           # the LayerNorm in front of the MLP (ln_2 / layer_norm2)
    fc_in: nn.Linear
    act: nn.Module            # the MLP's activation (GELU, or QuickGELU in OpenAI's checkpoints)
    fc_out: nn.Linear
    post_norm: nn.Module      # the tower's final LayerNorm (ln_post / post_layernorm)
    proj: torch.Tensor        # [width, embed] the image projection
    batch_first: bool = True  # layout of the tokens the norm sees

    def name(self, which: str, what: str = "weight") -> str:
        """The parameter name of the MLP's "in" or "out" weight (or bias)."""
        return f"{self.prefix}.{self.in_name if which == 'in' else self.out_name}.{what}"


def gate_site(model: nn.Module) -> GateSite:
    """The domain gate's site in ``model``'s image tower; ValueError when the tower does not read its
    embedding out of the class token through a plain last block (an average-pooled tower, an attention
    pool, a layer scale or a norm inside the MLP), naming what is in the way."""
    check_model(model)
    if is_hf_clip(model):
        vm = model.vision_model
        i = len(vm.encoder.layers) - 1
        blk = vm.encoder.layers[i]
        return GateSite(f"vision_model.encoder.layers.{i}.mlp", "fc1", "fc2", blk.layer_norm2, blk.mlp.fc1,
                        blk.mlp.activation_fn, blk.mlp.fc2,
                        vm.post_layernorm, model.visual_projection.weight.t())
    vis = model.visual
    if not pools_first_token(model) or getattr(vis, "attn_pool", None) is not None:
        how = "by attention" if getattr(vis, "attn_pool", None) is not None else repr(vis.pool_type)
        raise ValueError("the domain gate needs an image tower that reads its embedding out of the class token; "
                         f"this one pools {how}")
    blocks = list(vis.transformer.resblocks)
    i = len(blocks) - 1
    blk = blocks[i]
    mlp = getattr(blk, "mlp", None)
    parts = [n for n, _ in mlp.named_children()] if mlp is not None else []
    if parts != ["c_fc", "gelu", "c_proj"] or not isinstance(getattr(blk, "ls_2", None), nn.Identity):
        raise ValueError(f"the domain gate needs a plain last block (mlp = c_fc, gelu, c_proj; no layer scale); "
                         f"visual.transformer.resblocks.{i} has mlp parts {parts} and ls_2 "
                         f"{type(getattr(blk, 'ls_2', None)).__name__}")
    return GateSite(f"visual.transformer.resblocks.{i}.mlp", "c_fc", "c_proj", blk.ln_2, mlp.c_fc, mlp.gelu,
                    mlp.c_proj, vis.ln_post, vis.proj, getattr(vis.transformer, "batch_first", True))
