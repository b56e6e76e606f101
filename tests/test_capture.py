"""Streaming Grams equal the explicit XᵀX of the features each layer sees."""
import pytest
import torch

from clipforget_fast.capture import GramCapture, without_projection
from clipforget_fast.layers import find_layers, text_pool_positions


def _explicit_inputs(module, run):
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        run()
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("policy", ["pooled", "all"])
def test_streaming_gram_equals_explicit(tiny_clip, tokenizer, policy):
    m = tiny_clip
    layers = find_layers(m, "proj+mlp+attn", last_blocks=1)
    tokens = tokenizer(["a photo of a dog.", "a sketch of a big red car.", "tree"])
    images = torch.randn(5, 3, 32, 32)
    with GramCapture(m, layers, policy) as cap:
        cap.text(tokens[:2], "F")
        cap.text(tokens[2:], "F")          # two batches fold into one moment
        cap.images(images, "R")
    eot = text_pool_positions(m, tokens)
    for layer in layers:
        if layer.kind == "proj":
            if layer.tower == "text":
                with without_projection(m, "text_projection"), torch.no_grad():
                    X = m.encode_text(tokens)
                group = "F"
            else:
                with without_projection(m.visual, "proj"), torch.no_grad():
                    X = m.encode_image(images)
                group = "R"
        elif layer.tower == "text":
            with torch.no_grad():
                x = _explicit_inputs(layer.tap, lambda: m.encode_text(tokens))      # [B, L, D]
            if policy == "pooled":
                X = x[torch.arange(3), eot]
            else:
                X = torch.cat([x[i, : int(eot[i]) + 1] for i in range(3)])
            group = "F"
        else:
            with torch.no_grad():
                x = _explicit_inputs(layer.tap, lambda: m.encode_image(images))
            X = x[:, 0] if policy == "pooled" else x.reshape(-1, x.shape[-1])
            group = "R"
        other = "R" if group == "F" else "F"
        G = cap.grams[layer.name]
        torch.testing.assert_close(G[group], X.t() @ X, rtol=1e-4, atol=1e-4)
        assert cap.counts[layer.name][group] == X.shape[0]
        assert G[other].abs().max() == 0 and cap.counts[layer.name][other] == 0


def test_projection_is_restored_after_capture(tiny_clip, tokenizer):
    proj = tiny_clip.visual.proj
    with GramCapture(tiny_clip, find_layers(tiny_clip, "proj")) as cap:
        cap.images(torch.randn(2, 3, 32, 32), "F")
    assert tiny_clip.visual.proj is proj
    assert all(len(l.tap._forward_pre_hooks) == 0 for l in find_layers(tiny_clip, "proj+mlp") if l.tap is not None)


@pytest.mark.parametrize("text_pool", ["first", "last"])
def test_clipa_pooling_feeds_the_tokens_the_towers_pool(tokenizer, text_pool):
    """Towers pooled as CLIPA's are (text: the first or last position, no causal mask; image: the mean of
    the patch tokens): the pooled rows are those the towers read, "all" keeps every text position."""
    import open_clip

    torch.manual_seed(0)
    m = open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                                                           head_width=32, pool_type="avg"),
                             text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2,
                                           pool_type=text_pool, no_causal_mask=True)).eval()
    layers = [l for l in find_layers(m, "proj+mlp", last_blocks=1) if l.kind == "mlp"]
    tokens = tokenizer(["a photo of a dog.", "a sketch of a big red car."])
    images = torch.randn(3, 3, 32, 32)
    pos = 0 if text_pool == "first" else tokens.shape[1] - 1
    assert text_pool_positions(m, tokens).tolist() == [pos, pos]
    for policy in ("pooled", "all"):
        with GramCapture(m, layers, policy) as cap:
            cap.text(tokens, "F")
            cap.images(images, "R")
        for layer in layers:
            with torch.no_grad():
                if layer.tower == "text":
                    x = _explicit_inputs(layer.tap, lambda: m.encode_text(tokens))
                    X = x[:, pos] if policy == "pooled" else x.reshape(-1, x.shape[-1])
                    group = "F"
                else:
                    x = _explicit_inputs(layer.tap, lambda: m.encode_image(images))
                    X = x[:, 1:].mean(1) if policy == "pooled" else x.reshape(-1, x.shape[-1])
                    group = "R"
            torch.testing.assert_close(cap.grams[layer.name][group], X.t() @ X, rtol=1e-4, atol=1e-4)


def test_unknown_pooling_is_named(tiny_clip):
    from clipforget_fast.layers import check_model

    tiny_clip.text_pool_type = "mean"
    with pytest.raises(TypeError, match="pools by 'mean'"):
        check_model(tiny_clip)
