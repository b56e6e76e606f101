"""ForgetSpec: what to forget, as sets of (class, domain) cells, and the prompt bank built from it.

A request is a set F of cells to forget and a set R of cells to keep (DESIGN §1). The three modes are
presets over the vocabulary `classes × domains`:

    global           forget_classes given, forget_domains None: F = forget_classes × domains
    domain           both given:                                F = forget_classes × forget_domains
    domain-complete  forget_classes None, forget_domains given: F = classes × forget_domains

R is every other cell of the vocabulary. ``ForgetSpec.from_cells`` takes F (and optionally R) cell
by cell. All validation happens here, once.
"""
from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field

# Templates of the prompt bank; {domain} is the domain's phrase, {cls} the class name.
DEFAULT_TEMPLATES = (
    "a {domain} of a {cls}.",
    "a {domain} of the {cls}.",
    "a {cls} in {domain} style.",
    "a {domain} showing a {cls}.",
    "a {domain} of a small {cls}.",
    "a {domain} of a large {cls}.",
)

TEMPLATE_FIELDS = ("cls", "domain")     # the replacement fields a template may hold ({cls} it must)
MODES = ("global", "domain", "domain-complete", "cells")     # a spec's mode: the three presets, or cell by cell

# Natural phrases for common domain identifiers; any other identifier reads with '_' as a space.
DOMAIN_PHRASES = {
    "photo": "photo",
    "sketch": "sketch",
    "cartoon": "cartoon",
    "painting": "painting",
    "pixel_art": "pixel art image",
    "clipart": "clipart image",
    "infograph": "infographic",
    "quickdraw": "quick doodle",
    "real": "photo",
}


def _unique_names(values, arg: str) -> tuple[str, ...]:
    if isinstance(values, str) or values is None:
        raise TypeError(f"{arg} must be a list of names, got {values!r}")
    out = tuple(values)
    for v in out:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{arg} holds an empty or non-string name: {v!r}")
    seen = set()
    for v in out:
        if v in seen:
            raise ValueError(f"{arg} lists {v!r} twice")
        seen.add(v)
    return out


def phrases_for(names, given, what: str, known: dict) -> dict:
    """Phrase of each name: ``given`` (a mapping name → phrase, or None) first, then ``known``, else the
    name with '_' as a space."""
    if given is not None and not isinstance(given, Mapping):
        raise TypeError(f"{what}_phrases must be a mapping {what} → phrase, got {given!r}")
    out = {n: known.get(n, n.replace("_", " ")) for n in names}
    for n, p in (given or {}).items():
        if n not in out:
            raise ValueError(f"{what}_phrases: unknown {what} {n!r}")
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{what}_phrases[{n!r}] = {p!r} is not a phrase")
        out[n] = p
    return out


def check_templates(templates) -> tuple[str, ...]:
    """``templates`` (DEFAULT_TEMPLATES when None) as a tuple, each checked as a format string whose
    replacement fields are ``{cls}`` (at least once) and ``{domain}``, read as ``str.format`` reads them
    (``{{cls}}`` is the literal text "{cls}", no field); ValueError naming the first template that is not."""
    out = tuple(DEFAULT_TEMPLATES if templates is None else _unique_names(templates, "templates"))
    if not out:
        raise ValueError("templates is empty")
    for t in out:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError as e:                     # "a {cls", "a } of {cls}"
            raise ValueError(f"template {t!r} is not a format string: {e}") from e
        other = [f for f in fields if f not in TEMPLATE_FIELDS]
        if other:                                   # "{foo}", "{}", "{0}", "{cls.upper}"
            raise ValueError(f"template {t!r} has a placeholder other than {{cls}}/{{domain}}: {{{other[0]}}}")
        if "cls" not in fields:
            escaped = " (a doubled '{{cls}}' is the literal text '{cls}')" if "{{cls}}" in t else ""
            raise ValueError(f"template {t!r} has no '{{cls}}' placeholder{escaped}")
        try:                                        # what parse leaves unread: "{cls:{w}}", "{cls:d}"
            t.format(cls="x", domain="y")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template {t!r} does not format with a class and a domain: {e!r}") from e
    return out


@dataclass(frozen=True)
class ForgetSpec:
    classes: tuple[str, ...]
    domains: tuple[str, ...]
    forget_cells: frozenset = field(init=False)
    retain_cells: frozenset = field(init=False)
    mode: str = field(init=False)
    templates: tuple[str, ...] = field(init=False)
    domain_phrases: dict = field(init=False, compare=False)
    class_phrases: dict = field(init=False, compare=False)

    def __init__(self, classes, domains, forget_classes=None, forget_domains=None, templates=None,
                 domain_phrases=None, class_phrases=None):
        classes = _unique_names(classes, "classes")
        domains = _unique_names(domains, "domains")
        if not classes:
            raise ValueError("classes is empty: the vocabulary needs at least one class")
        if not domains:
            raise ValueError("domains is empty: give at least one domain, e.g. ['photo']")
        if forget_classes is None and forget_domains is None:
            raise ValueError("nothing to forget: give forget_classes, forget_domains or both")
        fc = classes if forget_classes is None else _unique_names(forget_classes, "forget_classes")
        fd = domains if forget_domains is None else _unique_names(forget_domains, "forget_domains")
        for c in fc:
            if c not in classes:
                raise ValueError(f"forget_classes: unknown class {c!r} (not in classes)")
        for d in fd:
            if d not in domains:
                raise ValueError(f"forget_domains: unknown domain {d!r} (not in domains {list(domains)})")
        if not fc:
            raise ValueError("forget_classes is empty: nothing to forget")
        if not fd:
            raise ValueError("forget_domains is empty: nothing to forget")
        mode = ("global" if forget_domains is None else
                "domain-complete" if forget_classes is None else "domain")
        forget = frozenset((c, d) for c in fc for d in fd)
        self._fill(classes, domains, forget, None, mode, templates, domain_phrases, class_phrases)

    @classmethod
    def from_cells(cls, classes, domains, forget_cells, retain_cells=None, templates=None,
                   domain_phrases=None, class_phrases=None) -> "ForgetSpec":
        """A spec given cell by cell: F = forget_cells, R = retain_cells (default: all other cells)."""
        self = object.__new__(cls)
        classes = _unique_names(classes, "classes")
        domains = _unique_names(domains, "domains")
        if not classes or not domains:
            raise ValueError("classes and domains must both be non-empty")
        forget = self._cells(forget_cells, classes, domains, "forget_cells")
        if not forget:
            raise ValueError("forget_cells is empty: nothing to forget")
        retain = None if retain_cells is None else self._cells(retain_cells, classes, domains,
                                                               "retain_cells")
        if retain is not None:
            both = sorted(forget & retain)
            if both:
                raise ValueError(f"cells in both forget_cells and retain_cells: {both[:5]}")
        self._fill(classes, domains, forget, retain, "cells", templates, domain_phrases, class_phrases)
        return self

    @staticmethod
    def _cells(cells, classes, domains, arg) -> frozenset:
        out, seen = [], set()
        for cell in cells:
            if not (isinstance(cell, tuple) and len(cell) == 2):
                raise ValueError(f"{arg}: {cell!r} is not a (class, domain) tuple")
            c, d = cell
            if c not in classes:
                raise ValueError(f"{arg}: unknown class {c!r} in cell {cell!r}")
            if d not in domains:
                raise ValueError(f"{arg}: unknown domain {d!r} in cell {cell!r}")
            if cell in seen:
                raise ValueError(f"{arg} lists {cell!r} twice")
            seen.add(cell)
            out.append(cell)
        return frozenset(out)

    def _fill(self, classes, domains, forget, retain, mode, templates, domain_phrases, class_phrases):
        phrases = phrases_for(domains, domain_phrases, "domain", DOMAIN_PHRASES)
        cphrases = phrases_for(classes, class_phrases, "class", {})
        if retain is None:
            retain = frozenset((c, d) for c in classes for d in domains) - forget
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "domains", domains)
        object.__setattr__(self, "forget_cells", forget)
        object.__setattr__(self, "retain_cells", retain)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "templates", check_templates(templates))
        object.__setattr__(self, "domain_phrases", phrases)
        object.__setattr__(self, "class_phrases", cphrases)

    # ---- derived views -------------------------------------------------------------------------
    @property
    def cells(self) -> list[tuple[str, str]]:
        """All cells of the request, F first then R, each in vocabulary order."""
        order = {(c, d): (ci, di) for ci, c in enumerate(self.classes) for di, d in enumerate(self.domains)}
        return (sorted(self.forget_cells, key=order.get) + sorted(self.retain_cells, key=order.get))

    def prompts(self, cell: tuple[str, str], templates=None) -> list[str]:
        """The prompt bank of one cell: every template filled with the class and domain phrase."""
        c, d = cell
        return [t.format(cls=self.class_phrases[c], domain=self.domain_phrases[d])
                for t in (templates or self.templates)]

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "domains": list(self.domains), "mode": self.mode,
                "forget_cells": sorted(map(list, self.forget_cells)),
                "retain_cells": sorted(map(list, self.retain_cells)),
                "templates": list(self.templates), "domain_phrases": dict(self.domain_phrases),
                "class_phrases": dict(self.class_phrases)}

    @classmethod
    def from_dict(cls, d: dict) -> "ForgetSpec":
        """The spec of ``to_dict()`` (a patch's ``spec``). Its cells are checked as ``from_cells`` checks
        them, and its ``mode`` must be one of MODES that agrees with them (ValueError naming it)."""
        spec = cls.from_cells(d["classes"], d["domains"], [tuple(c) for c in d["forget_cells"]],
                              [tuple(c) for c in d["retain_cells"]], d["templates"], d["domain_phrases"],
                              d.get("class_phrases"))
        why = spec._disagrees(d["mode"])
        if why:
            raise ValueError(f"mode {d['mode']!r} {why}")
        object.__setattr__(spec, "mode", d["mode"])
        return spec

    def _disagrees(self, mode) -> str | None:
        """Why these cells cannot be those of a spec of ``mode`` (None when they can): the presets keep
        every cell they do not forget, and forget some classes in every domain ("global"), every class
        in some domains ("domain-complete"), or some classes in some domains ("domain")."""
        if mode not in MODES:
            return f"is not one of {MODES}"
        if mode == "cells":
            return None
        every = frozenset((c, d) for c in self.classes for d in self.domains)
        if self.retain_cells != every - self.forget_cells:
            return ("does not match the cells: retain_cells is not every cell outside forget_cells "
                    "(a 'cells' spec's can be)")
        cls, doms = {c for c, _ in self.forget_cells}, {d for _, d in self.forget_cells}
        if {(c, d) for c in cls for d in doms} != self.forget_cells:
            return ("does not match the cells: forget_cells is not every pair of its classes and domains "
                    "(a 'cells' spec's can be)")
        if mode == "global" and len(doms) != len(self.domains):
            return f"does not match the cells: they forget {sorted(cls)} in {sorted(doms)} only, not in every domain"
        if mode == "domain-complete" and len(cls) != len(self.classes):
            return f"does not match the cells: they forget {sorted(cls)} only in {sorted(doms)}, not every class"
        return None

    def __repr__(self) -> str:
        return (f"ForgetSpec(mode={self.mode!r}, {len(self.classes)} classes × {len(self.domains)} "
                f"domains, |F|={len(self.forget_cells)}, |R|={len(self.retain_cells)})")
