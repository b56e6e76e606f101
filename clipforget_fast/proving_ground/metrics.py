"""Zero-shot metrics on proving-ground renders.

Prompts follow the template "a {domain phrase} of a {class phrase}." (`prompt`). Two classifiers:

- domain-aware: image i of domain d is scored against the C prompts of its own domain d;
- agnostic:     class c is represented by the mean over all given domains of its normalized prompt
                embeddings (re-normalized), as in CLIP prompt ensembling.

`domain_discrimination` asks the converse question: for an image of cell (c, d), does the prompt of
(c, d) score above every (c, d') with d' != d?
"""
import torch

from .render import CLASS_PHRASES, DOMAIN_PHRASES


def prompt(cls, domain):
    """The zero-shot prompt of a (class, domain) cell."""
    return f"a {DOMAIN_PHRASES[domain]} of a {CLASS_PHRASES[cls]}."


@torch.no_grad()
def encode_prompts(model, tokenizer, classes, domains, batch_size=256):
    """Normalized text features [D, C, E] of prompt(c, d)."""
    texts = [prompt(c, d) for d in domains for c in classes]
    tokens = tokenizer(texts)
    feats = torch.cat([model.encode_text(tokens[i:i + batch_size], normalize=True)
                       for i in range(0, len(texts), batch_size)])
    return feats.view(len(domains), len(classes), -1)


@torch.no_grad()
def encode_images(model, images, batch_size=256):
    """Normalized image features [N, E] of normalized images [N, 3, H, W]."""
    return torch.cat([model.encode_image(images[i:i + batch_size], normalize=True)
                      for i in range(0, len(images), batch_size)])


def _per_domain(hit, domain_idx, domains):
    return {d: hit[domain_idx == j].float().mean().item() for j, d in enumerate(domains)
            if (domain_idx == j).any()}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images, class_idx, domain_idx, classes, domains,
                       mode="domain_aware", image_features=None):
    """Top-1 zero-shot accuracy over all `classes`.

    images [N, 3, H, W] normalized; class_idx, domain_idx [N] int64 indexing `classes`, `domains`.
    `image_features` [N, E] (normalized) may be passed instead of recomputing them.
    Returns {"overall": float, "per_domain": {domain: float}}.
    """
    if mode not in ("domain_aware", "agnostic"):
        raise ValueError(f"mode must be 'domain_aware' or 'agnostic', got {mode!r}")
    img = encode_images(model, images) if image_features is None else image_features
    txt = encode_prompts(model, tokenizer, classes, domains)             # [D, C, E]
    if mode == "domain_aware":
        logits = torch.einsum("ne,nce->nc", img, txt[domain_idx])        # [N, C]
    else:
        proto = torch.nn.functional.normalize(txt.mean(0), dim=-1)       # [C, E]
        logits = img @ proto.T
    hit = logits.argmax(1) == class_idx
    return {"overall": hit.float().mean().item(), "per_domain": _per_domain(hit, domain_idx, domains)}


@torch.no_grad()
def domain_discrimination(model, tokenizer, images, class_idx, domain_idx, classes, domains,
                          image_features=None):
    """Fraction of images whose own-cell prompt (c, d) beats every (c, d'), d' != d.

    Returns {"overall": float, "per_domain": {domain: float}}.
    """
    img = encode_images(model, images) if image_features is None else image_features
    txt = encode_prompts(model, tokenizer, classes, domains)             # [D, C, E]
    scores = torch.einsum("ne,dne->nd", img, txt[:, class_idx])          # [N, D]
    hit = scores.argmax(1) == domain_idx
    return {"overall": hit.float().mean().item(), "per_domain": _per_domain(hit, domain_idx, domains)}


def evaluate(model, tokenizer, images, class_idx, domain_idx, classes, domains):
    """All three metrics, sharing one image encoding: {metric: {"overall", "per_domain"}}."""
    feats = encode_images(model, images)
    args = (model, tokenizer, images, class_idx, domain_idx, classes, domains)
    return {"domain_aware": zero_shot_accuracy(*args, mode="domain_aware", image_features=feats),
            "agnostic": zero_shot_accuracy(*args, mode="agnostic", image_features=feats),
            "domain_discrimination": domain_discrimination(*args, image_features=feats)}
