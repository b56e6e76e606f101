"""The class redirect: forgotten prompts turn against their class direction, kept prompts hold."""
import pytest
import torch

from clipforget_fast import ForgetConfig, ForgetSpec, forget
from clipforget_fast.text import tokenize

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


def test_redirect_validation_and_domain_warning(tiny_clip, tokenizer, vocab, caplog):
    with pytest.raises(ValueError, match="edit"):
        ForgetConfig(edit="class-redirect", use_text=False)
    with pytest.raises(ValueError, match="edit"):
        ForgetConfig(edit="class-redirect", targets="mlp")
    with pytest.raises(ValueError, match="edit"):
        ForgetConfig(edit="rewrite")
    spec = ForgetSpec(*vocab, forget_classes=["dog"], forget_domains=["sketch"])
    with caplog.at_level("WARNING"):
        forget(tiny_clip, tokenizer, spec, CFG)
    assert "text side only" in caplog.text
