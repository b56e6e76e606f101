"""Tests of the proving ground: renderer contract, offline loading, and the committed checkpoint."""
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforget_fast import proving_ground as pg
from clipforget_fast.proving_ground import metrics
from clipforget_fast.proving_ground.model import WEIGHTS_PATH
from clipforget_fast.proving_ground.render import render_raw, to_model_input

# A seed far from both training (seeds < 10**5 * (seed + 1)) and the training-time evaluation (10**6).
FRESH_SEED = 7_654_321


@pytest.fixture(scope="module")
def loaded():
    real_connect = socket.socket.connect

    def no_network(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    socket.socket.connect = no_network
    try:
        return pg.load()
    finally:
        socket.socket.connect = real_connect


def _unnormalize(x):
    mean = torch.tensor(pg.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(pg.STD).view(1, 3, 1, 1)
    return x * std + mean


def test_render_shapes_dtypes_range():
    x, c, d = pg.render(pg.CLASSES[:3], pg.DOMAINS, n_per_cell=2, seed=0)
    n = 3 * len(pg.DOMAINS) * 2
    assert x.shape == (n, 3, pg.IMAGE_SIZE, pg.IMAGE_SIZE) and x.dtype == torch.float32
    assert c.shape == (n,) and d.shape == (n,) and c.dtype == torch.int64 and d.dtype == torch.int64
    raw = _unnormalize(x)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert raw.std() > 0.05  # not blank


def test_render_deterministic_per_seed():
    a = pg.render(["star", "cup"], ["sketch", "photo"], n_per_cell=3, seed=5)
    b = pg.render(["star", "cup"], ["sketch", "photo"], n_per_cell=3, seed=5)
    c = pg.render(["star", "cup"], ["sketch", "photo"], n_per_cell=3, seed=6)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("classes,domains,n", [(pg.CLASSES, pg.DOMAINS, 1), (["boat"], ["pixel_art"], 4),
                                                (["key", "heart", "spiral"], ["cartoon", "painting"], 2)])
def test_render_covers_every_cell(classes, domains, n):
    x, c, d = pg.render(classes, domains, n_per_cell=n, seed=1)
    counts = torch.zeros(len(classes), len(domains), dtype=torch.long)
    counts.index_put_((c, d), torch.ones_like(c), accumulate=True)
    assert (counts == n).all()
    # images of one cell differ from each other (random placement and colour)
    if n > 1:
        assert not torch.equal(x[0], x[1])


def test_domains_differ_in_look():
    raw, _, dom, _ = render_raw(pg.CLASSES, pg.DOMAINS, 2, seed=3)
    sketch = raw[dom == pg.DOMAINS.index("sketch")].astype(np.float32) / 255
    pixel = raw[dom == pg.DOMAINS.index("pixel_art")].astype(np.float32)
    # sketch: light paper dominates; pixel art: constant 3-px-or-larger blocks (few distinct columns)
    assert np.median(sketch) > 0.8
    distinct_cols = np.mean([len(np.unique(im.reshape(im.shape[0], -1), axis=0)) for im in pixel])
    assert distinct_cols < pg.IMAGE_SIZE * 0.5


@pytest.mark.parametrize("kwargs,bad", [
    ({"classes": ["circle", "dragon"]}, "dragon"),
    ({"domains": ["photo", "oil"]}, "oil"),
    ({"n_per_cell": 0}, "0"),
    ({"n_per_cell": -2}, "-2"),
    ({"classes": []}, "classes"),
])
def test_render_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        pg.render(**kwargs)


def test_preprocess_matches_render(loaded):
    _, _, preprocess = loaded
    raw, _, _, _ = render_raw(["house"], ["cartoon"], 2, seed=11)
    ref = to_model_input(raw)
    got = torch.stack([preprocess(Image.fromarray(im)) for im in raw])
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_load_offline_structure(loaded):
    model, tokenizer, _ = loaded
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(model.visual.proj, torch.nn.Parameter)
    assert isinstance(model.text_projection, torch.nn.Parameter)
    blk = model.visual.transformer.resblocks[0]
    assert blk.mlp.c_proj.weight.ndim == 2 and blk.attn.in_proj_weight.ndim == 2
    tokens = tokenizer([metrics.prompt("fish", "pixel_art")])
    cfg = pg.register()
    assert tokens.shape == (1, cfg["text_cfg"]["context_length"])


def test_pooling_follows_the_checkpoint(loaded, tmp_path):
    """The shipped model reads its class token out (the registered config's pooling too); the same weights
    saved as average-pooled, or with no pooling recorded (as checkpoints were before), read out the mean
    of the patch tokens: pg.load follows the checkpoint's metadata."""
    from safetensors.torch import load_file, save_file

    from clipforget_fast.proving_ground.model import build_model, checkpoint_pool_type

    model = loaded[0]
    assert model.visual.pool_type == "tok" and checkpoint_pool_type(WEIGHTS_PATH) == "tok"
    assert pg.register()["vision_cfg"]["pool_type"] == "tok" and build_model().visual.pool_type == "tok"
    state = load_file(str(WEIGHTS_PATH))
    avg_path, plain_path = tmp_path / "avg.safetensors", tmp_path / "plain.safetensors"
    save_file(state, str(avg_path), metadata={"pool_type": "avg"})
    save_file(state, str(plain_path))
    avg_model, _, _ = pg.load(weights=avg_path)
    assert avg_model.visual.pool_type == "avg" and pg.load(weights=plain_path)[0].visual.pool_type == "avg"
    x, _, _ = pg.render(["star", "cup"], ["sketch"], n_per_cell=2, seed=FRESH_SEED)
    v = model.visual
    tokens = []
    hook = v.transformer.register_forward_hook(lambda m, a, o: tokens.append(o))
    with torch.no_grad():
        tok, avg = model.encode_image(x), avg_model.encode_image(x)
    hook.remove()
    with torch.no_grad():
        out = v.ln_post(tokens[0])
        torch.testing.assert_close(avg, out[:, 1:].mean(1) @ v.proj, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok, out[:, 0] @ v.proj, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(avg, tok, atol=1e-2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"pool_type": "max"})
    with pytest.raises(ValueError, match="pool_type='max'"):
        pg.load(weights=bad)
    with pytest.raises(ValueError, match="pool_type='first'"):
        build_model("first")


def test_depth_follows_the_checkpoint(tmp_path):
    """A tower of another depth (``vision_layers``) is recorded in the checkpoint's metadata and rebuilt
    from it by pg.load; the shipped checkpoint says nothing and has the config's depth."""
    from safetensors.torch import save_file

    from clipforget_fast.proving_ground.model import build_model, checkpoint_vision_layers

    layers = pg.register()["vision_cfg"]["layers"]
    assert checkpoint_vision_layers(WEIGHTS_PATH) == layers
    assert len(build_model().visual.transformer.resblocks) == layers
    torch.manual_seed(0)
    deeper = build_model("tok", layers + 2).eval()
    assert len(deeper.visual.transformer.resblocks) == layers + 2
    path = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(path),
              metadata={"pool_type": "tok", "vision_layers": str(layers + 2)})
    back, _, _ = pg.load(weights=path)
    x, _, _ = pg.render(["star"], ["photo"], n_per_cell=2, seed=FRESH_SEED)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(x), deeper.encode_image(x), rtol=0, atol=0)
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(path),
              metadata={"pool_type": "tok"})
    with pytest.raises(RuntimeError, match="resblocks"):      # the config's depth does not fit these weights
        pg.load(weights=path)
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(path),
              metadata={"pool_type": "tok", "vision_layers": "six"})
    with pytest.raises(ValueError, match="vision_layers='six'"):
        pg.load(weights=path)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="vision_layers"):
            build_model("tok", bad)


def test_checkpoint_size():
    assert WEIGHTS_PATH.stat().st_size <= 25 * 1024 * 1024


def test_package_is_self_contained():
    # proving_ground may import only itself within clipforget_fast
    for f in Path(pg.__file__).parent.glob("*.py"):
        src = f.read_text()
        assert "from .." not in src and "import clipforget_fast" not in src, f.name
        assert "from clipforget_fast" not in src, f.name


def test_metrics_reject_bad_mode(loaded):
    model, tokenizer, _ = loaded
    x, c, d = pg.render(["circle"], ["photo"], 1, seed=0)
    with pytest.raises(ValueError, match="sideways"):
        metrics.zero_shot_accuracy(model, tokenizer, x, c, d, ["circle"], ["photo"], mode="sideways")


# Thresholds set on the first model trained here (average-pooled, first stage) from its worst domain on
# 30 fresh renders per cell: domain-aware 93.7 % (pixel_art), agnostic 79.5 % (pixel_art), domain
# discrimination 98.5 % (cartoon); the committed class-token model's worst over three such sets
# (MODEL_CARD.md) is 95.2 %, 90.0 % and 98.3 %, so they hold with margin. Here 3 renders per cell give
# 60 images per domain, a binomial standard error of 3.1, 5.2 and 1.6 points; each bound sits about 2.5 standard errors (and at least 8 points) below the
# first-stage measurement. An untrained or foreign checkpoint scores near chance: 5 % for classes,
# 20 % for domains.
DA_MIN, AG_MIN, DD_MIN = 0.85, 0.65, 0.90


def test_committed_checkpoint_is_trained(loaded):
    model, tokenizer, _ = loaded
    x, c, d = pg.render(pg.CLASSES, pg.DOMAINS, n_per_cell=3, seed=FRESH_SEED)
    res = metrics.evaluate(model, tokenizer, x, c, d, pg.CLASSES, pg.DOMAINS)
    for dom in pg.DOMAINS:
        assert res["domain_aware"]["per_domain"][dom] >= DA_MIN, (dom, res["domain_aware"])
        assert res["agnostic"]["per_domain"][dom] >= AG_MIN, (dom, res["agnostic"])
        assert res["domain_discrimination"]["per_domain"][dom] >= DD_MIN, (dom, res["domain_discrimination"])
