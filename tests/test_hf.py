"""Hugging Face CLIPModel: the same network held as an open_clip CLIP and as a transformers CLIPModel
(weights copied across) must give the same features, the same Grams and the same patch, and the
HF patch must apply, revert and reload on the HF model.

The HF tokenizer is a real ``CLIPTokenizer`` built from open_clip's bundled BPE vocabulary, so both
models read the same token ids without any download.
"""
import gzip

import pytest
import torch

transformers = pytest.importorskip("transformers")

from clipforget_fast import ForgetConfig, ForgetSpec, Patch, evaluate, forget  # noqa: E402
from clipforget_fast.capture import GramCapture  # noqa: E402
from clipforget_fast.layers import (check_model, encode_image, encode_text, find_layers,  # noqa: E402
                                    image_geometry, is_hf_clip)
from clipforget_fast.text import tokenize  # noqa: E402

from conftest import make_tiny_clip  # noqa: E402

CTX = 32


def hf_tokenizer():
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)},
                                      merges=[tuple(m.split()) for m in merges], model_max_length=77)


def to_hf(oc) -> "transformers.CLIPModel":
    """A transformers CLIPModel holding the weights of the open_clip CLIP ``oc`` (the toy config of
    conftest.make_tiny_clip: class-token pooling, learned positions, exact GELU)."""
    v, width = oc.visual, oc.visual.conv1.out_channels
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=oc.vocab_size, hidden_size=oc.transformer.width,
                         intermediate_size=oc.transformer.resblocks[0].mlp.c_fc.out_features,
                         num_hidden_layers=len(oc.transformer.resblocks),
                         num_attention_heads=oc.transformer.resblocks[0].attn.num_heads,
                         max_position_embeddings=oc.context_length, hidden_act="gelu"),
        vision_config=dict(hidden_size=width, intermediate_size=v.transformer.resblocks[0].mlp.c_fc.out_features,
                           num_hidden_layers=len(v.transformer.resblocks),
                           num_attention_heads=v.transformer.resblocks[0].attn.num_heads,
                           image_size=v.image_size[0], patch_size=v.patch_size[0], hidden_act="gelu"),
        projection_dim=v.proj.shape[1])
    hf = transformers.CLIPModel(cfg).eval()
    sd = {"logit_scale": oc.logit_scale,
          "text_model.embeddings.token_embedding.weight": oc.token_embedding.weight,
          "text_model.embeddings.position_embedding.weight": oc.positional_embedding,
          "text_model.final_layer_norm.weight": oc.ln_final.weight,
          "text_model.final_layer_norm.bias": oc.ln_final.bias,
          "text_projection.weight": oc.text_projection.t(),
          "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
          "vision_model.embeddings.class_embedding": v.class_embedding,
          "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
          "vision_model.pre_layrnorm.weight": v.ln_pre.weight, "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
          "vision_model.post_layernorm.weight": v.ln_post.weight, "vision_model.post_layernorm.bias": v.ln_post.bias,
          "visual_projection.weight": v.proj.t()}
    for tower, blocks in (("text_model", oc.transformer.resblocks), ("vision_model", v.transformer.resblocks)):
        for i, b in enumerate(blocks):
            p = f"{tower}.encoder.layers.{i}."
            for n, w, bias in zip("qkv", b.attn.in_proj_weight.chunk(3), b.attn.in_proj_bias.chunk(3)):
                sd[p + f"self_attn.{n}_proj.weight"], sd[p + f"self_attn.{n}_proj.bias"] = w, bias
            sd.update({p + "self_attn.out_proj.weight": b.attn.out_proj.weight,
                       p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
                       p + "layer_norm1.weight": b.ln_1.weight, p + "layer_norm1.bias": b.ln_1.bias,
                       p + "layer_norm2.weight": b.ln_2.weight, p + "layer_norm2.bias": b.ln_2.bias,
                       p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
                       p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias})
    missing, unexpected = hf.load_state_dict({k: t.detach().clone() for k, t in sd.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf


# open_clip name -> HF name of every weight an edit may target (block 1 = the last of two)
NAMES = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight",
         "visual.transformer.resblocks.1.mlp.c_proj.weight": "vision_model.encoder.layers.1.mlp.fc2.weight",
         "transformer.resblocks.1.mlp.c_proj.weight": "text_model.encoder.layers.1.mlp.fc2.weight"}


@pytest.fixture(scope="module")
def pair():
    oc = make_tiny_clip()
    return oc, to_hf(oc), hf_tokenizer()


@pytest.fixture(scope="module")
def oc_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CTX)


PROMPTS = ["a photo of a dog.", "a sketch of a tree in pixel art style.", "a car."]


def test_hf_tokenizer_reads_the_same_ids(pair, oc_tokenizer):
    _, hf, tok = pair
    a = tokenize(oc_tokenizer, PROMPTS, "cpu")
    b = tokenize(tok, PROMPTS, "cpu", CTX)
    assert b.shape[1] < a.shape[1], "HF prompts are padded to the longest, not to the context"
    n = b.shape[1]
    eot = a.argmax(1)
    for i in range(len(PROMPTS)):
        assert torch.equal(a[i, :eot[i] + 1], b[i, :eot[i] + 1])
    with pytest.raises(TypeError, match="tokenizer must be callable"):
        tokenize("not a tokenizer", PROMPTS, "cpu")
    assert n == int(eot.max()) + 1


def test_same_network_same_features(pair, oc_tokenizer):
    oc, hf, tok = pair
    assert is_hf_clip(hf) and not is_hf_clip(oc)
    check_model(hf)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encode_image(hf, x), encode_image(oc, x), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(encode_text(hf, tokenize(tok, PROMPTS, "cpu", CTX)),
                                   encode_text(oc, tokenize(oc_tokenizer, PROMPTS, "cpu")), atol=2e-5, rtol=1e-4)
    assert image_geometry(hf)[0] == image_geometry(oc)[0] == (32, 32)


def test_find_layers_names_and_shapes(pair):
    oc, hf, _ = pair
    lo = {l.name: l for l in find_layers(oc, "proj+mlp+attn", last_blocks=1)}
    lh = {l.name: l for l in find_layers(hf, "proj+mlp+attn", last_blocks=1)}
    assert len(lh) == len(lo) + 4               # the fused in_proj is three HF layers per tower
    for o, h in NAMES.items():
        assert lo[o].kind == lh[h].kind and lo[o].tower == lh[h].tower
        assert lo[o].weight_out_in().shape == lh[h].weight_out_in().shape
    for tower in ("vision_model", "text_model"):
        for p in "qkv":
            layer = lh[f"{tower}.encoder.layers.1.self_attn.{p}_proj.weight"]
            assert layer.kind == "attn_in" and layer.layout == "linear"
    assert [l.name for l in find_layers(hf, "mlp", last_blocks=2)] == [
        "vision_model.encoder.layers.0.mlp.fc2.weight", "vision_model.encoder.layers.1.mlp.fc2.weight",
        "text_model.encoder.layers.0.mlp.fc2.weight", "text_model.encoder.layers.1.mlp.fc2.weight"]


@pytest.mark.parametrize("policy", ["pooled", "all"])
def test_same_grams(pair, oc_tokenizer, policy):
    oc, hf, tok = pair
    x = torch.randn(4, 3, 32, 32)
    grams = []
    for model, t, names in ((oc, oc_tokenizer, list(NAMES)), (hf, tok, list(NAMES.values()))):
        layers = [l for l in find_layers(model, "proj+mlp", last_blocks=1)]
        with GramCapture(model, layers, policy) as cap:
            cap.text(tokenize(t, PROMPTS, "cpu", CTX), "F")
            cap.images(x, "R")
        grams.append([cap.grams[n] for n in names])
    for go, gh in zip(*grams):
        for g in ("F", "R"):
            torch.testing.assert_close(gh[g], go[g], atol=1e-3, rtol=1e-4)


def product(entry) -> torch.Tensor:
    return entry.A @ entry.B.t()                 # [d_out, d_in] change, free of the bases' signs


@pytest.mark.parametrize("kw, config", [
    (dict(forget_classes=["dog"]), ForgetConfig(prototypes_per_cell=2, steps=4, accept_prob=1.0, edit="project",
                                                targets="proj+mlp", last_blocks=1, solver="exact")),
    (dict(forget_classes=["dog", "car"]), ForgetConfig(prototypes_per_cell=0, solver="exact")),
])
def test_same_patch(pair, oc_tokenizer, vocab, kw, config):
    oc, hf, tok = pair
    spec = ForgetSpec(*vocab, **kw)
    po = forget(oc, oc_tokenizer, spec, config)
    ph = forget(hf, tok, spec, config)
    assert po.info["edit"] == ph.info["edit"]
    eo = {e.name: e for e in po.entries}
    eh = {e.name: e for e in ph.entries}
    assert set(eh) == {NAMES[n] for n in eo}
    for o, h in NAMES.items():
        if o in eo:
            assert eo[o].rank == eh[h].rank, o
            # fp32 feature differences (~1e-6) pass through an eigendecomposition and, for the class
            # redirect, a ridge solve: compare the whole change, relative to its size
            a, b = product(eo[o]), product(eh[h])
            assert float((b - a).norm() / a.norm()) < 1e-3, o


def test_hf_patch_applies_reverts_and_reloads(pair, vocab, tmp_path):
    _, hf, tok = pair
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    cfg = ForgetConfig(prototypes_per_cell=2, steps=8, edit="project", targets="proj+mlp+attn", last_blocks=1)
    patch = forget(hf, tok, spec, cfg)
    assert any("self_attn" in e.name for e in patch.entries) and any("fc2" in e.name for e in patch.entries)
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    path = tmp_path / "hf.safetensors"
    patch.save(path)
    loaded = Patch.load(path)
    loaded.apply(hf)
    try:
        for e in patch.entries:
            W = dict(hf.named_parameters())[e.name].detach()
            torch.testing.assert_close(W - base[e.name], product(e), atol=1e-5, rtol=0)
    finally:
        loaded.revert(hf)
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(v, base[k], atol=1e-5, rtol=0)


def test_evaluate_on_hf_matches_open_clip(pair, oc_tokenizer, vocab):
    oc, hf, tok = pair
    classes, domains = vocab
    x = torch.randn(12, 3, 32, 32)
    ci, di = torch.arange(12) % len(classes), torch.arange(12) % len(domains)
    a = evaluate(oc, oc_tokenizer, x, ci, di, classes, domains)
    b = evaluate(hf, tok, x, ci, di, classes, domains)
    assert torch.equal(a.correct, b.correct) and torch.equal(a.total, b.total)


def test_not_a_clip_model_is_named():
    with pytest.raises(TypeError, match="Hugging Face CLIPModel"):
        find_layers(torch.nn.Linear(3, 3))


def test_class_redirect_domain_request_on_hf(pair, vocab):
    """The class redirect of a domain request (the fitted class shift: synthesis, pseudo images, the
    shift's realization, the self-check) runs through the HF model's towers. (The default config gives
    this request the domain gate on a class-token tower, as an HF CLIPModel is.)"""
    _, hf, tok = pair
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    assert ForgetConfig().edit_for(spec, gate_site=True) == "domain-gate"
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    patch = forget(hf, tok, spec, ForgetConfig(prototypes_per_cell=2, steps=8, edit="class-redirect"))
    assert patch.info["edit"] == "class-redirect"
    assert [e.name for e in patch.entries] == ["text_projection.weight"]
    assert set(patch.info["redirect"]["realized"]) == {"dog"}
    assert set(patch.info["self_check"]) >= {"forgotten", "same_class_other_domains", "kept"}
    for k, v in hf.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_towers_apart_take_their_part_of_the_patch(pair, vocab):
    """CLIPVisionModelWithProjection / CLIPTextModelWithProjection name their weights as CLIPModel does:
    ``patch.only(tower)`` applied to a tower alone gives the features of the patched CLIPModel."""
    _, hf, tok = pair
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    patch = forget(hf, tok, spec, ForgetConfig(prototypes_per_cell=2, steps=8, edit="project", targets="proj+mlp",
                                               last_blocks=1))
    image, text = patch.only("image"), patch.only("text")
    assert {e.name for e in image.entries} == {"visual_projection.weight", "vision_model.encoder.layers.1.mlp.fc2.weight"}
    assert {e.name for e in text.entries} == {"text_projection.weight", "text_model.encoder.layers.1.mlp.fc2.weight"}
    cfg = hf.config
    vision = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**{**cfg.vision_config.to_dict(), "projection_dim": cfg.projection_dim})).eval()
    words = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**{**cfg.text_config.to_dict(), "projection_dim": cfg.projection_dim})).eval()
    sd = hf.state_dict()
    for tower in (vision, words):
        missing, unexpected = tower.load_state_dict({k: v for k, v in sd.items() if k in tower.state_dict()}, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing)
    x, ids = torch.randn(3, 3, 32, 32), tokenize(tok, PROMPTS, "cpu", CTX)
    with torch.no_grad(), patch.applied(hf), image.applied(vision), text.applied(words):
        torch.testing.assert_close(vision(pixel_values=x).image_embeds, encode_image(hf, x), atol=1e-5, rtol=0)
        torch.testing.assert_close(words(input_ids=ids).text_embeds, encode_text(hf, ids), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="which this model does not have"):
        patch.apply(vision)
    with pytest.raises(ValueError, match="tower='audio'"):
        patch.only("audio")


@pytest.mark.parametrize("source, solver", [("open_clip", "exact"), ("hf", "exact"), ("hf", "randomized")])
def test_patch_converted_to_the_other_family(oc_tokenizer, vocab, source, solver):
    """A patch computed on one family, converted for the same network held in the other, gives the same
    edited features there (projections, MLP outputs and the attention inputs: fused ↔ q, k, v; one basis
    for q, k and v, which read one input, with the randomized solver too). A fresh pair: other tests'
    apply/revert leave the shared one's weights a rounding away from their base."""
    oc = make_tiny_clip()
    hf, tok = to_hf(oc), hf_tokenizer()
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    cfg = ForgetConfig(prototypes_per_cell=2, steps=8, edit="project", targets="proj+mlp+attn", last_blocks=1,
                       solver=solver)
    src, dst = (oc, hf) if source == "open_clip" else (hf, oc)
    patch = forget(src, oc_tokenizer if src is oc else tok, spec, cfg)
    assert any("attn.in_proj_weight" in e.name or "self_attn" in e.name for e in patch.entries)
    qkv = [e.B for e in patch.entries if "self_attn" in e.name]
    assert all(torch.equal(b, qkv[0]) for b in qkv[1:3]) and all(torch.equal(b, qkv[3]) for b in qkv[4:6])
    moved = patch.converted(dst)
    names = {n for n, _ in dst.named_parameters()}
    assert all(e.name in names for e in moved.entries)
    assert len(moved.entries) == len(patch.entries) + (4 if source == "open_clip" else -4)   # per tower 1 fused ↔ 3
    x, ids = torch.randn(3, 3, 32, 32), tokenize(tok, PROMPTS, "cpu", CTX)
    oc_ids = tokenize(oc_tokenizer, PROMPTS, "cpu")
    with torch.no_grad(), patch.applied(src), moved.applied(dst):
        for f_oc, f_hf in ((encode_image(oc, x), encode_image(hf, x)), (encode_text(oc, oc_ids), encode_text(hf, ids))):
            torch.testing.assert_close(f_hf, f_oc, atol=2e-5, rtol=0)
    with torch.no_grad():                      # and the edit changed them (the comparison means something)
        with moved.applied(dst):
            after = encode_image(dst, x)
        assert (after - encode_image(dst, x)).abs().max() > 1e-3
    # another network's weights are named, unless forced
    other = to_hf(make_tiny_clip(seed=1)) if source == "open_clip" else make_tiny_clip(seed=1)
    with pytest.raises(ValueError, match="not the weight this patch was computed on"):
        patch.converted(other)
    assert len(patch.converted(other, force=True).entries) == len(moved.entries)
    again = patch.converted(src)                # already this family: a copy
    assert [e.name for e in again.entries] == [e.name for e in patch.entries]


def test_domain_gate_on_hf_and_converted(vocab):
    """The domain gate finds its site in a Hugging Face CLIPModel (layer_norm2, fc1, fc2, post_layernorm,
    visual_projection), and its patch (fc1's weight and bias, fc2's weight) converts to open_clip's
    c_fc / c_proj with the same edited image features."""
    oc = make_tiny_clip()
    hf, tok = to_hf(oc), hf_tokenizer()
    patch = forget(hf, tok, ForgetSpec(*vocab, forget_domains=["sketch"]),
                   ForgetConfig(prototypes_per_cell=2, steps=8, edit="domain-gate"))
    assert patch.info["edit"] == "domain-gate"
    mlp = "vision_model.encoder.layers.1.mlp"
    assert [e.name for e in patch.entries] == [f"{mlp}.fc1.weight", f"{mlp}.fc1.bias", f"{mlp}.fc2.weight"]
    moved = patch.converted(oc)
    oc_mlp = "visual.transformer.resblocks.1.mlp"
    assert [(e.name, e.layout) for e in moved.entries] == [(f"{oc_mlp}.c_fc.weight", "linear"),
                                                           (f"{oc_mlp}.c_fc.bias", "bias"),
                                                           (f"{oc_mlp}.c_proj.weight", "linear")]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = encode_image(oc, x)
        with patch.applied(hf), moved.applied(oc):
            torch.testing.assert_close(encode_image(hf, x), encode_image(oc, x), atol=2e-5, rtol=0)
            assert (encode_image(oc, x) - plain).abs().max() > 1e-3


def test_a_half_precision_hf_model_on_the_cpu(vocab):
    """A bf16 CLIPModel where no autocast runs (transformers casts the pixels to its patch embedding's
    dtype itself): the domain gate's patch computes and applies, with real examples in either dtype too,
    and the features stay finite."""
    hf, tok = to_hf(make_tiny_clip()).to(torch.bfloat16), hf_tokenizer()
    examples = {"sketch": torch.randn(3, 3, 32, 32, dtype=torch.bfloat16), "photo": torch.randn(2, 3, 32, 32)}
    patch = forget(hf, tok, ForgetSpec(*vocab, forget_domains=["sketch"]),
                   ForgetConfig(prototypes_per_cell=2, steps=8, edit="domain-gate", gate_translate_steps=4),
                   domain_examples=examples)
    assert patch.info["edit"] == "domain-gate" and patch.info["gate"]["examples"] == {"photo": 2, "sketch": 3}
    with torch.no_grad(), patch.applied(hf):
        e = encode_image(hf, torch.randn(3, 3, 32, 32))
    assert e.dtype == torch.bfloat16 and bool(e.float().isfinite().all())


def test_a_stack_converts_and_q_k_v_bases_fuse_up_to_rounding(vocab):
    """A stack computed on Hugging Face converts to open_clip on top of its converted first patch; q, k and
    v entries whose bases span one space, written in other bases (as patches solved apart were), fuse."""
    oc = make_tiny_clip()
    hf, tok = to_hf(oc), hf_tokenizer()
    cfg = ForgetConfig(prototypes_per_cell=2, steps=4, edit="project", targets="proj+mlp+attn", last_blocks=1)
    p1 = forget(hf, tok, ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"]), cfg)
    p1.apply(hf)
    p2 = forget(hf, tok, ForgetSpec(*vocab, forget_classes=["cat"], forget_domains=["photo"]), cfg)
    p1.revert(hf)
    g = torch.Generator().manual_seed(0)
    for e in p1.entries:
        if "k_proj" in e.name:                     # the same delta in a rotated basis
            R, _ = torch.linalg.qr(torch.randn(e.rank, e.rank, generator=g))
            e.A, e.B = e.A @ R, e.B @ R
    c1 = p1.converted(oc)
    c1.apply(oc)
    c2 = p2.converted(oc)                          # checked against the marks p1's conversion left
    c2.apply(oc)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = encode_image(oc, x)
        c2.revert(oc)
        c1.revert(oc)
        p1.apply(hf)
        p2.apply(hf)
        torch.testing.assert_close(encode_image(hf, x), got, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="not the weight this patch was computed on"):
        p2.converted(make_tiny_clip())             # p1 not under it
