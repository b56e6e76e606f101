"""Sharding an edit across processes launched with ``torchrun`` (DESIGN §4).

When ``torch.distributed`` is initialized with more than one process, ``forget`` and
``synthesize_prototypes`` split their work across the ranks:

- prompts: each rank embeds a contiguous share of the forget prompts and of the keep prompts; the
  embeddings are gathered, so every rank holds every cell's text embedding;
- prototypes: the synthesis batches (``config.batch_size`` prototypes each) go round-robin to the ranks,
  each batch with its own random stream, so the images are the same whatever the number of processes;
  they are gathered afterwards;
- capture: each rank folds its share of prompts and prototypes into its Grams, which are summed
  (``all_reduce``);
- the domain gate's translated prototypes: the batches go round-robin to the ranks and are summed in;
  its real examples (``domain_examples``): each rank reads a contiguous share of whole batches, gathered;
- rank 0 fits the class shifts (or the domain gate) and computes the nullspace and the patch, and
  broadcasts the patch: every rank returns the same ``Patch``;
- ``evaluate``: each rank scores a contiguous share of the images; the predictions are gathered.

Every rank must call with the same model, spec, config and prototypes. The same code runs on CPU with
the gloo backend and on GPUs with NCCL (the collectives then go through the rank's current CUDA
device). ``World(enabled=False)`` (``forget(..., distributed=False)``) keeps a call local to its
process even when a process group exists.
"""
from __future__ import annotations

import torch

try:
    import torch.distributed as dist
except ImportError:       # torch built without distributed support
    dist = None


class World:
    """The ranks an edit is shared by: this process alone, or a ``torch.distributed`` group.

    enabled: None = shard when a process group of more than one rank is initialized; True = it must be
             (RuntimeError otherwise); False = never shard.
    group:   the process group (None = the default one).
    """

    def __init__(self, enabled: bool | None = None, group=None):
        if enabled not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {enabled!r}")
        ready = dist is not None and dist.is_available() and dist.is_initialized()
        if enabled is True and not ready:
            raise RuntimeError("distributed=True, but torch.distributed is not initialized: launch with torchrun "
                               "and call torch.distributed.init_process_group() first")
        self.on = bool(enabled is not False and ready and dist.get_world_size(group) > 1)
        self.group = group
        self.rank = dist.get_rank(group) if self.on else 0
        self.size = dist.get_world_size(group) if self.on else 1
        self._device = None
        if self.on:
            backend = dist.get_backend(group)
            self._device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                            else torch.device("cpu"))

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})" if self.on else "World(local)"

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[lo, hi): the contiguous share of ``n`` items that ``rank`` (default: this one) takes; shares
        differ in size by at most one, lower ranks first."""
        r = self.rank if rank is None else rank
        q, extra = divmod(n, self.size)
        lo = r * q + min(r, extra)
        return lo, lo + q + (1 if r < extra else 0)

    def mine(self, k: int) -> bool:
        """Whether work item ``k`` of a round-robin split is this rank's."""
        return k % self.size == self.rank

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``t`` over the ranks (a no-op alone); returns ``t``."""
        if self.on:
            buf = t.to(self._device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            if buf is not t:
                t.copy_(buf)
        return t

    def cat(self, t: torch.Tensor | None, device=None) -> torch.Tensor:
        """The ranks' ``t`` [n_r, ...] concatenated in rank order, on ``device`` (default: ``t``'s). The
        row counts may differ, the trailing shape and dtype may not; a rank with no rows may pass None."""
        if not self.on:
            return t if t is None or device is None else t.to(device)
        meta = [None] * self.size
        dist.all_gather_object(meta, None if t is None else (tuple(t.shape), t.dtype, str(t.device)), group=self.group)
        full = [m for m in meta if m is not None]
        if not full:
            raise ValueError("World.cat: every rank passed None")
        shape, dtype, dev = full[0]
        if any(m[0][1:] != shape[1:] or m[1] != dtype for m in full):
            raise ValueError(f"World.cat: the ranks' tensors differ in trailing shape or dtype: {full}")
        sizes = [0 if m is None else m[0][0] for m in meta]
        buf = torch.zeros(max(sizes), *shape[1:], dtype=dtype, device=self._device)
        if t is not None:
            buf[:t.shape[0]] = t.to(self._device)
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(parts, buf, group=self.group)
        out = device if device is not None else (t.device if t is not None else dev)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(out)

    def shared(self, n: int, rows, device=None) -> torch.Tensor | None:
        """``rows(lo, hi)`` [hi - lo, ...] computed on this rank's contiguous share of ``n`` items
        (``share``; not called on an empty share) and the ranks' results concatenated in rank order
        (``cat``, on ``device``): every rank gets all ``n`` rows (None when ``n`` is 0, on every rank)."""
        if n == 0:                                      # the same n on every rank: no collective to make
            return None
        lo, hi = self.share(n)
        return self.cat(rows(lo, hi) if hi > lo else None, device)

    def broadcast(self, obj, src: int = 0):
        """``obj`` of rank ``src`` (of the group) on every rank (pickled: tensors keep their device)."""
        if not self.on:
            return obj
        box = [obj if self.rank == src else None]
        root = src if self.group is None else dist.get_global_rank(self.group, src)
        dist.broadcast_object_list(box, src=root, group=self.group,
                                   device=self._device if self._device.type == "cuda" else None)
        return box[0]
