"""bench/quality.py's verdicts: the scores of a request from two accuracy matrices, and which targets
they miss, on matrices whose counts are set by hand."""
import sys
from pathlib import Path

import pytest
import torch

from clipforget_fast import ForgetSpec
from clipforget_fast.evaluate import AccuracyMatrix

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quality as q  # noqa: E402

CLASSES = tuple(f"c{i}" for i in range(20))          # chance 5 %
DOMAINS = ("photo", "sketch", "cartoon")
PER_CELL = 100


def matrix(correct: dict | None = None, default: int = 90) -> AccuracyMatrix:
    """Every cell ``default`` of PER_CELL right, except the (class, domain) cells in ``correct``."""
    c = torch.full((len(CLASSES), len(DOMAINS)), default, dtype=torch.long)
    for (cls, dom), n in (correct or {}).items():
        c[CLASSES.index(cls), DOMAINS.index(dom)] = n
    return AccuracyMatrix(c, torch.full_like(c, PER_CELL), CLASSES, DOMAINS)


def spec(fc, fd) -> ForgetSpec:
    return ForgetSpec(list(CLASSES), list(DOMAINS), forget_classes=fc, forget_domains=fd)


def test_domain_request_scores_and_counts():
    s = q.score(spec(["c0", "c1"], ["sketch"]), matrix(),
                matrix({("c0", "sketch"): 6, ("c1", "sketch"): 8, ("c0", "photo"): 87, ("c5", "cartoon"): 80}))
    assert s.forget_by_domain == {"sketch": pytest.approx(7.0)}
    assert s.forget_counts == {"sketch": (14, 200)}
    # the same classes elsewhere: 4 cells, 3 images lost of 400
    assert s.same_class_drop == pytest.approx(0.75)
    assert s.lost["same"] == (3, 400)
    # the other 54 cells lost 10 images of 5,400
    assert s.keep_drop == pytest.approx(100 * 10 / 5400)
    assert s.lost["kept"] == (10, 5400)
    assert q.fmt_counts(s) == "sketc 14/200, kept -10/5400, same -3/400"
    assert q.misses(spec(["c0", "c1"], ["sketch"]), s, 0.05) == []
    # the domain's mean meets; its worst cell (c1, 8 %), judged alone, does not
    assert s.worst_cell == (pytest.approx(8.0), "c1", "sketch")
    assert q.cell_misses(spec(["c0", "c1"], ["sketch"]), s, 0.05)


def test_a_domain_forgotten_whole_is_not_judged_cell_by_cell():
    sp = spec(None, ["cartoon"])
    after = {(c, "cartoon"): 0 for c in CLASSES}
    after[("c4", "cartoon")] = 100                          # every cartoon in one class: 5 %, met
    s = q.score(sp, matrix(), matrix(after))
    assert q.misses(sp, s, 0.05) == [] and s.worst_cell[1:] == ("c4", "cartoon")
    assert not q.cell_misses(sp, s, 0.05)


@pytest.mark.parametrize("forgotten, same_lost, kept_lost, expected", [
    (7, 0, 0, []),                                          # exactly chance + 2: met
    (8, 0, 0, ["forgotten sketch 8.00% > 7.00%"]),
    (0, 4, 0, []),                                          # 4 of 200 images: 2 points, met
    (0, 5, 0, ["same classes, other domains drop 2.50 > 2.0"]),
    (0, 0, 57, []),                                         # 57 of 5,700 images: 1 point, met
    (0, 0, 58, ["kept drop 1.02 > 1.0"]),
])
def test_domain_request_misses(forgotten, same_lost, kept_lost, expected):
    sp = spec(["c3"], ["sketch"])
    after = {("c3", "sketch"): forgotten, ("c3", "photo"): 90 - same_lost}
    kept = [(c, d) for c in CLASSES if c != "c3" for d in DOMAINS]      # 57 cells
    for i in range(kept_lost):                              # one image from each kept cell, then a second
        after[kept[i % len(kept)]] = after.get(kept[i % len(kept)], 90) - 1
    s = q.score(sp, matrix(), matrix(after))
    assert q.misses(sp, s, 0.05) == expected


def test_domain_complete_slack_and_no_same_class_group():
    sp = spec(None, ["cartoon"])
    after = {(c, "cartoon"): 10 for c in CLASSES}           # chance + 5 points: met
    s = q.score(sp, matrix(), matrix(after))
    assert s.same_class_drop != s.same_class_drop and "same" not in s.lost
    assert q.misses(sp, s, 0.05) == []
    after[("c0", "cartoon")] = 11                           # 10.05 %: missed
    s = q.score(sp, matrix(), matrix(after))
    assert q.misses(sp, s, 0.05) == ["forgotten cartoon 10.05% > 10.00%"]


def test_kept_gain_is_a_negative_drop():
    sp = spec(["c0"], None)
    s = q.score(sp, matrix(), matrix({("c1", "photo"): 95, **{("c0", d): 0 for d in DOMAINS}}))
    assert s.keep_drop < 0 and s.lost["kept"] == (-5, 5700)
    assert q.fmt_counts(s).endswith("kept +5/5700")
    assert q.misses(sp, s, 0.05) == []
