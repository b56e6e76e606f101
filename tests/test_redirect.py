"""The class redirect: forgotten prompts turn against their class direction (global) or shift along
their forgotten domains' image direction (domain), kept prompts hold."""
import pytest
import torch

from clipforget_fast import ForgetConfig, ForgetSpec, forget
from clipforget_fast.redirect import domain_detectors, domain_shifts
from clipforget_fast.text import class_embeddings, tokenize

CFG = ForgetConfig(edit="class-redirect", use_prototypes=False, retain_energy=0.9999)


def _outputs(model, tokenizer, spec, cells):
    with torch.no_grad():
        return {c: model.encode_text(tokenize(tokenizer, spec.prompts(c), "cpu")).float() for c in cells}


def test_forgotten_prompts_turn_away_kept_prompts_hold(tiny_clip, tokenizer, vocab):
    spec = ForgetSpec(*vocab, forget_classes=["dog"])
    patch = forget(tiny_clip, tokenizer, spec, CFG)
    assert [e.name for e in patch.entries] == ["text_projection"]
    before = _outputs(tiny_clip, tokenizer, spec, spec.cells)
    patch.apply(tiny_clip)
    after = _outputs(tiny_clip, tokenizer, spec, spec.cells)
    patch.revert(tiny_clip)
    f_cells = sorted(spec.forget_cells)
    w = torch.nn.functional.normalize(torch.cat([before[c] for c in f_cells]).mean(0), dim=0)
    comp_before = torch.cat([before[c] for c in f_cells]) @ w
    comp_after = torch.cat([after[c] for c in f_cells]) @ w
    assert (comp_before > 0).all()
    assert comp_after.mean() < 0                      # pushed past zero, against the class direction
    rel_f = (torch.cat([after[c] - before[c] for c in f_cells]).norm() /
             torch.cat([before[c] for c in f_cells]).norm())
    kept = sorted(spec.retain_cells)
    rel_r = (torch.cat([after[c] - before[c] for c in kept]).norm() /
             torch.cat([before[c] for c in kept]).norm())
    assert rel_r < 0.1 * rel_f                        # the kept prompts barely move


def test_redirect_validation(tiny_clip, tokenizer, vocab):
    with pytest.raises(ValueError, match="edit"):
        ForgetConfig(edit="class-redirect", use_text=False)
    with pytest.raises(ValueError, match="edit"):
        ForgetConfig(edit="class-redirect", targets="mlp")
    with pytest.raises(ValueError, match="edit"):
        ForgetConfig(edit="rewrite")
    with pytest.raises(ValueError, match="domain_gain"):
        ForgetConfig(domain_gain=0.0)
    # a class kept in other domains needs the prototypes' domain detectors
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    with pytest.raises(ValueError, match=r"\[.dog.\]\) needs prototypes"):
        forget(tiny_clip, tokenizer, spec, CFG)
    # every class forgotten somewhere: nothing holds the text side, the edit refuses
    spec = ForgetSpec(*vocab, forget_domains=["sketch"])
    assert spec.mode == "domain-complete"
    with pytest.raises(ValueError, match="cannot forget whole domains"):
        forget(tiny_clip, tokenizer, spec, ForgetConfig(edit="class-redirect", prototypes_per_cell=1, steps=1))


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_domain_detectors_respond_to_their_domain():
    # embeddings = class part + domain part + noise; the domains' text embeddings share the domain parts
    g = torch.Generator().manual_seed(0)
    D, n_cls, n_dom, P = 32, 6, 3, 8
    cls_dir, dom_dir = torch.randn(n_cls, D, generator=g), torch.randn(n_dom, D, generator=g)
    c = torch.arange(n_cls).repeat_interleave(n_dom * P)
    d = torch.arange(n_dom).repeat_interleave(P).repeat(n_cls)
    emb = _unit(cls_dir[c] + dom_dir[d] + 0.1 * torch.randn(len(c), D, generator=g))
    text = _unit(dom_dir + 0.3 * cls_dir.mean(0))
    U = domain_detectors(emb, d, text)
    z = emb @ U.t()                                             # [n, n_dom]
    for j in range(n_dom):
        assert z[d == j, j].mean() == pytest.approx(1.0, abs=1e-5)   # scaled to 1 on its domain
        assert z[d != j, j].abs().mean() < 0.25                     # about 0 elsewhere
        assert z[d == j, j].min() > z[d != j, j].max()


def test_domain_shift_lowers_the_class_in_its_domain_only():
    g = torch.Generator().manual_seed(1)
    D, classes, domains, P = 32, ["a", "b", "c", "e"], ["x", "y", "z"], 6
    cls_dir, dom_dir = torch.randn(len(classes), D, generator=g), torch.randn(len(domains), D, generator=g)
    proto = {(ci, di): _unit(cls_dir[i] + dom_dir[j] + 0.1 * torch.randn(P, D, generator=g))
             for i, ci in enumerate(classes) for j, di in enumerate(domains)}
    emb = torch.cat(list(proto.values()))
    dom_idx = torch.tensor([domains.index(dd) for (_, dd) in proto for _ in range(P)])
    class_emb = _unit(cls_dir)
    U = domain_detectors(emb, dom_idx, _unit(dom_dir))
    shifts, info = domain_shifts(proto, class_emb, classes, U, domains, {"a": ["y"]}, gain=2.0)
    assert set(shifts) == {"a"} and info["a@y"]["margin"] > 0
    new = class_emb.clone()
    new[0] = class_emb[0] + shifts["a"]
    assert new[0].norm() == pytest.approx(1.0, abs=1e-5)          # still a unit class embedding
    win = {cell: ((v @ new.t()).argmax(1) == classes.index(cell[0])).float().mean() for cell, v in proto.items()}
    assert win[("a", "y")] == 0                                   # forgotten in y
    assert win[("a", "x")] == 1 and win[("a", "z")] == 1          # kept in x and z
    assert all(win[cell] == 1 for cell in proto if cell[0] != "a")
    # the compensation keeps class a's mean score on the prototypes of the domains where it is kept
    kept = torch.cat([v for (cc, dd), v in proto.items() if dd != "y"])
    assert (kept @ new[0]).mean() == pytest.approx(float((kept @ class_emb[0]).mean()), abs=1e-4)


def test_domain_redirect_moves_the_class_embedding_as_planned(tiny_clip, tokenizer, vocab, caplog):
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    cfg = ForgetConfig(edit="class-redirect", retain_energy=0.9999, prototypes_per_cell=2, steps=5)
    with caplog.at_level("WARNING"):
        patch = forget(tiny_clip, tokenizer, spec, cfg)
    assert "experimental" in caplog.text
    assert patch.info["redirect"]["partly_forgotten"] == {"dog": ["sketch"]}
    sets = [[p for d in spec.domains for p in spec.prompts((c, d))] for c in spec.classes]
    before = _unit(class_embeddings(tiny_clip, tokenizer, sets, "cpu").float())
    patch.apply(tiny_clip)
    after = _unit(class_embeddings(tiny_clip, tokenizer, sets, "cpu").float())
    patch.revert(tiny_clip)
    moved = after[0] - before[0]
    assert moved.norm() > 0.05
    others = (after[1:] - before[1:]).norm(dim=1)
    assert others.max() < 0.1 * moved.norm()                     # the other classes hold
