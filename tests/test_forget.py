"""End to end on a tiny random open_clip model: all three modes, composition, bad inputs."""

import pytest
import torch
from torch import nn

from clipforget_fast import ForgetConfig, ForgetSpec, Patch, forget
from clipforget_fast.layers import encode_image

from conftest import make_tiny_clip

# the projection edit exercises every stage (synthesis, capture, nullspace on both towers)
FAST = ForgetConfig(prototypes_per_cell=2, steps=8, batch_size=64, edit="project")


@pytest.mark.parametrize("kw", [dict(forget_classes=["dog"]),
                                dict(forget_classes=["dog"], forget_domains=["sketch"]),
                                dict(forget_domains=["sketch"])])
@pytest.mark.parametrize("targets", ["proj", "proj+mlp"])
def test_forget_all_modes(tiny_clip, tokenizer, vocab, kw, targets):
    spec = ForgetSpec(*vocab, **kw)
    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    patch = forget(tiny_clip, tokenizer, spec, FAST.replace(targets=targets))
    for k, v in tiny_clip.state_dict().items():
        assert torch.equal(v, state[k]), f"forget() modified {k}"
    assert patch.entries, "no layer got a forget direction"
    assert set(patch.timings) == {"prompts", "synthesis", "capture", "nullspace", "self_check"}
    assert patch.spec["mode"] == spec.mode and patch.config["targets"] == targets
    for e in patch.entries:
        torch.testing.assert_close(e.B.t() @ e.B, torch.eye(e.rank), atol=1e-4, rtol=0)
    # the patched model's kept-cell text features change little; forget-cell features lose the
    # directions the patch removed (checked through the patch's own basis on the projection)
    patch.apply(tiny_clip)
    patch.revert(tiny_clip)
    for k, v in tiny_clip.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw, edit", [(dict(forget_classes=["dog", "car"]), "class-redirect"),
                                      (dict(forget_classes=["dog"], forget_domains=["sketch"]), "domain-gate"),
                                      (dict(forget_domains=["sketch"]), "domain-gate")])
@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_auto_edit_follows_the_request(tiny_clip, tokenizer, vocab, kw, edit, pool):
    """A class-token tower takes the domain gate for some classes, or all, in some domains; an
    average-pooled one has no site for it and takes the class redirect there, or the projection when
    every class is forgotten."""
    tiny_clip.visual.pool_type = pool
    if edit == "domain-gate" and pool == "avg":
        edit = "project" if "forget_classes" not in kw else "class-redirect"
    spec = ForgetSpec(*vocab, **kw)
    cfg = FAST.replace(edit="auto")
    assert cfg.edit_for(spec, gate_site=pool == "tok") == edit
    patch = forget(tiny_clip, tokenizer, spec, cfg)
    assert patch.info["edit"] == edit
    if edit == "domain-gate":                             # the last image block's MLP
        mlp = "visual.transformer.resblocks.1.mlp"
        assert [e.name for e in patch.entries] == [f"{mlp}.c_fc.weight", f"{mlp}.c_fc.bias", f"{mlp}.c_proj.weight"]
        return
    assert patch.info["retain_energy"] == {"project": 0.99, "class-redirect": 0.9999}[edit]
    if edit == "class-redirect":                          # text projection only
        assert {e.name for e in patch.entries} == {"text_projection"}
        # prototypes only where a class is kept in other domains (they place its pseudo images)
        assert ("synthesis" in patch.timings) == (spec.mode == "domain")
    else:
        assert {e.name for e in patch.entries} == {"text_projection", "visual.proj"}


def test_auto_edit_falls_back_to_projection(vocab):
    spec = ForgetSpec(*vocab, forget_classes=["dog"])
    assert ForgetConfig().edit == "auto" and ForgetConfig().edit_for(spec) == "class-redirect"
    assert ForgetConfig(use_text=False).edit_for(spec) == "project"       # nothing on the text side
    assert ForgetConfig(targets="mlp").edit_for(spec) == "project"        # no projection targeted
    assert ForgetConfig(edit="project").edit_for(spec) == "project"
    # a class forgotten in some domains only needs prototypes for the redirect
    cells = ForgetSpec.from_cells(*vocab, [("dog", d) for d in vocab[1]] + [("car", vocab[1][0])])
    assert ForgetConfig().edit_for(cells) == "class-redirect"
    assert ForgetConfig(prototypes_per_cell=0).edit_for(cells) == "project"
    assert ForgetConfig(prototypes_per_cell=0).edit_for(spec) == "class-redirect"
    # every class forgotten somewhere: nothing holds the text side; the domain gate where the model has
    # its site and there are prototypes
    whole = ForgetSpec(*vocab, forget_domains=["photo"])
    assert ForgetConfig().edit_for(whole) == "project"
    assert ForgetConfig().edit_for(whole, gate_site=True) == "domain-gate"
    assert ForgetConfig(prototypes_per_cell=0).edit_for(whole, gate_site=True) == "project"
    assert ForgetConfig(edit="domain-gate").edit_for(whole) == "domain-gate"
    # some classes in some domains: the gate where the model has its site and there are prototypes
    part = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    assert ForgetConfig().edit_for(part, gate_site=True) == "domain-gate"
    assert ForgetConfig(prototypes_per_cell=0).edit_for(part, gate_site=True) == "project"
    assert ForgetConfig().edit_for(ForgetSpec(*vocab, forget_classes=["dog"]), gate_site=True) == "class-redirect"
    # ... not with one class (no other to take its images), nor without a kept cell of another domain
    one = ForgetSpec(["dog"], vocab[1], forget_classes=["dog"], forget_domains=["sketch"])
    assert ForgetConfig().edit_for(one, gate_site=True) == "project"
    bare = ForgetSpec.from_cells(*vocab, [("dog", "sketch")], [("cat", "sketch")])
    assert ForgetConfig().edit_for(bare, gate_site=True) != "domain-gate"
    assert ForgetConfig().retain_energy_for("domain-gate") is None
    assert ForgetConfig(retain_energy=0.5).retain_energy_for("class-redirect") == 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw, edit", [(dict(forget_classes=["dog"]), "class-redirect"),
                                      (dict(forget_classes=["dog"], forget_domains=["sketch"]), "domain-gate"),
                                      (dict(forget_domains=["sketch"]), "domain-gate"),
                                      (dict(forget_domains=["sketch"]), "project")])
def test_forget_a_half_precision_model_on_the_cpu(tokenizer, vocab, dtype, kw, edit):
    """A bf16 or fp16 model where no autocast runs (the CPU): every edit computes its patch (the pixels
    meet the tower in its dtype), and the patched model embeds finite features."""
    model = make_tiny_clip().to(dtype)
    cfg = FAST.replace(edit=edit, gate_translate_steps=4)
    patch = forget(model, tokenizer, ForgetSpec(*vocab, **kw), cfg)
    assert patch.info["edit"] == edit and patch.entries
    with torch.no_grad(), patch.applied(model):
        e = encode_image(model, torch.randn(6, 3, 32, 32))
    assert e.dtype == dtype and bool(e.float().isfinite().all())


@pytest.mark.parametrize("edit", ["auto", "project"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_forget_under_no_grad_or_inference_mode(tiny_clip, tokenizer, vocab, edit, mode):
    # synthesis and the class-shift fit need gradients whatever the caller's mode
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    cfg = FAST.replace(edit=edit)
    plain = forget(tiny_clip, tokenizer, spec, cfg)
    with mode():
        inside = forget(tiny_clip, tokenizer, spec, cfg)
    assert [e.name for e in inside.entries] == [e.name for e in plain.entries]
    for a, b in zip(inside.entries, plain.entries):
        torch.testing.assert_close(a.A @ a.B.t(), b.A @ b.B.t(), rtol=1e-4, atol=1e-5)
    inside.apply(tiny_clip)
    inside.revert(tiny_clip)


def test_self_check_scores_the_patch_on_its_prototypes(tiny_clip, tokenizer, vocab, caplog):
    from clipforget_fast import evaluate, synthesize_prototypes

    classes, domains = vocab
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    cfg = FAST.replace(steps=30, targets="proj+mlp")
    base = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    patch = forget(tiny_clip, tokenizer, spec, cfg)
    for k, v in tiny_clip.state_dict().items():
        assert torch.equal(v, base[k]), k                      # the check's apply leaves no trace
    check = patch.info["self_check"]
    assert set(check) >= {"forgotten", "same_class_other_domains", "kept", "warnings"}
    # the same numbers as evaluate() on the same prototypes, without and with the patch applied
    bank = synthesize_prototypes(tiny_clip, tokenizer, spec, cfg)
    cells = spec.cells
    images = torch.cat([bank.images[c] for c in cells])
    ci = torch.tensor([classes.index(c) for c, _ in cells]).repeat_interleave(cfg.prototypes_per_cell)
    di = torch.tensor([domains.index(d) for _, d in cells]).repeat_interleave(cfg.prototypes_per_cell)
    kw = dict(templates=spec.templates)
    before = evaluate(tiny_clip, tokenizer, images, ci, di, classes, domains, **kw)
    patch.apply(tiny_clip)
    after = evaluate(tiny_clip, tokenizer, images, ci, di, classes, domains, **kw)
    patch.revert(tiny_clip)
    same = {x for x in spec.retain_cells if x[0] == "dog"}
    for name, group in (("forgotten", spec.forget_cells), ("same_class_other_domains", same),
                        ("kept", spec.retain_cells - same)):
        assert check[name] == {"before": round(before.cell_mean(group), 4), "after": round(after.cell_mean(group), 4)}
    # a patch that removes nothing (alpha 0) leaves the forgotten prototypes recognized: it says so
    # (every class @ sketch: 8 prototypes, all recognized before, 8 of 8 is no chance + 10 points)
    caplog.clear()
    idle = forget(tiny_clip, tokenizer, ForgetSpec(*vocab, forget_domains=["sketch"]), cfg.replace(alpha=0.0))
    chk = idle.info["self_check"]
    assert chk["forgotten"] == {"before": 1.0, "after": 1.0}
    assert any("still recognized 100% of the time (8 of 8" in w for w in chk["warnings"])
    assert "self-check on the prototypes" in caplog.text
    # one forgotten cell of 2 prototypes, both recognized: too few to say (2 of 2 happens 12 % of the
    # time at chance + 10 points), so no warning
    few = forget(tiny_clip, tokenizer, spec, cfg.replace(alpha=0.0)).info["self_check"]
    assert few["forgotten"] == {"before": 1.0, "after": 1.0} and not any("recognized" in w for w in few["warnings"])
    off = forget(tiny_clip, tokenizer, spec, cfg.replace(self_check=False))
    assert off.info["self_check"] is None and "self_check" not in off.timings


@pytest.mark.parametrize("kw, edit", [(dict(forget_classes=["dog"], forget_domains=["sketch"]), "project"),
                                      (dict(forget_classes=["dog"], forget_domains=["sketch"]), "class-redirect")])
def test_self_check_reprojects_the_prompts_when_only_the_text_projection_moves(tiny_clip, tokenizer, vocab,
                                                                              monkeypatch, kw, edit):
    # the prompts' embeddings under a patch that edits no text layer but the projection are the
    # prompts stage's inputs to it through the patched weight: the same scores as evaluate() gives,
    # without running the text tower again
    from clipforget_fast import evaluate, pipeline, synthesize_prototypes

    classes, domains = vocab
    spec = ForgetSpec(*vocab, **kw)
    cfg = FAST.replace(steps=30, targets="proj", edit=edit)

    def no_text_tower(*a, **k):
        raise AssertionError("the self-check ran the text tower again")

    monkeypatch.setattr(pipeline, "class_embeddings", no_text_tower)
    patch = forget(tiny_clip, tokenizer, spec, cfg)
    monkeypatch.undo()
    assert "text_projection" in {e.name for e in patch.entries}
    check = patch.info["self_check"]
    bank = synthesize_prototypes(tiny_clip, tokenizer, spec, cfg)
    cells = spec.cells
    images = torch.cat([bank.images[c] for c in cells])
    ci = torch.tensor([classes.index(c) for c, _ in cells]).repeat_interleave(cfg.prototypes_per_cell)
    di = torch.tensor([domains.index(d) for _, d in cells]).repeat_interleave(cfg.prototypes_per_cell)
    before = evaluate(tiny_clip, tokenizer, images, ci, di, classes, domains, templates=spec.templates)
    with patch.applied(tiny_clip):
        after = evaluate(tiny_clip, tokenizer, images, ci, di, classes, domains, templates=spec.templates)
    same = {x for x in spec.retain_cells if x[0] == "dog"}
    for name, group in (("forgotten", spec.forget_cells), ("same_class_other_domains", same),
                        ("kept", spec.retain_cells - same)):
        assert check[name] == {"before": round(before.cell_mean(group), 4), "after": round(after.cell_mean(group), 4)}
    if edit == "class-redirect":            # it moves the forgotten prompts: the scores see the patch
        assert check["forgotten"]["after"] < check["forgotten"]["before"]


def test_self_check_thresholds():
    from clipforget_fast import pipeline as fg

    # exact binomial tails: P(X ≥ 3 | n=3, p=.5) = 1/8; P(X ≥ 2 | n=2, p=.15) = .0225; P(X ≥ 0) = 1
    assert fg._binomial_tail(3, 3, 0.5) == pytest.approx(0.125)
    assert fg._binomial_tail(2, 2, 0.15) == pytest.approx(0.0225)
    assert fg._binomial_tail(4, 10, 0.3) == pytest.approx(0.3503892816, rel=1e-8)
    assert fg._binomial_tail(0, 5, 0.5) == 1.0
    # a kept group: 3 lost, none gained happens 1 time in 8 at random (no warning); 5 lost, 1 in 32
    assert not fg._kept_group_warns(19.0, 3, 0)
    assert fg._kept_group_warns(19.0, 5, 0)
    assert not fg._kept_group_warns(4.0, 5, 0)            # a small drop is not worth a warning
    assert not fg._kept_group_warns(30.0, 9, 4)           # 9 of 13 flips: p = .13
    assert fg._kept_group_warns(30.0, 11, 1)              # 11 of 12: p = .003


def test_text_only_and_prototypes_only(tiny_clip, tokenizer, vocab):
    spec = ForgetSpec(*vocab, forget_classes=["cat"])
    text_only = forget(tiny_clip, tokenizer, spec, FAST.replace(use_prototypes=False))
    assert {e.name for e in text_only.entries} == {"text_projection"}
    assert "synthesis" not in text_only.timings
    protos = forget(tiny_clip, tokenizer, spec, FAST.replace(use_text=False))
    assert {e.name for e in protos.entries} == {"visual.proj"}


def test_sequential_requests_compose(tiny_clip, tokenizer, vocab):
    cfg = FAST.replace(use_prototypes=False)
    pa = forget(tiny_clip, tokenizer, ForgetSpec(*vocab, forget_classes=["dog"]), cfg)
    pa.apply(tiny_clip)
    pb = forget(tiny_clip, tokenizer, ForgetSpec(*vocab, forget_classes=["car"]), cfg)
    pb.apply(tiny_clip)                                   # hashes: computed on the patched model
    W = tiny_clip.text_projection.detach()                # [d_in, d_out], y = x W
    Ba = pa.entries[0].B
    Bb = pb.entries[0].B
    assert (Ba.t() @ Bb).abs().max() < 1e-4               # B's directions keep clear of A's
    assert torch.linalg.norm(Ba.t() @ W) <= 1e-5 * torch.linalg.norm(W)   # A still forgotten
    assert torch.linalg.norm(Bb.t() @ W) <= 1e-5 * torch.linalg.norm(W)
    pb.revert(tiny_clip)
    pa.revert(tiny_clip)


def test_patch_round_trip_through_disk_applies(tmp_path, tiny_clip, tokenizer, vocab):
    patch = forget(tiny_clip, tokenizer, ForgetSpec(*vocab, forget_domains=["photo"]), FAST)
    loaded = Patch.load(patch.save(tmp_path / "forget_photo.safetensors"))
    assert ForgetSpec.from_dict(loaded.spec).forget_cells == {(c, "photo") for c in vocab[0]}
    assert ForgetConfig.from_dict(loaded.config) == FAST
    loaded.apply(tiny_clip)


def test_bad_inputs(tiny_clip, tokenizer, vocab):
    spec = ForgetSpec(*vocab, forget_classes=["dog"])
    with pytest.raises(TypeError, match="open_clip"):
        forget(nn.Linear(3, 3), tokenizer, spec)
    with pytest.raises(TypeError, match="ForgetSpec"):
        forget(tiny_clip, tokenizer, {"forget": "dog"})
    with pytest.raises(TypeError, match="ForgetConfig"):
        forget(tiny_clip, tokenizer, spec, {"alpha": 1})
    with pytest.raises(TypeError, match="tokenizer"):
        forget(tiny_clip, "not a tokenizer", spec)
    with pytest.raises(ValueError, match="selects no layer"):
        forget(tiny_clip, tokenizer, spec, FAST.replace(use_text=False, prototypes_per_cell=0))
    with pytest.raises(TypeError, match="PrototypeBank"):
        forget(tiny_clip, tokenizer, spec, FAST, prototypes="bank.safetensors")
    with pytest.raises(ValueError, match="config.device is 'meta'"):
        forget(tiny_clip, tokenizer, spec, FAST.replace(device="meta"))
    classes, domains = vocab                       # a class in no cell: the classifier would have no row
    partial = ForgetSpec.from_cells(classes, domains, [("dog", "sketch")],
                                    [(c, d) for c in classes[:-1] for d in domains if (c, d) != ("dog", "sketch")])
    with pytest.raises(ValueError, match=rf"\['{classes[-1]}'\] are in the request's vocabulary but in none"):
        forget(tiny_clip, tokenizer, partial, FAST)


def test_a_request_kept_cell_by_cell_takes_the_gate(tiny_clip, tokenizer, vocab):
    """A request given cell by cell whose keep set leaves out some cells (here dog in pixel art): the
    gate translates prototypes only into cells the request has."""
    classes, domains = vocab
    spec = ForgetSpec.from_cells(classes, domains, [("dog", "sketch")],
                                 [(c, d) for c in classes for d in domains if (c, d) not in {("dog", "sketch"),
                                                                                              ("dog", "pixel_art")}])
    patch = forget(tiny_clip, tokenizer, spec, FAST.replace(edit="domain-gate", gate_translate_steps=2))
    assert patch.info["edit"] == "domain-gate" and patch.entries


def test_resnet_image_tower_is_refused(tokenizer):
    import open_clip

    m = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8),
                             text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=1))
    with pytest.raises(TypeError, match="VisionTransformer"):
        forget(m, tokenizer, ForgetSpec(["a", "b"], ["photo"], forget_classes=["a"]))


def test_prototype_bank_is_reused(tiny_clip, tokenizer, vocab):
    from clipforget_fast import synthesize_prototypes

    spec = ForgetSpec(*vocab, forget_classes=["dog"])
    bank = synthesize_prototypes(tiny_clip, tokenizer, spec, FAST)
    assert set(bank.images) == set(spec.cells) and all(v.shape[0] == 2 for v in bank.images.values())
    p1 = forget(tiny_clip, tokenizer, spec, FAST, prototypes=bank)
    assert "synthesis" not in p1.timings and p1.info["synthesis"]["reused_cells"] == len(spec.cells)
    # the same seed synthesizes the same prototypes: the bank-fed patch equals one made from scratch
    p2 = forget(tiny_clip, tokenizer, spec, FAST)
    vis1 = next(e for e in p1.entries if e.name == "visual.proj")
    vis2 = next(e for e in p2.entries if e.name == "visual.proj")
    torch.testing.assert_close(vis1.A @ vis1.B.t(), vis2.A @ vis2.B.t(), rtol=1e-4, atol=1e-5)


def test_prototype_bank_saves_and_loads(tiny_clip, tokenizer, vocab, tmp_path):
    from clipforget_fast import synthesize_prototypes
    from clipforget_fast.layers import image_tower_fingerprint
    from clipforget_fast.synthesis import PrototypeBank

    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    bank = synthesize_prototypes(tiny_clip, tokenizer, spec, FAST)
    assert bank.source["image_tower"] == image_tower_fingerprint(tiny_clip)
    assert bank.source["synthesis"]["steps"] == FAST.steps
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = PrototypeBank.load(path)
    assert list(loaded.images) == list(bank.images) and loaded.stats == bank.stats and loaded.source == bank.source
    for c in bank.images:
        assert torch.equal(loaded.images[c], bank.images[c]) and torch.equal(loaded.accepted[c], bank.accepted[c])
    a = forget(tiny_clip, tokenizer, spec, FAST, prototypes=bank)
    b = forget(tiny_clip, tokenizer, spec, FAST, prototypes=loaded)
    assert [(e.name, e.rank) for e in a.entries] == [(e.name, e.rank) for e in b.entries]
    for ea, eb in zip(a.entries, b.entries):
        assert torch.equal(ea.A, eb.A) and torch.equal(ea.B, eb.B)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        bank.save(tmp_path / "bank.pt")
    with pytest.raises(ValueError, match="no prototype bank at"):
        PrototypeBank.load(tmp_path / "none.safetensors")
    a.save(tmp_path / "patch.safetensors")
    with pytest.raises(ValueError, match="not a clipforget prototype bank"):
        PrototypeBank.load(tmp_path / "patch.safetensors")


def test_prototype_bank_of_another_tower(tiny_clip, tokenizer, vocab, caplog):
    from clipforget_fast import synthesize_prototypes

    from conftest import make_tiny_clip

    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    bank = synthesize_prototypes(tiny_clip, tokenizer, spec, FAST)
    with pytest.raises(ValueError, match="another image tower"):
        forget(make_tiny_clip(width=96), tokenizer, spec, FAST, prototypes=bank)
    with caplog.at_level("WARNING", logger="clipforget_fast.pipeline"):
        forget(make_tiny_clip(seed=1), tokenizer, spec, FAST, prototypes=bank)
    assert "other image-tower weights" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipforget_fast.pipeline"):
        forget(tiny_clip, tokenizer, spec, FAST, prototypes=bank)
    assert "image-tower weights" not in caplog.text
