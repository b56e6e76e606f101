"""Procedural, seeded renderer of the proving ground: object glyphs in five visual domains.

An image is one glyph (see `glyphs.py`) placed with a random position, scale, rotation and colour, drawn
in one domain. All images of a class share one vectorized signed-distance evaluation over [n, H, W]
pixel grids; each domain then styles its images from the distance field in pixels (`sdf < 0` inside):

- photo:     smooth textured background, bevel-shaded and textured object, soft drop shadow, noise;
- sketch:    paper, dark wobbly double strokes along the outline (|sdf| small), no fill;
- cartoon:   plain saturated background, flat fill, thick black outline;
- painting:  mosaic of jittered brush blotches, impressionist colour jitter, ragged edges, stroke grain;
- pixel_art: the distance field sampled on a coarse 14-20 block grid, hard mask, block outline,
             quantized palette, nearest-neighbour upscaled.

Background and object colours are chosen with a luminance gap of at least `_MIN_CONTRAST` so the object
is always visible. Only numpy and the seed decide an image: same arguments, same pixels.
"""
import numpy as np
import torch

from .glyphs import GLYPHS

CLASSES = tuple(GLYPHS)
DOMAINS = ("photo", "sketch", "cartoon", "painting", "pixel_art")
DOMAIN_PHRASES = {"photo": "photo", "sketch": "sketch", "cartoon": "cartoon", "painting": "painting",
                  "pixel_art": "pixel art image"}
CLASS_PHRASES = {c: c.replace("_", " ") for c in CLASSES}
COLOURS = {
    "red": (0.85, 0.14, 0.12), "orange": (0.96, 0.55, 0.1), "yellow": (0.96, 0.86, 0.16),
    "green": (0.18, 0.62, 0.2), "blue": (0.14, 0.32, 0.86), "purple": (0.55, 0.22, 0.7),
    "pink": (0.96, 0.5, 0.72), "brown": (0.5, 0.3, 0.14), "black": (0.08, 0.08, 0.08),
    "white": (0.96, 0.96, 0.96),
}
COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
# open_clip's OpenAI statistics, so the model works with standard open_clip preprocessing as well
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 48
_MIN_CONTRAST = 0.3   # luminance gap object/background, in [0, 1] units
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _check(names, known, what):
    if isinstance(names, str):
        raise TypeError(f"{what} must be a sequence of names, got the string {names!r}")
    names = list(names)
    if not names:
        raise ValueError(f"{what} must not be empty")
    for n in names:
        if n not in known:
            raise ValueError(f"unknown {what} entry {n!r}; "
                             f"known: {', '.join(known)}")
    return names


def _interp_matrix(size, cells):
    """[size, cells] linear-interpolation weights from a `cells`-point grid to `size` pixel centres."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * (cells - 1)
    i0 = np.minimum(np.floor(t).astype(int), cells - 2)
    f = t - i0
    m = np.zeros((size, cells), dtype=np.float32)
    m[np.arange(size), i0] = 1.0 - f
    m[np.arange(size), i0 + 1] = f
    return m


def _smooth_noise(rng, n, size, cells, channels=None):
    """Smooth random field in [-1, 1]-ish: [n, H, W] (or [n, H, W, C]), bilinear from a cells^2 grid."""
    m = _interp_matrix(size, cells)
    if channels is None:
        g = rng.uniform(-1, 1, (n, cells, cells)).astype(np.float32)
        return np.einsum("hc,ncd,wd->nhw", m, g, m, optimize=True)
    g = rng.uniform(-1, 1, (n, cells, cells, channels)).astype(np.float32)
    return np.einsum("hc,ncdk,wd->nhwk", m, g, m, optimize=True)


def _with_luma(rgb, target):
    """Shift colours [n, 3] so their luminance is `target` [n], keeping hue roughly."""
    return np.clip(rgb + (target - rgb @ _LUMA)[:, None], 0.0, 1.0)


def _contrasting_bg(rng, obj, sat):
    """Background colours [n, 3] whose luminance differs from the object's by >= _MIN_CONTRAST."""
    n = len(obj)
    lo = obj @ _LUMA
    dark = rng.uniform(0.02, 1.0, n) * np.maximum(lo - _MIN_CONTRAST - 0.02, 0.0) + 0.02
    light = 1.0 - rng.uniform(0.02, 1.0, n) * np.maximum(0.98 - lo - _MIN_CONTRAST, 0.0) - 0.02
    can_dark = lo - _MIN_CONTRAST > 0.04
    can_light = lo + _MIN_CONTRAST < 0.96
    pick_dark = np.where(can_dark & can_light, rng.random(n) < 0.5, can_dark)
    target = np.where(pick_dark, dark, light).astype(np.float32)
    grey = rng.uniform(0.3, 0.7, (n, 1)).astype(np.float32)
    hue = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    base = grey + sat * (hue - hue.mean(1, keepdims=True))
    bg = _with_luma(base, target)
    # clipping can eat the gap for saturated bases; fall back to a grey of the target luminance
    bad = np.abs(bg @ _LUMA - lo) < _MIN_CONTRAST - 0.02
    bg[bad] = target[bad, None]
    return bg


def _alpha(sdf_px, soft=1.0):
    return np.clip(0.5 - sdf_px / soft, 0.0, 1.0)[..., None]


def _photo(rng, sdf, u, v, obj):
    n, h, w = sdf.shape
    bg = _contrasting_bg(rng, obj, 0.5)
    img = (bg[:, None, None, :] + 0.06 * _smooth_noise(rng, n, h, 4, 3)
           + 0.03 * _smooth_noise(rng, n, h, 12)[..., None])
    img = img + (np.linspace(-0.06, 0.06, h, dtype=np.float32)[None, :, None, None]
                 * rng.choice([-1.0, 1.0], (n, 1, 1, 1)).astype(np.float32))
    shift = max(1, h // 24)
    shadow = _alpha(np.roll(sdf, (shift, shift), axis=(1, 2)) - 1.0, 3.0)
    img = img * (1.0 - 0.35 * shadow)
    depth = np.clip(-sdf / (0.12 * h), 0.0, 1.0)            # bevel: brighter towards the inside
    ang = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    light = 0.72 + 0.3 * np.sqrt(depth) + 0.14 * (u * np.cos(ang) + v * np.sin(ang))
    body = obj[:, None, None, :] * light[..., None] + 0.05 * _smooth_noise(rng, n, h, 10)[..., None]
    body = body + 0.12 * (depth > 0.6)[..., None] * (obj[:, None, None, :] < 0.2)  # specular on dark
    a = _alpha(sdf)
    img = img * (1.0 - a) + body * a
    return img + rng.normal(0.0, 0.025, img.shape).astype(np.float32)


def _sketch(rng, sdf, obj):
    n, h, w = sdf.shape
    paper = rng.uniform(0.9, 0.99, (n, 1, 1, 1)).astype(np.float32) + np.float32([0.01, 0.0, -0.03])
    img = paper + 0.015 * _smooth_noise(rng, n, h, 16)[..., None]
    ink = np.minimum(obj, 0.45) * rng.uniform(0.3, 0.8, (n, 1)).astype(np.float32)
    width = rng.uniform(0.55, 0.95, (n, 1, 1)).astype(np.float32) * h / 48
    a1 = np.clip(width + 0.5 - np.abs(sdf), 0.0, 1.0)
    offset = (1.3 * h / 48) * _smooth_noise(rng, n, h, 5)
    a2 = 0.65 * np.clip(0.75 * width + 0.5 - np.abs(sdf + offset), 0.0, 1.0)
    pressure = 0.75 + 0.25 * _smooth_noise(rng, n, h, 8)
    a = (np.maximum(a1, a2) * pressure)[..., None]
    img = img * (1.0 - a) + ink[:, None, None, :] * a
    return img + rng.normal(0.0, 0.01, img.shape).astype(np.float32)


def _cartoon(rng, sdf, obj):
    n, h, w = sdf.shape
    bg = _contrasting_bg(rng, obj, 1.6)
    t = rng.uniform(1.4, 2.4, (n, 1, 1)).astype(np.float32) * h / 48
    fill = _alpha(sdf)
    line = np.clip(t / 2 + 0.5 - np.abs(sdf + t / 2), 0.0, 1.0)[..., None]
    img = bg[:, None, None, :] * (1.0 - fill) + obj[:, None, None, :] * fill
    return img * (1.0 - line) + 0.05 * line


def _blotches(rng, n, h, cell, base, jitter):
    """Mosaic of brush blotches: colour per grid cell [n, k, k, 3], looked up at jittered positions."""
    k = int(np.ceil(h / cell)) + 1
    grid = base[:, None, None, :] + rng.uniform(-jitter, jitter, (n, k, k, 3)).astype(np.float32)
    grid = grid + rng.uniform(-jitter, jitter, (n, k, k, 1)).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[None, :, None] + cell * 0.8 * _smooth_noise(rng, n, h, 6)
    xx = np.arange(h, dtype=np.float32)[None, None, :] + cell * 0.8 * _smooth_noise(rng, n, h, 6)
    iy = np.clip(((yy + cell / 2) / cell).astype(int), 0, k - 1)
    ix = np.clip(((xx + cell / 2) / cell).astype(int), 0, k - 1)
    return grid[np.arange(n)[:, None, None], iy, ix]


def _painting(rng, sdf, obj):
    n, h, w = sdf.shape
    vivid = np.clip(0.5 + 1.25 * (obj - 0.5), 0.0, 1.0)
    bg = _contrasting_bg(rng, vivid, 1.2)
    img = _blotches(rng, n, h, 0.13 * h, bg, 0.08)
    body = _blotches(rng, n, h, 0.06 * h, vivid, 0.07)
    edge = (0.025 * h) * _smooth_noise(rng, n, h, 12)
    a = _alpha(sdf + edge, 1.5)
    img = img * (1.0 - a) + body * a
    phi = rng.uniform(0, np.pi, (n, 1, 1)).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    grain = np.sin((x * np.cos(phi) + y * np.sin(phi)) * 1.7 + 4.0 * _smooth_noise(rng, n, h, 6))
    return img * (1.0 + 0.06 * grain[..., None])


def _pixel_art(rng, sdf, obj):
    n, h, w = sdf.shape
    blocks = rng.integers(14, 21, n) * h // 48             # low resolution per image
    bpx = (h / blocks).astype(np.float32)                  # block size in pixels
    idx = np.arange(h)
    src = ((np.floor(idx[None, :] * blocks[:, None] / h) + 0.5) * bpx[:, None]).astype(int)
    src = np.minimum(src, h - 1)                           # [n, H] pixel sampled by each pixel
    ar = np.arange(n)[:, None, None]
    low = sdf[ar, src[:, :, None], src[:, None, :]]        # blocky distance field
    inside = low < 0.0
    outline = inside & (low > -0.5 * bpx[:, None, None])
    by = np.floor(idx[None, :] * blocks[:, None] / h).astype(int)
    checker = ((by[:, :, None] + by[:, None, :]) % 2).astype(np.float32)
    bg = _contrasting_bg(rng, obj, 1.2)
    img = bg[:, None, None, :] + 0.04 * (checker[..., None] - 0.5) * rng.integers(0, 2, (n, 1, 1, 1))
    img = np.where(inside[..., None], obj[:, None, None, :], img)
    lift = np.where(obj @ _LUMA < 0.2, 0.3, 0.0).astype(np.float32)   # black objects: grey rim
    img = np.where(outline[..., None], obj[:, None, None, :] * 0.5 + lift[:, None, None, None], img)
    return np.round(np.clip(img, 0, 1) * 5.0) / 5.0        # 6-level palette per channel


def render_raw(classes=CLASSES, domains=DOMAINS, n_per_cell=1, seed=0, size=IMAGE_SIZE):
    """Render uint8 images. Returns (images [N, H, W, 3] uint8, class_idx [N], domain_idx [N],
    colour_idx [N] into COLOUR_NAMES), numpy arrays, ordered class-major, then domain, then sample."""
    classes = _check(classes, CLASSES, "classes")
    domains = _check(domains, DOMAINS, "domains")
    if isinstance(n_per_cell, bool) or not isinstance(n_per_cell, (int, np.integer)) or n_per_cell < 1:
        raise ValueError(f"n_per_cell must be a positive integer, got {n_per_cell!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    rng = np.random.default_rng(seed)
    nc, nd = len(classes), len(domains)
    n = nc * nd * n_per_cell
    cls = np.repeat(np.arange(nc), nd * n_per_cell)
    dom = np.tile(np.repeat(np.arange(nd), n_per_cell), nc)
    dom_names = np.array([domains[i] for i in dom])
    col = rng.integers(0, len(COLOUR_NAMES), n)
    col = np.where((dom_names == "sketch") & np.isin(col, [COLOUR_NAMES.index("white"),
                                                           COLOUR_NAMES.index("yellow")]),
                   COLOUR_NAMES.index("black"), col)    # light ink would vanish on paper
    obj = np.clip(_COLOUR_RGB[col] + rng.uniform(-0.06, 0.06, (n, 3)).astype(np.float32), 0, 1)
    # placement: s = pixels per glyph unit, the glyph spans about 2 s pixels
    s = (size * rng.uniform(0.3, 0.42, n) * np.where(dom_names == "pixel_art", 1.1, 1.0)).astype(np.float32)
    # the centre moves by up to half the free room and the glyph turns by up to 25 degrees: enough
    # variety to defeat pixel templates while a small ViT still learns the classes quickly
    room = 0.5 * np.maximum(size / 2 - 0.95 * s, 0.0)
    cx = size / 2 + rng.uniform(-1, 1, n) * room
    cy = size / 2 + rng.uniform(-1, 1, n) * room
    th = np.deg2rad(rng.uniform(-25, 25, n))
    wob = np.where(dom_names == "sketch", 0.035, np.where(dom_names == "painting", 0.02, 0.0))
    wob_f = rng.uniform(4, 9, (n, 2))
    wob_p = rng.uniform(0, 2 * np.pi, (n, 2))
    p = np.arange(size, dtype=np.float32) + 0.5
    sdf = np.empty((n, size, size), dtype=np.float32)
    uu = np.empty_like(sdf)
    vv = np.empty_like(sdf)
    for ci, name in enumerate(classes):
        sel = np.nonzero(cls == ci)[0]
        f = lambda a: a[sel].astype(np.float32)[:, None, None]
        dx = p[None, None, :] - f(cx)
        dy = f(cy) - p[None, :, None]
        c, sn, sc = np.cos(f(th)), np.sin(f(th)), f(s)
        u = (dx * c + dy * sn) / sc
        v = (dy * c - dx * sn) / sc
        u = u + f(wob) * np.sin(f(wob_f[:, 0]) * v + f(wob_p[:, 0]))
        v = v + f(wob) * np.sin(f(wob_f[:, 1]) * u + f(wob_p[:, 1]))
        sdf[sel] = GLYPHS[name](u, v) * sc
        uu[sel], vv[sel] = u, v
    img = np.empty((n, size, size, 3), dtype=np.float32)
    for di, name in enumerate(domains):
        sel = np.nonzero(dom == di)[0]
        if name == "photo":
            img[sel] = _photo(rng, sdf[sel], uu[sel], vv[sel], obj[sel])
        elif name == "sketch":
            img[sel] = _sketch(rng, sdf[sel], obj[sel])
        elif name == "cartoon":
            img[sel] = _cartoon(rng, sdf[sel], obj[sel])
        elif name == "painting":
            img[sel] = _painting(rng, sdf[sel], obj[sel])
        else:
            img[sel] = _pixel_art(rng, sdf[sel], obj[sel])
    out = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out, cls, dom, col


def to_model_input(images_uint8):
    """uint8 [N, H, W, 3] -> float32 tensor [N, 3, H, W] normalized with MEAN/STD."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def render(classes=CLASSES, domains=DOMAINS, n_per_cell=1, seed=0, size=IMAGE_SIZE):
    """Render n_per_cell fresh images for every (class, domain) cell.

    Returns (images [N, 3, size, size] float32 normalized for the model, class_idx [N] int64 into
    `classes`, domain_idx [N] int64 into `domains`), N = len(classes) * len(domains) * n_per_cell.
    Deterministic for a given seed. Raises ValueError naming an unknown class/domain or bad count.
    """
    raw, cls, dom, _ = render_raw(classes, domains, n_per_cell, seed, size)
    return to_model_input(raw), torch.from_numpy(cls).long(), torch.from_numpy(dom).long()
