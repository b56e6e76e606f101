"""Evaluation: zero-shot top-1 accuracy per (class, domain) cell, before and after an edit
(DESIGN §2.8).

The classifier has one row per class: the normalized mean embedding of the class's prompts. With
``prompts="agnostic"`` (default) a class's prompts are every template × every domain phrase (the
usual prompt ensemble, blind to the image's domain); with ``prompts="domain_aware"`` an image of
domain d is scored against the prompts of domain d only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import World
from .images import image_source
from .layers import encode_image, image_geometry
from .spec import DOMAIN_PHRASES, ForgetSpec, check_templates, phrases_for
from .text import class_embeddings


@dataclass
class AccuracyMatrix:
    correct: torch.Tensor     # [C, D] long, correct predictions per cell
    total: torch.Tensor       # [C, D] long, images per cell
    classes: tuple[str, ...]
    domains: tuple[str, ...]

    @property
    def accuracy(self) -> torch.Tensor:
        """[C, D] fp32 accuracy per cell (NaN where a cell has no image)."""
        return self.correct.float() / self.total.float()

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)

    @classmethod
    def from_predictions(cls, pred: torch.Tensor, class_idx: torch.Tensor, domain_idx: torch.Tensor, classes,
                         domains) -> "AccuracyMatrix":
        """The matrix of predicted class indices ``pred`` [N] against the true ``class_idx`` [N], per
        (class, ``domain_idx``) cell."""
        classes, domains = tuple(classes), tuple(domains)
        hit = (pred.cpu() == class_idx.cpu()).long()
        flat = class_idx.cpu() * len(domains) + domain_idx.cpu()
        size = len(classes) * len(domains)
        correct = torch.zeros(size, dtype=torch.long).index_add_(0, flat, hit).view(len(classes), len(domains))
        total = torch.bincount(flat, minlength=size).view(len(classes), len(domains))
        return cls(correct, total, classes, domains)

    def _index(self, cells) -> list[tuple[int, int]]:
        ci = {c: i for i, c in enumerate(self.classes)}
        di = {d: i for i, d in enumerate(self.domains)}
        return [(ci[c], di[d]) for c, d in cells if c in ci and d in di]

    def counts(self, cells) -> tuple[int, int]:
        """(correct, total) images over the given (class, domain) cells (cells outside the matrix
        are skipped)."""
        idx = self._index(cells)
        return sum(int(self.correct[i, j]) for i, j in idx), sum(int(self.total[i, j]) for i, j in idx)

    def cell_mean(self, cells) -> float:
        """Mean accuracy over the given (class, domain) cells; cells outside the matrix or without
        images are skipped; nan if none is left."""
        idx = self._index(cells)
        if not idx:
            return float("nan")
        acc = self.correct.double() / self.total.double()       # fp64: 7 of 100 is 0.07, not 0.0700000003
        vals = torch.stack([acc[i, j] for i, j in idx])
        return float(vals[~vals.isnan()].mean())

    def cell(self, cls: str, domain: str) -> float:
        return float(self.accuracy[self.classes.index(cls), self.domains.index(domain)])

    def forget_accuracy(self, spec: ForgetSpec) -> float:
        """Mean accuracy over the spec's forgotten cells."""
        return self.cell_mean(spec.forget_cells)

    def retain_accuracy(self, spec: ForgetSpec) -> float:
        """Mean accuracy over the spec's kept cells."""
        return self.cell_mean(spec.retain_cells)

    def per_domain(self) -> dict[str, float]:
        """Accuracy over all images of each domain."""
        c, t = self.correct.sum(0).float(), self.total.sum(0).float()
        return {d: float(c[j] / t[j]) for j, d in enumerate(self.domains)}

    def mean(self) -> float:
        return float(self.correct.sum()) / max(1, int(self.total.sum()))

    def table(self, width: int = 6) -> str:
        """The matrix as text: one row per class, one column per domain, in percent."""
        acc = self.accuracy * 100
        name_w = max(len(c) for c in self.classes) + 1
        head = " " * name_w + "".join(f"{d[:width]:>{width + 1}}" for d in self.domains)
        rows = [head]
        for i, c in enumerate(self.classes):
            rows.append(f"{c:<{name_w}}" + "".join(f"{acc[i, j]:>{width + 1}.0f}" for j in range(len(self.domains))))
        return "\n".join(rows)


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, images: torch.Tensor, class_idx: torch.Tensor,
             domain_idx: torch.Tensor, classes, domains, templates=None, prompts: str = "agnostic",
             domain_phrases: dict | None = None, class_phrases: dict | None = None,
             batch_size: int = 256, *, distributed: bool | None = None, group=None) -> AccuracyMatrix:
    """Zero-shot accuracy of ``model`` per cell.

    images:     [N, 3, H, W] normalized for the model, or a source that slices into such tensors
                (``ImageFiles``: files decoded a batch at a time; each batch is checked as it is read).
    class_idx:  [N] long, index into ``classes`` of each image's true class.
    domain_idx: [N] long, index into ``domains`` of each image's domain.
    templates:  prompt templates with {cls} and optionally {domain} (default: the spec's bank); checked
                as ``ForgetSpec`` checks its own (ValueError naming a template with another field or none).
    domain_phrases, class_phrases: words for the names in prompts (default: '_' read as a space).
    distributed, group: as for ``forget``: under torchrun each rank scores its share of the images and
                every rank gets the whole matrix (every rank must make the same call).
    """
    return _Scorer(model, tokenizer, images, class_idx, domain_idx, classes, domains, templates, prompts,
                   domain_phrases, class_phrases, batch_size, World(distributed, group)).run([None])[0]


@torch.no_grad()
def evaluate_patches(model: nn.Module, tokenizer, patches, images: torch.Tensor, class_idx: torch.Tensor,
                     domain_idx: torch.Tensor, classes, domains, templates=None, prompts: str = "agnostic",
                     domain_phrases: dict | None = None, class_phrases: dict | None = None,
                     batch_size: int = 256, force: bool = False, *, distributed: bool | None = None,
                     group=None) -> tuple[AccuracyMatrix, AccuracyMatrix]:
    """(before, after): ``evaluate`` of ``model`` as it is and with ``patches`` (a ``Patch`` or a list,
    applied in order, checked as ``Patch.apply`` checks them unless ``force``), with each batch of
    ``images`` read once and scored in both states. From an ``ImageFiles`` source that decodes every file
    once instead of twice. The targeted weights are restored bit for bit afterwards, whatever happens
    (``Patch.applied``); a patch that does not apply raises ``PatchNotApplied`` (a ValueError) with its
    index. The other arguments are ``evaluate``'s."""
    scorer = _Scorer(model, tokenizer, images, class_idx, domain_idx, classes, domains, templates, prompts,
                     domain_phrases, class_phrases, batch_size, World(distributed, group))
    with patched_states(model, patches, force) as states:
        return tuple(scorer.run(states))


class PatchNotApplied(ValueError):
    """``patched_states`` could not apply the patch at ``index`` (the message says why)."""

    def __init__(self, index: int, error: ValueError):
        super().__init__(str(error))
        self.index = index


@contextlib.contextmanager
def patched_states(model: nn.Module, patches, force: bool = False):
    """``patches`` (a ``Patch`` or a list) applied in order for the duration of the block (``Patch.applied``:
    checked unless ``force``; restored bit for bit afterwards, whatever happens). Yields [before, after]:
    callables that load the targeted weights as they were and as the patches leave them (a copy of each
    targeted weight in each state, so switching costs one copy of those weights, not an apply)."""
    from .patch import Patch

    patches = [patches] if isinstance(patches, Patch) else list(patches) if isinstance(patches, (list, tuple)) else None
    if not patches or not all(isinstance(p, Patch) for p in patches):
        raise ValueError(f"patches: expected a Patch or a non-empty list of them, got {patches!r}")
    params = dict(model.named_parameters())
    names = list(dict.fromkeys(e.name for patch in patches for e in patch.entries))
    targeted = [params[n] for n in names if n in params]     # a missing name fails in apply, named
    base = [p.detach().clone() for p in targeted]
    with contextlib.ExitStack() as stack:
        for k, patch in enumerate(patches):
            try:
                stack.enter_context(patch.applied(model, force))
            except ValueError as e:
                raise PatchNotApplied(k, e) from e
        edited = [p.detach().clone() for p in targeted]

        def state(weights):
            @torch.no_grad()
            def load():
                for p, w in zip(targeted, weights):
                    p.copy_(w)
            return load

        yield [state(base), state(edited)]


class _Scorer:
    """The checked inputs of one evaluation, scored in one or more states of the model's weights."""

    def __init__(self, model, tokenizer, images, class_idx, domain_idx, classes, domains, templates, prompts,
                 domain_phrases, class_phrases, batch_size, world: World):
        classes, domains = tuple(classes), tuple(domains)
        if prompts not in ("agnostic", "domain_aware"):
            raise ValueError(f"prompts={prompts!r} must be 'agnostic' or 'domain_aware'")
        if not isinstance(images, torch.Tensor):
            (H, W), _, _ = image_geometry(model)
            images = image_source(images, "images", H, W)
        n = len(images)
        if (isinstance(images, torch.Tensor) and images.dim() != 4) or class_idx.shape != (n,) or domain_idx.shape != (n,):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else f"{n} images"
            raise ValueError(f"images must be [N, 3, H, W] with class_idx and domain_idx [N]; got "
                             f"{shape}, {tuple(class_idx.shape)}, {tuple(domain_idx.shape)}")
        if n and (int(class_idx.max()) >= len(classes) or int(domain_idx.max()) >= len(domains)
                  or int(class_idx.min()) < 0 or int(domain_idx.min()) < 0):
            raise ValueError("class_idx / domain_idx hold an index outside classes / domains")
        templates = check_templates(templates or None)
        phrases = phrases_for(domains, domain_phrases, "domain", DOMAIN_PHRASES)
        cph = phrases_for(classes, class_phrases, "class", {})
        if prompts == "agnostic":
            self.sets = [[t.format(cls=cph[c], domain=phrases[d]) for d in domains for t in templates] for c in classes]
        else:
            self.sets = [[t.format(cls=cph[c], domain=phrases[d]) for t in templates] for d in domains for c in classes]
        self.model, self.tokenizer, self.images, self.batch_size, self.world = model, tokenizer, images, batch_size, world
        self.class_idx, self.domain_idx, self.classes, self.domains, self.prompts = (class_idx, domain_idx, classes,
                                                                                     domains, prompts)

    def _classifier(self, device) -> torch.Tensor:
        clf = class_embeddings(self.model, self.tokenizer, self.sets, device, self.batch_size)
        return clf[None] if self.prompts == "agnostic" else clf.view(len(self.domains), len(self.classes), -1)

    def run(self, states: list) -> list[AccuracyMatrix]:
        """One matrix per state: a callable that loads it into the model's weights (None: as they are).
        Every batch of images is read once and scored in every state, in order."""
        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            clfs = []
            for load in states:
                if load is not None:
                    load()
                clfs.append(self._classifier(device))
            lo, hi = self.world.share(len(self.images))
            preds = [[] for _ in states]
            for i in range(lo, hi, self.batch_size):
                x = self.images[i:min(hi, i + self.batch_size)].to(device)
                dj = self.domain_idx[i:min(hi, i + self.batch_size)].to(device)
                for k, (load, clf) in enumerate(zip(states, clfs)):
                    if load is not None and len(states) > 1:
                        load()
                    f = torch.nn.functional.normalize(encode_image(model, x).float(), dim=-1)
                    if self.prompts == "agnostic":
                        preds[k].append((f @ clf[0].t()).argmax(-1).cpu())
                    else:
                        preds[k].append(torch.einsum("nd,ncd->nc", f, clf[dj]).argmax(-1).cpu())
            out = []
            for p in preds:
                pred = self.world.cat(torch.cat(p) if p else torch.zeros(0, dtype=torch.long))
                out.append(AccuracyMatrix.from_predictions(pred, self.class_idx, self.domain_idx, self.classes,
                                                           self.domains))
            return out
        finally:
            model.train(was_training)
