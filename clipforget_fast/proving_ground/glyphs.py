"""Signed distance functions of the proving-ground object classes.

Each glyph is a signed distance field (negative inside) in glyph coordinates, where the object fits in
the square [-1, 1]^2 with v pointing up. Glyphs are unions and differences of a few primitives; the
primitive formulas are the standard exact 2-D distance functions (circle, box, segment, polygon with a
crossing-number sign test), the ellipse is the usual first-order approximation. Every function takes
float32 arrays `u`, `v` of any shape (in practice [n, H, W]) and returns an array of the same shape.
"""
import numpy as np


def _circle(u, v, cx, cy, r):
    return np.hypot(u - cx, v - cy) - r


def _ellipse(u, v, cx, cy, a, b):
    # first-order approximation: exact on the axes, good enough for anti-aliased filling
    return (np.hypot((u - cx) / a, (v - cy) / b) - 1.0) * min(a, b)


def _box(u, v, cx, cy, hx, hy):
    dx = np.abs(u - cx) - hx
    dy = np.abs(v - cy) - hy
    outside = np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
    return outside + np.minimum(np.maximum(dx, dy), 0.0)


def _segment(u, v, ax, ay, bx, by, r):
    ex, ey = bx - ax, by - ay
    wx, wy = u - ax, v - ay
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return np.hypot(wx - ex * t, wy - ey * t) - r


def _polygon(u, v, pts):
    """Exact distance to a simple polygon `pts` (list of (x, y)), sign by the crossing-number rule."""
    d2 = (u - pts[0][0]) ** 2 + (v - pts[0][1]) ** 2
    inside = np.zeros(u.shape, dtype=bool)
    for i in range(len(pts)):
        xi, yi = pts[i]
        xj, yj = pts[i - 1]
        ex, ey = xj - xi, yj - yi
        wx, wy = u - xi, v - yi
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d2 = np.minimum(d2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        c1 = v >= yi
        c2 = v < yj
        c3 = ex * wy > ey * wx
        inside ^= (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
    d = np.sqrt(d2)
    return np.where(inside, -d, d)


def _union(*ds):
    out = ds[0]
    for d in ds[1:]:
        out = np.minimum(out, d)
    return out


def _minus(a, b):
    return np.maximum(a, -b)


def _star_points(n=5, r_out=0.95, r_in=0.4):
    ang = np.pi / 2 + np.arange(2 * n) * np.pi / n
    rad = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return list(zip(rad * np.cos(ang), rad * np.sin(ang) - 0.05))


_STAR = _star_points()


def circle(u, v):
    return _circle(u, v, 0.0, 0.0, 0.8)


def square(u, v):
    return _box(u, v, 0.0, 0.0, 0.68, 0.68)


def triangle(u, v):
    return _polygon(u, v, [(-0.85, -0.7), (0.85, -0.7), (0.0, 0.8)])


def star(u, v):
    return _polygon(u, v, _STAR)


def heart(u, v):
    return _union(_circle(u, v, -0.38, 0.3, 0.42), _circle(u, v, 0.38, 0.3, 0.42),
                  _polygon(u, v, [(-0.77, 0.15), (0.77, 0.15), (0.0, -0.85)]))


def cross(u, v):
    return _union(_box(u, v, 0.0, 0.0, 0.24, 0.82), _box(u, v, 0.0, 0.0, 0.82, 0.24))


def arrow(u, v):
    return _union(_box(u, v, -0.35, 0.0, 0.5, 0.16),
                  _polygon(u, v, [(0.1, 0.58), (0.92, 0.0), (0.1, -0.58)]))


def crescent_moon(u, v):
    return _minus(_circle(u, v, 0.0, 0.0, 0.82), _circle(u, v, 0.38, 0.22, 0.66))


def house(u, v):
    body = _box(u, v, 0.0, -0.38, 0.6, 0.45)
    roof = _polygon(u, v, [(-0.85, 0.05), (0.85, 0.05), (0.0, 0.88)])
    return _minus(_union(body, roof), _box(u, v, 0.0, -0.62, 0.14, 0.22))


def tree(u, v):
    return _union(_polygon(u, v, [(-0.72, -0.45), (0.72, -0.45), (0.0, 0.2)]),
                  _polygon(u, v, [(-0.56, -0.08), (0.56, -0.08), (0.0, 0.55)]),
                  _polygon(u, v, [(-0.4, 0.28), (0.4, 0.28), (0.0, 0.9)]),
                  _box(u, v, 0.0, -0.66, 0.13, 0.24))


def fish(u, v):
    body = _union(_ellipse(u, v, -0.18, 0.0, 0.62, 0.4),
                  _polygon(u, v, [(0.3, 0.0), (0.9, 0.48), (0.9, -0.48)]))
    return _minus(body, _circle(u, v, -0.48, 0.1, 0.08))


def umbrella(u, v):
    canopy = np.maximum(_circle(u, v, 0.0, 0.0, 0.85), -v)
    for x in (-0.57, 0.0, 0.57):
        canopy = _minus(canopy, _circle(u, v, x, -0.02, 0.2))
    handle = _segment(u, v, 0.0, 0.1, 0.0, -0.65, 0.06)
    hook = np.maximum(np.abs(_circle(u, v, 0.17, -0.65, 0.17)) - 0.06, v + 0.65)
    return _union(canopy, handle, hook)


def lightning_bolt(u, v):
    return _polygon(u, v, [(-0.1, 0.92), (0.5, 0.92), (0.16, 0.22), (0.52, 0.22), (-0.38, -0.92),
                           (-0.06, -0.08), (-0.42, -0.08)])


def key(u, v):
    head = _minus(_circle(u, v, -0.52, 0.0, 0.36), _circle(u, v, -0.52, 0.0, 0.15))
    shaft = _box(u, v, 0.22, 0.0, 0.62, 0.09)
    return _union(head, shaft, _box(u, v, 0.7, -0.2, 0.08, 0.14), _box(u, v, 0.42, -0.17, 0.07, 0.11))


def cup(u, v):
    body = _polygon(u, v, [(-0.55, 0.62), (0.45, 0.62), (0.32, -0.62), (-0.42, -0.62)])
    handle = np.abs(_circle(u, v, 0.46, 0.05, 0.3)) - 0.08
    return _union(body, handle)


def car(u, v):
    body = _box(u, v, 0.0, -0.12, 0.88, 0.25)
    cabin = _polygon(u, v, [(-0.5, 0.1), (0.45, 0.1), (0.25, 0.52), (-0.32, 0.52)])
    return _union(body, cabin, _circle(u, v, -0.5, -0.42, 0.21), _circle(u, v, 0.5, -0.42, 0.21))


def flower(u, v):
    ang = np.arange(6) * np.pi / 3
    petals = [_circle(u, v, 0.36 * np.cos(a), 0.25 + 0.36 * np.sin(a), 0.23) for a in ang]
    stem = _segment(u, v, 0.0, -0.05, 0.0, -0.92, 0.06)
    return _union(_circle(u, v, 0.0, 0.25, 0.22), stem, *petals)


_SPIRAL_TURNS = 2.5
_SPIRAL_A = 0.85 / (2 * np.pi * _SPIRAL_TURNS)  # radius grows by 2*pi*a per turn, 0.85 at the end


def spiral(u, v):
    r = np.hypot(u, v)
    th = np.mod(np.arctan2(v, u), 2 * np.pi)
    d = np.full(u.shape, 10.0, dtype=u.dtype)
    r_end = 2 * np.pi * _SPIRAL_TURNS * _SPIRAL_A
    for k in range(int(np.ceil(_SPIRAL_TURNS)) + 1):
        rk = _SPIRAL_A * (th + 2 * np.pi * k)
        d = np.where(rk <= r_end, np.minimum(d, np.abs(r - rk)), d)
    return d - 0.08


def mushroom(u, v):
    cap = np.maximum(_ellipse(u, v, 0.0, -0.02, 0.85, 0.78), -(v + 0.02))
    return _union(cap, _box(u, v, 0.0, -0.42, 0.2, 0.42))


def boat(u, v):
    hull = _polygon(u, v, [(-0.9, -0.28), (0.9, -0.28), (0.58, -0.68), (-0.58, -0.68)])
    sail = _polygon(u, v, [(0.06, -0.18), (0.06, 0.9), (0.68, -0.18)])
    mast = _box(u, v, 0.0, 0.32, 0.05, 0.62)
    return _union(hull, sail, mast, _polygon(u, v, [(-0.06, -0.18), (-0.06, 0.6), (-0.5, -0.18)]))


GLYPHS = {
    "circle": circle, "square": square, "triangle": triangle, "star": star, "heart": heart,
    "cross": cross, "arrow": arrow, "crescent_moon": crescent_moon, "house": house, "tree": tree,
    "fish": fish, "umbrella": umbrella, "lightning_bolt": lightning_bolt, "key": key, "cup": cup,
    "car": car, "flower": flower, "spiral": spiral, "mushroom": mushroom, "boat": boat,
}
