"""The domain gate (clipforget_fast/gate.py): the neutral shift, the gate's on/off behaviour on a tiny
random open_clip model, its patch (bias entries included) and the requests and towers it refuses."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipforget_fast import ForgetConfig, ForgetSpec, Patch, PrototypeBank, forget, synthesize_prototypes
from clipforget_fast import gate, pipeline
from clipforget_fast.gate import gate_entries, neutral_shift, rewired_units
from clipforget_fast.layers import encode_image, gate_site
from clipforget_fast.pipeline import _domain_examples

from conftest import Rows, make_tiny_clip

OFF = dict(device_type="cpu", enabled=False)


def scores(emb, T):
    return F.normalize(emb, dim=-1) @ F.normalize(T, dim=-1).t()


def test_neutral_shift_scores_every_class_alike():
    torch.manual_seed(1)
    width, E, k = 24, 16, 6
    ln = nn.LayerNorm(width)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.3)             # the bias alone favours some classes: the shift must undo that too
    proj, T, y = torch.randn(width, E), torch.randn(k, E), 3 * torch.randn(10, width) + 1
    with torch.no_grad():
        d = neutral_shift(y, ln, proj, T)
        before, after = scores(ln(y) @ proj, T), scores(ln(y + d) @ proj, T)
    spread = lambda s: (s.max(1).values - s.min(1).values)   # noqa: E731
    assert spread(before).min() > 0.1
    assert spread(after).max() < 1e-4
    # some classes only: those score the mean of all, and the others move relative to one another less
    # the more keep_order holds them
    rest = [0, 2, 3, 5]
    moved = []
    for keep in (0.0, 100.0):
        with torch.no_grad():
            d2 = neutral_shift(y, ln, proj, T, neutralize=[1, 4], keep_order=keep)
            z0, z1 = scores(ln(y) @ proj, T), scores(ln(y + d2) @ proj, T)
        # at the mean up to the bias's share of post_norm's change of scale (the constraint is solved in
        # units of y's scale): a few per cent of the scores' spread here, where the bias is large
        spread0 = spread(z0)[:, None]
        assert ((z1[:, [1, 4]] - z1.mean(1, keepdim=True)).abs() / spread0).max() < 0.05
        r0, r1 = z0[:, rest] - z0[:, rest].mean(1, keepdim=True), z1[:, rest] - z1[:, rest].mean(1, keepdim=True)
        moved.append(float(((r1 - r0).norm(dim=1) / r0.norm(dim=1)).mean()))
    assert moved[1] < 0.5 * moved[0], moved
    # the part of y's centred vector that no class reads is kept as it is
    Tn = F.normalize(T, dim=-1)
    K = (Tn - Tn.mean(0)) @ proj.t() * ln.weight[None]
    K = K - K.mean(1, keepdim=True)
    null = torch.eye(width) - torch.linalg.pinv(K) @ K
    yc = y - y.mean(1, keepdim=True)
    u = (y + d) - (y + d).mean(1, keepdim=True)
    torch.testing.assert_close(u @ null.t(), yc @ null.t(), atol=1e-4, rtol=0)


def domain_images(n, marked, seed):
    """Random images; the "marked" domain carries a bright red stripe a linear read tells apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    if marked:
        x[:, 0, 8:24] += 2.5
    return x


def run_patch(model, patch, *batches):
    """Embeddings of ``batches`` before and with ``patch``, which is reverted to the weights bit for bit."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = [encode_image(model, x) for x in batches]
        patch.apply(model)
        after = [encode_image(model, x) for x in batches]
        patch.revert(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=1e-5, rtol=0)
    return before, after


def test_detector_weighs_its_examples():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, generator=gen)
    y = x[:, 0] + 0.7 * torch.randn(600, generator=gen) > 0
    group = x[:, 1] > 0                                  # the examples whose false alarms cost most
    plain = gate.detector(x, y)
    ones = gate.detector(x, y, weight=torch.full((600,), 2.0))
    assert torch.allclose(plain[0], ones[0], atol=1e-5) and torch.allclose(plain[1], ones[1], atol=1e-5)
    w, b = gate.detector(x, y, weight=torch.where(group & ~y, 10.0, 1.0))
    false_alarms = lambda w, b: int(((x @ w + b > 0) & ~y & group).sum())
    assert false_alarms(w, b) < false_alarms(*plain)


def test_detector_fits_in_fp64_where_the_device_has_it():
    """The fit runs in fp64 where the features are, on the CPU for MPS (no fp64 there), and comes back in
    the features' dtype."""
    assert gate.fp64_device(torch.device("mps")) == torch.device("cpu")
    assert gate.fp64_device("cuda:1") == torch.device("cuda:1") and gate.fp64_device("cpu") == torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen)
    w, b = gate.detector(x.half(), x[:, 0] > 0)
    assert w.dtype == b.dtype == torch.float16 and float(w[0]) > 0


def test_gate_acts_on_the_detected_domain_only():
    """Some classes forgotten: a gated map after which the detected images score those classes at the
    mean of all; the kept domain's embeddings stay."""
    model = make_tiny_clip()
    site = gate_site(model)
    T = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    fit = torch.cat([domain_images(40, False, 0), domain_images(40, True, 1)])
    forgotten = torch.arange(80) >= 40
    entries, info = gate_entries(model, site, fit, forgotten, T, rank=8, batch_size=64, autocast=OFF,
                                 neutralize=[1, 3])
    assert info["action"] == "map" and info["rank"] == 2 and len(info["units"]) == 3
    assert info["prototypes_caught"] == 1.0 and info["prototypes_flagged"] == 0.0
    assert info["action_fit_r2"] > 0.8 and info["map_ridge"] == gate.MAP_RIDGE   # a shrunk fit (ridge 0.3)
    # units already rewired (by an applied gate) are left alone; the next least used take their place
    _, other = gate_entries(model, site, fit, forgotten, T, rank=8, batch_size=64, autocast=OFF,
                            taken=info["units"][:2], neutralize=[1, 3])
    assert set(info["units"][2:]) < set(other["units"]) and not set(other["units"]) & set(info["units"][:2])
    kept, gone = domain_images(30, False, 10), domain_images(30, True, 11)      # fresh images
    before, after = run_patch(model, Patch(entries), kept, gone)
    # the kept domain's embeddings stay (the rewired units' old share is all they lose) ...
    assert F.cosine_similarity(before[0], after[0]).min() > 0.99
    # ... and the forgotten domain's images score classes 1 and 3 at the mean of all, or closer to it
    off = lambda e: (scores(e, T)[:, [1, 3]] - scores(e, T).mean(1, keepdim=True)).abs().mean()  # noqa: E731
    assert off(after[1]) < 0.3 * off(before[1])
    # several forgotten domains with their labels: a detector, and a copy of the map's units, per domain
    third = domain_images(40, False, 2)
    third[:, 2, :, 8:24] += 2.5                     # another domain: a blue stripe across
    domain_of = torch.arange(120) // 40
    two, info2 = gate_entries(model, site, torch.cat([fit, third]), domain_of > 0, T, rank=8, batch_size=64,
                              autocast=OFF, neutralize=[1, 3], domain_of=domain_of)
    assert info2["detectors"] == 2 and len(info2["units"]) == 6 and len(info2["sharpness"]) == 2
    assert info2["prototypes_caught"] == 1.0 and info2["prototypes_flagged"] == 0.0
    blue = domain_images(30, False, 12)
    blue[:, 2, :, 8:24] += 2.5
    before, after = run_patch(model, Patch(two), kept, gone, blue)
    assert F.cosine_similarity(before[0], after[0]).min() > 0.99
    assert off(after[1]) < 0.3 * off(before[1]) and off(after[2]) < 0.3 * off(before[2])


def test_real_examples_teach_the_detector_what_the_prototypes_miss(monkeypatch):
    """The prototypes of the forgotten domain carry two cues, a faint red stripe and a bright green one,
    and the kept ones neither, so a detector fitted on them alone reads green; real images of the kept
    domain with a green stripe are then flagged. Real examples of both domains (``examples``) teach it
    that green is not the domain: those images are left alone, and the forgotten domain's are still
    gated."""
    model = make_tiny_clip()
    twin = copy.deepcopy(model)                 # the second patch goes on weights never patched
    site = gate_site(model)
    T = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    # both gates switch on at the same logit, so that only the examples differ
    monkeypatch.setattr(gate, "MAP_THRESHOLD", gate.MAP_THRESHOLD_EXAMPLES)

    def green(x):
        x[:, 1, :, 8:24] += 2.5
        return x

    faint = green(domain_images(40, False, 1))
    faint[:, 0, 8:24] += 0.8                    # where domain_images marks its domain, brightly
    fit = torch.cat([domain_images(40, False, 0), faint])
    domain_of = (torch.arange(80) >= 40).long()
    real = torch.cat([green(domain_images(40, False, 5)), green(domain_images(40, True, 6))])
    real_domain = (torch.arange(80) >= 40).long()
    args = dict(rank=8, batch_size=64, autocast=OFF, neutralize=[1, 3], domain_of=domain_of)
    alone, info_alone = gate_entries(model, site, fit, domain_of == 1, T, **args)
    taught, info = gate_entries(model, site, fit, domain_of == 1, T, examples=(real, real_domain), **args)
    assert "examples" not in info_alone and info["examples"] == {0: 40, 1: 40}
    assert info["detector_examples"] == info_alone["detector_examples"] + 80
    kept_green, gone = green(domain_images(30, False, 10)), green(domain_images(30, True, 11))   # fresh
    off = lambda e: (scores(e, T)[:, [1, 3]] - scores(e, T).mean(1, keepdim=True)).abs().mean()  # noqa: E731
    before, after_alone = run_patch(model, Patch(alone), kept_green, gone)
    _, after = run_patch(twin, Patch(taught), kept_green, gone)
    assert off(after_alone[0]) < 0.5 * off(before[0])                     # flagged without the examples
    assert F.cosine_similarity(before[0], after[0]).min() > 0.99          # left alone with them
    assert off(after[1]) < 0.3 * off(before[1])                           # the forgotten domain still gated
    # given a share of the detectors' weight, the examples fit another detector (and another gate)
    monkeypatch.setattr(gate, "EXAMPLES_SHARE", 0.9)
    shared, _ = gate_entries(model, site, fit, domain_of == 1, T, examples=(real, real_domain), **args)
    assert (shared[0].A - taught[0].A).abs().max() > 1e-3
    with pytest.raises(ValueError, match="need the prototypes' domains"):
        gate_entries(model, site, fit, domain_of == 1, T, rank=8, batch_size=64, autocast=OFF, neutralize=[1, 3],
                     examples=(real, real_domain))


def test_gate_collapses_every_class_in_the_detected_domains(monkeypatch):
    """Every class forgotten: one unit per forgotten domain writes that domain's mean token, so every
    detected image embeds alike, whatever its class; the kept domain's embeddings stay."""
    model = make_tiny_clip()
    site = gate_site(model)
    T = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    fit = torch.cat([domain_images(40, False, 0), domain_images(40, True, 1)])
    forgotten = torch.arange(80) >= 40
    entries, info = gate_entries(model, site, fit, forgotten, T, rank=8, batch_size=64, autocast=OFF)
    assert info["action"] == "collapse" and info["neutralized"] == "all" and len(info["units"]) == 2
    assert info["prototypes_caught"] == 1.0 and info["prototypes_flagged"] == 0.0
    kept, gone = domain_images(30, False, 10), domain_images(30, True, 11)
    patch = Patch(entries)
    before, after = run_patch(model, patch, kept, gone)
    assert F.cosine_similarity(before[0], after[0]).min() > 0.99
    spread = lambda e: 1 - F.cosine_similarity(e, e.mean(0, keepdim=True)).mean()   # noqa: E731
    assert spread(after[1]) < 0.02 * spread(before[1])
    # the push is capped: with a cap below what the detected images reach, what the rewired units add to
    # their class token is the cap (it would grow with the detector's logit without the second unit)
    monkeypatch.setattr(gate, "CAP", 0.5)
    capped, info2 = gate_entries(model, site, fit, forgotten, T, rank=8, batch_size=64, autocast=OFF)
    added = []
    take = lambda m, a, out: added.append(out[:, 0] if site.batch_first else out[0])  # noqa: E731
    hook = site.fc_out.register_forward_hook(take)
    try:
        with torch.no_grad():
            encode_image(model, gone)
            with Patch(capped).applied(model):
                encode_image(model, gone)
    finally:
        hook.remove()
    grown = (added[1] - added[0]).norm(dim=1)
    assert info2["push_cap"] == pytest.approx(0.5 * gate.GATE_LEVEL * info2["push"], rel=1e-5)
    # (the second unit's GELU dips at most 0.17 below 0 just under the cap; the old units' share is tiny)
    assert grown.max() <= info2["push"] * (0.5 * gate.GATE_LEVEL + 0.17) + 0.01 * info2["push_cap"]
    assert grown.median() > 0.95 * info2["push_cap"]
    # several forgotten domains: a unit (a detector) each; the domain labels must be those of the images
    third = domain_images(40, False, 2)
    third[:, 2, :, 8:24] += 2.5                     # another domain: a blue stripe across
    fit3 = torch.cat([fit, third])
    domain_of = torch.arange(120) // 40
    _, info3 = gate_entries(model, site, fit3, domain_of > 0, T, rank=8, batch_size=64, autocast=OFF,
                            domain_of=domain_of)
    assert info3["detectors"] == 2 and len(info3["units"]) == 4 and len(info3["sharpness"]) == 2
    assert info3["prototypes_caught"] == 1.0 and info3["prototypes_flagged"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_collapse_runs_in_half_precision_with_large_tokens(dtype):
    """The every-class gate's push, at most CAP times a push that is itself COLLAPSE times the median
    token's norm, stays finite in a half-precision model whose residual stream is large (block 0's MLP
    scaled up a thousandfold: tokens of norm ~1,600, a push capped near 135,000), images far past the
    detector's switch included, and acts there as in fp32."""
    model = make_tiny_clip()
    mlp = model.visual.transformer.resblocks[0].mlp
    with torch.no_grad():
        for t in (mlp.c_proj.weight, mlp.c_proj.bias):
            t.mul_(1000.0)
    site = gate_site(model)
    T = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    fit = torch.cat([domain_images(40, False, 0), domain_images(40, True, 1)])
    entries, info = gate_entries(model, site, fit, torch.arange(80) >= 40, T, rank=8, batch_size=64, autocast=OFF)
    assert info["push_cap"] > 1e5
    gone = domain_images(30, True, 11)
    far = gone.clone()
    far[:, 0, 8:24] += 5.0                          # a stronger mark: the detector's logit far past its switch
    batches = (domain_images(30, False, 10), gone, far)
    patch = Patch(entries)
    with torch.no_grad():
        with patch.applied(model):
            ref = [encode_image(model, x) for x in batches]
        half = copy.deepcopy(model).to(dtype)
        patch.apply(half)                           # the fp32 weights' casts: recognized
        out = [encode_image(half, x.to(dtype)).float() for x in batches]
    assert all(bool(o.isfinite().all()) for o in out)
    for o, r in zip(out, ref):                      # the kept images untouched, the detected ones collapsed
        assert F.cosine_similarity(o, r).min() > 0.999
    spread = lambda e: 1 - F.cosine_similarity(e, e.mean(0, keepdim=True)).mean()   # noqa: E731
    assert spread(out[1]) < 1e-4 and spread(out[2]) < 1e-4


@pytest.mark.parametrize("threshold, caught, flagged", [(100.0, 0.0, 0.0), (-100.0, 1.0, 1.0)])
def test_collapse_threshold_sets_where_the_units_switch_on(monkeypatch, threshold, caught, flagged):
    """The every-class gate's units switch on where the detector logit passes COLLAPSE_THRESHOLD: far above
    every logit they catch nothing (and the forgotten domain's embeddings stay), far below they flag all."""
    model = make_tiny_clip()
    site = gate_site(model)
    T = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    fit = torch.cat([domain_images(40, False, 0), domain_images(40, True, 1)])
    monkeypatch.setattr(gate, "COLLAPSE_THRESHOLD", threshold)
    entries, info = gate_entries(model, site, fit, torch.arange(80) >= 40, T, rank=8, batch_size=64, autocast=OFF)
    assert info["prototypes_caught"] == caught and info["prototypes_flagged"] == flagged
    if threshold > 0:
        before, after = run_patch(model, Patch(entries), domain_images(30, True, 11))
        assert F.cosine_similarity(before[0], after[0]).min() > 0.99


def test_gate_self_check_says_how_many_prototypes_its_detectors_catch(tokenizer, vocab, monkeypatch):
    # a push too small to move anything: the forgotten prototypes stay recognized and the warning says
    # what share of them the detectors caught
    monkeypatch.setattr(gate, "COLLAPSE", 1e-9)
    spec = ForgetSpec(*vocab, forget_domains=["sketch"])
    cfg = ForgetConfig(prototypes_per_cell=2, steps=30, batch_size=64, edit="domain-gate", gate_translate_steps=0)
    patch = forget(make_tiny_clip(), tokenizer, spec, cfg)
    caught = patch.info["gate"]["prototypes_caught"]
    assert patch.info["self_check"]["forgotten"]["after"] == patch.info["self_check"]["forgotten"]["before"] == 1.0
    assert any(f"the gate's detectors catch {100 * caught:.0f}% of the forgotten domains' prototypes" in w
               for w in patch.info["self_check"]["warnings"])


def test_forget_with_the_gate_saves_reloads_and_refuses(tmp_path, tokenizer, vocab):
    model = make_tiny_clip()
    spec = ForgetSpec(*vocab, forget_domains=["sketch", "pixel_art"])
    cfg = ForgetConfig(prototypes_per_cell=2, steps=8, edit="domain-gate")
    patch = forget(model, tokenizer, spec, cfg)
    assert patch.info["edit"] == "domain-gate" and patch.info["gate"]["action"] == "collapse"
    assert patch.info["gate"]["detectors"] == 2                  # sketch and pixel art: a unit each
    assert [e.layout for e in patch.entries] == ["linear", "bias", "linear"]
    assert patch.info["self_check"]["forgotten"]["before"] >= 0
    again = Patch.load(patch.save(tmp_path / "gate.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        with patch.applied(model):
            a = encode_image(model, x)
        with again.applied(model):
            b = encode_image(model, x)
        assert (a - encode_image(model, x)).abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # every class: the detectors can also be fitted on prototypes translated into and out of the
    # forgotten domains (two per cell here: sketch and pixel art, into and out of)
    alone = forget(model, tokenizer, spec, cfg.replace(gate_translate_steps=0))
    n = len(vocab[0]) * len(vocab[1]) * 2
    assert alone.info["gate"]["detector_examples"] == n and "translate" not in alone.timings
    assert patch.info["gate"]["detector_examples"] > n and patch.timings["translate"] > 0
    with pytest.raises(ValueError, match="gate_translate_steps"):
        ForgetConfig(gate_translate_steps=-1)
    # some classes in some domains: only those classes are neutralized, by a map of their rank
    one = forget(model, tokenizer, ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"]), cfg)
    assert one.info["gate"]["neutralized"] == [0] and one.info["gate"]["rank"] == 1
    assert one.info["gate"]["action"] == "map"
    assert one.info["gate"]["map_ridge"] == gate.MAP_RIDGE
    assert len(one.info["gate"]["units"]) == 2
    # ... its detector too is fitted also on prototypes translated into and out of the forgotten domain
    assert one.info["gate"]["detector_examples"] > n and one.timings["translate"] > 0
    plain = forget(model, tokenizer, ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"]),
                   cfg.replace(gate_translate_steps=0))
    assert plain.info["gate"]["detector_examples"] == n and "translate" not in plain.timings
    # cells that are not a product of classes and domains, or every domain: not the gate's
    for bad in (ForgetSpec.from_cells(*vocab, [("dog", "sketch"), ("cat", "photo")]),
                ForgetSpec(*vocab, forget_classes=["dog"])):
        with pytest.raises(ValueError, match="must be every pair of their classes and domains"):
            forget(model, tokenizer, bad, cfg)
    model.visual.pool_type = "avg"
    with pytest.raises(ValueError, match="class token; this one pools 'avg'"):
        forget(model, tokenizer, spec, cfg)
    with pytest.raises(ValueError, match="domain-gate is fitted on prototypes"):
        ForgetConfig(edit="domain-gate", prototypes_per_cell=0)
    model.visual.pool_type = "tok"               # an activation that is not off far below 0: no gate
    model.visual.transformer.resblocks[-1].mlp.gelu = nn.Tanh()
    with pytest.raises(ValueError, match="about 0 far below 0.*Tanh"):
        forget(model, tokenizer, spec, cfg)


def test_a_bank_keeps_the_gates_translations_for_the_next_request(tokenizer, vocab, monkeypatch):
    """A bank handed to forget keeps the gate's translations of its prototypes: a request with the same
    forgotten domains reuses them, and its patch is the one computed afresh, bit for bit; other domains,
    a patch applied to the image tower (and reverted), or a weight written in place compute them again."""
    model = make_tiny_clip()
    cfg = ForgetConfig(prototypes_per_cell=2, steps=8, edit="domain-gate")
    bank = synthesize_prototypes(model, tokenizer, ForgetSpec(*vocab, forget_domains=["sketch"]), cfg)
    calls = []
    real = pipeline.translate
    monkeypatch.setattr(pipeline, "translate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))

    def run(classes, domains, prototypes=bank):
        patch = forget(model, tokenizer, ForgetSpec(*vocab, forget_classes=classes, forget_domains=domains), cfg,
                       prototypes=prototypes)
        return patch, patch.info["translations_reused"]

    first, reused = run(["dog", "cat"], ["sketch"])
    assert not reused and len(calls) == 1 and len(bank.translations) == 1
    again, reused = run(["car", "tree"], ["sketch"])          # other classes, the same forgotten domain
    assert reused and len(calls) == 1
    fresh, reused = run(["car", "tree"], ["sketch"], PrototypeBank(bank.images, bank.accepted, bank.stats, bank.source))
    assert not reused and len(calls) == 2
    assert [e.name for e in again.entries] == [e.name for e in fresh.entries]
    for a, b in zip(again.entries, fresh.entries):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert run(["dog"], ["pixel_art"])[1] is False and len(bank.translations) == 2
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    first.apply(model)                                         # the image tower holds a patch
    assert run(["dog", "cat"], ["sketch"])[1] is False
    first.revert(model)                                        # back, up to rounding
    exact = all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert run(["dog", "cat"], ["sketch"])[1] is exact        # reused only where the revert was exact
    assert run(["dog", "cat"], ["sketch"])[1] is True
    with torch.no_grad():
        model.visual.transformer.resblocks[0].mlp.c_fc.weight.add_(1e-3)
    assert run(["dog", "cat"], ["sketch"])[1] is False
    with torch.no_grad():
        model.logit_scale.add_(0.1)                            # the translation's loss reads it
    assert run(["dog", "cat"], ["sketch"])[1] is False
    monkeypatch.setattr(pipeline, "TRANSLATIONS_KEPT", 2)      # the oldest go first
    run(["dog", "cat"], ["photo"])
    assert len(bank.translations) == 2
    assert run(["dog", "cat"], ["sketch"])[1] is True and run(["dog"], ["pixel_art"])[1] is False


def test_image_tower_digest_hashes_each_stale_weight_once_in_threads(monkeypatch):
    """The tower's digest is the same whatever the threads; a second call hashes nothing, and a weight
    written in place is the only one hashed again."""
    from clipforget_fast import layers, patch as patch_module

    model = make_tiny_clip()
    hashed = []
    real = patch_module.tensor_hash
    monkeypatch.setattr(patch_module, "tensor_hash", lambda t: hashed.append(t.shape) or real(t))
    one = layers.image_tower_digest(model, workers=1)
    tower = [p for n, p in model.named_parameters() if n.startswith(layers.IMAGE_PREFIXES)]
    assert len(hashed) == len(tower) > 10
    layers._DIGESTS._held.clear()
    assert layers.image_tower_digest(model, workers=4) == one and len(hashed) == 2 * len(tower)
    assert layers.image_tower_digest(model) == one and len(hashed) == 2 * len(tower)     # memoized
    w = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    with torch.no_grad():
        w.mul_(2)
    assert layers.image_tower_digest(model, workers=4) != one and hashed[-1] == w.shape
    assert len(hashed) == 2 * len(tower) + 1


def test_translations_run_in_the_vocabularys_order_and_come_back_in_the_requests(vocab):
    """``_translated`` moves the images in the vocabulary's order of the cells and returns them in the
    order of the request's pairs of cells, each with its own labels: the same, up to rounding, as moving
    them in the request's order."""
    model = make_tiny_clip()
    classes, domains = vocab
    cells = [("cat", "sketch"), ("dog", "sketch"), ("tree", "photo"), ("dog", "photo"), ("cat", "photo"),
             ("tree", "sketch")]                                  # the request's order, some cells left out
    P = 2
    torch.manual_seed(3)
    images, text = torch.randn(len(cells) * P, 3, 32, 32), F.normalize(torch.randn(len(cells), 32), dim=-1)
    cfg = ForgetConfig(gate_translate_steps=3)
    (moved, dom, cls), hit = pipeline._translated(model, images, cells, P, text, ["sketch"], domains, cfg, classes)
    assert not hit
    index = {c: i for i, c in enumerate(cells)}
    pairs = sorted({(index[(c, d)], index[(c, "sketch")]) for c, d in cells if d != "sketch" and (c, "sketch") in index}
                   | {(index[(c, "sketch")], index[(c, e)]) for c, d in cells if d == "sketch"
                      for e in domains if e != "sketch" and (c, e) in index})
    src = torch.cat([torch.arange(i * P, (i + 1) * P) for i, _ in pairs])
    tgt = torch.tensor([j for _, j in pairs]).repeat_interleave(P)
    want = pipeline.translate(model, images[src], text, tgt, 3, cfg)
    torch.testing.assert_close(moved, want, atol=1e-5, rtol=1e-5)
    assert dom.tolist() == [domains.index(cells[j][1]) for _, j in pairs for _ in range(P)]
    assert cls.tolist() == [classes.index(cells[j][0]) for _, j in pairs for _ in range(P)]


def test_a_second_gate_takes_other_units_and_both_revert(tokenizer, vocab):
    """Forget sketch, then pixel art on the patched model: the second gate rewires units the first left
    alone (else it would undo it), and the patches revert in reverse order to the base weights."""
    model = make_tiny_clip()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ForgetConfig(prototypes_per_cell=2, steps=8, edit="domain-gate")
    first = forget(model, tokenizer, ForgetSpec(*vocab, forget_domains=["sketch"]), cfg)
    first.apply(model)
    second = forget(model, tokenizer, ForgetSpec(*vocab, forget_domains=["pixel_art"]), cfg)
    assert second.info["edit"] == "domain-gate"
    site = gate_site(model)
    assert rewired_units([first], site) == first.info["gate"]["units"]
    assert not set(first.info["gate"]["units"]) & set(second.info["gate"]["units"])
    second.apply(model)
    second.revert(model)
    first.revert(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=1e-5, rtol=0)


def test_forget_takes_real_domain_examples_and_refuses_bad_ones(tokenizer, vocab):
    model = make_tiny_clip()
    spec = ForgetSpec(*vocab, forget_domains=["sketch"])
    cfg = ForgetConfig(prototypes_per_cell=2, steps=8, edit="domain-gate", gate_translate_steps=0)
    gen = torch.Generator().manual_seed(0)
    examples = {"sketch": torch.randn(5, 3, 32, 32, generator=gen), "photo": torch.randn(3, 3, 32, 32, generator=gen)}
    plain = forget(model, tokenizer, spec, cfg)
    taught = forget(model, tokenizer, spec, cfg, domain_examples=examples)
    assert taught.info["gate"]["examples"] == {"photo": 3, "sketch": 5} and "examples" not in plain.info["gate"]
    assert taught.info["gate"]["detector_examples"] == plain.info["gate"]["detector_examples"] + 8
    assert any((a.A - b.A).abs().max() > 0 for a, b in zip(taught.entries, plain.entries))
    bad = [({"drawing": examples["sketch"]}, ValueError, "'drawing' not among the request's domains"),
           ({"sketch": torch.randn(2, 3, 16, 16)}, ValueError, r"expected floating images \[n, 3, 32, 32\]"),
           ({"sketch": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, ValueError, "torch.uint8"),
           ({"sketch": [examples["sketch"]]}, ValueError, "got a list"),
           ({"sketch": torch.randn(0, 3, 32, 32)}, ValueError, "no images"),
           ({"sketch": torch.full((1, 3, 32, 32), float("nan"))}, ValueError, "NaN"),
           ({}, ValueError, "no domain given"),
           ([examples["sketch"]], TypeError, "must map domain names to image tensors")]
    for value, error, message in bad:
        with pytest.raises(error, match=message):
            forget(model, tokenizer, spec, cfg, domain_examples=value)
    # some classes forgotten: the map holds the other classes' order at 100 without examples and at
    # 10,000 with them, unless the config sets it
    one = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    alone, taught = forget(model, tokenizer, one, cfg), forget(model, tokenizer, one, cfg, domain_examples=examples)
    assert alone.info["gate"]["keep_order"] == 100.0 and taught.info["gate"]["keep_order"] == 10000.0
    # and its units switch on at MAP_THRESHOLD without examples, at MAP_THRESHOLD_EXAMPLES with them
    assert (alone.info["gate"]["map_threshold"], taught.info["gate"]["map_threshold"]) == (1.0, -0.5)
    assert forget(model, tokenizer, one, cfg.replace(gate_keep_order=5),
                  domain_examples=examples).info["gate"]["keep_order"] == 5.0
    for order in (-1.0, True, "100"):
        with pytest.raises(ValueError, match="gate_keep_order"):
            ForgetConfig(gate_keep_order=order)
    # only the domain gate reads them: another edit refuses them rather than ignore them
    with pytest.raises(ValueError, match="domain_examples are for the domain gate's detectors.*'class-redirect'"):
        forget(model, tokenizer, ForgetSpec(*vocab, forget_classes=["dog"]),
               ForgetConfig(prototypes_per_cell=2, steps=8), domain_examples=examples)


def test_examples_from_a_source_that_decodes_a_batch_at_a_time(tokenizer, vocab, tmp_path):
    """A domain_examples value may be a source that slices into image tensors (ImageFiles over files):
    the patch is the one the same images held as tensors give, and a source's bad rows are named."""
    from PIL import Image

    from clipforget_fast import ImageFiles, read_images

    model = make_tiny_clip()
    spec = ForgetSpec(*vocab, forget_domains=["sketch"])
    cfg = ForgetConfig(prototypes_per_cell=2, steps=8, edit="domain-gate", gate_translate_steps=0, batch_size=3)
    gen = torch.Generator().manual_seed(6)
    files = {d: [] for d in ("sketch", "photo")}
    for d, n in (("sketch", 4), ("photo", 3)):
        for k in range(n):
            files[d].append(tmp_path / f"{d}{k}.png")
            Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()).save(files[d][-1])

    def preprocess(im):
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1

    held = forget(model, tokenizer, spec, cfg, domain_examples={d: read_images(f, preprocess) for d, f in files.items()})
    lazy = forget(model, tokenizer, spec, cfg, domain_examples={d: ImageFiles(f, preprocess) for d, f in files.items()})
    assert lazy.info["gate"]["examples"] == {"photo": 3, "sketch": 4}
    assert all(torch.equal(a.A, b.A) and torch.equal(a.B, b.B) for a, b in zip(held.entries, lazy.entries, strict=True))

    x = torch.randn(6, 3, 32, 32, generator=gen)
    x[4, 0, 0, 0] = float("inf")                   # a caller's own source, with a bad image at row 4
    with pytest.raises(ValueError, match=r"domain_examples\['sketch'\] rows 3:6: images with NaN or infinite"):
        forget(model, tokenizer, spec, cfg, domain_examples={"sketch": Rows(x)})
    with pytest.raises(ValueError, match=r"domain_examples\['sketch'\] rows 0:1: expected floating images "
                                         r"\[n, 3, 32, 32\].*of shape \(1, 3, 16, 16\)"):
        forget(model, tokenizer, spec, cfg, domain_examples={"sketch": Rows(torch.randn(2, 3, 16, 16))})
    with pytest.raises(ValueError, match="no images"):
        forget(model, tokenizer, spec, cfg, domain_examples={"sketch": Rows(x[:0])})
    with pytest.raises(ValueError, match="got a int"):
        forget(model, tokenizer, spec, cfg, domain_examples={"sketch": 3})


def test_examples_are_read_a_batch_at_a_time_without_a_copy(tokenizer, vocab):
    """The gate reads the caller's example tensors where they are, in batches that may span two of them,
    and the ℓ it gets is the one a single concatenated tensor gives."""
    model = make_tiny_clip()
    site = gate_site(model)
    gen = torch.Generator().manual_seed(4)
    parts = [torch.randn(5, 3, 32, 32, generator=gen), torch.randn(1, 3, 32, 32, generator=gen).half(),
             torch.randn(6, 3, 32, 32, generator=gen).bfloat16()]
    rows = gate.ImageRows(parts)
    whole = torch.cat([p.float() for p in parts])
    assert len(rows) == 12
    for lo, hi in ((0, 12), (3, 9), (5, 6), (4, 12), (7, 7)):
        assert torch.equal(rows[lo:hi], whole[lo:hi])
    with pytest.raises(ValueError, match="step 1"):
        rows[::2]
    auto = dict(device_type="cpu", enabled=False)
    read = gate.site_read(model, site, rows, 5, auto, torch.device("cpu"))
    assert read.shape == (12, site.norm.weight.shape[0]) and read.dtype == torch.float32
    assert torch.equal(read, gate.site_read(model, site, whole, 5, auto, torch.device("cpu")))
    # gate_entries takes the examples as images, as ImageRows or as their ℓ, and fits the same detectors
    fit = torch.randn(12, 3, 32, 32, generator=gen)
    domain_of = torch.arange(12) % 2
    T = F.normalize(torch.randn(4, model.text_projection.shape[1], generator=gen), dim=-1)
    args = dict(rank=2, batch_size=5, autocast=auto, domain_of=domain_of)
    got = [gate_entries(model, site, fit, domain_of == 1, T, examples=(x, torch.arange(12) % 2), **args)[0]
           for x in (whole, rows, read)]
    for other in got[1:]:
        assert all(torch.equal(a.A, b.A) and torch.equal(a.B, b.B) for a, b in zip(got[0], other, strict=True))
    # forget keeps the caller's tensors as they are: the rows it reads are theirs, not a copy
    spec = ForgetSpec(*vocab, forget_domains=["sketch"])
    got, domain = _domain_examples({"sketch": parts[0], "photo": parts[2]}, spec, model)
    assert [p.data_ptr() for p in got.parts] == [parts[2].data_ptr(), parts[0].data_ptr()]
    assert domain.tolist() == [0] * 6 + [1] * 5
