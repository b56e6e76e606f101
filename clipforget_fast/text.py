"""Text side helpers: tokenize prompt banks once and embed them in batches.

The tokenizer is the model's own: open_clip's ``get_tokenizer(name)`` (or any callable mapping a
list of strings to a LongTensor [n, context_length]), or a Hugging Face tokenizer
(``CLIPTokenizer`` / ``CLIPTokenizerFast``), which is called with padding and truncation.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import context_length, encode_text


def is_hf_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` looks like a Hugging Face tokenizer (it returns a dict of lists)."""
    return all(hasattr(tokenizer, a) for a in ("model_max_length", "pad_token_id", "batch_decode"))


def tokenize(tokenizer, prompts: list[str], device, max_length: int | None = None) -> torch.Tensor:
    """LongTensor [n, ctx] on ``device``; TypeError if the tokenizer returns something else.

    max_length: the text tower's positions, for a Hugging Face tokenizer (its ``model_max_length``
    when None); the prompts are padded to the longest and truncated to it."""
    if not callable(tokenizer):
        raise TypeError("tokenizer must be callable (open_clip.get_tokenizer(...) or a Hugging Face "
                        f"CLIPTokenizer), got {tokenizer!r}")
    if is_hf_tokenizer(tokenizer):
        limit = max_length or tokenizer.model_max_length
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=limit,
                           return_tensors="pt")["input_ids"]
    else:
        tokens = tokenizer(list(prompts))
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise TypeError("tokenizer must return a 2-D LongTensor [n, context_length]")
    return tokens.to(device)


@torch.no_grad()
def encode_tokens(model: nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized text embeddings [n, D] (fp32) of ``tokens`` [n, ctx]."""
    out = [encode_text(model, tokens[i:i + batch_size]).float() for i in range(0, len(tokens), batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def class_embeddings(model: nn.Module, tokenizer, prompt_sets: list[list[str]], device,
                     batch_size: int = 256) -> torch.Tensor:
    """One classifier row per prompt set: the normalized mean of its prompts' normalized
    embeddings (the usual prompt ensemble). Returns [len(prompt_sets), D] fp32."""
    flat = [p for ps in prompt_sets for p in ps]
    tokens = tokenize(tokenizer, flat, device, context_length(model))
    return mean_embeddings(model, tokens, [len(ps) for ps in prompt_sets], batch_size)


@torch.no_grad()
def mean_embeddings(model: nn.Module, tokens: torch.Tensor, sizes: list[int],
                    batch_size: int = 256) -> torch.Tensor:
    """Prompt-ensemble rows from already tokenized prompts: ``tokens`` [sum(sizes), ctx] holds
    consecutive groups of ``sizes[i]`` prompts; returns [len(sizes), D] normalized group means."""
    return ensemble(encode_tokens(model, tokens, batch_size), sizes)


def ensemble(emb: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """[len(sizes), D]: the normalized mean of each consecutive group of ``sizes[i]`` rows of
    ``emb`` [sum(sizes), D], each row normalized first."""
    emb = torch.nn.functional.normalize(emb.float(), dim=-1)
    rows = torch.stack([g.mean(dim=0) for g in torch.split(emb, sizes)])
    return torch.nn.functional.normalize(rows, dim=-1)
