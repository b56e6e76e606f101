"""Accuracy bookkeeping, on a stand-in model whose predictions are known exactly."""
import pytest
import torch
from torch import nn

from clipforget_fast import ForgetSpec, evaluate

CLASSES, DOMAINS = ["dog", "cat", "car"], ["photo", "sketch"]


class OneHotModel(nn.Module):
    """encode_text: one-hot of the class named in the prompt; encode_image: the image's pixels,
    which the test sets to the one-hot of the class it wants predicted."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens):
        return nn.functional.one_hot(tokens[:, 0], len(CLASSES)).float()

    def encode_image(self, images):
        return images.flatten(1)


def tokenizer(prompts):
    return torch.tensor([[next(i for i, c in enumerate(CLASSES) if f" {c}" in p)] for p in prompts])


def _images(pred):
    return nn.functional.one_hot(torch.tensor(pred), len(CLASSES)).float().view(-1, len(CLASSES), 1, 1)


def test_accuracy_matrix_counts_per_cell():
    class_idx = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    domain_idx = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    pred = [0, 1, 1, 1, 2, 0, 2, 2]      # dog/photo 1 of 2, cat/photo 2/2, car/photo 1/2, dog/sketch 0/2
    acc = evaluate(OneHotModel(), tokenizer, _images(pred), class_idx, domain_idx, CLASSES, DOMAINS,
                   templates=["a {domain} of a {cls}."], batch_size=3)
    assert acc.cell("dog", "photo") == 0.5 and acc.cell("cat", "photo") == 1.0
    assert acc.cell("dog", "sketch") == 0.0 and torch.isnan(acc.accuracy[1, 1])
    spec = ForgetSpec(CLASSES, DOMAINS, forget_classes=["dog"])
    assert acc.forget_accuracy(spec) == pytest.approx(0.25)
    assert acc.retain_accuracy(spec) == pytest.approx(0.75)
    assert acc.per_domain() == {"photo": pytest.approx(4 / 6), "sketch": 0.0}
    assert acc.chance == pytest.approx(1 / 3) and acc.mean() == pytest.approx(4 / 8)
    assert "dog" in acc.table()
    assert acc.counts([("dog", "photo"), ("dog", "sketch"), ("car", "photo")]) == (2, 6)
    assert acc.counts([("dog", "nowhere")]) == (0, 0)


def test_domain_aware_prompts_agree_here():
    pred = [0, 1, 2]
    acc = evaluate(OneHotModel(), tokenizer, _images(pred), torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0]),
                   CLASSES, DOMAINS, prompts="domain_aware")
    assert acc.mean() == 1.0


def test_bad_arguments():
    imgs = _images([0, 1])
    with pytest.raises(ValueError, match="outside"):
        evaluate(OneHotModel(), tokenizer, imgs, torch.tensor([0, 5]), torch.tensor([0, 0]), CLASSES, DOMAINS)
    with pytest.raises(ValueError, match=r"\[N\]"):
        evaluate(OneHotModel(), tokenizer, imgs, torch.tensor([0]), torch.tensor([0, 0]), CLASSES, DOMAINS)
    with pytest.raises(ValueError, match="prompts"):
        evaluate(OneHotModel(), tokenizer, imgs, torch.tensor([0, 1]), torch.tensor([0, 0]), CLASSES, DOMAINS,
                 prompts="mixed")


@pytest.mark.parametrize("template, match", [
    ("a {foo} of {cls}", r"template 'a \{foo\} of \{cls\}' has a placeholder other than .*\{foo\}"),
    ("a {cls", r"template 'a \{cls' is not a format string"),
    ("a photo", r"template 'a photo' has no '\{cls\}' placeholder"),
    ("a photo of {{cls}}.", r"has no '\{cls\}' placeholder"),
])
def test_templates_are_checked_as_the_specs_are(template, match):
    """A template without a class field would score every class alike (every image goes to class 0)."""
    imgs = _images([0, 1])
    with pytest.raises(ValueError, match=match):
        evaluate(OneHotModel(), tokenizer, imgs, torch.tensor([0, 1]), torch.tensor([0, 0]), CLASSES, DOMAINS,
                 templates=["a {domain} of a {cls}.", template])


def test_a_source_of_images_is_read_a_batch_at_a_time(tokenizer):
    """evaluate takes a source that slices into image tensors (ImageFiles) as it takes the tensor, and
    names the rows of a batch that is not images."""
    from conftest import Rows, make_tiny_clip

    model = make_tiny_clip()
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ci, di = torch.tensor([0, 1, 2, 0, 1, 2, 0]), torch.tensor([0, 0, 0, 1, 1, 1, 1])
    source = Rows(x)
    whole = evaluate(model, tokenizer, x, ci, di, CLASSES, DOMAINS, batch_size=3)
    got = evaluate(model, tokenizer, source, ci, di, CLASSES, DOMAINS, batch_size=3)
    assert torch.equal(got.accuracy, whole.accuracy)
    assert source.reads == [(0, 3), (3, 6), (6, 7)]
    bad = x.clone()
    bad[4] = float("nan")
    with pytest.raises(ValueError, match=r"images rows 3:6: images with NaN"):
        evaluate(model, tokenizer, Rows(bad), ci, di, CLASSES, DOMAINS, batch_size=3)
    with pytest.raises(ValueError, match="got a list"):
        evaluate(model, tokenizer, list(x), ci, di, CLASSES, DOMAINS)


def test_evaluate_patches_reads_each_batch_once_and_restores_the_weights(tokenizer):
    """Before and after a stack of patches, each batch of images read once: the same matrices as
    evaluate() without and with the patches applied, the weights bit for bit as before, and a patch
    that does not apply named by its index."""
    from conftest import Rows, make_tiny_clip

    from clipforget_fast import ForgetConfig, evaluate_patches, forget
    from clipforget_fast.evaluate import PatchNotApplied

    model = make_tiny_clip()
    spec = ForgetSpec(CLASSES, DOMAINS, forget_classes=["dog"])
    first = forget(model, tokenizer, spec, ForgetConfig(edit="class-redirect"))
    with first.applied(model):
        second = forget(model, tokenizer, ForgetSpec(CLASSES, DOMAINS, forget_classes=["car"]),
                        ForgetConfig(edit="class-redirect"))
    x = torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ci = torch.tensor([0, 1, 2] * 3 + [0, 2])
    di = torch.tensor([0] * 6 + [1] * 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for prompts in ("agnostic", "domain_aware"):
        kw = dict(batch_size=4, prompts=prompts)
        want_before = evaluate(model, tokenizer, x, ci, di, CLASSES, DOMAINS, **kw)
        with first.applied(model), second.applied(model):
            want_after = evaluate(model, tokenizer, x, ci, di, CLASSES, DOMAINS, **kw)
        source = Rows(x)
        before, after = evaluate_patches(model, tokenizer, [first, second], source, ci, di, CLASSES, DOMAINS, **kw)
        assert source.reads == [(0, 4), (4, 8), (8, 11)]                  # each batch once
        assert torch.equal(before.correct, want_before.correct) and torch.equal(after.correct, want_after.correct)
        assert not torch.equal(before.correct, after.correct)             # the patches move these images
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
    # one patch alone; the second alone is computed on weights the first leaves, and is refused by index
    b1, a1 = evaluate_patches(model, tokenizer, first, x, ci, di, CLASSES, DOMAINS)
    with first.applied(model):
        assert torch.equal(a1.correct, evaluate(model, tokenizer, x, ci, di, CLASSES, DOMAINS).correct)
    with pytest.raises(PatchNotApplied, match="hash mismatch") as e:
        evaluate_patches(model, tokenizer, [second, first], x, ci, di, CLASSES, DOMAINS)
    assert e.value.index == 0
    with pytest.raises(ValueError, match="expected a Patch or a non-empty list"):
        evaluate_patches(model, tokenizer, [], x, ci, di, CLASSES, DOMAINS)
    # a batch that fails midway leaves the weights as they were
    bad = x.clone()
    bad[9] = float("nan")
    with pytest.raises(ValueError, match=r"images rows 8:11: images with NaN"):
        evaluate_patches(model, tokenizer, [first, second], Rows(bad), ci, di, CLASSES, DOMAINS, batch_size=4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
