"""bench/domain_limits.py's translation memo: within a sweep it translates a request's prototypes once,
and a request that lists the same prototypes' cells in another order gets its own translations."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import domain_limits as dl  # noqa: E402

from clipforget_fast import pipeline  # noqa: E402


def test_translation_memo_keys_on_the_cells_in_order(monkeypatch):
    calls = []

    def translated(model, images, cells, per_cell, cell_text, forgotten_domains, domains, config, classes,
                   world=None, bank=None, amp=None):
        calls.append(list(cells))
        return (images + len(calls), torch.zeros(len(images), dtype=torch.long), None), False

    monkeypatch.setattr(pipeline, "_translated", translated)
    images = torch.arange(12.0).view(3, 4)
    first = [("a", "sketch"), ("b", "sketch"), ("a", "photo")]
    other = [("b", "sketch"), ("a", "sketch"), ("a", "photo")]     # the same cells, listed otherwise
    config = dl.ForgetConfig()
    with dl._translations_once():
        a = pipeline._translated(None, images, first, 1, None, ["sketch"], ["photo", "sketch"], config, [])
        again = pipeline._translated(None, images, first, 1, None, ["sketch"], ["photo", "sketch"], config, [])
        b = pipeline._translated(None, images[[1, 0, 2]], other, 1, None, ["sketch"], ["photo", "sketch"],
                                 config, [])
    assert calls == [first, other]            # reused for the same request, computed for the other order
    assert again[0][0] is a[0][0] and not torch.equal(b[0][0], a[0][0])
    assert pipeline._translated is translated   # restored on exit
