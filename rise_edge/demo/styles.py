"""Drawing code of the demo world: shapes, a colour palette and one renderer per visual style.

Images are float RGB arrays in [0, 1] built with numpy and PIL only; all randomness comes from the
`numpy.random.Generator` passed in, so a renderer is a pure function of its generator's state.
Masks are drawn at twice the size and box-filtered down: anti-aliased edges without extra libraries.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Array = np.ndarray
Renderer = Callable[[np.random.Generator, Array, Array, int], Array]

_SS = 2  # supersampling factor of drawn masks
MAX_ROTATION = 30.0  # degrees either way: objects are mostly upright, as in photographs

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.16, 0.64, 0.20),
    "blue": (0.14, 0.30, 0.86),
    "yellow": (0.96, 0.84, 0.10),
    "purple": (0.56, 0.20, 0.70),
    "orange": (0.98, 0.54, 0.08),
}

_NATURAL = np.array([(0.55, 0.72, 0.90), (0.35, 0.55, 0.25), (0.85, 0.78, 0.60), (0.55, 0.38, 0.22),
                     (0.60, 0.60, 0.60), (0.88, 0.85, 0.80), (0.35, 0.30, 0.45), (0.20, 0.35, 0.30)])


# -- shapes: closed outlines in unit coordinates (half-extent 1, centred, y pointing down) -----------

def _circle_arc(cx: float, cy: float, r: float, a0: float, a1: float, k: int) -> Array:
    t = np.linspace(a0, a1, k)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _moon() -> Array:
    # Outer disc minus an offset inner disc; the outline walks the outer arc, then the inner arc back.
    d, r1 = 0.55, 0.85
    x = (1 - r1 ** 2 + d ** 2) / (2 * d)
    y = np.sqrt(1 - x ** 2)
    a = np.arctan2(y, x)
    b = np.arctan2(y, x - d)
    return np.concatenate([_circle_arc(0, 0, 1, a, 2 * np.pi - a, 40),
                           _circle_arc(d, 0, r1, 2 * np.pi - b, b, 30)])


def _heart() -> Array:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _star() -> Array:
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross() -> Array:
    w = 0.32
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                     (-1, w), (-1, -w), (-w, -w)])


def _normalise(points: Array) -> Array:
    points = np.asarray(points, dtype=np.float64)
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) / ((hi - lo).max() / 2)


SHAPES: dict[str, Array] = {name: _normalise(p) for name, p in {
    "circle": _circle_arc(0, 0, 1, 0, 2 * np.pi, 48)[:-1],
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": np.array([(0, -1), (1, 0.73), (-1, 0.73)]),
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
    "moon": _moon(),
}.items()}


# -- drawing helpers -------------------------------------------------------------------------------

def _poly_mask(points: Array, n: int) -> Array:
    img = Image.new("L", (n * _SS, n * _SS), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in points * _SS], fill=255)
    return np.asarray(img.resize((n, n), Image.BOX), dtype=np.float32) / 255


def _line_mask(points: Array, n: int, width: float, closed: bool = True) -> Array:
    img = Image.new("L", (n * _SS, n * _SS), 0)
    pts = [tuple(p) for p in points * _SS]
    if closed:
        pts.append(pts[0])
    ImageDraw.Draw(img).line(pts, fill=255, width=max(1, round(width * _SS)), joint="curve")
    return np.asarray(img.resize((n, n), Image.BOX), dtype=np.float32) / 255


def _hatch_mask(rng: np.random.Generator, n: int, spacing: float, width: float) -> Array:
    """Parallel lines at a random angle over the whole image (clip with a shape mask)."""
    angle = rng.uniform(0, np.pi)
    d = np.array([np.cos(angle), np.sin(angle)]) * n * 2
    normal = np.array([-np.sin(angle), np.cos(angle)])
    img = Image.new("L", (n * _SS, n * _SS), 0)
    draw = ImageDraw.Draw(img)
    centre = np.array([n / 2, n / 2])
    for k in np.arange(-n, n, spacing):
        c = centre + normal * (k + rng.normal(0, spacing * 0.12))
        draw.line([tuple((c - d) * _SS), tuple((c + d) * _SS)], fill=255, width=max(1, round(width * _SS)))
    return np.asarray(img.resize((n, n), Image.BOX), dtype=np.float32) / 255


def _blur(a: Array, radius: float) -> Array:
    """Gaussian blur of a [0, 1] mask (H, W) or image (H, W, 3)."""
    mode = "RGB" if a.ndim == 3 else "L"
    img = Image.fromarray(np.uint8(np.clip(a, 0, 1) * 255 + 0.5), mode)
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> Array:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32), "F")
    return (np.asarray(grid.resize((n, n), Image.BICUBIC), dtype=np.float32) - 0.5) * 2


def _over(base: Array, colour: Array, alpha: Array) -> Array:
    """Paint `colour` (3,) or (H, W, 3) over `base` with coverage `alpha` (H, W)."""
    a = np.clip(alpha, 0, 1)[..., None]
    return base * (1 - a) + colour * a


def _flat(n: int, colour: Array) -> Array:
    return np.broadcast_to(np.asarray(colour, np.float32), (n, n, 3)).copy()


def _grid(n: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    return xx + 0.5, yy + 0.5


def _contrasting(rng: np.random.Generator, col: Array, lo: float, hi: float) -> Array:
    """A random background colour in [lo, hi) not too close to the object's colour."""
    for _ in range(8):
        bg = lo + (hi - lo) * rng.random(3)
        if np.abs(bg - col).sum() > 0.6:
            break
    return bg


def _jitter_points(rng: np.random.Generator, points: Array, sigma: float) -> Array:
    return points + rng.normal(0, sigma, points.shape)


def _strokes(rng: np.random.Generator, image: Array, where: Array, count: int, colour_of: Callable,
             length: tuple[float, float], width: tuple[int, int]) -> Array:
    """Short straight brush strokes starting at random pixels where `where` > 0.5."""
    n = image.shape[0]
    layer = Image.fromarray(np.uint8(np.clip(image, 0, 1) * 255), "RGB")
    draw = ImageDraw.Draw(layer)
    ys, xs = np.nonzero(where > 0.5)
    if len(xs) == 0:
        return image
    for _ in range(count):
        i = int(rng.integers(len(xs)))
        angle, size = rng.uniform(0, np.pi), rng.uniform(*length) * n / 64
        dx, dy = np.cos(angle) * size / 2, np.sin(angle) * size / 2
        rgb = tuple(int(v) for v in np.clip(colour_of(), 0, 1) * 255)
        w = max(1, round(int(rng.integers(width[0], width[1] + 1)) * n / 64))
        draw.line([(xs[i] - dx, ys[i] - dy), (xs[i] + dx, ys[i] + dy)], fill=rgb, width=w)
    return np.asarray(layer, dtype=np.float32) / 255


# -- styles: (rng, outline in pixels, colour, size) -> float RGB image ------------------------------

def photo(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """Natural-ish background, shaded and textured object, soft shadow, sensor noise."""
    top, bottom = _NATURAL[rng.choice(len(_NATURAL), 2, replace=False)]
    _, yy = _grid(n)
    horizon = rng.uniform(0.3, 0.8) * n
    t = 1 / (1 + np.exp(-(yy - horizon) / (0.08 * n)))
    img = top * (1 - t[..., None]) + bottom * t[..., None]
    img = img + 0.08 * _smooth_noise(rng, n, 6)[..., None]
    shift = rng.uniform(1, 3, 2) * n / 64
    img = img * (1 - 0.45 * _blur(_poly_mask(pts + shift, n), 1.5 * n / 64))[..., None]
    xx, yy = _grid(n)
    centre, extent = pts.mean(axis=0), np.ptp(pts, axis=0).max() / 2
    light = rng.uniform(0, 2 * np.pi)
    proj = ((xx - centre[0]) * np.cos(light) + (yy - centre[1]) * np.sin(light)) / extent
    shade = 1.0 - 0.25 * np.clip(proj, -1.5, 1.5)
    spot = np.exp(-((proj + 0.5) ** 2) * 3) * 0.15
    obj = col * shade[..., None] + spot[..., None] + 0.06 * _smooth_noise(rng, n, 10)[..., None]
    img = _over(img, obj, _poly_mask(pts, n))
    img = img + rng.normal(0, 0.025, img.shape)
    return _blur(img, 0.4 * n / 64)


def cartoon(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """Flat pastel background, flat fill, thick dark outline."""
    img = _flat(n, 0.72 + 0.28 * rng.random(3))
    img = _over(img, col, _poly_mask(pts, n))
    outline = np.array([0.06, 0.05, 0.08]) * rng.uniform(0.5, 1.5)
    return _over(img, outline, _line_mask(pts, n, rng.uniform(2.2, 3.6) * n / 64))


def sketch(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """White paper, a few jittered pen strokes along the outline, some hatching inside."""
    paper = np.array([0.97, 0.96, 0.93]) * rng.uniform(0.95, 1.03)
    img = _flat(n, paper) + rng.normal(0, 0.015, (n, n, 1))
    ink = col * rng.uniform(0.55, 0.85)
    for _ in range(int(rng.integers(2, 4))):
        stroke = _line_mask(_jitter_points(rng, pts, 0.7 * n / 64), n, rng.uniform(0.8, 1.3) * n / 64)
        img = _over(img, ink, 0.85 * stroke)
    if rng.random() < 0.7:
        hatch = _hatch_mask(rng, n, rng.uniform(3, 5) * n / 64, 0.7 * n / 64)
        img = _over(img, ink, 0.5 * hatch * _poly_mask(pts, n))
    return img


def painting(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """Blotchy brush-stroked canvas; the object is painted in strokes with ragged edges."""
    base = _contrasting(rng, col, 0.25, 0.8)
    img = _strokes(rng, _flat(n, base), np.ones((n, n)), 40,
                   lambda: base + rng.normal(0, 0.05, 3), (8, 22), (4, 8))
    mask = _poly_mask(pts, n)
    body = _strokes(rng, _flat(n, col), mask, 45, lambda: col * rng.uniform(0.8, 1.1) +
                    rng.normal(0, 0.04, 3), (5, 14), (3, 5))
    ragged = np.clip((_blur(mask, n / 64) - 0.5 + 0.07 * _smooth_noise(rng, n, 12)) * 4 + 0.5, 0, 1)
    img = _over(img, body, ragged)
    return _blur(img, 0.5 * n / 64)


def mosaic(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """Square tiles, each one colour, separated by grout lines."""
    img = _over(_flat(n, _contrasting(rng, col, 0.2, 0.9)), col, _poly_mask(pts, n))
    tile = max(2, int(round(rng.uniform(3, 4.5) * n / 64)))
    k = -(-n // tile)
    small = Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255), "RGB").resize((k, k), Image.BOX)
    tiles = np.asarray(small, dtype=np.float32) / 255 + rng.normal(0, 0.05, (k, k, 3))
    img = np.repeat(np.repeat(tiles, tile, axis=0), tile, axis=1)[:n, :n]
    xx, yy = _grid(n)
    grout = ((xx.astype(int) % tile) == 0) | ((yy.astype(int) % tile) == 0)
    return _over(img, np.full(3, rng.uniform(0.3, 0.85)), 0.6 * grout.astype(np.float32))


def neon_sign(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """Dark wall, a glowing tube along the outline."""
    img = _flat(n, rng.uniform(0.02, 0.12) * np.array([0.8, 0.8, 1.1])) + \
        0.03 * _smooth_noise(rng, n, 8)[..., None]
    tube = _line_mask(pts, n, rng.uniform(1.2, 2.0) * n / 64)
    glow = np.clip(_blur(tube, 2.5 * n / 64) * 2.0, 0, 1)
    img = img + col * glow[..., None] * 0.9
    return _over(img, 0.5 * col + 0.5, tube)


def pixel_art(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """Drawn on a coarse grid with few colours and a one-pixel outline, then enlarged."""
    k = int(rng.integers(18, 26))
    img = Image.new("L", (k, k), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts * k / n], fill=255)
    inside = np.asarray(img) > 0
    pad = np.pad(inside, 1)
    edge = inside & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
    bg = np.round(_contrasting(rng, col, 0.3, 0.9) * 3) / 3
    checker = ((np.indices((k, k)).sum(axis=0) % 2) * 0.06)[..., None]
    small = _over(_flat(k, bg) - checker, np.round(col * 4) / 4, inside.astype(np.float32))
    small = _over(small, np.array([0.1, 0.1, 0.12]), edge.astype(np.float32))
    big = Image.fromarray(np.uint8(np.clip(small, 0, 1) * 255), "RGB").resize((n, n), Image.NEAREST)
    return np.asarray(big, dtype=np.float32) / 255


def embroidery(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """Woven fabric; the shape is filled with parallel satin stitches and a darker outline stitch."""
    xx, yy = _grid(n)
    weave = 0.05 * ((xx.astype(int) + yy.astype(int)) % 2)
    img = _flat(n, np.array([0.86, 0.81, 0.70]) * rng.uniform(0.8, 1.05)) - weave[..., None]
    mask = _poly_mask(pts, n)
    img = img * (1 - 0.3 * _blur(_poly_mask(pts + 1.2 * n / 64, n), n / 64))[..., None]
    a = rng.uniform(0, np.pi)
    period = rng.uniform(2.0, 2.8) * n / 64
    stripe = 0.82 + 0.18 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
    img = _over(img, col * stripe[..., None], mask)
    return _over(img, col * 0.55, _line_mask(pts, n, 1.6 * n / 64))


def chalk_drawing(rng: np.random.Generator, pts: Array, col: Array, n: int) -> Array:
    """Dark board; grainy pastel chalk strokes along the outline and a scribbled fill."""
    board = np.array([0.12, 0.22, 0.16]) if rng.random() < 0.6 else np.array([0.12, 0.12, 0.13])
    img = _flat(n, board) + 0.05 * _smooth_noise(rng, n, 5)[..., None]
    chalk = 0.55 * col + 0.45
    grain = (rng.random((n, n)) > 0.3).astype(np.float32)
    for _ in range(2):
        stroke = _line_mask(_jitter_points(rng, pts, 0.6 * n / 64), n, 1.6 * n / 64)
        img = _over(img, chalk, stroke * grain * 0.9)
    fill = _hatch_mask(rng, n, rng.uniform(2.5, 4) * n / 64, 1.0 * n / 64) * _poly_mask(pts, n)
    return _over(img, chalk, fill * grain * 0.6)


STYLE_RENDERERS: dict[str, Renderer] = {
    "photo": photo, "cartoon": cartoon, "painting": painting, "sketch": sketch,
    "mosaic": mosaic, "neon_sign": neon_sign, "pixel_art": pixel_art, "embroidery": embroidery,
    "chalk_drawing": chalk_drawing,
}


def place(rng: np.random.Generator, class_name: str, n: int) -> Array:
    """The class's outline rotated, scaled and moved to a random pose inside an n x n image."""
    radius = rng.uniform(0.24, 0.40) * n
    angle = np.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = SHAPES[class_name] @ rot.T
    pts = pts * (radius / (np.ptp(pts, axis=0).max() / 2))  # the rotated shape's extent, not the unit one
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    margin = 0.04 * n
    offset = rng.uniform(margin - lo, n - margin - hi)  # keeps the whole shape inside the frame
    return pts + offset


def render(style: str, class_name: str, colour: tuple[float, float, float],
           rng: np.random.Generator, n: int) -> Array:
    """One image as uint8 (n, n, 3)."""
    pts = place(rng, class_name, n)
    col = np.clip(np.asarray(colour) * rng.uniform(0.88, 1.08, 3) + rng.normal(0, 0.03, 3), 0, 1)
    img = STYLE_RENDERERS[style](rng, pts, col, n)
    return np.uint8(np.clip(img, 0, 1) * 255 + 0.5)
