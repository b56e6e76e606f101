"""Capture: stream the input features of every targeted layer into per-layer second moments.

For each layer l and each group g ∈ {F, R} (cells to forget, cells to keep) we keep

    G_g[l] = Σ_x x xᵀ     fp32 [d_in, d_in]

folded batch by batch inside forward hooks, so memory is O(d_in²) per layer whatever the number of
prompts, prototypes or tokens (DESIGN §2.4). Which tokens of a block layer count is
``token_policy``: "pooled" keeps the token the tower pools (CLS or, for an average-pooling tower, the
mean of the patch tokens; the text EOT token, or the first or last position), "all" keeps every token
the pooled one reads (in a causal text tower, none after it: padding; in CLIPA's, every position). The raw projections
(`visual.proj`, `text_projection`) have no module to hook: their input is the tower's output with
the projection taken off for the duration of the pass.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .layers import Layer, encode_image, encode_text, pools_first_token, text_is_causal, text_pool_positions

GROUPS = ("F", "R")


@contextlib.contextmanager
def without_projection(owner: nn.Module, attr: str):
    """Temporarily set ``owner.attr`` (a raw projection Parameter) to None, so the tower returns
    the projection's input."""
    saved = getattr(owner, attr)
    setattr(owner, attr, None)
    try:
        yield
    finally:
        setattr(owner, attr, saved)


class GramCapture:
    """Forward hooks that fold each targeted layer's input into G_F / G_R.

    Use as a context manager; call ``text(tokens, group)`` and ``images(x, group)``; read ``grams``
    ({layer name: {"F": [d, d], "R": [d, d]}}) and ``counts`` ({layer name: {"F": n, "R": n}}).
    """

    def __init__(self, model: nn.Module, layers: list[Layer], token_policy: str = "pooled",
                 device: torch.device | None = None, keep_rows: tuple[str, ...] = ()):
        self.model = model
        self.layers = layers
        self.policy = token_policy
        dev = device or next(model.parameters()).device
        self.grams = {l.name: {g: torch.zeros(l.d_in, l.d_in, device=dev, dtype=torch.float32)
                               for g in GROUPS} for l in layers}
        self.counts = {l.name: {g: 0 for g in GROUPS} for l in layers}
        # the rows themselves, per group in the order of the passes, for the layers named (the class
        # redirect needs the text projection's F rows; the self-check re-projects its inputs)
        self.rows = {name: {g: [] for g in GROUPS} for name in keep_rows}
        self._group = None
        self._eot = None            # [B] EOT positions of the current text batch
        self._handles = []
        self._vis_pool_tok = pools_first_token(model)
        self._causal = text_is_causal(model)

    # ---- hooks --------------------------------------------------------------------------------
    def __enter__(self):
        for layer in self.layers:
            if layer.tap is not None:
                self._handles.append(layer.tap.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: Layer):
        def hook(module, args):
            if self._group is not None:
                self._fold(layer, self._select(layer, args[0]))
        return hook

    def _select(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """The rows of x ([B, L, D], [L, B, D] or [B, D]) that count, as [n, D]."""
        if x.dim() == 2:
            return x
        if not layer.batch_first:
            x = x.transpose(0, 1)
        if layer.tower == "text":
            if self.policy == "pooled":
                return x[torch.arange(x.shape[0], device=x.device), self._eot]
            if not self._causal:
                return x.reshape(-1, x.shape[-1])
            keep = torch.arange(x.shape[1], device=x.device)[None, :] <= self._eot[:, None]
            return x[keep]
        if self.policy == "pooled":                     # open_clip's average pool leaves the class token out
            return x[:, 0] if self._vis_pool_tok else x[:, 1:].mean(dim=1)
        return x.reshape(-1, x.shape[-1])

    def _fold(self, layer: Layer, rows: torch.Tensor) -> None:
        rows = rows.float()
        if layer.name in self.rows:
            self.rows[layer.name][self._group].append(rows.detach().clone())
        self.grams[layer.name][self._group].addmm_(rows.t(), rows)
        self.counts[layer.name][self._group] += rows.shape[0]

    def gather(self, world) -> None:
        """Combine the ranks' captures (``distributed.World``): every rank ends with the Grams and
        counts summed over the ranks and the kept rows of every rank, in rank order (each rank took
        a contiguous share of each group's prompts, so that is the order of the prompts)."""
        if not world.on:
            return
        for name, g in self.grams.items():
            for grp in GROUPS:
                world.sum_(g[grp])
            n = torch.tensor([self.counts[name][grp] for grp in GROUPS], dtype=torch.float64)
            world.sum_(n)
            self.counts[name] = {grp: int(v) for grp, v in zip(GROUPS, n.tolist())}
        for name, groups in self.rows.items():
            dev = next(iter(self.grams[name].values())).device
            for grp, rows in groups.items():
                if self.counts[name][grp]:                  # summed above: every rank takes the same branch
                    groups[grp] = [world.cat(torch.cat(rows) if rows else None, dev)]

    # ---- passes -------------------------------------------------------------------------------
    def _raw_proj(self, tower: str) -> Layer | None:
        for l in self.layers:
            if l.kind == "proj" and l.tower == tower and l.tap is None:
                return l
        return None

    @torch.no_grad()
    def text(self, tokens: torch.Tensor, group: str) -> torch.Tensor:
        """Run the text tower on ``tokens`` [B, ctx] (long), fold its features into ``group``, and
        return the text embeddings [B, D] (unnormalized), so one pass serves both."""
        assert group in GROUPS
        self._group, self._eot = group, text_pool_positions(self.model, tokens)
        try:
            proj = self._raw_proj("text")
            if proj is None:
                return encode_text(self.model, tokens)
            with without_projection(self.model, "text_projection"):
                x = encode_text(self.model, tokens)
            self._fold(proj, x)
            return x @ proj.param.to(x.dtype)
        finally:
            self._group, self._eot = None, None

    @torch.no_grad()
    def images(self, images: torch.Tensor, group: str) -> None:
        """Run the image tower on ``images`` [B, 3, H, W] and fold its features into ``group``."""
        assert group in GROUPS
        self._group = group
        try:
            proj = self._raw_proj("visual")
            if proj is None:
                encode_image(self.model, images)
            else:
                with without_projection(self.model.visual, "proj"):
                    self._fold(proj, encode_image(self.model, images))
        finally:
            self._group = None

