"""Proving ground: a procedural renderer of object glyphs in five visual domains and a small CLIP
(open_clip's `CLIP`, ViT image tower) trained on it, shipped as the embedded default model."""
from .metrics import domain_discrimination, evaluate, prompt, zero_shot_accuracy
from .model import MODEL_NAME, build_model, get_preprocess, get_tokenizer, load, register
from .render import (CLASS_PHRASES, CLASSES, COLOUR_NAMES, DOMAIN_PHRASES, DOMAINS, IMAGE_SIZE, MEAN, STD,
                     render, render_raw)

__all__ = ["CLASSES", "CLASS_PHRASES", "COLOUR_NAMES", "DOMAINS", "DOMAIN_PHRASES", "IMAGE_SIZE", "MEAN",
           "MODEL_NAME", "STD", "build_model", "domain_discrimination", "evaluate", "get_preprocess",
           "get_tokenizer", "load", "prompt", "register", "render", "render_raw", "zero_shot_accuracy"]
