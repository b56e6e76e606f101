"""Domain gate: a data-free image-side edit that forgets chosen classes, or all of them, in chosen visual
domains (``domain``, ``domain-complete``) in a model whose image tower reads its embedding out of the class
token (open_clip ``pool_type="tok"``, the OpenAI and LAION ViTs, Hugging Face ``CLIPModel``). Opt-in
(``edit="domain-gate"``): README and bench/RESULTS.md say how far it gets.

A projection of the image tower's weights acts on every image alike, so it cannot take the sketches of
every class away and leave the photos of the same classes alone. Something in the tower has to tell the
forgotten domains' images from the others per image, and act on those only. The last block's MLP sees
one image's class token x through its LayerNorm, ℓ = norm(x), and a few of its hidden units (the ones
the prototypes use least) are rewired. g(ℓ) = wᵀℓ + b is a logistic detector of the forgotten domains
fitted on the prototypes' ℓ; where s·g ≪ 0 a unit with pre-activation s·g is off (GELU and QuickGELU are
≈ 0 far below 0), where s·g ≫ 0 it is linear.

Some classes forgotten (``domain``): per forgotten domain (with its own detector g), r + 1 units carry
a gated rank-r affine map,

    unit 0:      pre-activation  s·g(ℓ)                      output column  -(c_1 + … + c_r)/ε
    unit j ≥ 1:  pre-activation  s·g(ℓ) + ε(a_jᵀℓ + α_j)     output column   c_j/ε

so the detected images' block output gains Σ_j c_j (a_jᵀℓ + α_j) = C (A ℓ + α); ε keeps
|ε(a_jᵀℓ + α_j)| at most half of the gate's typical s·g. The map is derived, not trained. For a class
token y leaving the block, the embedding is e = post_norm(y) @ proj and the class logits are T e (T: the
classes' text embeddings). The smallest change of y after which the forgotten classes score the mean of
all while the others keep their scores relative to one another is computed per prototype, in closed
form (``neutral_shift``); C (A ℓ + α) is the rank-r ridge least-squares fit (ridge ``MAP_RIDGE``) of
those changes from ℓ over all prototypes: the same function for every image and under every forgotten
domain's detector, the gate decides where it acts. One detector per forgotten domain rather than one for
their union: a linear read of one domain against the rest is easier than of two apart domains at once
(bench/RESULTS.md (16)).

Every class forgotten (``domain-complete``): no map of ℓ cancels the class of every image it acts on
(the class signal scales with the token; bench/RESULTS.md measures the best one leaving 12 % of
sketches recognized with a perfect detector). Instead two units per forgotten domain, with that
domain's own detector, write a large constant: the direction of that domain's mean class token over its
prototypes, COLLAPSE times a typical token's norm at the median detected prototype and never more than
CAP times that (``_collapse``). A detected image's embedding becomes that of the domain's average image,
whatever its class, so a classifier of it is about at chance (a few points above where that image sits
near a second class: bench/RESULTS.md (32)); an image the detector misses is untouched.

The patch edits three tensors of that MLP (input weight and bias: m rows; output weight: m columns),
reversibly like any other patch. The tower's other tokens pass the rewired units too; a class-token
tower does not read them, but their features change.

Every detector is fitted on the prototypes and, given them, on prototypes translated into and out of
the forgotten domains (``extra``; ``ForgetConfig.gate_translate_steps``): examples near each domain's
border that real images need and the prototypes alone lack. Where the caller has real images of some
domains (``examples``: ``forget``'s ``domain_examples``, labelled by domain alone), the detectors are
fitted on them too; the edit is then no longer data-free, and on the proving ground it meets far more of
its targets (README).

What it needs: prototypes that a linear read of the class token tells apart by domain as real images
are (bench/RESULTS.md measures where that holds), and a hidden layer wider than m.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import GATE_KEEP_ORDER
from .layers import GateSite, encode_image
from .patch import PatchEntry

GATE_LEVEL = 8.0      # s is chosen so that the detected prototypes' median pre-activation s·g is this
DETECTOR_RIDGE = 10.0 # L2 penalty of the map's detectors (standardized features, against the summed log
                      # loss), chosen on the proving ground from 0.1, 10, 80 and 400 by the held-out renders
                      # the detector catches and flags, and against 100 with translated examples on the nine
                      # domain requests (bench/RESULTS.md (16): 14 of 27 request x bank pairs met either way)
ACTION_SHARE = 0.5    # ε keeps every |ε(a_jᵀℓ + α_j)| on the prototypes within this share of GATE_LEVEL
MAP_RIDGE = 0.3       # ridge of the map's least squares (relative to the mean eigenvalue of ℓ's Gram matrix),
                      # chosen on the proving ground from 1e-3 to 1 (bench/RESULTS.md): the map shrunk
                      # hard moves the kept classes less
COLLAPSE = 45.0       # every class forgotten: the push at the median detected prototype, in multiples of
                      # the median class token's norm; chosen on the proving ground from 3, 10, 20 and 30
                      # (bench/RESULTS.md (12), (19)), then 40, 45 and 60 ((29), (30)): at 100 held-out
                      # renders a cell each of 40, 45 and 60 meets 4 of the 8 requests on each of three
                      # prototype banks, 30 4, 4 and 2 (the photos it catches keep their class, pushed too
                      # weakly). A larger push costs the kept domains more where the detectors err (pixel
                      # art 1.49-1.86 points at 40, 2.01-2.17 at 60), a smaller one leaves bank 2's photos
                      # closer to their limit (9.1 and 10.0 % of 10 at 40, 8.6 and 9.1 at 45)
CAP = 4.0             # ... and at most this many times that push at any image (GATE_LEVEL·CAP of gate input)
COLLAPSE_RIDGE = 100.0  # ... the L2 penalty of its per-domain detectors (fitted on prototypes and translated
                        # ones); chosen on the proving ground from 10, 40, 100, 300 and 1000 (bench/RESULTS.md
                        # (15), (16)): the kept domains' cost falls as it grows, the forgetting with it
COLLAPSE_THRESHOLD = 0.0  # ... the detector logit at which its units switch on; chosen on the proving ground
                          # from -1, -0.5, 0, 0.5 and 1 (bench/RESULTS.md (18)): no threshold meets pixel art's
                          # or cartoon + painting's targets; lower forgets more and costs the kept domains more
MAP_PER_DOMAIN = True  # some classes forgotten in several domains: a detector (and a copy of the map's units)
                       # per forgotten domain rather than one detector for their union (bench/RESULTS.md
                       # (16): fish @ sketch, cartoon then meets on three prototype banks, 0 of 3 with one)
MAP_THRESHOLD = 1.0    # the detector logit at which the map's units switch on, data-free; chosen on the
                       # proving ground from -2 to 2 (bench/RESULTS.md (16), (17), (22), (27)): at 100 held-out
                       # renders a cell 1 meets 5 of its 9 domain requests on each of three prototype banks,
                       # 0 meets 4 (fish @ sketch, cartoon costs its fish elsewhere less; at 1 it sits on its
                       # limit, and (30)'s machine gives 4); lower forgets more and costs the forgotten
                       # classes in the kept domains more
MAP_THRESHOLD_EXAMPLES = -0.5  # the same with real examples (``examples``), whose detectors flag fewer kept
                               # images: with 20 per cell -0.5 meets 20, 19 and 20 of the 20 requests on
                               # three prototype banks; with COLLAPSE at 30, -0.5 met 20, 19 and 18, 0 met
                               # 19, 18 and 17 (boat @ cartoon left 10-11 %) and -1 18 on the first (the
                               # pixel-art requests cost their classes elsewhere more; bench/RESULTS.md
                               # (24), (25), (28), (29))
MAP_CLASS_WEIGHT = 1.0  # the weight, in the map detectors' log loss, of the examples of the classes the map
                        # neutralizes (the others: 1), where a detector's errors cost most; chosen on the
                        # proving ground from 1, 3 and 10 (bench/RESULTS.md (17): more weight, fewer requests met)
EXAMPLES_SHARE = None  # with real examples (``examples``): None weighs each like a stand-in; s in (0, 1) gives
                       # them the share s of the detectors' total weight; 0.5 met no more requests on the
                       # proving ground (bench/RESULTS.md (24))
KEEP_ORDER = GATE_KEEP_ORDER[False]         # chosen on the proving ground from 0, 1, 10, 100, 1000 and
                                            # 10000 on its nine domain requests (bench/RESULTS.md; (22):
                                            # 100, 1000 and 10000 each meet 4 of 9 at 100 renders a cell,
                                            # the map then switching on at logit 0)


@torch.no_grad()
def capture(model, site: GateSite, images, batch_size: int, autocast: dict, device=None, lo: int = 0,
            hi: int | None = None, hidden: bool = True):
    """(x [n, width], h [n, hidden] or None without ``hidden``) fp32 for ``images[lo:hi]``: the class
    token's residual entering the last block's MLP norm, and the MLP's hidden activations of that token.
    ``images``: [N, 3, H, W], or anything that slices into such tensors (``ImageRows``); each batch of
    ``batch_size`` (counted from ``lo``) goes to ``device`` (default: where it is) on its own. Only the
    class token's rows are kept (copies, not views that would hold every token of a batch)."""
    xs, hs = [], []
    hi = len(images) if hi is None else hi

    def first(t):
        return (t[:, 0] if site.batch_first else t[0]).to(torch.float32, copy=True)

    hooks = [site.norm.register_forward_pre_hook(lambda m, a: xs.append(first(a[0])))]
    if hidden:
        hooks.append(site.fc_out.register_forward_pre_hook(lambda m, a: hs.append(first(a[0]))))
    try:
        with torch.autocast(**autocast):
            for i in range(lo, hi, batch_size):
                batch = images[i:min(i + batch_size, hi)]
                encode_image(model, batch if device is None else batch.to(device))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(xs), (torch.cat(hs) if hidden else None)


class ImageRows:
    """Image tensors [n_i, 3, H, W] read as one [Σ n_i, 3, H, W] without copying them into one: a slice
    gives the rows it spans, concatenated, in fp32 (on the parts' device; parts on different devices
    are gathered on the first part's). A part may be anything with ``len`` whose slices are such
    tensors (``ImageFiles``): only the rows asked for are read."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = list(parts)
        self.ends = torch.tensor([len(p) for p in self.parts]).cumsum(0).tolist()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, rows: slice) -> torch.Tensor:
        lo, hi, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("ImageRows slices with step 1 only")
        out, start = [], 0
        for part, end in zip(self.parts, self.ends):
            if lo < end and hi > start:
                out.append(part[max(lo - start, 0):min(hi, end) - start].float())
            start = end
        if not out:
            return self.parts[0][:0].float()
        return torch.cat([o.to(out[0].device) for o in out]) if len(out) > 1 else out[0]


def site_read(model, site: GateSite, images, batch_size: int, autocast: dict, device, world=None) -> torch.Tensor:
    """ℓ [n, width] fp32 on ``device``: the gate's input (the class token at the last block's MLP, after
    its norm) for ``images`` (a tensor or ``ImageRows``, wherever they are held: each batch goes to
    ``device`` on its own). With a ``World`` each rank reads a contiguous share of whole batches and every
    rank gets every row; the batches are those one process makes."""
    n = len(images)

    def rows(lo: int, hi: int) -> torch.Tensor:
        lo, hi = lo * batch_size, min(hi * batch_size, n)
        return layer_norm(capture(model, site, images, batch_size, autocast, device, lo, hi, hidden=False)[0],
                          site.norm)

    batches = -(-n // batch_size)
    if world is None:
        return rows(0, batches)
    return world.shared(batches, rows, device)


def layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """``norm`` (a LayerNorm) applied in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], norm.weight.detach().float(), norm.bias.detach().float(), norm.eps)


def detector(feats: torch.Tensor, labels: torch.Tensor, ridge: float = DETECTOR_RIDGE,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A logistic-regression detector of ``labels`` [n] bool from ``feats`` [n, f] (features standardized,
    L2 penalty ``ridge`` on the standardized weights, L-BFGS from zero in fp64: deterministic); returned on
    the raw features as (w [f], b [] ) in their dtype: logit = feats @ w + b. ``weight`` [n]: each
    example's weight in the log loss (its mean over the examples; default all 1). Fits with gradients
    whatever the caller's mode (no_grad, inference_mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        # fp64: in fp32 L-BFGS stops where the loss's last bits do, leaving the weights settled to about
        # 1e-4, so that captures batched otherwise (sharded ranks) moved them that far (bench/RESULTS.md
        # (31)); in fp64 the fit is the problem's, not the arithmetic's
        out_dtype, out_device = feats.dtype, feats.device
        fit_on = fp64_device(feats.device)
        feats, y = feats.detach().to(fit_on, torch.float64), labels.detach().to(fit_on, torch.float64)
        weight = torch.ones_like(y) if weight is None else weight.detach().to(fit_on, torch.float64)
        weight = weight * (len(y) / weight.sum())
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        z = (feats - mu) / sd
        w = torch.zeros(feats.shape[1], dtype=feats.dtype, device=feats.device, requires_grad=True)
        b = torch.zeros((), dtype=feats.dtype, device=feats.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ w + b, y, weight) + ridge * w.pow(2).sum() / len(y)
            loss.backward()
            return loss

        opt.step(closure)
        w = w.detach() / sd
        return w.to(out_device, out_dtype), (b.detach() - mu @ w).to(out_device, out_dtype)


def fp64_device(device: torch.device) -> torch.device:
    """Where an fp64 fit of tensors held on ``device`` runs: there, or on the CPU for a device without
    fp64 arithmetic (Apple's MPS)."""
    return torch.device("cpu") if torch.device(device).type == "mps" else torch.device(device)


def neutral_shift(y: torch.Tensor, post_norm, proj: torch.Tensor, class_emb: torch.Tensor,
                  neutralize=None, keep_order: float = KEEP_ORDER) -> torch.Tensor:
    """[n, width] the change Δ of each class token ``y`` [n, width] after which ``post_norm(y + Δ) @ proj``
    scores every row of ``class_emb`` [k, E] (normalized here, as a zero-shot classifier's rows are)
    alike; with ``neutralize`` (class indices), after which those classes score the mean of all k while
    the others keep their scores relative to one another as far as ``keep_order`` buys.

    With γ, β post_norm's scale and bias, u = y + Δ centred and σ = ‖u‖/√width, the class scores less
    their mean are z = K u/σ + b₀, K = T_c proj̃ᵀ diag(γ) (centring; T_c = T - mean(T), proj̃: proj as
    [width, E]), b₀ = T_c proj̃ᵀβ.

    Every class: z = 0 with the smallest change of y's centred part; u keeps y's part in K's null space
    and takes u∥ = -σ K⁺b₀, with σ solved from ‖u‖² = width σ².
    Some classes F: in units of y's scale, n = y_c/σ_y, the change d minimizes
    ‖d‖² + μ ‖K_R d‖² (K_R: the other classes' rows, centred among themselves, so ‖K_R d‖ is how far their
    scores move relative to one another; μ = keep_order / ‖K_R‖²) subject to K_F (n + d) = -b₀_F, i.e.
    d = M⁻¹K_Fᵀ (K_F M⁻¹ K_Fᵀ)⁻¹ (-z_F), M = I + μ K_RᵀK_R; Δ = σ_y d."""
    y = y.float()
    width = y.shape[1]
    gamma, beta = post_norm.weight.detach().float(), post_norm.bias.detach().float()
    P, T = proj.detach().float(), F.normalize(class_emb.float(), dim=-1)
    Tc = T - T.mean(0)
    K = (Tc @ P.t()) * gamma[None]                      # [k, width]
    K = K - K.mean(1, keepdim=True)                     # acts on centred vectors
    b0 = Tc @ (beta @ P)                                # [k]
    yc = y - y.mean(1, keepdim=True)
    if neutralize is None:
        Kp = torch.linalg.pinv(K, rtol=1e-6)            # [width, k]
        q = -(Kp @ b0)                                  # [width]: u∥ per unit of σ
        room = width - float(q @ q)
        if room <= 0.5 * width:                         # the bias cannot be neutralized by a centred u
            q, room = torch.zeros_like(q), float(width)
        perp = yc - (yc @ K.t()) @ Kp.t()               # y's centred part outside K's row space
        sigma = perp.norm(dim=1, keepdim=True) / math.sqrt(room)
        return perp + sigma * q[None] - yc
    gone = torch.zeros(K.shape[0], dtype=torch.bool, device=K.device)
    gone[torch.as_tensor(sorted(set(neutralize)), dtype=torch.long, device=K.device)] = True
    sigma_y = (yc.norm(dim=1, keepdim=True) / math.sqrt(width)).clamp_min(1e-12)
    z = (yc / sigma_y) @ K.t() + b0                     # [n, k]
    KF, KR = K[gone], K[~gone]
    KR = KR - KR.mean(0, keepdim=True)
    scale = float(torch.linalg.matrix_norm(KR, ord=2)) ** 2 if len(KR) > 1 else 0.0
    mu = keep_order / scale if scale > 0 else 0.0
    M = torch.eye(width, dtype=K.dtype, device=K.device) + mu * KR.t() @ KR
    MiKF = torch.linalg.solve(M, KF.t())                # [width, f]
    d = -torch.linalg.solve(KF @ MiKF, z[:, gone].t()).t() @ MiKF.t()
    return sigma_y * d


def reduced_rank_fit(X: torch.Tensor, Y: torch.Tensor, rank: int, ridge: float = 1e-3):
    """The rank-``rank`` affine map ℓ ↦ C (A ℓ + α) closest to Y [n, d] from X [n, f] in ridge least
    squares (the full ridge solution, then its fitted values' leading right singular vectors). Returns
    (A [r, f], α [r], C [d, r] with orthonormal columns, R² of the fit)."""
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], 1)
    G = Xa.t() @ Xa
    lam = ridge * float(torch.trace(G)) / G.shape[0]
    Bfull = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device), Xa.t() @ Y)
    _, _, Vh = torch.linalg.svd(Xa @ Bfull, full_matrices=False)
    C = Vh[:rank].t()                                   # [d, r]
    Aa = (Bfull @ C).t()                                # [r, f + 1]
    resid = Y - (Xa @ Aa.t()) @ C.t()
    r2 = 1 - float(resid.pow(2).sum() / (Y - Y.mean(0)).pow(2).sum().clamp_min(1e-30))
    return Aa[:, :-1], Aa[:, -1], C, r2


@torch.no_grad()
def gate_entries(model, site: GateSite, images: torch.Tensor, forgotten: torch.Tensor, class_emb: torch.Tensor,
                 rank: int, batch_size: int, autocast: dict, taken=(), neutralize=None,
                 keep_order: float = KEEP_ORDER, domain_of: torch.Tensor | None = None,
                 extra: tuple[torch.Tensor, ...] | None = None,
                 class_of: torch.Tensor | None = None,
                 examples: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[PatchEntry], dict]:
    """The domain gate's patch entries (see the module docstring) and what it measured on the prototypes.

    images:    [n, 3, H, W] the prototypes of every cell of the request.
    forgotten: [n] bool, whether a prototype's cell lies in a forgotten domain.
    class_emb: [k, E] normalized class embeddings (the zero-shot classifier the action neutralizes).
    rank:      r, the rank of the gated map (r + 1 units are rewired), at most the number of classes in
               ``neutralize``; unused when every class is forgotten (the collapse).
    neutralize: class indices (rows of class_emb) the gated images must not be recognized as; None: all.
    keep_order: with ``neutralize``, the weight of the other classes' relative scores (``neutral_shift``).
    taken:     hidden units not to rewire (those of gates already applied: ``rewired_units``).
    domain_of: [n] int, the domain of each prototype: one detector per forgotten domain (with its own
               units) instead of one for their union (with some classes forgotten, as MAP_PER_DOMAIN says).
    extra:     (images [e, 3, H, W], domain [e] int[, class [e] int]): with ``domain_of``, more examples
               for the detectors (prototypes translated between domains), labelled by domain (and class).
    class_of:  [n] int, the class (row of class_emb) of each prototype: with ``neutralize``, the map's
               detectors weigh those classes' examples by MAP_CLASS_WEIGHT (the class of ``extra`` too).
    examples:  (images [e, 3, H, W] or their ``site_read`` ℓ [e, width], domain [e] int): with
               ``domain_of``, real images of some domains (of classes not known), more examples for the
               detectors as ``extra`` are (each weighs as a stand-in, or as EXAMPLES_SHARE says). The
               gate's sharpness and the map are still set from the prototypes. Images may be held
               anywhere (each batch goes to the prototypes' device on its own) and may be ``ImageRows``.
    """
    probe = torch.tensor([-12.0, 12.0])
    out = site.act(probe).float()
    if not (abs(float(out[0])) < 1e-2 and abs(float(out[1]) - 12.0) < 1e-2):
        raise ValueError(f"the domain gate needs an MLP activation that is about 0 far below 0 and the identity "
                         f"far above (GELU, QuickGELU); {type(site.act).__name__} gives {out.tolist()} at ±12")
    forgotten = forgotten.to(images.device)
    if forgotten.all() or not forgotten.any():
        raise ValueError("the domain gate needs prototypes of both the forgotten and the kept domains")
    k = class_emb.shape[0]
    if neutralize is not None and len(set(neutralize)) == k:
        neutralize = None                               # every class: the same as all alike
    if k < 2:
        raise ValueError("the domain gate needs at least two classes")
    if domain_of is not None:
        domain_of = domain_of.to(images.device)
        gone = sorted(set(domain_of[forgotten].tolist()))
    per_domain = domain_of is not None and (neutralize is None or MAP_PER_DOMAIN)
    groups = [forgotten & (domain_of == j) for j in gone] if per_domain else [forgotten]
    if neutralize is None:                              # the collapse: a detector per forgotten domain
        m = 2 * len(groups)
    else:
        r = min(rank, len(set(neutralize)), site.fc_in.weight.shape[1] - 1)
        if r < 1:
            raise ValueError("the domain gate needs a class to neutralize and a rank of at least 1")
        m = (r + 1) * len(groups)
    x, h = capture(model, site, images, batch_size, autocast)
    W1, b1 = site.fc_in.weight.detach().float(), site.fc_in.bias.detach().float()
    W2 = site.fc_out.weight.detach().float()
    hidden, width = W1.shape
    taken = sorted(set(taken))
    if hidden - len(taken) <= m:
        raise ValueError(f"the domain gate rewires {m} hidden units; the MLP has {hidden}"
                         + (f", {len(taken)} of them rewired by gates already applied" if taken else ""))
    ell = layer_norm(x, site.norm)
    usage = h.abs().mean(0) * W2.norm(dim=0)
    free = usage.clone()
    free[taken] = float("inf")
    units = free.argsort()[:m].sort().values
    # the class token leaving the block without the rewired units' old contributions
    y = x + h @ W2.t() + site.fc_out.bias.detach().float() - h[:, units] @ W2[:, units].t()
    info = {"units": units.tolist(), "neutralized": "all" if neutralize is None else sorted(set(neutralize))}
    ell_x = ed = None
    classes = class_of.to(images.device) if class_of is not None else None
    if extra is not None and domain_of is not None and len(extra[0]):
        ex, ed = extra[0].to(images.device), extra[1].to(images.device)
        ell_x = site_read(model, site, ex, batch_size, autocast, images.device)
        if classes is not None:
            classes = torch.cat([classes, extra[2].to(images.device)]) if len(extra) > 2 else None
    if examples is not None and len(examples[0]):
        if domain_of is None:
            raise ValueError("the domain gate's examples need the prototypes' domains (domain_of)")
        ell_e = examples[0]
        if not (isinstance(ell_e, torch.Tensor) and ell_e.dim() == 2):     # images, not their ℓ
            ell_e = site_read(model, site, ell_e, batch_size, autocast, images.device)
        ell_e = ell_e.to(images.device, torch.float32)
        n_e = len(ell_e)
        de = examples[1].to(images.device)
        info["examples"] = {int(j): int((de == j).sum()) for j in sorted(set(de.tolist()))}
        ell_x = ell_e if ell_x is None else torch.cat([ell_x, ell_e])
        ed = de if ed is None else torch.cat([ed, de])
        if classes is not None:                         # their classes are not known: never weighed
            classes = torch.cat([classes, torch.full_like(de, -1)])
    more = None
    if ell_x is not None:
        more = (ell_x, [ed == j for j in gone] if per_domain
                else [torch.isin(ed, torch.tensor(gone, device=ed.device))])
    weight = None
    if neutralize is not None and classes is not None and MAP_CLASS_WEIGHT != 1.0:
        hit = torch.isin(classes, torch.tensor(sorted(set(neutralize)), device=classes.device))
        weight = torch.where(hit, MAP_CLASS_WEIGHT, 1.0).to(ell.dtype)
    if "examples" in info and EXAMPLES_SHARE is not None:    # the real examples carry this share of the weight
        if weight is None:
            weight = torch.ones(len(ell) + len(more[0]), dtype=ell.dtype, device=ell.device)
        stand = weight[:-n_e].sum()
        weight = weight.clone()
        weight[-n_e:] = EXAMPLES_SHARE / (1 - EXAMPLES_SHARE) * stand / n_e
    if neutralize is None:
        rows, bias, cols, info_action = _collapse(ell, y, groups, more, weight)
    else:
        threshold = MAP_THRESHOLD_EXAMPLES if "examples" in info else MAP_THRESHOLD
        rows, bias, cols, info_action = _neutral_map(ell, y, groups, site, class_emb, neutralize, r, keep_order,
                                                     more, weight, threshold)
    info.update(info_action)
    info["units_share_of_mlp_output"] = round(float(usage[units].sum() / usage.sum()), 6)
    return _rewire(site, units, rows, bias, cols, W1, b1, W2), info


def _sharpness(g: torch.Tensor, on: torch.Tensor) -> float:
    """s such that the median pre-activation s·g of the prototypes ``on`` that the detector g catches is
    GATE_LEVEL."""
    g_on = g[on & (g > 0)]
    return GATE_LEVEL / float(g_on.median()) if len(g_on) else 1.0


def _detectors(ell: torch.Tensor, groups: list[torch.Tensor], more, ridge: float, weight=None):
    """[(w, b)] a ``detector`` per group ([n] bool over the prototypes' ℓ [n, width]) with L2 penalty
    ``ridge``, fitted also on ``more``: (ℓ [e, width], one [e] bool per group) when given; ``weight``: the
    examples' weights (prototypes, then ``more``'s)."""
    if more is None:
        return [detector(ell, grp, ridge, weight) for grp in groups]
    return [detector(torch.cat([ell, more[0]]), torch.cat([grp, lab]), ridge, weight)
            for grp, lab in zip(groups, more[1])]


def _collapse(ell: torch.Tensor, y: torch.Tensor, groups: list[torch.Tensor], more=None, weight=None):
    """Every class forgotten: two units per forgotten domain (``groups`` [n] bool each), with the
    pre-activations z = s_j·g_j(ℓ) and z - CAP·GATE_LEVEL (g_j a detector of that domain against every
    other prototype) and the output columns K v_j and -K v_j (v_j the direction of that domain's mean centred
    class token): the block's output gains K v_j (act(z) - act(z - CAP·GATE_LEVEL)), about K v_j·z up to
    CAP·GATE_LEVEL and no more, so no input pushes the token past a known size (fp16 included). A detected
    image's token becomes mostly K v_j, the same for every class: its embedding carries that domain's
    average image and mostly too little of its own to tell its class (where that image sits near a second
    class, a few images' own class still decides, more under some templates than others: bench/RESULTS.md
    (32)). K makes the push at the median detected prototype COLLAPSE times the median centred token's norm.
    ``more``: (ℓ [e, width], one [e] bool per group) more examples for the detectors' fits; ``weight``: the
    examples' weights (prototypes, then ``more``'s)."""
    yc = y - y.mean(1, keepdim=True)
    K = COLLAPSE * float(yc.norm(dim=1).median()) / GATE_LEVEL
    top = CAP * GATE_LEVEL
    rows, bias, cols, sharp = [], [], [], []
    fired = torch.zeros(len(ell), dtype=torch.bool, device=ell.device)
    for grp, (w, b) in zip(groups, _detectors(ell, groups, more, COLLAPSE_RIDGE, weight)):
        b = b - COLLAPSE_THRESHOLD                      # the units switch on where the logit passes it
        g = ell @ w + b
        s = _sharpness(g, grp)
        v = yc[grp].mean(0)
        v = K * v / v.norm().clamp_min(1e-12)
        rows += [s * w, s * w]
        bias += [s * b, s * b - top]
        cols += [v, -v]
        sharp.append(round(s, 6))
        fired |= g > 0
    anyf = torch.stack(groups).any(0)
    info = {"action": "collapse", "detectors": len(groups), "sharpness": sharp, "push": round(K, 6),
            "push_cap": round(K * top, 6), "detector_examples": len(ell) + (0 if more is None else len(more[0])),
            "prototypes_caught": round(float(fired[anyf].float().mean()), 4),
            "prototypes_flagged": round(float(fired[~anyf].float().mean()), 4)}
    return torch.stack(rows), torch.stack(bias), torch.stack(cols, 1), info


def _neutral_map(ell, y, groups, site, class_emb, neutralize, r, keep_order, more, weight, threshold: float):
    """Some classes forgotten: per detector (one per forgotten domain in ``groups``, [n] bool each, or one
    for their union), a unit 0 and units 1..r that carry it and the rank-r map C (A ℓ + α) of the module
    docstring, fitted to ``neutral_shift`` of every prototype (the same map under every detector).
    ``more``: (ℓ [e, width], one [e] bool per group) more examples for the detectors' fits (not for the
    map's); ``weight``: the detectors' examples' weights; ``threshold``: the detector logit at which the
    units switch on."""
    forgotten = torch.stack(groups).any(0)
    delta = neutral_shift(y, site.post_norm, site.proj, class_emb.to(y.device), neutralize, keep_order)
    A, alpha, C, r2 = reduced_rank_fit(ell, delta, r, MAP_RIDGE)
    v = ell @ A.t() + alpha
    eps = ACTION_SHARE * GATE_LEVEL / float(v.abs().max().clamp_min(1e-12))
    width = ell.shape[1]
    rows, bias, sharp = [], [], []
    fired = torch.zeros(len(ell), dtype=torch.bool, device=ell.device)
    for grp, (w, b) in zip(groups, _detectors(ell, groups, more, DETECTOR_RIDGE, weight)):
        b = b - threshold                               # the units switch on where the logit passes it
        g = ell @ w + b
        fired |= g > 0
        s = _sharpness(g, grp)
        part = s * w[None].expand(r + 1, width).clone()
        part[1:] += eps * A
        rows.append(part)
        one = torch.full((r + 1,), s * float(b), dtype=part.dtype, device=part.device)
        one[1:] += eps * alpha
        bias.append(one)
        sharp.append(round(s, 6))
    cols = torch.cat([-C.sum(1, keepdim=True), C], 1) / eps      # [width, r + 1] per detector
    info = {"action": "map", "rank": r, "detectors": len(groups), "sharpness": sharp,
            "action_scale": round(eps, 6),
            "prototypes_caught": round(float(fired[forgotten].float().mean()), 4),
            "prototypes_flagged": round(float(fired[~forgotten].float().mean()), 4),
            "detector_examples": len(ell) + (0 if more is None else len(more[0])),
            "action_fit_r2": round(r2, 4), "map_ridge": MAP_RIDGE, "keep_order": keep_order,
            "map_threshold": threshold}
    return torch.cat(rows), torch.cat(bias), cols.repeat(1, len(groups)), info


def _rewire(site: GateSite, units, rows, bias, cols, W1, b1, W2) -> list[PatchEntry]:
    """Patch entries that give the MLP's hidden ``units`` the input rows ``rows`` [m, width] and biases
    ``bias`` [m] and the output columns ``cols`` [width, m]: low-rank deltas of its three tensors."""
    hidden, m = W1.shape[0], len(units)
    E = torch.zeros(hidden, m, dtype=rows.dtype, device=rows.device)
    E[units, torch.arange(m, device=rows.device)] = 1.0
    Q, R = torch.linalg.qr((rows - W1[units]).t())                # ΔW1 = E Rᵀ Qᵀ
    db = torch.zeros(hidden, 1, dtype=rows.dtype, device=rows.device)
    db[units, 0] = bias - b1[units]
    return [
        PatchEntry.on(site.name("in"), "linear", (E @ R.t()).cpu(), Q.contiguous().cpu(), site.fc_in.weight),
        PatchEntry.on(site.name("in", "bias"), "bias", db.cpu(), torch.ones(1, 1), site.fc_in.bias),
        PatchEntry.on(site.name("out"), "linear", (cols - W2[:, units]).cpu(), E.cpu(), site.fc_out.weight),
    ]


def rewired_units(patches, site: GateSite) -> list[int]:
    """The hidden units of ``site``'s MLP that the gates among ``patches`` rewire (their input-weight rows)."""
    units = set()
    for p in patches:
        for e in p.entries:
            if e.name == site.name("in"):
                units.update(torch.nonzero(e.A.abs().sum(1)).flatten().tolist())
    return sorted(units)
