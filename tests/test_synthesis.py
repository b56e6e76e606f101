import pytest
import torch

from clipforget_fast import ForgetConfig, ForgetSpec
from clipforget_fast.layers import encode_image, image_geometry
from clipforget_fast.synthesis import initial_noise, synthesize, translate
from clipforget_fast.text import class_embeddings


def _setup(model, tokenizer, vocab):
    classes, domains = vocab
    spec = ForgetSpec(classes, domains, forget_classes=[classes[0]])
    text = class_embeddings(model, tokenizer, [spec.prompts(c) for c in spec.cells], "cpu")
    target = torch.arange(len(spec.cells)).repeat_interleave(2)
    return text, target


def test_synthesis_raises_target_probability(tiny_clip, tokenizer, vocab):
    text, target = _setup(tiny_clip, tokenizer, vocab)
    base = ForgetConfig(accept_prob=1.0, jitter=1, blur_every=3, step_size=0.2, seed=3)
    start = synthesize(tiny_clip, text, target, base.replace(steps=1))
    end = synthesize(tiny_clip, text, target, base.replace(steps=40))
    # same seed → same starting noise; p(target) after 40 steps beats p(target) of the start
    assert end.final_prob.mean() > start.final_prob.mean()
    assert (end.final_prob > start.final_prob).float().mean() >= 0.9


def test_images_stay_in_pixel_range_and_params_stay_frozen(tiny_clip, tokenizer, vocab):
    text, target = _setup(tiny_clip, tokenizer, vocab)
    flags = [p.requires_grad for p in tiny_clip.parameters()]
    tiny_clip.train()
    tiny_clip.visual.eval()                                 # a model partly in training mode comes back so
    modes = [m.training for m in tiny_clip.modules()]
    res = synthesize(tiny_clip, text, target, ForgetConfig(steps=5, batch_size=7, step_size=1.0))
    (H, W), mean, std = image_geometry(tiny_clip)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    assert res.images.shape == (len(target), 3, H, W)
    assert (res.images >= lo.view(1, 3, 1, 1) - 1e-6).all() and (res.images <= hi.view(1, 3, 1, 1) + 1e-6).all()
    assert [p.requires_grad for p in tiny_clip.parameters()] == flags and tiny_clip.training
    assert [m.training for m in tiny_clip.modules()] == modes
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_accepted_prototypes_do_not_move(tiny_clip, tokenizer, vocab):
    text, target = _setup(tiny_clip, tokenizer, vocab)
    res = synthesize(tiny_clip, text, target, ForgetConfig(steps=10, accept_prob=1e-6, seed=5))
    assert res.accepted.all() and (res.steps == 1).all()
    (H, W), mean, std = image_geometry(tiny_clip)
    start = initial_noise(len(target), (H, W), (0 - mean) / std, (1 - mean) / std,
                          torch.Generator().manual_seed(5))
    torch.testing.assert_close(res.images, start)           # accepted at step 1: never moved


def test_min_steps_holds_acceptance_back(tiny_clip, tokenizer, vocab):
    text, target = _setup(tiny_clip, tokenizer, vocab)
    res = synthesize(tiny_clip, text, target, ForgetConfig(steps=10, accept_prob=1e-6, min_steps=3, seed=5))
    assert res.accepted.all() and (res.steps == 4).all()
    moved = synthesize(tiny_clip, text, target, ForgetConfig(steps=3, accept_prob=1.0, seed=5))
    assert not moved.accepted.any()
    torch.testing.assert_close(res.images, moved.images)   # accepted after three steps, as they stood then


@pytest.mark.parametrize("batch_size", [5, 64])
def test_acceptance_bookkeeping_for_any_chunking(tiny_clip, tokenizer, vocab, batch_size):
    text, target = _setup(tiny_clip, tokenizer, vocab)
    res = synthesize(tiny_clip, text, target, ForgetConfig(steps=3, batch_size=batch_size, accept_prob=0.5))
    assert res.accepted.shape == target.shape and res.steps.max() <= 3
    s = res.stats()
    assert s["prototypes"] == len(target) and 0 <= s["acceptance_rate"] <= 1


def test_translate_moves_images_towards_their_target_cells(tiny_clip, tokenizer, vocab):
    """``translate`` (the domain gate's examples near a domain's border): images moved by gradient ascent
    towards given cells score those cells higher, stay in the pixel range, and 0 steps leaves them."""
    text, _ = _setup(tiny_clip, tokenizer, vocab)
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    g = torch.Generator().manual_seed(5)
    (H, W), mean, std = image_geometry(tiny_clip)
    x = initial_noise(12, (H, W), (0 - mean) / std, (1 - mean) / std, g)
    target = torch.randint(len(text), (12,), generator=g)
    cfg = ForgetConfig(batch_size=5)                # batches of 5, 5 and 2

    def prob(images):
        with torch.no_grad():
            e = torch.nn.functional.normalize(encode_image(tiny_clip, images).float(), dim=-1)
            return (100 * e @ text.t()).softmax(-1).gather(1, target[:, None]).squeeze(1)

    flags = [p.requires_grad for p in tiny_clip.parameters()]
    moved = translate(tiny_clip, x, text, target, 15, cfg)
    assert moved.shape == x.shape and not torch.equal(moved, x)
    assert (prob(moved) > prob(x)).float().mean() >= 0.9
    lo, hi = ((0 - mean) / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    assert (moved >= lo - 1e-6).all() and (moved <= hi + 1e-6).all()
    assert [p.requires_grad for p in tiny_clip.parameters()] == flags
    assert torch.equal(translate(tiny_clip, x, text, target, 0, cfg), x)
    with torch.inference_mode():                    # a caller in inference mode gets the same images
        again = translate(tiny_clip, x.clone(), text.clone(), target.clone(), 15, cfg)
    torch.testing.assert_close(again, moved, atol=1e-5, rtol=0)
