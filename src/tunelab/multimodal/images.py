"""The built-in image–caption world: shapes × colours × sizes × positions, rendered with numpy.

Why: multimodal prompt tuning (CoOp, VPT, MaPLe) needs a CLIP model and an image classification
benchmark with *base* and *novel* classes, and this machine can download neither. So the world is
generated: every image shows one shape of one colour, at one of two sizes and five positions, on a
background that may carry noise and clutter. Captions come from templates ("a small red circle on the
left"). Because the world is known, every label is exact.

Classes are attribute combinations ``(colour, shape)`` — 6 colours × 4 shapes = 24 classes, named
"red circle", "blue triangle", ... They are split in half into **base** and **novel** classes by a
checkerboard over (colour index + shape index), so every colour and every shape occurs among both:
recognising a novel class means composing attribute values seen in other combinations, which is what
the base-to-novel protocol of CoCoOp / MaPLe measures.

Two rendering styles (:class:`Style`):

- ``PRETRAIN_STYLE``: clean images (flat grey background, faint noise) — the "web" data that
  tiny-clip is pretrained on contrastively;
- ``TASK_STYLE``: the downstream task's images — stronger pixel noise and a cluttered background of
  coloured stripes and blobs, a distribution shift that prompts (especially vision prompts) can adapt to.

Everything is deterministic for a seed (``numpy.random.default_rng``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

RGB = {  # mid-saturation values: distinct from each other and from the grey background
    "red": (0.9, 0.12, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.88, 0.1), "purple": (0.6, 0.15, 0.8), "cyan": (0.1, 0.85, 0.9),
}
RADIUS = {"small": 4.5, "large": 7.5}  # pixels, on a 32 x 32 canvas
OFFSET = {"left": (0, -8), "right": (0, 8), "top": (-8, 0), "bottom": (8, 0), "center": (0, 0)}  # (dy, dx)
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}

CLASS_TEMPLATE = "a photo of a {}"  # the hand-written zero-shot prompt; CoOp learns to replace "a photo of a"
CAPTION_TEMPLATES = (  # pretraining captions; the class template is one of them, as "a photo of" is on the web
    "a photo of a {colour} {shape}",
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a photo of a {size} {colour} {shape} {where}",
    "a {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "a picture of a {colour} {shape}",
    "a {size} {shape} that is {colour}",
)


@dataclass(frozen=True)
class Style:
    """How images are rendered: pixel noise (std, in [0, 1] units) and a cluttered background."""

    noise: float = 0.03
    clutter: bool = False


PRETRAIN_STYLE = Style(noise=0.03, clutter=False)
TASK_STYLE = Style(noise=0.12, clutter=True)


@dataclass(frozen=True)
class ImageSpec:
    """What one image shows."""

    colour: str
    shape: str
    size: str
    position: str

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"


def class_names() -> list[str]:
    """All 24 class names, colour-major: "red circle", "red square", ..."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def split_classes() -> dict[str, list[str]]:
    """``{"base": [...], "novel": [...]}``: a checkerboard over (colour, shape), 12 classes each."""
    split: dict[str, list[str]] = {"base": [], "novel": []}
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            split["base" if (ci + si) % 2 == 0 else "novel"].append(f"{colour} {shape}")
    return split


def vocabulary() -> list[str]:
    """Every word a caption or class prompt can contain (sorted; the tokenizer's word list)."""
    words = set(CLASS_TEMPLATE.replace("{}", "").split())
    for template in CAPTION_TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    for phrase in WHERE.values():
        words.update(phrase.split())
    words.update(COLOURS + SHAPES + SIZES)
    return sorted(words)


def caption(spec: ImageSpec, rng: np.random.Generator) -> str:
    """A caption of ``spec`` from a random template."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(colour=spec.colour, shape=spec.shape, size=spec.size, where=WHERE[spec.position])


def random_spec(rng: np.random.Generator, class_name: str | None = None) -> ImageSpec:
    """A random image of ``class_name`` (any class when None) with random size and position."""
    if class_name is None:
        colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    else:
        colour, shape = class_name.split(" ")
    return ImageSpec(colour, shape, SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))])


def shape_mask(shape: str, cy: float, cx: float, radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` centred at (cy, cx)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * radius
    if shape == "triangle":  # apex up; the half-width grows linearly from the apex to the base
        top, bottom = -radius, 0.8 * radius
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) / (bottom - top) * radius)
    if shape == "cross":
        arm = radius / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, style: Style, size: int) -> np.ndarray:
    grey = rng.uniform(0.25, 0.45)
    image = np.full((3, size, size), grey, dtype=np.float32)  # (3, H, W)
    if not style.clutter:
        return image
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(2):  # faint coloured stripes at a random angle and frequency
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.7)
        wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
        image += 0.08 * wave[None] * rng.uniform(-1, 1, size=(3, 1, 1)).astype(np.float32)
    for _ in range(3):  # small blobs of random colour: distractors that are not one of the shapes
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.0, 2.5)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        image[:, blob] = rng.uniform(0, 1, size=(3, 1)).astype(np.float32)
    return image


def render(spec: ImageSpec, rng: np.random.Generator, style: Style = PRETRAIN_STYLE,
           size: int = IMAGE_SIZE) -> np.ndarray:
    """Render ``spec`` as a float32 (3, size, size) image with values in [0, 1]."""
    image = _background(rng, style, size)
    dy, dx = OFFSET[spec.position]
    scale = size / IMAGE_SIZE
    cy = (size - 1) / 2 + (dy + rng.uniform(-1.5, 1.5)) * scale  # position jitter of a pixel or two
    cx = (size - 1) / 2 + (dx + rng.uniform(-1.5, 1.5)) * scale
    radius = RADIUS[spec.size] * scale * rng.uniform(0.9, 1.1)
    mask = shape_mask(spec.shape, cy, cx, radius, size)
    colour = np.clip(np.array(RGB[spec.colour], dtype=np.float32) + rng.uniform(-0.06, 0.06, 3), 0, 1)
    image[:, mask] = colour[:, None]
    if style.noise > 0:
        image += rng.normal(0, style.noise, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


def to_pixel_values(images: np.ndarray) -> np.ndarray:
    """Map [0, 1] images to the model's input range [-1, 1] (CLIP-style normalisation)."""
    return (images - 0.5) / 0.5


@dataclass
class ImageSet:
    """Rendered images with integer labels into ``class_names``."""

    pixel_values: np.ndarray  # (N, 3, H, W) float32 in [-1, 1]
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    specs: list[ImageSpec]

    def __len__(self) -> int:
        return len(self.labels)


def sample_images(classes: list[str], per_class: int, seed: int, style: Style = TASK_STYLE,
                  size: int = IMAGE_SIZE) -> ImageSet:
    """``per_class`` random images of each class in ``classes`` (class-major order), deterministic."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, name) for name in classes for _ in range(per_class)]
    pixels = np.stack([render(spec, rng, style, size) for spec in specs])  # (N, 3, H, W)
    labels = np.repeat(np.arange(len(classes)), per_class)
    return ImageSet(to_pixel_values(pixels).astype(np.float32), labels.astype(np.int64), list(classes), specs)


def sample_captioned(seed: int, style: Style = PRETRAIN_STYLE, size: int = IMAGE_SIZE,
                     classes: list[str] | None = None) -> tuple[np.ndarray, str, ImageSpec]:
    """One pretraining pair from its own seed: ``(pixel_values (3, H, W), caption, spec)``."""
    rng = np.random.default_rng(seed)
    name = None if classes is None else classes[rng.integers(len(classes))]
    spec = random_spec(rng, name)
    pixels = to_pixel_values(render(spec, rng, style, size)).astype(np.float32)
    return pixels, caption(spec, rng), spec
