"""Shared fixtures: a seeded torch, and a tiny open_clip CLIP with random weights (seconds to build)."""
import os
import random
import sys

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run under its CPU interpreter, which Triton reads when it is first
# imported: set it here, before any test module can import Triton (tests/test_kernels.py).
TRITON_BEFORE_CONFTEST = "triton" in sys.modules    # imported before the setting below could act
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def make_tiny_clip(seed: int = 0, image_size: int = 32, width: int = 64):
    """open_clip's own CLIP class at toy size: ViT image tower (8-px patches, 2 blocks) and a
    2-block text tower with a 32-token context."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=image_size, patch_size=8, width=width, layers=2, head_width=32),
        text_cfg=dict(context_length=32, vocab_size=49408, width=width, heads=2, layers=2),
    )
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=32)


@pytest.fixture
def tiny_clip():
    return make_tiny_clip()


@pytest.fixture
def vocab():
    return ["dog", "cat", "car", "tree"], ["photo", "sketch", "pixel_art"]


class Rows:
    """A caller's own source of images: ``len``, and slices that are the rows of ``x``; records the slices
    read."""

    def __init__(self, x):
        self.x, self.reads = x, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, rows):
        self.reads.append((rows.start, rows.stop))
        return self.x[rows]
