"""SyntheticShapes: procedurally rendered shapes with exact masks (the embedded default).

A class is a (shape, appearance) pair: 10 shapes x 10 appearances = 100 classes, split
64 / 16 / 20 (train / val / test) like miniImageNet by a fixed permutation that does not
depend on the dataset seed. Each image shows one object of its class at a random scale,
rotation and position over a cluttered background (smooth colour noise plus small soft
blobs, which never have a class shape's hard outline). Everything is rendered in batches
on coordinate grids and is a pure function of ``(seed, class, index)``: the random
numbers of an image come from a generator seeded by those integers alone.

Geometry lives in normalised canvas coordinates ``[-1, 1]`` (pixel centres at
``(2j + 1) / S - 1``), so every image size renders the same scene. Every shape lies inside
the unit disc of its local frame, scaled by the object radius ``r``: the object's
diameter is ``r`` times the canvas side. Masks are the object's pixels exactly (no
anti-aliasing): a pixel is object iff its centre is inside the shape.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from experiments.data.common import normalise_image
from experiments.data.seeding import derive_seed, generator
from fam.errors import FamBenchError

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
SPLIT_SIZES = {"train": 64, "val": 16, "test": 20}

# Fixed class assignment, independent of the dataset seed and of torch's RNG algorithms
# (pure-Python hash order), so the splits never change.
_SPLIT_ORDER = sorted(range(NUM_CLASSES), key=lambda c: derive_seed(20_230_711, c))

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
_OBJECT_DRAWS = 13  # radius, angle, x, y, two phases, brightness, 2 x 3 colour jitters
_BACKGROUND_DRAWS = 3 + 3 * _NOISE_GRID**2 + 7 * _N_BLOBS
_SINGLE_DRAWS = _OBJECT_DRAWS + _BACKGROUND_DRAWS
_PAIR_DRAWS = 2 * _OBJECT_DRAWS + _BACKGROUND_DRAWS + 3
# Images rendered per batch: small enough that the temporaries stay in cache (about 3x
# faster on CPU than one large batch), large enough to amortise the per-op overhead.
_CHUNK = 256

# Dataset statistics of the rendered images (train split, seed 0, 32 px, 200 per class);
# rounded, fixed so that normalisation never depends on which images were rendered.
MEAN = (0.502, 0.501, 0.498)
STD = (0.259, 0.254, 0.257)


def split_classes(split: str) -> list[int]:
    """Global class ids ``0..99`` of a split (sorted)."""
    if split not in SPLIT_SIZES:
        raise FamBenchError(
            f"SyntheticShapes has splits 'train', 'val' and 'test', got split={split!r}."
        )
    start = {"train": 0, "val": 64, "test": 80}[split]
    return sorted(_SPLIT_ORDER[start : start + SPLIT_SIZES[split]])


def class_name(global_class: int) -> str:
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
_SHAPE_TESTS = (
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


def shape_inside(u: Tensor, v: Tensor) -> Tensor:
    """Inside tests of every shape in local coordinates: ``(...) -> (10, ...)`` bool."""
    return torch.stack([test(u, v) for test in _SHAPE_TESTS])


def object_inside(shape: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Inside test of shape ``shape[n]`` for image ``n``: ``u, v (N, H, W) -> (N, H, W)``."""
    inside = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    for s, test in enumerate(_SHAPE_TESTS):
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
    obj, bg = draws[:, :_OBJECT_DRAWS], draws[:, _OBJECT_DRAWS:]
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
    a = draws[:, :_OBJECT_DRAWS]
    b = draws[:, _OBJECT_DRAWS : 2 * _OBJECT_DRAWS]
    bg = draws[:, 2 * _OBJECT_DRAWS : 2 * _OBJECT_DRAWS + _BACKGROUND_DRAWS]
    place = draws[:, 2 * _OBJECT_DRAWS + _BACKGROUND_DRAWS :]
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


def _draws(parts: Sequence[tuple[int, ...]], count: int) -> Tensor:
    """One row of ``count`` uniforms per identifying tuple, each from its own generator."""
    return torch.stack([torch.rand(count, generator=generator(*p)) for p in parts])


def _to_uint8(images: Tensor) -> Tensor:
    return (images * 255).round_().clamp_(0, 255).to(torch.uint8)


class SyntheticShapes(Dataset):
    """Synthetic few-shot dataset with exact object masks.

    Args:
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).
        image_size: output side ``S`` in pixels (square images).
        images_per_class: images rendered per class (item ``i`` is image ``i % n`` of
            split class ``i // n``).
        seed: the dataset seed; image ``k`` of global class ``c`` depends only on
            ``(seed, c, k)``, pair images only on ``(seed, class_a, class_b, key)``.
        mode: ``"single"`` (one object per image) or ``"pairs"``, which also enables
            :meth:`pair`. Items ``ds[i]`` are single-object images in both modes (they are
            the support images of a pairs episode).
        normalise: return images normalised with ``MEAN`` / ``STD`` (default), or raw
            ``[0, 1]`` images (e.g. for SimCLR augmentations).
        max_classes: use only this many of the split's classes, evenly spaced over its
            class list (sorted by id, i.e. shape-major, so the subset spans the shapes):
            e.g. 10 training classes for a CIFAR-10-sized contrastive task. ``None``: all.
        clutter: the background's contrast, ``1`` (default) the full colour noise and
            blobs, ``0`` a plain mid-grey background (``0.5 + clutter * (bg - 0.5)``;
            objects are untouched, the masks unchanged).

    Items are dicts ``{"image": (3, S, S) float, "label": int, "index": int,
    "mask": (S, S) bool}``. An item is rendered when it is first asked for (only that
    item: an episode costs its own images, not its classes') and kept as uint8 in a
    least-recently-used cache of at most ``cache_bytes`` (``4 * S * S`` bytes an item);
    an evicted item is rendered again, with the same pixels (rendering is a pure function
    of the item, whatever else is rendered with it).
    """

    has_masks = True
    #: The shapes are analytic (resolution-free); their masks count as annotated at
    #: TorchRay's reference 224 px, so the pointing game's 15 px tolerance
    #: (metric.tolerance_at=annotation) is 15 * image_size / 224 input pixels.
    annotation_size = (224, 224)
    #: bound of the item cache (bytes): the default's training split at 32 px (15 MB) and
    #: a 600-image-per-class test split at 84 px (340 MB) fit; memory never grows past it
    cache_bytes: int = 512 * 2**20

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        images_per_class: int = 600,
        seed: int = 0,
        mode: Literal["single", "pairs"] = "single",
        normalise: bool = True,
        max_classes: int | None = None,
        clutter: float = 1.0,
    ) -> None:
        if mode not in ("single", "pairs"):
            raise FamBenchError(
                f"SyntheticShapes mode must be 'single' or 'pairs', got mode={mode!r}."
            )
        if int(image_size) < 8:
            raise FamBenchError(
                f"SyntheticShapes needs image_size >= 8 to draw recognisable shapes, got "
                f"{image_size}."
            )
        if int(images_per_class) < 1:
            raise FamBenchError(
                f"SyntheticShapes needs images_per_class >= 1, got {images_per_class}."
            )
        if not 0.0 <= float(clutter) <= 1.0:
            raise FamBenchError(f"SyntheticShapes clutter must be in [0, 1], got {clutter}.")
        self.clutter = float(clutter)
        self.split = split
        self.class_ids = split_classes(split)
        if max_classes is not None:
            total = len(self.class_ids)
            if not 1 <= int(max_classes) <= total:
                raise FamBenchError(
                    f"SyntheticShapes max_classes must be between 1 and the {total} classes "
                    f"of split {split!r}, got {max_classes}."
                )
            step = total / int(max_classes)
            self.class_ids = [self.class_ids[int(i * step)] for i in range(int(max_classes))]
        self.classes = [class_name(c) for c in self.class_ids]
        self.image_size = int(image_size)
        self.images_per_class = int(images_per_class)
        self.seed = int(seed)
        self.mode = mode
        self.normalise = normalise
        self.mean, self.std = MEAN, STD
        self.labels = torch.arange(len(self.class_ids)).repeat_interleave(self.images_per_class)
        self._cache: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()
        self.rendered = 0  # items rendered so far (re-renders of evicted items included)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.labels)

    def render(
        self, labels: Tensor, indices: Tensor, with_object: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Render images ``indices`` (within their class) of split classes ``labels``.

        Returns ``[0, 1]`` images ``(N, 3, S, S)`` and masks ``(N, S, S)``, uncached.
        """
        global_ids = torch.tensor(self.class_ids)[torch.as_tensor(labels)]
        parts = [
            (self.seed, 1, c, k)
            for c, k in zip(global_ids.tolist(), torch.as_tensor(indices).tolist(), strict=True)
        ]
        draws = _draws(parts, _SINGLE_DRAWS)
        chunks = [
            render_single(
                global_ids[i : i + _CHUNK], draws[i : i + _CHUNK], self.image_size, with_object
            )
            for i in range(0, len(parts), _CHUNK)
        ]
        images, masks = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return self._declutter(images, masks), masks

    def _declutter(self, images: Tensor, objects: Tensor) -> Tensor:
        """``clutter < 1``: the background pulled towards mid grey, objects untouched."""
        if self.clutter == 1.0:
            return images
        calm = 0.5 + self.clutter * (images - 0.5)
        return torch.where(objects[:, None], images, calm)

    def images_on_other_backgrounds(self, indices: Tensor, keys: Tensor) -> Tensor:
        """Items ``indices`` with their object (class, pose, size, colours) unchanged over
        another background, drawn from ``(seed, class, index, key)``: ``(B, 3, S, S)`` as
        items return them, uncached. The background swap of Ryali et al. (ICCV 2021) for
        self-supervised views (``task.background_swap``): a positive pair that shares only
        the object cannot be matched by its background."""
        indices = torch.as_tensor(indices).reshape(-1).tolist()
        labels, ks = (
            [i // self.images_per_class for i in indices],
            [i % self.images_per_class for i in indices],
        )
        if not indices:
            return torch.empty(0, 3, self.image_size, self.image_size)
        global_ids = torch.tensor(self.class_ids)[torch.tensor(labels)]
        parts = list(zip(global_ids.tolist(), ks, strict=True))
        own = _draws([(self.seed, 1, c, k) for c, k in parts], _SINGLE_DRAWS)
        other = _draws(
            [(self.seed, 3, c, k, int(key)) for (c, k), key in zip(parts, keys, strict=True)],
            _SINGLE_DRAWS,
        )
        draws = torch.cat([own[:, :_OBJECT_DRAWS], other[:, _OBJECT_DRAWS:]], 1)
        chunks = [
            render_single(global_ids[i : i + _CHUNK], draws[i : i + _CHUNK], self.image_size)
            for i in range(0, len(parts), _CHUNK)
        ]
        images, masks = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return self._finish(_to_uint8(self._declutter(images, masks)).float() / 255)

    def _item(self, index: int) -> tuple[Tensor, Tensor]:
        """``(uint8 image (3, S, S), mask (S, S))`` of item ``index``, cached (LRU)."""
        return self._items([index])[0]

    def _items(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """Items ``indices`` as ``(uint8 image, mask)`` pairs, through the LRU cache.

        The ones not cached are rendered together, in chunks (about 9x faster an image
        than one at a time on CPU), with the same pixels as alone.
        """
        found: dict[int, tuple[Tensor, Tensor]] = {}
        missing = []
        for index in dict.fromkeys(int(i) for i in indices):
            cached = self._cache.get(index)
            if cached is None:
                missing.append(index)
            else:
                self._cache.move_to_end(index)
                found[index] = cached
        if missing:
            labels, ks = zip(*(divmod(i, self.images_per_class) for i in missing), strict=True)
            images, masks = self.render(torch.tensor(labels), torch.tensor(ks))
            images = _to_uint8(images)
            self.rendered += len(missing)
            for row, index in enumerate(missing):
                found[index] = self._cache[index] = (images[row], masks[row])
            item_bytes = 4 * self.image_size**2
            while len(self._cache) * item_bytes > self.cache_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return [found[int(i)] for i in indices]

    def _finish(self, image: Tensor) -> Tensor:
        return normalise_image(image, self.mean, self.std) if self.normalise else image

    def _check_index(self, index: int) -> int:
        if not 0 <= int(index) < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return int(index)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Items ``indices`` (the DataLoader's batched fetch): rendered together."""
        indices = [self._check_index(i) for i in indices]
        return [
            {
                "image": self._finish(image.float() / 255),
                "label": index // self.images_per_class,
                "index": index,
                "mask": mask,
            }
            for index, (image, mask) in zip(indices, self._items(indices), strict=True)
        ]

    def images_at(self, indices: Tensor) -> Tensor:
        """Images at ``indices``: ``(B,) -> (B, 3, S, S)`` as items return them (one
        render of the uncached ones; :func:`experiments.training.batches.gather`)."""
        indices = [self._check_index(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if not indices:
            return torch.empty(0, 3, self.image_size, self.image_size)
        images = torch.stack([image for image, _ in self._items(indices)])
        return self._finish(images.float() / 255)

    def pairs(self, class_a: Tensor, class_b: Tensor, keys: Tensor) -> dict:
        """Batch of pair images (see :meth:`pair`); arguments are ``(N,)`` int tensors.

        Returns ``image (N, 3, S, S)``, ``label``/``other_label`` ``(N,)``, ``mask`` /
        ``other_mask`` ``(N, S, S)`` bool.
        """
        if self.mode != "pairs":
            raise FamBenchError(
                "SyntheticShapes.pair needs mode='pairs' (set data.mode=pairs); this dataset "
                "was built with mode='single'."
            )
        class_a, class_b = torch.as_tensor(class_a).long(), torch.as_tensor(class_b).long()
        if bool((class_a == class_b).any()):
            raise FamBenchError("SyntheticShapes.pair needs two different classes per image.")
        ids = torch.tensor(self.class_ids)
        ga, gb = ids[class_a], ids[class_b]
        parts = [
            (self.seed, 2, a, b, k)
            for a, b, k in zip(
                ga.tolist(), gb.tolist(), torch.as_tensor(keys).tolist(), strict=True
            )
        ]
        draws = _draws(parts, _PAIR_DRAWS)
        chunks = [
            render_pairs(
                ga[i : i + _CHUNK], gb[i : i + _CHUNK], draws[i : i + _CHUNK], self.image_size
            )
            for i in range(0, len(parts), _CHUNK)
        ]
        images, mask_a, mask_b = (torch.cat([c[j] for c in chunks]) for j in range(3))
        images = self._declutter(images, mask_a | mask_b)
        images = _to_uint8(images).float() / 255  # identical pixels to cached singles
        return {
            "image": self._finish(images),
            "label": class_a,
            "mask": mask_a,
            "other_label": class_b,
            "other_mask": mask_b,
        }

    def pair(self, class_a: int, class_b: int, key: int) -> dict:
        """One image with an object of split class ``class_a`` and one of ``class_b``.

        Deterministic in ``(seed, class_a, class_b, key)``. The objects never overlap, so
        ``mask`` (of class_a) and ``other_mask`` are exact and disjoint.

        Returns ``dict(image=(3, S, S), label=class_a, mask=(S, S), other_label=class_b,
        other_mask=(S, S))``.
        """
        out = self.pairs(torch.tensor([class_a]), torch.tensor([class_b]), torch.tensor([key]))
        return {
            "image": out["image"][0],
            "label": int(class_a),
            "mask": out["mask"][0],
            "other_label": int(class_b),
            "other_mask": out["other_mask"][0],
        }
