"""clipforget_fast: training-free, data-free class and domain unlearning for CLIP models.

    spec  = ForgetSpec(classes, domains, forget_classes=["dog"])
    patch = forget(model, tokenizer, spec)          # the model is not modified
    patch.apply(model); ...; patch.revert(model)
"""
from ._version import __version__
from .config import ForgetConfig
from .evaluate import AccuracyMatrix, evaluate, evaluate_patches
from .images import ImageFiles, read_images
from .pipeline import forget, synthesize_prototypes
from .patch import Patch, PatchEntry
from .spec import ForgetSpec
from .synthesis import PrototypeBank

__all__ = ["ForgetConfig", "ForgetSpec", "Patch", "PatchEntry", "PrototypeBank", "AccuracyMatrix", "forget",
           "evaluate", "evaluate_patches", "synthesize_prototypes", "ImageFiles", "read_images", "__version__"]
