"""The proving-ground model: open_clip's own `CLIP` class with a small registered ViT config.

The architecture is the JSON file next to this module, in open_clip's `model_configs/` format; its stem
is the model name, registered with `open_clip.add_model_config`, so `open_clip.create_model(MODEL_NAME)`
and `open_clip.get_tokenizer(MODEL_NAME)` work as for any built-in model. The trained weights are
stored in fp16 under `weights/` (see MODEL_CARD.md for how they were made) and loaded as fp32.

The image tower reads its embedding out of the class token, as the OpenAI and LAION CLIP ViTs do (the
config's `pool_type` "tok"). `pool_type="avg"` builds the same network averaging its patch tokens instead
(the weights have the same names and shapes; only what the tower reads out differs), the pooling of the
model shipped before this one. A checkpoint records its pooling in its safetensors metadata
(`"pool_type"`), which `load` follows; one without it is average-pooled (those were written before the
pooling was recorded). The image tower's depth can differ from the config's too (``vision_layers``, for
measuring how a deeper tower changes an edit); a checkpoint records it as ``"vision_layers"``, which `load`
follows as well (the config's when absent).
"""
import json
import logging
from pathlib import Path

import open_clip
from safetensors import safe_open
from safetensors.torch import load_file

from .render import MEAN, STD

_HERE = Path(__file__).resolve().parent
MODEL_NAME = "ProvingGround-ViT-48"
CONFIG_PATH = _HERE / f"{MODEL_NAME}.json"
WEIGHTS_PATH = _HERE / "weights" / "proving_ground_vit48.safetensors"

_registered = False


def register():
    """Register the config with open_clip (idempotent); returns the config dict."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_PATH)
        _registered = True
    return json.loads(CONFIG_PATH.read_text())


POOL_TYPES = ("avg", "tok")


def build_model(pool_type: str | None = None, vision_layers: int | None = None):
    """A randomly initialised proving-ground CLIP (fp32, train mode); ``pool_type`` is what the image
    tower reads out: ``"tok"`` (the class token: the config's, and the shipped model's) or ``"avg"`` (the
    mean of the patch tokens); ``vision_layers`` the image tower's number of blocks. None takes the
    config's."""
    cfg = register()
    pool_type = cfg["vision_cfg"]["pool_type"] if pool_type is None else pool_type
    if pool_type not in POOL_TYPES:
        raise ValueError(f"pool_type={pool_type!r} must be one of {POOL_TYPES}")
    kwargs = {}
    if vision_layers is not None:
        if isinstance(vision_layers, bool) or not isinstance(vision_layers, int) or vision_layers < 1:
            raise ValueError(f"vision_layers={vision_layers!r} must be a positive int")
        kwargs["vision_cfg"] = {**cfg["vision_cfg"], "layers": vision_layers}
    # open_clip logs "No pretrained weights loaded ... initialized randomly" for pretrained=None,
    # which reads as an error when load() fills the weights right after: keep it out of the log.
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(MODEL_NAME, pretrained=None, device="cpu", **kwargs)
    finally:
        quiet.setLevel(level)
    model.visual.pool_type = pool_type     # read at forward time only: no weight depends on it
    return model


def get_tokenizer():
    """open_clip's SimpleTokenizer (BPE vocab shipped with open_clip) at the config's context length."""
    register()
    return open_clip.get_tokenizer(MODEL_NAME)


def get_preprocess():
    """PIL image -> normalized float tensor [3, H, W] for the model."""
    cfg = register()
    return open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False, mean=MEAN, std=STD,
                                     interpolation="bicubic", resize_mode="shortest")


def _metadata(path) -> dict:
    """A safetensors file's metadata ({} when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def checkpoint_pool_type(path) -> str:
    """The image tower's pooling a proving-ground checkpoint was trained with (``"avg"`` when its
    safetensors metadata does not say: checkpoints written before the pooling was recorded)."""
    pool = _metadata(path).get("pool_type", "avg")
    if pool not in POOL_TYPES:
        raise ValueError(f"{str(path)!r}: metadata pool_type={pool!r} is not one of {POOL_TYPES}")
    return pool


def checkpoint_vision_layers(path) -> int:
    """The image tower's number of blocks in a proving-ground checkpoint (its safetensors metadata's
    ``"vision_layers"``; the config's when it does not say)."""
    layers = _metadata(path).get("vision_layers")
    if layers is None:
        return register()["vision_cfg"]["layers"]
    if not layers.isdigit() or int(layers) < 1:
        raise ValueError(f"{str(path)!r}: metadata vision_layers={layers!r} is not a positive int")
    return int(layers)


def load(device="cpu", weights=None):
    """Load the committed, trained proving-ground model offline.

    Returns (model in eval mode, fp32, on `device`; tokenizer; preprocess). `weights` overrides the
    checkpoint path (a safetensors file of this architecture); its metadata's ``"pool_type"`` says how
    the image tower pools (``"avg"`` when it has none), ``"vision_layers"`` how many blocks it has (the
    config's when it has none).
    """
    path = Path(weights) if weights is not None else WEIGHTS_PATH
    if not path.is_file():
        raise ValueError(f"weights file not found: {str(path)!r}")
    model = build_model(checkpoint_pool_type(path), checkpoint_vision_layers(path))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    return model, get_tokenizer(), get_preprocess()
