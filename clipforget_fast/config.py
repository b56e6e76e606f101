"""ForgetConfig: every knob of an edit in one frozen, validated dataclass.

Defaults are the choices measured best on the proving ground (see README, "Quality status and the
defaults", and bench/RESULTS.md). Field names are the public contract; benchmarks and saved patches record them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

TARGET_PRESETS = ("proj", "proj+mlp", "proj+mlp+attn", "mlp")
EDITS = ("auto", "project", "class-redirect", "domain-gate")
# retain_energy when it is left at None, per edit (measured on the proving ground: README)
RETAIN_ENERGY = {"project": 0.99, "class-redirect": 0.9999}
# gate_keep_order when it is left at None, without and with real examples of the domains (forget's
# domain_examples); measured on the proving ground: README, bench/RESULTS.md (22), (24)
GATE_KEEP_ORDER = {False: 100.0, True: 10000.0}
TOKEN_POLICIES = ("pooled", "all")
SOLVERS = ("auto", "exact", "randomized")
DTYPES = (None, "float32", "float16", "bfloat16")
# fields by type: checked before any range, so that a wrong type is named rather than failing a comparison
INT_FIELDS = ("prototypes_per_cell", "steps", "jitter", "blur_every", "min_steps", "batch_size", "last_blocks",
              "max_rank", "oversample", "power_iters", "gate_translate_steps", "seed")
FLOAT_FIELDS = ("step_size", "pixel_decay", "accept_prob", "forget_energy", "alpha", "redirect_gain",
                "retain_weight", "domain_keep_weight")
OPTIONAL_FLOAT_FIELDS = ("retain_energy", "gate_keep_order")      # None resolves per edit
BOOL_FIELDS = ("use_text", "use_prototypes", "self_check")


def is_number(v) -> bool:
    """A finite int or float, not a bool (JSON's Infinity and NaN, and True, are no numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def device_error(value) -> str | None:
    """Why ``value`` is not a device name that ``torch.device`` reads (None when it is). Whether this
    machine has the device is not asked: a config may be written on one machine and run on another."""
    import torch

    if not isinstance(value, str):
        return "must be None or a device name such as 'cpu' or 'cuda:0'"
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as e:
        return f"is not a device name ({first_line(e)})"
    return None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for messages that
    quote another library's error without its pages of detail."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def gated_request(spec) -> tuple[list[str], list[str]] | None:
    """(classes, domains) when ``spec`` forgets those classes in those domains and nothing else (every
    cell of the product), keeps some cells of the other domains (the gate's detectors learn them apart)
    and has two classes or more (one class has no other to be confused with): the requests the domain
    gate can take; None otherwise."""
    cls = {c for c, _ in spec.forget_cells}
    doms = {d for _, d in spec.forget_cells}
    if {(c, d) for c in cls for d in doms} != set(spec.forget_cells) or len(spec.classes) < 2:
        return None
    if not any(d not in doms for _, d in spec.retain_cells):
        return None
    return [c for c in spec.classes if c in cls], [d for d in spec.domains if d in doms]


@dataclass(frozen=True)
class ForgetConfig:
    # --- prototype synthesis (DESIGN §2.3) ---
    prototypes_per_cell: int = 4        # P images synthesized per (class, domain) cell; 0 = text only
    steps: int = 150                    # maximum gradient-ascent steps per prototype batch
    step_size: float = 0.1              # RMS-normalized step, in normalized-pixel units
    pixel_decay: float = 0.01           # L2 pull of pixels towards 0 (the mean image), per step × step_size
    jitter: int = 2                     # maximum random shift (pixels) of the encoder input each step
    blur_every: int = 4                 # blur the prototypes every n steps (0 = never)
    accept_prob: float = 0.9            # a prototype is accepted (and frozen) once p(target cell) ≥ this
    min_steps: int = 0                  # ... and no earlier than this step: it keeps moving into its cell
    batch_size: int = 128               # images per encoder pass (synthesis and capture)
    # --- which features define the edit (DESIGN §2.4) ---
    use_text: bool = True               # edit text-tower layers from the prompts' features
    use_prototypes: bool = True         # edit image-tower layers from the prototypes' features
    targets: str = "proj"               # layer preset, one of TARGET_PRESETS
    last_blocks: int = 2                # blocks (from the end, per tower) that "+mlp"/"+attn" presets edit
    token_policy: str = "pooled"        # tokens that feed the Grams of block layers: "pooled" or "all"
    # --- nullspace (DESIGN §2.5) ---
    retain_energy: float | None = None  # 1 - ε: energy of G_R that the kept subspace U_R must hold;
                                        # None = per edit: 0.99 for "project", 0.9999 for "class-redirect"
    forget_energy: float = 0.95         # energy of the R-free forget moment that U_F must hold
    max_rank: int = 32                  # cap on k = rank of U_F per layer (domain gate: of its gated map)
    solver: str = "auto"                # "exact" eigh, "randomized" range finder, "auto" by d_in
    oversample: int = 10                # randomized range finder: extra columns beyond the rank
    power_iters: int = 2                # randomized range finder: subspace iterations
    alpha: float = 1.0                  # 1 = project the forget directions out fully, 0.5 = halve them
    edit: str = "auto"                  # "project" the directions out, "class-redirect" (text side),
                                        # "domain-gate" (image side, some or all classes in some domains,
                                        # class-token towers), or "auto": the domain gate for some or all
                                        # classes in some domains where the model has its site, else
                                        # class-redirect when some class is kept in every domain (and the
                                        # config allows it), project otherwise
    redirect_gain: float = 3.0          # class-redirect: how far forgotten prompts move against their class
    retain_weight: float = 1.0          # class-redirect: weight of holding the kept prompts' outputs
    gate_keep_order: float | None = None  # domain-gate, some classes forgotten: how much the other classes'
                                        # scores relative to one another are held against the size of the
                                        # change (gate.neutral_shift); None: 100 for the data-free edit,
                                        # 10,000 with real examples of the domains (GATE_KEEP_ORDER)
    gate_translate_steps: int = 20      # domain-gate: gradient-ascent steps that move the prototypes into
                                        # and out of each forgotten domain, as more examples for its
                                        # detectors (synthesis.translate); 0 = prototypes only; chosen on
                                        # the proving ground from 0, 20, 60 (README)
    domain_keep_weight: float = 3.0     # class-redirect, class kept in other domains: weight of keeping the
                                        # other cells' predictions against missing the forgotten cells, in
                                        # the fit of its embedding's shift
    # --- checking the result ---
    self_check: bool = True             # score the patch on its own prototypes (zero-shot, before and
                                        # after) and warn when the forgotten cells stay recognized or the
                                        # kept ones lose ground; patch.info["self_check"] holds the scores
    # --- execution ---
    seed: int = 0                       # seeds noise, jitter and random sketches
    device: str | None = None           # None = the model's device
    dtype: str | None = None            # autocast dtype; None = bfloat16 on CUDA, none on the CPU (the
                                        # weights' own dtype)

    def __post_init__(self):
        def need(cond, field, why):
            if not cond:
                raise ValueError(f"ForgetConfig.{field}={getattr(self, field)!r}: {why}")

        for f in INT_FIELDS:
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool), f, "must be an int")
            need(v >= 0, f, "must be ≥ 0")
        for f in FLOAT_FIELDS:
            need(is_number(getattr(self, f)), f, "must be a finite number")
        for f in OPTIONAL_FLOAT_FIELDS:
            need(getattr(self, f) is None or is_number(getattr(self, f)), f, "must be None or a finite number")
        for f in BOOL_FIELDS:
            need(isinstance(getattr(self, f), bool), f, "must be True or False")
        need(self.batch_size >= 1, "batch_size", "must be an int ≥ 1")
        need(self.max_rank >= 1, "max_rank", "must be ≥ 1")
        need(self.last_blocks >= 1, "last_blocks", "must be ≥ 1")
        need(self.steps >= 1 or self.prototypes_per_cell == 0, "steps", "must be ≥ 1")
        need(self.step_size > 0, "step_size", "must be > 0")
        need(self.pixel_decay >= 0, "pixel_decay", "must be ≥ 0")
        need(0 < self.accept_prob <= 1, "accept_prob", "must be in (0, 1]")
        need(self.min_steps < self.steps or self.prototypes_per_cell == 0, "min_steps",
             f"must be < steps ({self.steps}): no prototype could be accepted")
        need(self.retain_energy is None or 0 < self.retain_energy <= 1, "retain_energy", "must be None or in (0, 1]")
        need(0 < self.forget_energy <= 1, "forget_energy", "must be in (0, 1]")
        need(0 <= self.alpha <= 1, "alpha", "must be in [0, 1]")
        need(self.targets in TARGET_PRESETS, "targets", f"must be one of {TARGET_PRESETS}")
        need(self.edit in EDITS, "edit", f"must be one of {EDITS}")
        need(self.redirect_gain > 0, "redirect_gain", "must be > 0")
        need(self.retain_weight >= 0, "retain_weight", "must be ≥ 0")
        need(self.domain_keep_weight > 0, "domain_keep_weight", "must be > 0")
        need(self.gate_keep_order is None or self.gate_keep_order >= 0, "gate_keep_order", "must be None or ≥ 0")
        need(self.edit != "class-redirect" or (self.use_text and self.targets.startswith("proj")), "edit",
             "class-redirect edits the text projection: it needs use_text=True and a 'proj…' targets preset")
        need(self.edit != "domain-gate" or (self.use_prototypes and self.prototypes_per_cell > 0), "edit",
             "domain-gate is fitted on prototypes: it needs use_prototypes=True and prototypes_per_cell ≥ 1")
        need(self.token_policy in TOKEN_POLICIES, "token_policy", f"must be one of {TOKEN_POLICIES}")
        need(self.solver in SOLVERS, "solver", f"must be one of {SOLVERS}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.use_text or self.use_prototypes, "use_text", "use_text and use_prototypes are both off")
        if self.device is not None:
            why = device_error(self.device)
            need(why is None, "device", why)

    def edit_for(self, spec, gate_site: bool = False) -> str:
        """The edit this config makes on ``spec``: ``edit`` itself unless it is "auto", which takes
        the domain gate when the request forgets some classes, or all, in some domains (a product of
        them: ``gated_request``), the model has a site for it (``gate_site``: ``layers.gate_site``
        finds one) and there are prototypes; else the class redirect when some class is kept in every
        domain and the config can run it (the text projection targeted; prototypes for classes
        forgotten in some domains only); and the projection otherwise. Why, as measured on the proving
        ground (README, "Quality status"): on ``domain`` requests the gate meets more than the redirect
        does; on ``domain-complete`` it is the only edit that forgets (the projection acts on every
        image alike and leaves the forgotten domains recognized), at a cost to the kept domains where
        its detector fails."""
        if self.edit != "auto":
            return self.edit
        forgotten = {c for c, _ in spec.forget_cells}
        kept_everywhere = {c for c, _ in spec.cells} - forgotten
        partly = forgotten & {c for c, _ in spec.retain_cells}
        prototypes = self.use_prototypes and self.prototypes_per_cell > 0
        if gate_site and prototypes and gated_request(spec):
            return "domain-gate"
        can = self.use_text and self.targets.startswith("proj") and (not partly or prototypes)
        return "class-redirect" if kept_everywhere and can else "project"

    def retain_energy_for(self, edit: str) -> float | None:
        """``retain_energy``, or the measured default of ``edit`` when it is None (None for the domain
        gate, which has no kept subspace)."""
        if edit not in RETAIN_ENERGY:
            return None
        return RETAIN_ENERGY[edit] if self.retain_energy is None else float(self.retain_energy)

    def gate_keep_order_for(self, examples: bool) -> float:
        """``gate_keep_order``, or, when it is None, the measured default for an edit without or with real
        examples of the domains (``examples``)."""
        return GATE_KEEP_ORDER[bool(examples)] if self.gate_keep_order is None else float(self.gate_keep_order)

    def replace(self, **changes) -> "ForgetConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ForgetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ForgetConfig: unknown fields {unknown}")
        return cls(**d)
