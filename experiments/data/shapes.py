"""Drawing the synthetic shapes: the classes' shapes and appearances, the cluttered
background, and whole images with exact masks, from uniform random numbers.

A class is a (shape, appearance) pair: 10 shapes x 10 appearances = 100 classes; class id
``c`` is shape ``c // 10`` in appearance ``c % 10``. Each image shows one object of its
class (or two, :func:`render_pairs`) at a random scale, rotation and position over a
cluttered background (smooth colour noise plus small soft blobs, which never have a class
shape's hard outline). Everything is rendered in batches on coordinate grids from a row of
uniforms per image (``SINGLE_DRAWS`` / ``PAIR_DRAWS`` of them), so an image is a pure
function of its row; :mod:`experiments.data.synthetic` draws the rows from seeds.

Geometry lives in normalised canvas coordinates ``[-1, 1]`` (pixel centres at
``(2j + 1) / S - 1``), so every image size renders the same scene. Every shape lies inside
the unit disc of its local frame, scaled by the object radius ``r``: the object's
diameter is ``r`` times the canvas side. Masks are the object's pixels exactly (no
anti-aliasing): a pixel is object iff its centre is inside the shape.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "ellipse",
    "hexagon",
    "heart",
)

# (name, pattern, first colour, second colour); pattern 0 solid, 1 stripes, 2 checks, 3 dots
APPEARANCES = (
    ("red", 0, (0.90, 0.12, 0.12), (0.90, 0.12, 0.12)),
    ("green", 0, (0.10, 0.75, 0.20), (0.10, 0.75, 0.20)),
    ("blue", 0, (0.12, 0.25, 0.95), (0.12, 0.25, 0.95)),
    ("yellow", 0, (0.97, 0.88, 0.10), (0.97, 0.88, 0.10)),
    ("bw-stripes", 1, (0.97, 0.97, 0.97), (0.05, 0.05, 0.05)),
    ("orange-blue-stripes", 1, (1.00, 0.55, 0.00), (0.05, 0.15, 0.70)),
    ("bw-checks", 2, (0.97, 0.97, 0.97), (0.05, 0.05, 0.05)),
    ("red-yellow-checks", 2, (0.90, 0.10, 0.10), (0.97, 0.90, 0.10)),
    ("white-on-magenta-dots", 3, (0.85, 0.10, 0.75), (0.97, 0.97, 0.97)),
    ("black-on-cyan-dots", 3, (0.10, 0.85, 0.90), (0.05, 0.05, 0.05)),
)

NUM_CLASSES = len(SHAPES) * len(APPEARANCES)

# Difficulty (object size, clutter, colour jitter) is calibrated so that a Conv-4 ProtoNet
# at 32 px (two pools, GAP), trained for 200 5-way 5-shot 15-query episodes (Adam 1e-3),
# reaches 80.0 +- 1.2% 5-way 5-shot test accuracy (300 episodes, seed 0, 200 images per
# class): learnable, not trivial.

# Object radius ranges (fraction of the canvas side covered by the object's bounding
# circle); pairs are smaller so that two fit side by side.
SINGLE_RADIUS = (0.35, 0.55)
PAIR_RADIUS = (0.26, 0.40)
# How far (in radii) an object's centre may reach towards the canvas edge beyond the
# position that keeps it whole: 0 keeps objects whole (and concentrates them in the
# middle), 1 lets half of an object leave the canvas. With 0.5 and arcsine centres
# (see render_single) most of every object stays visible while the mean mask is nearly
# flat: at 32 px an object lies within 2 px of the canvas centre in 20% of images against
# 17% for a random point, so a centre prior earns little.
POSITION_SLACK = 0.5

_N_BLOBS = 9
_NOISE_GRID = 4
OBJECT_DRAWS = 13  # radius, angle, x, y, two phases, brightness, 2 x 3 colour jitters
BACKGROUND_DRAWS = 3 + 3 * _NOISE_GRID**2 + 7 * _N_BLOBS
SINGLE_DRAWS = OBJECT_DRAWS + BACKGROUND_DRAWS
PAIR_DRAWS = 2 * OBJECT_DRAWS + BACKGROUND_DRAWS + 3


def class_name(global_class: int) -> str:
    """The name of class id ``0..99``: its appearance and shape, e.g. ``"red-circle"``."""
    shape, appearance = divmod(global_class, len(APPEARANCES))
    return f"{APPEARANCES[appearance][0]}-{SHAPES[shape]}"


def pixel_grid(size: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Normalised pixel-centre coordinates ``(x, y)``, each ``(1, S, S)``."""
    c = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x[None], y[None]


def _polygon_inside(u: Tensor, v: Tensor, sides: int, inradius: float) -> Tensor:
    angles = torch.arange(sides, device=u.device, dtype=u.dtype) * (2 * math.pi / sides)
    proj = u[..., None] * torch.cos(angles) + v[..., None] * torch.sin(angles)
    return proj.amax(-1) <= inradius


def _rho(u: Tensor, v: Tensor) -> Tensor:
    return torch.sqrt(u * u + v * v)


def _star(u: Tensor, v: Tensor) -> Tensor:
    wave = torch.abs(torch.remainder(torch.atan2(v, u) * (5 / (2 * math.pi)), 1.0) - 0.5) * 2
    return _rho(u, v) <= 0.40 + 0.55 * wave


def _heart(u: Tensor, v: Tensor) -> Tensor:
    hx, hy = u / 0.62, -v / 0.62 + 0.25
    return (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy**3 <= 0


# Inside tests in the object's local frame, in SHAPES order; each shape lies inside the
# unit disc (pairs rely on it to never overlap).
SHAPE_TESTS = (
    lambda u, v: _rho(u, v) <= 0.72,
    lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.62,
    lambda u, v: _polygon_inside(u, v, 3, 0.47),
    _star,
    lambda u, v: ((u.abs() <= 0.26) & (v.abs() <= 0.92)) | ((v.abs() <= 0.26) & (u.abs() <= 0.92)),
    lambda u, v: (_rho(u, v) <= 0.92) & (_rho(u, v) >= 0.52),
    lambda u, v: (_rho(u, v) <= 0.92) & ((u - 0.48) ** 2 + v * v > 0.68**2),
    lambda u, v: (u / 0.95) ** 2 + (v / 0.50) ** 2 <= 1,
    lambda u, v: _polygon_inside(u, v, 6, 0.84),
    _heart,
)


def object_inside(shape: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Inside test of shape ``shape[n]`` for image ``n``: ``u, v (N, H, W) -> (N, H, W)``."""
    inside = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    for s, test in enumerate(SHAPE_TESTS):
        selected = shape == s
        if bool(selected.any()):  # rendering is not a hot path: the sync is fine
            inside[selected] = test(u[selected], v[selected])
    return inside


def _pattern(u: Tensor, v: Tensor, phase_a: Tensor, phase_b: Tensor) -> Tensor:
    """Second-colour indicator of each pattern: ``(4, N, H, W)`` bool (solid is all False)."""
    pu = u + phase_a[:, None, None] * 2
    pv = v + phase_b[:, None, None] * 2
    stripes = torch.remainder(pu / 0.62, 2.0) < 1.0
    checks = (torch.floor(pu / 0.36) + torch.floor(pv / 0.36)).remainder(2) == 1
    du = torch.remainder(pu, 0.72) - 0.36
    dv = torch.remainder(pv, 0.72) - 0.36
    dots = du * du + dv * dv <= 0.2**2
    return torch.stack([torch.zeros_like(stripes), stripes, checks, dots])


_APPEARANCE_PATTERN = torch.tensor([a[1] for a in APPEARANCES])
_APPEARANCE_COLOURS = torch.tensor([[a[2], a[3]] for a in APPEARANCES])  # (10, 2, 3)


@functools.lru_cache(maxsize=8)
def _noise_basis(size: int) -> Tensor:
    """Bicubic upsampling of a ``G x G`` grid as a matrix ``(G*G, S*S)``.

    Upsampling is linear, so the smooth noise of a whole batch is one matmul.
    """
    eye = torch.eye(_NOISE_GRID**2).reshape(-1, 1, _NOISE_GRID, _NOISE_GRID)
    basis = F.interpolate(eye, size=(size, size), mode="bicubic", align_corners=False)
    return basis.reshape(_NOISE_GRID**2, size * size)


def render_background(draws: Tensor, size: int) -> Tensor:
    """Smooth colour noise plus soft blobs: ``draws (N, B)`` uniforms -> ``(N, 3, S, S)``."""
    n = draws.shape[0]
    base = 0.25 + 0.5 * draws[:, 0:3]
    k = 3 + 3 * _NOISE_GRID**2
    grid = draws[:, 3:k].reshape(n, 3, _NOISE_GRID**2)
    noise = (grid @ _noise_basis(size).to(draws.device)).reshape(n, 3, size, size)
    image = (base[:, :, None, None] + 0.8 * (noise - 0.5)).clamp(0, 1)
    x, y = pixel_grid(size, draws.device)
    blobs = draws[:, k : k + 7 * _N_BLOBS].reshape(n, _N_BLOBS, 7, 1, 1)
    bx, by = blobs[:, :, 0] * 2 - 1, blobs[:, :, 1] * 2 - 1  # (N, K, 1, 1)
    sigma = 0.03 + 0.07 * blobs[:, :, 2]
    # Separable Gaussians; exponents clamped so that nothing goes subnormal (slow on CPU).
    gx = torch.exp((-((x[:, :1] - bx) ** 2) / (2 * sigma * sigma)).clamp(min=-30))
    gy = torch.exp((-((y[:, :, :1] - by) ** 2) / (2 * sigma * sigma)).clamp(min=-30))
    alpha = (0.5 + 0.5 * blobs[:, :, 6]) * gy * gx  # (N, K, S, S)
    # Blobs composited in order, each over the previous ones, in closed form: blob k shows
    # through the blobs above it, the noise through all of them.
    through = torch.flip(torch.cumprod(torch.flip(1 - alpha, [1]), 1), [1])  # prod_{j>=k}
    above = torch.cat([through[:, 1:], torch.ones_like(through[:, :1])], 1)  # prod_{j>k}
    colours = blobs[:, :, 3:6, 0, 0]  # (N, K, 3)
    return image * through[:, :1] + torch.einsum("nkhw,nkc->nchw", alpha * above, colours)


def render_object(
    global_class: Tensor, draws: Tensor, cx: Tensor, cy: Tensor, radius: Tensor, size: int
) -> tuple[Tensor, Tensor]:
    """Colour and mask of one object per image.

    Args:
        global_class: ``(N,)`` class ids ``0..99`` (shape = id // 10, appearance = id % 10).
        draws: ``(N, 13)`` uniforms (angle at 1, phases at 4-5, colour jitter at 6-12).
        cx, cy, radius: ``(N,)`` centre and radius in normalised canvas coordinates.

    Returns:
        colour ``(N, 3, S, S)`` in ``[0, 1]`` (meaningful where the mask is set) and
        mask ``(N, S, S)`` bool.
    """
    device = draws.device
    shape = torch.div(global_class, len(APPEARANCES), rounding_mode="floor").to(device)
    appearance = torch.remainder(global_class, len(APPEARANCES)).to(device)
    angle = draws[:, 1] * 2 * math.pi
    x, y = pixel_grid(size, device)
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    r = radius[:, None, None]
    u = (cos * dx + sin * dy) / r
    v = (-sin * dx + cos * dy) / r
    mask = object_inside(shape, u, v)
    pattern = _APPEARANCE_PATTERN.to(device)[appearance]
    second = torch.gather(
        _pattern(u, v, draws[:, 4], draws[:, 5]),
        0,
        pattern[None, :, None, None].expand(1, *u.shape),
    )[0]
    colours = _APPEARANCE_COLOURS.to(device)[appearance]  # (N, 2, 3)
    brightness = 0.85 + 0.3 * draws[:, 6, None, None]
    jitter = (draws[:, 7:13].reshape(-1, 2, 3) - 0.5) * 0.4
    colours = ((colours + jitter) * brightness).clamp(0, 1)
    colour = torch.where(
        second[:, None], colours[:, 1, :, None, None], colours[:, 0, :, None, None]
    )
    return colour, mask


def _range(draw: Tensor, bounds: tuple[float, float]) -> Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * draw


def render_single(
    global_class: Tensor, draws: Tensor, size: int, with_object: bool = True
) -> tuple[Tensor, Tensor]:
    """One object per image: uniforms ``draws (N, D)`` -> images, masks.

    Returns ``[0, 1]`` images ``(N, 3, S, S)`` and masks ``(N, S, S)`` bool.

    ``with_object=False`` renders the same background alone (for tests and figures).
    """
    obj, bg = draws[:, :OBJECT_DRAWS], draws[:, OBJECT_DRAWS:]
    radius = _range(obj[:, 0], SINGLE_RADIUS)
    # The centre ranges over the canvas shrunk by (1 - slack) radii at every edge, with
    # an arcsine (U-shaped) density per axis: uniform centres would pile object pixels
    # up in the middle of the canvas, arcsine centres make the coverage nearly flat.
    reach = 1 - (1 - POSITION_SLACK) * radius
    cx = -torch.cos(math.pi * obj[:, 2]) * reach
    cy = -torch.cos(math.pi * obj[:, 3]) * reach
    image = render_background(bg, size)
    colour, mask = render_object(global_class, obj, cx, cy, radius, size)
    if not with_object:
        return image, torch.zeros_like(mask)
    return torch.where(mask[:, None], colour, image), mask


def render_pairs(
    class_a: Tensor, class_b: Tensor, draws: Tensor, size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Two non-overlapping objects per image.

    The objects' bounding discs are placed a random direction apart with a small gap, and
    the pair's midpoint is uniform over the positions where both discs stay on the canvas,
    so the masks are exact and disjoint (nothing is occluded).

    Returns images ``(N, 3, S, S)`` in [0, 1], mask_a and mask_b ``(N, S, S)``.
    """
    a = draws[:, :OBJECT_DRAWS]
    b = draws[:, OBJECT_DRAWS : 2 * OBJECT_DRAWS]
    bg = draws[:, 2 * OBJECT_DRAWS : 2 * OBJECT_DRAWS + BACKGROUND_DRAWS]
    place = draws[:, 2 * OBJECT_DRAWS + BACKGROUND_DRAWS :]
    ra, rb = _range(a[:, 0], PAIR_RADIUS), _range(b[:, 0], PAIR_RADIUS)
    direction = place[:, 0] * 2 * math.pi
    half = (ra + rb + 0.04) / 2
    offset_x, offset_y = half * torch.cos(direction), half * torch.sin(direction)
    centres = []
    for offset, draw in ((offset_x, place[:, 1]), (offset_y, place[:, 2])):
        # a sits at m + offset, b at m - offset; both must keep their disc inside [-1, 1].
        low = torch.maximum(-1 + ra - offset, -1 + rb + offset)
        high = torch.minimum(1 - ra - offset, 1 - rb + offset)
        centres.append(low + (high - low) * draw)
    mx, my = centres
    image = render_background(bg, size)
    colour_a, mask_a = render_object(class_a, a, mx + offset_x, my + offset_y, ra, size)
    colour_b, mask_b = render_object(class_b, b, mx - offset_x, my - offset_y, rb, size)
    image = torch.where(mask_b[:, None], colour_b, image)
    image = torch.where(mask_a[:, None], colour_a, image)
    return image, mask_a, mask_b
