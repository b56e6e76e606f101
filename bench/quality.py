"""Unlearning quality on the proving ground: every mode against its targets (DESIGN §6), on renders
and prompt templates the edit never saw.

    python bench/quality.py                 # the target check: 3+ requests per mode, exit 1 on a miss
    python bench/quality.py --ablations     # baselines and ablations table on one request per mode
    python bench/quality.py --sequential    # forget A, then B on the patched model
    python bench/quality.py --probe         # recovery probe on edited image features
    python bench/quality.py --more-domain   # the target check on six more domain requests
    python bench/quality.py --more-complete # the target check on five more domain-complete requests

Images: fresh renders (seeds ≥ 3·10⁶; training used < 10⁵, its model selection 10⁶), PER_CELL per
cell; the table gives the image counts behind each percentage. Accuracy is zero-shot top-1 over all
classes with the domain-agnostic prompt ensemble, once with the edit's own templates and once with
held-out templates (paraphrases the edit never used). Forgotten cells are judged per domain (mean over
the forgotten classes in that domain); kept cells by their mean drop. The table also gives the worst
forgotten cell, and its last line how many rows would miss with every forgotten cell judged alone
(``global`` and ``domain``: a domain forgotten whole lands its images in some class, so its cells are not
judged alone).

The gate's constants were chosen on the renders of RENDER_SEED (bench/RESULTS.md (16)–(30)): its tables
are validation scores. ``--render-seed TEST_SEED`` scores the same edits on renders no choice was made
on, for the record.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from clipforget_fast import ForgetConfig, ForgetSpec, evaluate, forget, synthesize_prototypes  # noqa: E402
from clipforget_fast import gate  # noqa: E402
from clipforget_fast import proving_ground as pg  # noqa: E402
from clipforget_fast.cli import PRECISIONS  # noqa: E402
from clipforget_fast.layers import IMAGE_PREFIXES, gate_site  # noqa: E402
from clipforget_fast.spec import DEFAULT_TEMPLATES  # noqa: E402
from clipforget_fast.synthesis import SYNTHESIS_FIELDS  # noqa: E402

HELD_OUT_TEMPLATES = (
    "an illustration of a {cls}, {domain}.",
    "a {cls} drawn as a {domain}.",
    "a {domain} depicting a {cls}.",
    "my {domain} of a {cls}.",
    "a picture of a {cls} ({domain}).",
)
RENDER_SEED = 3_000_000
# renders on which no constant of the library was chosen (--render-seed): the test set of the record
TEST_SEED = 11_000_000
# held-out renders per (class, domain) cell. One image of a forgotten cell weighs 100 / PER_CELL points
# against a slack of 2 points over chance: at 20 (the count until 2026-11-30) one image moved a
# one-class cell 5 points and the same class's other domains 1.25, coarser than the targets themselves
PER_CELL = 100
# --domain-examples: real renders handed to forget() as ``domain_examples`` (their seeds apart from the
# held-out ones; the same renders bench/domain_limits.py fits its real-data detectors on)
EXAMPLES_SEED = 5_000_000

# (mode, forget_classes, forget_domains): 1, 3 and 5 classes; one and several domains
REQUESTS = [
    ("global", ["fish"], None),
    ("global", ["house", "star", "key"], None),
    ("global", ["tree", "cup", "car", "boat", "heart"], None),
    ("domain", ["house"], ["sketch"]),
    ("domain", ["star"], ["photo"]),
    ("domain", ["cup", "key", "umbrella"], ["painting", "pixel_art"]),
    ("domain-complete", None, ["sketch"]),
    ("domain-complete", None, ["pixel_art"]),
    ("domain-complete", None, ["cartoon", "painting"]),
]
# more domain requests (--more-domain): where the domain mode breaks, class count versus domain count
MORE_DOMAIN_REQUESTS = [
    ("domain", ["heart"], ["painting"]),
    ("domain", ["boat"], ["cartoon"]),
    ("domain", ["fish"], ["sketch", "cartoon"]),
    ("domain", ["tree", "car"], ["pixel_art"]),
    ("domain", ["cup", "key", "umbrella"], ["painting"]),
    ("domain", ["cup", "key", "umbrella"], ["pixel_art"]),
]
# more domain-complete requests (--more-complete): the every-class gate on the domains and pairs the
# default list leaves out
MORE_COMPLETE_REQUESTS = [
    ("domain-complete", None, ["photo"]),
    ("domain-complete", None, ["cartoon"]),
    ("domain-complete", None, ["painting"]),
    ("domain-complete", None, ["photo", "sketch"]),
    ("domain-complete", None, ["sketch", "pixel_art"]),
]
# targets in accuracy points (DESIGN §6): forgotten ≤ chance + slack; kept drop ≤ limit
FORGET_SLACK = {"global": 2.0, "domain": 2.0, "domain-complete": 5.0}
KEEP_DROP = 1.0
SAME_CLASS_OTHER_DOMAIN_DROP = 2.0
# a score within this many points of its limit meets it (a count exactly at the limit, as 7 of 100 at
# 7 %, comes out of floating point a hair above it); far below one image in any table
AT_LIMIT = 1e-6


@dataclass
class Scores:
    forget_by_domain: dict      # domain -> accuracy (%) over the forgotten cells of that domain
    keep_drop: float            # mean drop (points) over kept cells outside the special group
    same_class_drop: float      # domain mode: drop over the forgotten classes in the other domains
    keep_before: float
    keep_after: float
    forget_counts: dict         # domain -> (recognized, images) behind forget_by_domain
    lost: dict                  # "kept" / "same": (images recognized before less after, images)
    worst_cell: tuple = None    # (accuracy %, class, domain) of the forgotten cell recognized most


def spec_for(mode, fc, fd) -> ForgetSpec:
    return ForgetSpec(list(pg.CLASSES), list(pg.DOMAINS), forget_classes=fc, forget_domains=fd,
                      domain_phrases=pg.DOMAIN_PHRASES, class_phrases=pg.CLASS_PHRASES)


def score(spec: ForgetSpec, before, after) -> Scores:
    fb, counts = {}, {}
    for d in spec.domains:
        cells = [(c, dd) for c, dd in spec.forget_cells if dd == d]
        if cells:
            fb[d], counts[d] = 100 * after.cell_mean(cells), after.counts(cells)
    same = set()
    if spec.mode in ("domain", "cells"):
        fcls = {c for c, _ in spec.forget_cells}
        same = {cell for cell in spec.retain_cells if cell[0] in fcls}
    rest = spec.retain_cells - same
    sd = 100 * (before.cell_mean(same) - after.cell_mean(same)) if same else float("nan")
    lost = {}
    for key, cells in (("kept", rest), ("same", same)):
        if cells:
            (right, n), (right_after, _) = before.counts(cells), after.counts(cells)
            lost[key] = (right - right_after, n)
    keep_before, keep_after = 100 * before.cell_mean(rest), 100 * after.cell_mean(rest)
    worst = max(((100 * after.cell_mean([cell]), *cell) for cell in sorted(spec.forget_cells)), default=None)
    return Scores(fb, keep_before - keep_after, sd, keep_before, keep_after, counts, lost, worst)


def cell_misses(spec: ForgetSpec, s: Scores, chance: float) -> bool:
    """Whether the worst forgotten cell, judged alone, is over the mode's limit (a reading stricter than
    the per-domain mean the verdicts use: one class of a domain can sit over it while the mean meets).
    Not for ``domain-complete``: an image classified at chance lands in some class, so a domain whose
    every image is forgotten still has cells far over chance."""
    if spec.mode == "domain-complete":
        return False
    limit = 100 * chance + FORGET_SLACK.get(spec.mode, 2.0)
    return s.worst_cell is not None and s.worst_cell[0] > limit + AT_LIMIT


def misses(spec: ForgetSpec, s: Scores, chance: float) -> list[str]:
    out = []
    limit = 100 * chance + FORGET_SLACK.get(spec.mode, 2.0)     # cell by cell: the domain mode's
    for d, a in s.forget_by_domain.items():
        if a > limit + AT_LIMIT:
            out.append(f"forgotten {d} {a:.2f}% > {limit:.2f}%")
    if s.keep_drop > KEEP_DROP + AT_LIMIT:
        out.append(f"kept drop {s.keep_drop:.2f} > {KEEP_DROP}")
    same = s.same_class_drop
    if same == same and same > SAME_CLASS_OTHER_DOMAIN_DROP + AT_LIMIT:
        out.append(f"same classes, other domains drop {same:.2f} > {SAME_CLASS_OTHER_DOMAIN_DROP}")
    return out


class Harness:
    def __init__(self, per_cell: int, config: ForgetConfig, weights=None, dtype: torch.dtype = torch.float32,
                 render_seed: int = RENDER_SEED):
        self.model, self.tok, _ = pg.load(weights=weights)
        self.model.to(dtype)                     # edits and evaluations alike run on weights of this dtype
        # how the tables name the model: another checkpoint by its file name, depth and pooling
        self.name = "proving ground" if weights is None else \
            f"proving ground, {Path(weights).name}, {len(self.model.visual.transformer.resblocks)} image " \
            f"blocks, {self.model.visual.pool_type} pooling"
        if dtype != torch.float32:
            self.name += f", {str(dtype).removeprefix('torch.')} weights"
        self.config = config
        if render_seed != RENDER_SEED:
            self.name += f", test renders (seed {render_seed})"
        self.images, self.ci, self.di = pg.render(list(pg.CLASSES), list(pg.DOMAINS), per_cell, seed=render_seed)
        self.ev = dict(classes=list(pg.CLASSES), domains=list(pg.DOMAINS), domain_phrases=pg.DOMAIN_PHRASES,
                       class_phrases=pg.CLASS_PHRASES)
        self.before = {name: self._eval(t) for name, t in (("edit", DEFAULT_TEMPLATES), ("held-out", HELD_OUT_TEMPLATES))}
        self.banks = {}
        self.examples = None                     # {domain: images}: forget()'s domain_examples, where the gate edits
        self.example_classes = None              # {domain: class index [n]} of those images
        self.examples_without_forgotten = False  # leave each request's forgotten classes out of them
        try:
            self.has_site = gate_site(self.model) is not None
        except ValueError:
            self.has_site = False

    def use_examples(self, per_cell: int, without_forgotten: bool = False) -> None:
        """Hand forget() ``per_cell`` real renders of every cell, by domain (render seed EXAMPLES_SEED), for
        every request the domain gate edits; with ``without_forgotten``, of every cell but the request's
        forgotten classes' (examples of the domains that hold none of what is forgotten). The tables say
        which in their title."""
        images, ci, di = pg.render(list(pg.CLASSES), list(pg.DOMAINS), per_cell, seed=EXAMPLES_SEED)
        self.examples = {d: images[di == j].to(next(self.model.parameters()).dtype) for j, d in enumerate(pg.DOMAINS)}
        self.example_classes = {d: ci[di == j] for j, d in enumerate(pg.DOMAINS)}
        self.examples_without_forgotten = without_forgotten
        self.name += f", {per_cell} real renders per cell as domain examples" + \
            (", none of the forgotten classes" if without_forgotten else "")

    def _eval(self, templates):
        return evaluate(self.model, self.tok, self.images, self.ci, self.di, templates=templates, **self.ev)

    def bank(self, config: ForgetConfig):
        key = tuple(getattr(config, f) for f in SYNTHESIS_FIELDS)
        if config.use_prototypes and key not in self.banks:
            self.banks[key] = synthesize_prototypes(self.model, self.tok, spec_for("global", ["fish"], None), config)
        return self.banks.get(key)

    def forget(self, spec: ForgetSpec, config: ForgetConfig | None = None):
        """forget() on the model as it is, with the bank of ``config`` (default: the harness's) and, where the
        domain gate edits, the real examples the harness was given (``use_examples``)."""
        config = config or self.config
        examples = None
        if self.examples is not None and config.edit_for(spec, gate_site=self.has_site) == "domain-gate":
            examples = self.examples
            if self.examples_without_forgotten:
                gone = torch.tensor([pg.CLASSES.index(c) for c in {c for c, _ in spec.forget_cells}])
                keep = {d: ~torch.isin(self.example_classes[d], gone) for d in examples}
                # every class forgotten (domain-complete): no example is left, the edit is data-free
                examples = {d: x[keep[d]] for d, x in examples.items() if keep[d].any()} or None
        return forget(self.model, self.tok, spec, config, prototypes=self.bank(config), domain_examples=examples)

    def run(self, spec: ForgetSpec, config: ForgetConfig | None = None, edit=None):
        """Edit, evaluate with both template sets, restore. ``edit`` overrides forget() (baselines)."""
        config = config or self.config
        self.bank(config)       # synthesized once and shared: its time is in the table's header, not the edit's
        t = time.perf_counter()
        patch = edit(self, spec) if edit else self.forget(spec, config)
        secs = time.perf_counter() - t
        with patch.applied(self.model):          # the weights come back exactly, request after request
            after = {name: self._eval(t) for name, t in (("edit", DEFAULT_TEMPLATES), ("held-out", HELD_OUT_TEMPLATES))}
        return {name: score(spec, self.before[name], after[name]) for name in after}, patch, secs


def fmt_forget(s: Scores) -> str:
    return " ".join(f"{d[:5]}:{a:.1f}" for d, a in s.forget_by_domain.items())


def fmt_counts(s: Scores) -> str:
    """The images behind a row: recognized / images per forgotten domain, and the change in the kept
    cells' (and the same classes' in the other domains) recognized images, of how many."""
    parts = [f"{d[:5]} {r}/{n}" for d, (r, n) in s.forget_counts.items()]
    parts += [f"{key} {-k:+d}/{n}" for key, (k, n) in s.lost.items()]
    return ", ".join(parts)


EDITS = ("default", "class-redirect", "domain-gate")   # forget() with the default config, or with that edit


def config_diff(config: ForgetConfig) -> str:
    """'ForgetConfig(a=1, b=2)' with only the fields that differ from the defaults."""
    base, mine = ForgetConfig().to_dict(), config.to_dict()
    return "ForgetConfig(" + ", ".join(f"{k}={v!r}" for k, v in mine.items() if base.get(k) != v) + ")"


def self_check_summary(check: dict | None) -> str:
    """The patch's self-check in a table cell: forgotten (and same-class) prototypes before → after, and
    whether forget() warned."""
    if not check:
        return "none (no prototypes)"
    parts = [f"F {100 * check['forgotten']['before']:.0f}→{100 * check['forgotten']['after']:.0f}"]
    for key, tag in (("same_class_other_domains", "same"), ("kept", "kept")):
        if key in check:
            parts.append(f"{tag} {100 * check[key]['before']:.0f}→{100 * check[key]['after']:.0f}")
    return ", ".join(parts) + ("; warns" if check["warnings"] else "; quiet")


def bank_note(h: Harness) -> str:
    """The shared prototype bank's size and synthesis time (the requests' ``edit s`` leave it out)."""
    bank = h.bank(h.config)
    if bank is None:
        return ""
    st = bank.stats
    return (f"; prototype bank: {st['prototypes']} prototypes synthesized once in {st['seconds']:.0f} s and shared "
            "by every request (not in the edit times)")


def check_targets(h: Harness, record: bool, requests=REQUESTS, edit: str = "default edit") -> int:
    """Every request against its mode's targets, with ``h.config`` (named ``edit`` in the title)."""
    chance = h.before["edit"].chance
    lines = [f"held-out renders: {h.images.shape[0]} images; chance {100 * chance:.1f}%; edit: "
             f"{config_diff(h.config)}{bank_note(h)}",
             "", "| mode | forget | templates | forgotten acc. per domain (%) | worst forgotten cell (%) | kept before → after (drop) | same class other domains drop | images | edit s | self-check (prototypes) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print(lines[0], flush=True)
    failed = cell_failed = 0
    for mode, fc, fd in requests:
        spec = spec_for(mode, fc, fd)
        what = f"{','.join(fc or ['*'])} @ {','.join(fd or ['*'])}"
        try:
            res, patch, secs = h.run(spec)
        except ValueError as e:             # the edit refuses this kind of request: every row misses
            failed += 2
            cell_failed += 2
            lines.append(f"| {mode} | {what} | both | | | | | | | | MISS: refused: {e} |")
            print(lines[-1], flush=True)
            continue
        if h.config.edit == "auto":
            what += f" ({patch.info['edit']})"
        check = self_check_summary(patch.info.get("self_check"))
        for name, s in res.items():
            miss = misses(spec, s, chance)
            failed += bool(miss)
            cell_failed += bool(miss) or cell_misses(spec, s, chance)
            sd = "" if s.same_class_drop != s.same_class_drop else f"{s.same_class_drop:.2f}"
            worst = "" if s.worst_cell is None else f"{s.worst_cell[1]} @ {s.worst_cell[2][:5]}: {s.worst_cell[0]:.1f}"
            lines.append(f"| {mode} | {what} | {name} | {fmt_forget(s)} | {worst} | {s.keep_before:.1f} → {s.keep_after:.1f} "
                         f"({s.keep_drop:.2f}) | {sd} | {fmt_counts(s)} | {secs:.1f} | {check} | {'ok' if not miss else 'MISS: ' + '; '.join(miss)} |")
        print(lines[-2], lines[-1], sep="\n", flush=True)
    lines.append("")
    lines.append(f"{failed} of {2 * len(requests)} request × template-set rows miss a target "
                 f"({cell_failed} with every forgotten cell of global and domain requests judged alone)")
    print(lines[-1])
    if record:
        append_results(f"quality: targets per mode, {edit} ({h.name})", lines)
    return 1 if failed else 0


# ---- baselines ---------------------------------------------------------------------------------
def prompt_keys(h: Harness, spec: ForgetSpec) -> dict:
    """{cell: [n_templates, d_in]} inputs of ``text_projection`` for each cell's prompts."""
    from clipforget_fast.capture import without_projection
    from clipforget_fast.text import tokenize

    with torch.no_grad(), without_projection(h.model, "text_projection"):
        return {c: h.model.encode_text(tokenize(h.tok, spec.prompts(c), "cpu")).float() for c in spec.cells}


def redirect_edit(h: Harness, spec: ForgetSpec, lam: float = 1e-2, rank: int = 32):
    """Closed-form "redirect" on the two projections (in the spirit of UCE / AlphaEdit): the W' that
    minimizes Σ_F ‖W'k - W k₀‖² + Σ_R ‖W'k - Wk‖² + λ‖W' - W‖², k₀ a neutral key (the generic
    prompt "an image." for text, the mean prototype for images), solved as
    ΔW = W (k₀ s_Fᵀ - G_F)(G_F + G_R + λ tr(G)/d · I)⁻¹ and stored as a rank-``rank`` patch."""
    from clipforget_fast.capture import without_projection
    from clipforget_fast.patch import Patch, PatchEntry, tensor_hash
    from clipforget_fast.text import tokenize

    m, cells = h.model, spec.cells
    forget_set = spec.forget_cells
    bank = h.bank(h.config)
    keys = prompt_keys(h, spec)
    with torch.no_grad():
        with without_projection(m, "text_projection"):
            k0_text = m.encode_text(tokenize(h.tok, ["an image."], "cpu"))[0]
        with without_projection(m.visual, "proj"):
            vkeys = {c: m.encode_image(bank.images[c]) for c in cells}
    k0_vis = torch.cat(list(vkeys.values())).mean(0)
    entries = []
    for name, P, kd, k0 in (("text_projection", m.text_projection, keys, k0_text), ("visual.proj", m.visual.proj, vkeys, k0_vis)):
        W = P.detach().t().float()                                   # [d_out, d_in]
        KF = torch.cat([kd[c] for c in cells if c in forget_set]).float()
        KR = torch.cat([kd[c] for c in cells if c not in forget_set]).float()
        GF, GR = KF.t() @ KF, KR.t() @ KR
        d = GF.shape[0]
        reg = lam * float(torch.trace(GF + GR)) / d
        M = torch.linalg.solve((GF + GR + reg * torch.eye(d)).t(), (torch.outer(k0.float(), KF.sum(0)) - GF).t()).t()
        U, S, Vh = torch.linalg.svd(W @ M)
        A, B = U[:, :rank] * S[:rank], Vh[:rank].t()
        entries.append(PatchEntry(name, "in_out", A.contiguous(), B.contiguous(), tensor_hash(P)))
    return Patch(entries)


# The class redirect (clipforget_fast.redirect) at the settings measured here.
CLASS_REDIRECT = ForgetConfig(edit="class-redirect")   # retain_energy None: 0.9999 for this edit


ABLATION_REQUESTS = [("global", ["fish"], None), ("domain", ["house"], ["sketch"]), ("domain-complete", None, ["sketch"])]


def ablations(h: Harness, record: bool) -> None:
    base = h.config.replace(edit="project")             # the projection variants
    variants = [
        ("text-only nullspace, proj (CCUP)", base.replace(use_prototypes=False), None),
        ("prototypes only, proj", base.replace(use_text=False), None),
        ("multimodal, proj", base, None),
        ("multimodal, proj+mlp (last 2)", base.replace(targets="proj+mlp"), None),
        ("multimodal, proj+mlp+attn (last 2)", base.replace(targets="proj+mlp+attn"), None),
        ("multimodal, proj+mlp, all tokens", base.replace(targets="proj+mlp", token_policy="all"), None),
        *[(f"multimodal, proj, α={a}", base.replace(alpha=a), None) for a in (0.25, 0.5, 0.75)],
        ("closed-form redirect, proj", base, redirect_edit),
        ("class redirect, text side (edit='class-redirect')", CLASS_REDIRECT, None),
        ("domain gate, image side (edit='domain-gate')", h.config.replace(edit="domain-gate"), None),
        (f"the harness's config ({config_diff(h.config)}; edit='auto' picks per request)", h.config, None),
    ]
    chance = h.before["edit"].chance
    lines = ["Held-out renders and held-out templates; forgotten = mean over forgotten cells (%), "
             "kept drop in points (domain mode: the same classes in the other domains in brackets); "
             f"chance {100 * chance:.1f}%; misses = rows of the two template sets that miss a target.", "",
             "| variant | " + " | ".join(f"{m} forgotten / kept drop" for m, _, _ in ABLATION_REQUESTS) + " | misses |",
             "|---|" + "---|" * (len(ABLATION_REQUESTS) + 1)]
    for name, cfg, edit in variants:
        cols, miss = [], 0
        for mode, fc, fd in ABLATION_REQUESTS:
            spec = spec_for(mode, fc, fd)
            try:
                res, patch, _ = h.run(spec, cfg, edit)
            except ValueError:              # the edit refuses this kind of request
                cols.append("refused")
                miss += 2
                continue
            s = res["held-out"]
            fa = sum(s.forget_by_domain.values()) / len(s.forget_by_domain)
            sc = "" if s.same_class_drop != s.same_class_drop else f" (same class {s.same_class_drop:.2f})"
            picked = f" [{patch.info['edit']}]" if cfg.edit == "auto" and edit is None else ""
            cols.append(f"{fa:.1f} / {s.keep_drop:.2f}{sc}{picked}")
            miss += sum(bool(misses(spec, r, chance)) for r in res.values())
        lines.append(f"| {name} | " + " | ".join(cols) + f" | {miss} |")
        print(lines[-1], flush=True)
    if record:
        append_results(f"quality: baselines and ablations ({h.name})", lines)


SEQUENTIAL = [(("global", ["fish"], None), ("global", ["house"], None)),
              (("domain", ["house"], ["sketch"]), ("domain", ["star"], ["photo"])),
              (("domain-complete", None, ["sketch"]), ("domain-complete", None, ["pixel_art"]))]


def sequential(h: Harness, record: bool) -> int:
    """Forget A, apply; forget B on the patched model, apply: both forgotten, the rest kept; revert."""
    state = {k: v.clone() for k, v in h.model.state_dict().items()}
    chance = h.before["edit"].chance
    lines = [f"Forget A, apply; then forget B on the patched model, apply. Edit: {config_diff(h.config)}.", "",
             "| A then B | templates | A acc. per domain | B acc. per domain | same classes other domains drop | "
             "kept before → after (drop) | revert B, A: max abs weight change | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    failed = 0
    for a, b in SEQUENTIAL:
        sa, sb = spec_for(*a), spec_for(*b)
        if a[0] == b[0] == "domain-complete":        # judged as one request of that mode
            both = spec_for("domain-complete", None, a[2] + b[2])
        else:
            both = ForgetSpec.from_cells(list(pg.CLASSES), list(pg.DOMAINS), sorted(sa.forget_cells | sb.forget_cells),
                                         domain_phrases=pg.DOMAIN_PHRASES, class_phrases=pg.CLASS_PHRASES)
        pa = h.forget(sa)
        pa.apply(h.model)
        # B's Grams are captured on the patched model; its prototypes come from the bank (synthesized on
        # the base model: the edit changed only the targeted layers)
        pb = h.forget(sb)
        pb.apply(h.model)
        after = {name: h._eval(t) for name, t in (("edit", DEFAULT_TEMPLATES), ("held-out", HELD_OUT_TEMPLATES))}
        pb.revert(h.model)
        pa.revert(h.model)
        restored = max(float((h.model.state_dict()[k] - v).abs().max()) for k, v in state.items())
        h.model.load_state_dict(state)               # the next measurements start from the same weights, bit for bit
        what = " then ".join(f"{','.join(r[1] or ['*'])} @ {','.join(r[2] or ['*'])}" for r in (a, b))
        for name, acc in after.items():
            s = score(both, h.before[name], acc)
            per = lambda spec: " ".join(f"{d[:5]}:{100 * acc.cell_mean([c for c in spec.forget_cells if c[1] == d]):.0f}"
                                        for d in pg.DOMAINS if any(c[1] == d for c in spec.forget_cells))
            miss = misses(both, s, chance)
            failed += bool(miss)
            sd = "" if s.same_class_drop != s.same_class_drop else f"{s.same_class_drop:.2f}"
            lines.append(f"| {what} | {name} | {per(sa)} | {per(sb)} | {sd} | {s.keep_before:.1f} → {s.keep_after:.1f} "
                         f"({s.keep_drop:.2f}) | {restored:.2e} | {'ok' if not miss else 'MISS: ' + '; '.join(miss)} |")
    print("\n".join(lines))
    if record:
        append_results(f"quality: sequential requests ({h.name})", lines)
    return 1 if failed else 0


def _probe(f: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, steps: int) -> float:
    """Balanced accuracy (%) on the rows outside ``train`` of a softmax-regression probe on features ``f``
    trained on the ``train`` rows to predict ``labels`` (classes weighted alike)."""
    k = int(labels.max()) + 1
    W = torch.zeros(f.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    counts = torch.bincount(labels[train], minlength=k).float()
    weight = counts.sum() / (k * counts.clamp_min(1))
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(f[train] @ W + b, labels[train], weight=weight).backward()
        opt.step()
    with torch.no_grad():
        pred, yt = (f[~train] @ W + b).argmax(1), labels[~train]
        return 100 * float(torch.stack([(pred[yt == c] == c).float().mean() for c in yt.unique()]).mean())


def recovery_probe(h: Harness, record: bool, train_per_cell: int = 5, steps: int = 300) -> None:
    """Knowledge retention: a linear probe on image embeddings, trained on ``train_per_cell`` renders
    per cell and tested on the other renders, before and after the edit: for a class forgotten somewhere,
    whether an image is of a forgotten cell; when every class of some domains is forgotten, which class
    an image of those domains shows."""
    rows = [f"Edit: {'default' if h.config == ForgetConfig() else h.config.edit}.", "",
            "| request | probe | chance | probe balanced acc. before | after | zero-shot forgotten acc. after |",
            "|---|---|---|---|---|---|"]
    rank = torch.zeros_like(h.ci)
    seen = {}
    for i, (c, d) in enumerate(zip(h.ci.tolist(), h.di.tolist())):
        rank[i] = seen.get((c, d), 0)
        seen[(c, d)] = rank[i].item() + 1
    for mode, fc, fd in ABLATION_REQUESTS:
        spec = spec_for(mode, fc, fd)
        patch = h.forget(spec)
        cells = torch.tensor([(pg.CLASSES[c], pg.DOMAINS[d]) in spec.forget_cells
                              for c, d in zip(h.ci.tolist(), h.di.tolist())])
        if mode == "domain-complete":                  # which class, among the forgotten domains' images
            rows_of, labels, what, chance = cells, h.ci, "class of a forgotten domain's image", 100 / len(pg.CLASSES)
        else:                                           # whether an image is of a forgotten cell
            rows_of, labels, what, chance = torch.ones_like(cells), cells.long(), "forgotten cell or not", 50.0
        def probe() -> float:                          # the probe on the model's image features as they are
            with torch.no_grad():
                f = torch.nn.functional.normalize(h.model.encode_image(h.images), dim=-1)
            return _probe(f[rows_of], labels[rows_of], (rank < train_per_cell)[rows_of], steps)

        accs = [probe()]
        image_side = any(e.name.startswith(IMAGE_PREFIXES) for e in patch.entries)
        with patch.applied(h.model):                   # the weights come back bit for bit (revert: to ~5e-7)
            # an edit of the text side alone leaves the image features as they were: nothing to probe
            after = f"{probe():.1f}" if image_side else "n/a (image features unchanged)"
            zs = 100 * h._eval(HELD_OUT_TEMPLATES).forget_accuracy(spec)
        rows.append(f"| {mode}: {','.join(fc or ['*'])} @ {','.join(fd or ['*'])} ({patch.info['edit']}) | {what} | "
                    f"{chance:.0f} | {accs[0]:.1f} | {after} | {zs:.1f} |")
    print("\n".join(rows))
    if record:
        append_results(f"quality: recovery probe ({h.name})",
                       [f"Linear probe on image embeddings, {train_per_cell} renders per cell for training, "
                        "the rest for testing; balanced accuracy.", ""] + rows)


def prototype_report(h: Harness, out: Path, record: bool) -> None:
    """Acceptance rate, steps to acceptance, and a grid PNG of prototypes (one column per domain)."""
    from PIL import Image

    bank = h.bank(h.config)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = torch.tensor(pg.MEAN).view(3, 1, 1), torch.tensor(pg.STD).view(3, 1, 1)
    tiles = []
    for c in pg.CLASSES:
        row = [(bank.images[(c, d)][0] * std + mean).clamp(0, 1) for d in pg.DOMAINS]
        tiles.append(torch.cat(row, dim=2))
    grid = (torch.cat(tiles, dim=1).permute(1, 2, 0).numpy() * 255).astype("uint8")
    path = out / "prototypes_grid.png"
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    st = bank.stats
    steps = "none accepted" if st["mean_steps_to_accept"] is None else f"{st['mean_steps_to_accept']:.1f}"
    line = (f"{st['prototypes']} prototypes ({h.config.prototypes_per_cell} per cell), accepted "
            f"{st['accepted']} ({100 * st['acceptance_rate']:.1f}%) at p ≥ {h.config.accept_prob}, mean steps to "
            f"acceptance {steps}, {st['seconds']:.1f} s; grid: {path}")
    print(line)
    if record:
        append_results(f"quality: prototype synthesis ({h.name})", [line.replace(str(path), path.name)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-cell", type=int, default=PER_CELL, help="held-out renders per cell")
    ap.add_argument("--render-seed", type=int, default=RENDER_SEED,
                    help=f"seed of the held-out renders (default {RENDER_SEED}, on which the gate's constants were "
                         f"chosen; {TEST_SEED}: renders no choice was made on, the record's test set)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--ablations", action="store_true", help="baselines and ablations table")
    ap.add_argument("--sequential", action="store_true", help="forget A then B on the patched model")
    ap.add_argument("--probe", action="store_true", help="recovery probe (knowledge retention)")
    ap.add_argument("--prototypes", action="store_true", help="synthesis report and prototype grid PNG")
    ap.add_argument("--more-domain", action="store_true", help="the targets on more domain requests")
    ap.add_argument("--more-complete", action="store_true", help="the targets on more domain-complete requests")
    ap.add_argument("--out", default="results/quality", help="folder for PNGs")
    ap.add_argument("--edit", choices=EDITS, default="default",
                    help="edit checked against the targets: the library's forget() or a bench variant")
    ap.add_argument("--seed", type=int, default=None, help="ForgetConfig.seed (prototype synthesis)")
    ap.add_argument("--prototypes-per-cell", type=int, default=None, help="ForgetConfig.prototypes_per_cell")
    ap.add_argument("--gate-keep-order", type=float, default=None, help="ForgetConfig.gate_keep_order")
    ap.add_argument("--domain-examples", type=int, default=None, metavar="N",
                    help="hand forget() N real renders per cell as domain_examples wherever the domain gate edits "
                         "(not data-free: the defaults' targets are measured without)")
    ap.add_argument("--examples-without-forgotten", action="store_true",
                    help="with --domain-examples: leave each request's forgotten classes out of the examples")
    ap.add_argument("--examples-share", type=float, default=None, metavar="S",
                    help="with --domain-examples: gate.EXAMPLES_SHARE, the share of the detectors' weight the real "
                         "examples carry (default: the library's, each weighs as a stand-in)")
    ap.add_argument("--weights", default=None,
                    help="another proving-ground checkpoint (e.g. a class-token one from scripts/train_proving_ground.py "
                         "--pool tok); the tables name it")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="the model's weight dtype for edits and evaluations (bf16: as a half-precision model is "
                         "edited where no autocast runs)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run of the harness itself: 2 renders per cell, 2 prototypes × 10 steps, "
                         "one request per mode, nothing recorded (its verdicts mean nothing)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dtype = PRECISIONS[args.precision]
    if args.quick:
        h = Harness(2, ForgetConfig(prototypes_per_cell=2, steps=10), args.weights, dtype)
        return check_targets(h, False, ABLATION_REQUESTS) and 0
    config = ForgetConfig() if args.edit == "default" else ForgetConfig(edit=args.edit)
    config = config.replace(**{k: v for k, v in (("seed", args.seed), ("prototypes_per_cell", args.prototypes_per_cell),
                                                 ("gate_keep_order", args.gate_keep_order)) if v is not None})
    if args.render_seed in (1_000_000, EXAMPLES_SEED) or args.render_seed < 1_000_000:
        ap.error(f"--render-seed {args.render_seed}: renders the edit or the model's training saw")
    h = Harness(args.per_cell, config, args.weights, dtype, args.render_seed)
    if args.domain_examples is not None:
        if args.domain_examples < 1:
            ap.error(f"--domain-examples {args.domain_examples}: must be ≥ 1")
        h.use_examples(args.domain_examples, args.examples_without_forgotten)
    elif args.examples_without_forgotten:
        ap.error("--examples-without-forgotten needs --domain-examples")
    if args.examples_share is not None:
        if args.domain_examples is None or not 0 < args.examples_share < 1:
            ap.error(f"--examples-share {args.examples_share}: needs --domain-examples and a share in (0, 1)")
        gate.EXAMPLES_SHARE = args.examples_share
        h.name += f", examples' share {args.examples_share:g}"
    record = not args.no_record
    rc = 0
    if args.prototypes:
        prototype_report(h, Path(args.out), record)
    if args.ablations:
        ablations(h, record)
    if args.sequential:
        rc |= sequential(h, record)
    if args.probe:
        recovery_probe(h, record)
    if args.more_domain:
        rc |= check_targets(h, record, MORE_DOMAIN_REQUESTS, edit=f"{args.edit} edit, more domain requests")
    if args.more_complete:
        rc |= check_targets(h, record, MORE_COMPLETE_REQUESTS, edit=f"{args.edit} edit, more domain-complete requests")
    if not (args.ablations or args.sequential or args.probe or args.prototypes or args.more_domain
            or args.more_complete):
        rc |= check_targets(h, record, edit=f"{args.edit} edit")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
