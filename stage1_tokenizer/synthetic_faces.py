"""Procedural faces: the built-in dataset of a machine that has no real face dataset.

No package registry ships CelebA, CelebA-HQ or FFHQ, so the default data of this project is drawn here:
a frontal head-and-shoulders portrait whose every parameter comes from a random generator seeded by
``(seed, index)``. The same pair gives the same picture on every machine, at every size, without storing
anything; a picture can be redrawn with some of its labelled attributes changed (``overrides``), which
lets tests check that a label really shows in the pixels.

Drawing is vectorised numpy: every part of the face is a signed distance field over the pixel grid,
turned into coverage with a one-pixel linear ramp (a box-filter approximation, which anti-aliases edges
without supersampling), and painted back to front. A directional light shades the head as an
ellipsoid, so the pictures have the smooth low-frequency gradients real photos have.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

# Bump when a change alters the pixels of any (seed, index): on-disk caches are keyed by it.
RENDERER_VERSION = 1

MIN_SIZE = 32

HAIR_COLOURS = ("black", "brown", "blond", "auburn", "grey")
HAIR_STYLES = ("short", "long", "bald", "fringe")
SKIN_TONES = ("very light", "light", "medium", "tan", "dark")
EYE_COLOURS = ("brown", "blue", "green")

# The labelled attributes, in the order of a label vector; each is a class id in [0, classes).
ATTRIBUTE_NAMES = ("smiling", "glasses", "beard", "hair_colour", "hair_style", "skin_tone", "eye_colour")
NUM_CLASSES_PER_ATTRIBUTE = {
    "smiling": 2,
    "glasses": 2,
    "beard": 2,
    "hair_colour": len(HAIR_COLOURS),
    "hair_style": len(HAIR_STYLES),
    "skin_tone": len(SKIN_TONES),
    "eye_colour": len(EYE_COLOURS),
}
_BOOLEAN_ATTRIBUTES = ("smiling", "glasses", "beard")

_HAIR_RGB = np.array(
    [[0.09, 0.07, 0.07], [0.36, 0.22, 0.12], [0.86, 0.72, 0.42], [0.62, 0.26, 0.11], [0.66, 0.66, 0.68]],
    dtype=np.float32,
)
_SKIN_RGB = np.array(
    [[0.98, 0.86, 0.77], [0.93, 0.75, 0.62], [0.80, 0.60, 0.44], [0.62, 0.43, 0.29], [0.40, 0.26, 0.17]],
    dtype=np.float32,
)
_EYE_RGB = np.array([[0.36, 0.20, 0.09], [0.25, 0.48, 0.78], [0.30, 0.56, 0.32]], dtype=np.float32)
# Mouth-corner lift of a smiling and of a neutral mouth (head-local units); the ranges do not overlap.
_SMILE_CURVE = (0.04, 0.07)
_NEUTRAL_CURVE = (-0.008, 0.01)


@dataclass(frozen=True)
class FaceParams:
    """Everything that decides one picture. Lengths are in head-local units: the image spans [-1, 1].

    The labelled attributes (``ATTRIBUTE_NAMES``) are fields too; the rest are nuisance variables.
    """

    smiling: bool
    glasses: bool
    beard: bool
    hair_colour: int
    hair_style: int
    skin_tone: int
    eye_colour: int
    # Colours, jittered around the class colour so that a class is a region, not a point.
    skin_rgb: np.ndarray
    hair_rgb: np.ndarray
    eye_rgb: np.ndarray
    lip_rgb: np.ndarray
    shirt_rgb: np.ndarray
    frame_rgb: np.ndarray
    background_rgb: np.ndarray  # [2, 3]: the two ends of the gradient
    background_direction: float  # radians
    # Pose: in-plane rotation, offset of the head centre, overall scale, and a small turn (yaw) that
    # slides the inner features sideways.
    rotation: float
    offset_x: float
    offset_y: float
    scale: float
    yaw: float
    # Geometry.
    head_half_width: float
    head_aspect: float
    eye_spacing: float
    eye_height: float
    eye_size: float
    gaze_x: float
    brow_lift: float
    brow_thickness: float
    nose_length: float
    mouth_width: float
    smile_curve: float
    mouth_open: float
    glasses_size: float
    fringe_phase: float
    light_direction: np.ndarray  # [3], unit vector, z toward the viewer
    ambient: float


def sample_face_params(seed: int, index: int) -> FaceParams:
    """Draw the parameters of face ``index`` of the dataset with generator seed ``seed``.

    Every draw happens regardless of the outcome of earlier ones (the frame colour is drawn also for a
    face without glasses), so overriding one attribute never shifts the others.

    Args:
        seed: non-negative integer, the dataset seed.
        index: non-negative integer, the face's position in the dataset.

    Returns:
        The face's :class:`FaceParams`.
    """
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))

    def jitter(rgb: np.ndarray, amount: float) -> np.ndarray:
        return np.clip(rgb + rng.uniform(-amount, amount, 3), 0.0, 1.0).astype(np.float32)

    hair_colour = int(rng.integers(len(HAIR_COLOURS)))
    hair_style = int(rng.choice(len(HAIR_STYLES), p=[0.35, 0.3, 0.1, 0.25]))
    skin_tone = int(rng.integers(len(SKIN_TONES)))
    eye_colour = int(rng.integers(len(EYE_COLOURS)))
    smiling = bool(rng.random() < 0.5)
    glasses = bool(rng.random() < 0.35)
    beard = bool(rng.random() < 0.25)

    background = rng.uniform(0.15, 0.95, (2, 3)).astype(np.float32)
    light = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.1), 1.0], dtype=np.float32)
    return FaceParams(
        smiling=smiling,
        glasses=glasses,
        beard=beard,
        hair_colour=hair_colour,
        hair_style=hair_style,
        skin_tone=skin_tone,
        eye_colour=eye_colour,
        skin_rgb=jitter(_SKIN_RGB[skin_tone], 0.04),
        hair_rgb=jitter(_HAIR_RGB[hair_colour], 0.05),
        eye_rgb=jitter(_EYE_RGB[eye_colour], 0.06),
        lip_rgb=jitter(np.array([0.72, 0.30, 0.30], dtype=np.float32), 0.08),
        shirt_rgb=rng.uniform(0.05, 0.95, 3).astype(np.float32),
        frame_rgb=(rng.uniform(0.0, 0.6, 3) * rng.choice([0.3, 1.0])).astype(np.float32),
        background_rgb=background,
        background_direction=float(rng.uniform(0, 2 * np.pi)),
        rotation=float(rng.normal(0.0, 0.07)),
        offset_x=float(rng.uniform(-0.06, 0.06)),
        offset_y=float(rng.uniform(-0.05, 0.05)),
        scale=float(rng.uniform(1.12, 1.3)),
        yaw=float(rng.uniform(-1.0, 1.0)),
        head_half_width=float(rng.uniform(0.36, 0.44)),
        head_aspect=float(rng.uniform(1.15, 1.4)),
        eye_spacing=float(rng.uniform(0.14, 0.18)),
        eye_height=float(rng.uniform(-0.06, 0.0)),
        eye_size=float(rng.uniform(0.85, 1.15)),
        gaze_x=float(rng.uniform(-0.3, 0.3)),
        brow_lift=float(rng.uniform(0.0, 0.03)),
        brow_thickness=float(rng.uniform(0.014, 0.024)),
        nose_length=float(rng.uniform(0.13, 0.19)),
        mouth_width=float(rng.uniform(0.10, 0.14)),
        smile_curve=float(rng.uniform(*(_SMILE_CURVE if smiling else _NEUTRAL_CURVE))),
        mouth_open=float(rng.uniform(0.045, 0.07)),
        glasses_size=float(rng.uniform(0.075, 0.095)),
        fringe_phase=float(rng.uniform(0, 2 * np.pi)),
        light_direction=light / np.linalg.norm(light),
        ambient=float(rng.uniform(0.45, 0.65)),
    )


def face_attributes(params: FaceParams) -> dict[str, int | bool]:
    """The labelled attributes of a face: booleans for yes/no attributes, class ids for the rest."""
    return {name: getattr(params, name) for name in ATTRIBUTE_NAMES}


def render_face(
    seed: int, index: int, size: int = 64, overrides: dict[str, int | bool] | None = None
) -> tuple[np.ndarray, dict[str, int | bool]]:
    """Render face ``index`` of the dataset with seed ``seed``.

    Args:
        seed: non-negative integer, the dataset seed.
        index: non-negative integer, the face's position in the dataset.
        size: output side in pixels, at least ``MIN_SIZE``.
        overrides: optional new values for labelled attributes (keys from ``ATTRIBUTE_NAMES``); all other
            parameters stay those of ``(seed, index)``, so the picture changes only where that attribute shows.

    Returns:
        ``(image, attributes)``: ``uint8 [size, size, 3]`` RGB, and the attributes dict of the drawn face.
    """
    params = sample_face_params(seed, index)
    if overrides:
        params = _apply_overrides(params, overrides)
    return draw_face(params, size), face_attributes(params)


def _apply_overrides(params: FaceParams, overrides: dict[str, int | bool]) -> FaceParams:
    """Replace labelled attributes, moving the colours and the smile that depend on them along."""
    unknown = sorted(set(overrides) - set(ATTRIBUTE_NAMES))
    if unknown:
        raise ValueError(f"unknown face attributes {unknown}; overridable ones are {list(ATTRIBUTE_NAMES)}")
    changes: dict[str, object] = {}
    for name, value in overrides.items():
        classes = NUM_CLASSES_PER_ATTRIBUTE[name]
        boolean = name in _BOOLEAN_ATTRIBUTES
        valid = isinstance(value, (int, np.integer)) and (boolean or not isinstance(value, bool))
        if not valid or not 0 <= value < classes:
            kind = "a bool" if boolean else f"a class id in [0, {classes})"
            raise ValueError(f"attribute {name!r} takes {kind}, got {value!r}")
        changes[name] = bool(value) if boolean else int(value)
    if changes.get("smiling", params.smiling) != params.smiling:
        # Keep the curvature's relative position inside its range, so the face keeps its character.
        old, new = (_NEUTRAL_CURVE, _SMILE_CURVE) if changes["smiling"] else (_SMILE_CURVE, _NEUTRAL_CURVE)
        position = (params.smile_curve - old[0]) / (old[1] - old[0])
        changes["smile_curve"] = new[0] + position * (new[1] - new[0])
    palettes = {"hair_colour": ("hair_rgb", _HAIR_RGB), "skin_tone": ("skin_rgb", _SKIN_RGB),
                "eye_colour": ("eye_rgb", _EYE_RGB)}
    for attribute, (colour, palette) in palettes.items():
        if attribute in changes:  # the same jitter around the new class colour
            moved = getattr(params, colour) - palette[getattr(params, attribute)] + palette[changes[attribute]]
            changes[colour] = np.clip(moved, 0.0, 1.0).astype(np.float32)
    return dataclasses.replace(params, **changes)


# -- signed distance fields (negative inside), all in head-local units --------------------------------
def _ellipse_sdf(u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float) -> np.ndarray:
    """First-order distance to an axis-aligned ellipse: ``f / |grad f|`` with ``f = r (r - 1)``."""
    pu, pv = (u - cu) / a, (v - cv) / b
    r = np.sqrt(pu * pu + pv * pv)
    grad = np.sqrt((pu / a) ** 2 + (pv / b) ** 2)
    return r * (r - 1.0) / np.maximum(grad, 1e-6)


def _box_sdf(u: np.ndarray, v: np.ndarray, cu: float, cv: float, hu: float, hv: float, radius: float) -> np.ndarray:
    """Exact distance to a rectangle of half-sides ``(hu, hv)`` with corners rounded by ``radius``."""
    qu = np.abs(u - cu) - hu + radius
    qv = np.abs(v - cv) - hv + radius
    outside = np.sqrt(np.maximum(qu, 0.0) ** 2 + np.maximum(qv, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qu, qv), 0.0) - radius


def _curve_offset(u: np.ndarray, v: np.ndarray, cu: float, cv: float, half_length: float, bend: float) -> np.ndarray:
    """Signed vertical distance (slope-corrected) to ``v = cv - bend * (1 - t^2)``, ``t = (u - cu) / half_length``.

    Positive ``bend`` raises the middle (an eyebrow arch); negative lowers it.
    """
    t = (u - cu) / half_length
    curve = cv - bend * (1.0 - t * t)
    slope = 2.0 * bend * t / half_length
    return (v - curve) / np.sqrt(1.0 + slope * slope)


def _stroke_sdf(u, v, cu, cv, half_length, bend, thickness, taper=0.5) -> np.ndarray:
    """A brush stroke along the curve of ``_curve_offset``, thinning toward its ends by ``taper``."""
    t = (u - cu) / half_length
    half_width = 0.5 * thickness * (1.0 - taper * np.minimum(t * t, 1.0))
    return np.maximum(np.abs(_curve_offset(u, v, cu, cv, half_length, bend)) - half_width, np.abs(u - cu) - half_length)


class _Canvas:
    """An RGB float image, the head-local coordinates of its pixel centres, and the face's layout.

    Attributes:
        x, y: ``[S, S]`` image coordinates of the pixel centres, in [-1, 1].
        u, v: ``[S, S]`` the same points in head-local coordinates (pose undone).
        pixel: width of one pixel in head-local units, the ramp of the coverage function.
        rgb: ``[S, S, 3]`` float32 image being painted.
        a, b: half-width and half-height of the head ellipse; ``head_v`` its centre.
        eye_v, nose_v, mouth_v: heights of the features; ``shift``: their sideways shift (yaw).
        shade: ``[S, S, 1]`` Lambertian shading of the head ellipsoid.
    """

    HEAD_V = -0.08  # the head sits above the centre so that neck and shoulders fit underneath

    def __init__(self, params: FaceParams, size: int):
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        self.x, self.y = np.meshgrid(centres, centres)
        cos, sin = math.cos(params.rotation), math.sin(params.rotation)
        self._pose = (cos, sin, params.offset_x, params.offset_y, params.scale)
        dx, dy = self.x - params.offset_x, self.y - params.offset_y
        self.u = (cos * dx + sin * dy) / params.scale
        self.v = (-sin * dx + cos * dy) / params.scale
        self.size = size
        self.pixel = 2.0 / size / params.scale
        self.rgb = np.zeros((size, size, 3), dtype=np.float32)

        self.a = params.head_half_width
        self.b = self.a * params.head_aspect
        self.head_v = self.HEAD_V
        self.eye_v = self.head_v + params.eye_height
        self.nose_v = self.eye_v + params.nose_length
        self.mouth_v = self.nose_v + 0.11
        self.shift = 0.05 * params.yaw
        # The ellipsoid is a little larger than the head so that the hair around it is lit too.
        nu = self.u / (self.a * 1.2)
        nv = (self.v - self.head_v) / (self.b * 1.15)
        nz = np.sqrt(np.clip(1.0 - nu * nu - nv * nv, 0.0, 1.0))
        lu, lv, lz = params.light_direction
        lambert = np.clip(nu * lu + nv * lv + nz * lz, 0.0, 1.0)
        self.shade = (1.1 * (params.ambient + (1.0 - params.ambient) * lambert))[..., None]

    def crop(self, u_min: float, u_max: float, v_min: float, v_max: float) -> _Canvas | None:
        """A canvas over the pixels of a head-local rectangle (plus a pixel of margin), sharing this one's memory.

        Small parts (an eye, the mouth) are drawn on a crop: evaluating their distance fields over the
        whole picture costs ~10x more than over the few pixels they can touch. None if nothing is visible.
        Crop the full canvas only: the window is computed in full-image pixels.
        """
        cos, sin, offset_x, offset_y, scale = self._pose
        corners_u = np.array([u_min, u_max, u_min, u_max])
        corners_v = np.array([v_min, v_min, v_max, v_max])
        columns = (offset_x + scale * (cos * corners_u - sin * corners_v) + 1.0) * self.size / 2.0 - 0.5
        rows = (offset_y + scale * (sin * corners_u + cos * corners_v) + 1.0) * self.size / 2.0 - 0.5
        c0, c1 = max(0, math.floor(columns.min()) - 1), min(self.size, math.ceil(columns.max()) + 2)
        r0, r1 = max(0, math.floor(rows.min()) - 1), min(self.size, math.ceil(rows.max()) + 2)
        if c0 >= c1 or r0 >= r1:
            return None
        window = (slice(r0, r1), slice(c0, c1))
        part = copy.copy(self)
        for name in ("x", "y", "u", "v", "rgb", "shade"):
            setattr(part, name, getattr(self, name)[window])
        return part

    def coverage(self, sdf: np.ndarray) -> np.ndarray:
        """Fraction of each pixel inside the shape ``sdf < 0`` (a one-pixel linear ramp across the edge)."""
        return np.clip(0.5 - sdf / self.pixel, 0.0, 1.0)

    def paint(self, alpha: np.ndarray, colour: np.ndarray) -> None:
        """Composite ``colour`` (``[3]`` or ``[S, S, 3]``) over the canvas with per-pixel ``alpha``.

        Only the bounding box of the covered pixels is touched: most parts (an iris, a nostril) cover a
        few pixels, and blending the whole image for each of them would dominate the drawing time.
        """
        covered = alpha > 0.0
        rows = np.flatnonzero(covered.any(axis=1))
        if rows.size == 0:
            return
        cols = np.flatnonzero(covered.any(axis=0))
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        a = alpha[window][..., None]
        region = self.rgb[window]
        region *= 1.0 - a
        region += a * (colour[window] if colour.ndim == 3 else colour)


_WHITE = np.array([0.96, 0.96, 0.94], dtype=np.float32)
_BLACK = np.zeros(3, dtype=np.float32)
_LASH = np.array([0.12, 0.08, 0.07], dtype=np.float32)
_MOUTH_INSIDE = np.array([0.35, 0.08, 0.10], dtype=np.float32)
_TEETH = np.array([0.97, 0.96, 0.92], dtype=np.float32)
_LENS = np.array([0.85, 0.92, 1.0], dtype=np.float32)


def _draw_background(c: _Canvas, p: FaceParams) -> None:
    along = math.cos(p.background_direction) * c.x + math.sin(p.background_direction) * c.y
    t = np.clip(0.5 + 0.5 * along, 0.0, 1.0)[..., None]
    c.rgb[:] = (1.0 - t) * p.background_rgb[0] + t * p.background_rgb[1]


def _draw_hair_behind(c: _Canvas, p: FaceParams) -> None:
    """Long hair falls behind the head to the shoulders."""
    back = np.minimum(
        _ellipse_sdf(c.u, c.v, 0.0, c.head_v - 0.02, c.a * 1.18, c.b * 1.08),
        _box_sdf(c.u, c.v, 0.0, c.head_v + c.b * 0.75, c.a * 1.22, c.b * 0.85, 0.12),
    )
    c.paint(c.coverage(back), p.hair_rgb * (0.75 * c.shade))


def _draw_body(c: _Canvas, p: FaceParams) -> None:
    shoulders_v = c.head_v + c.b + 0.52
    shoulders = _ellipse_sdf(c.u, c.v, 0.0, shoulders_v, c.a * 2.3, 0.42)
    c.paint(c.coverage(shoulders), p.shirt_rgb * (0.6 + 0.4 * c.shade))
    neck = np.minimum(
        _box_sdf(c.u, c.v, 0.0, c.head_v + c.b * 0.8, c.a * 0.42, c.b * 0.55, 0.02),
        _ellipse_sdf(c.u, c.v, 0.0, shoulders_v - 0.42, c.a * 0.42, 0.12),
    )
    c.paint(c.coverage(neck), p.skin_rgb * 0.72)  # in the shadow of the chin


def _draw_head(c: _Canvas, p: FaceParams) -> None:
    c = c.crop(-c.a - 0.1, c.a + 0.1, c.head_v - c.b, c.head_v + c.b)
    if c is None:
        return
    skin = p.skin_rgb * c.shade
    for side in (-1.0, 1.0):
        ear = _ellipse_sdf(c.u, c.v, side * c.a * 0.97, c.head_v + 0.03, 0.065, 0.11)
        c.paint(c.coverage(ear), skin * 0.92)
    c.paint(c.coverage(_ellipse_sdf(c.u, c.v, 0.0, c.head_v, c.a, c.b)), skin)


def _draw_beard(c: _Canvas, p: FaceParams) -> None:
    """Chin and jaw below a line that rises from the mouth corners to the sideburns, plus a moustache."""
    c = c.crop(-c.a * 1.05, c.a * 1.05, c.head_v + 0.1, c.head_v + c.b * 1.06 + 0.02)
    if c is None:
        return
    jaw_v = c.mouth_v - 0.02
    rise = np.clip((np.abs(c.u) - p.mouth_width) / (c.a - p.mouth_width), 0.0, 1.0) ** 1.5
    beard_line = jaw_v - (jaw_v - c.head_v - 0.14) * rise
    beard = np.maximum(_ellipse_sdf(c.u, c.v, 0.0, c.head_v + 0.02, c.a * 1.02, c.b * 1.04), beard_line - c.v)
    moustache = _stroke_sdf(c.u, c.v, c.shift, c.mouth_v - 0.045, p.mouth_width * 1.1, 0.02, 0.035, 0.6)
    c.paint(0.92 * c.coverage(np.minimum(beard, moustache)), p.hair_rgb * (0.85 * c.shade))


def _draw_hair(c: _Canvas, p: FaceParams) -> None:
    """Hair inside a cap slightly larger than the skull, above a hairline (or only at the sides, bald)."""
    c = c.crop(-c.a * 1.1, c.a * 1.1, c.head_v - c.b * 1.1 - 0.05, c.head_v + 0.2)
    if c is None:
        return
    hair = p.hair_rgb * c.shade
    cap = _ellipse_sdf(c.u, c.v, 0.0, c.head_v - 0.03, c.a * 1.08, c.b * 1.05)
    # The hairline is flat over the forehead and drops at the temples toward the ears.
    temples = np.minimum((c.u / c.a) ** 4, 1.0)
    style = HAIR_STYLES[p.hair_style]
    if style in ("short", "long"):
        hair_sdf = np.maximum(cap, c.v - (c.head_v - c.b * 0.55 + 0.32 * temples))
    elif style == "fringe":
        ragged = 0.02 * np.sin(c.u * 38.0 + p.fringe_phase)
        hair_sdf = np.maximum(cap, c.v - (c.head_v - c.b * 0.3 + ragged + 0.2 * temples))
    else:  # bald: a thin crescent of hair above each ear
        rim = np.maximum(cap, -_ellipse_sdf(c.u, c.v, 0.0, c.head_v, c.a * 0.9, c.b * 0.98))
        hair_sdf = np.maximum(rim, np.abs(c.v - c.head_v + 0.03) - 0.1)
    c.paint(c.coverage(hair_sdf), hair)


def _draw_eyes(canvas: _Canvas, p: FaceParams) -> None:
    """White almond, iris, pupil, catch-light, upper lid line, and an eyebrow above each eye."""
    ew, eh = 0.075 * p.eye_size, 0.04 * p.eye_size
    for side in (-1.0, 1.0):
        eu = side * p.eye_spacing + canvas.shift
        c = canvas.crop(eu - 0.12, eu + 0.12, canvas.eye_v - 0.19, canvas.eye_v + 0.06)
        if c is None:
            continue
        sclera = _ellipse_sdf(c.u, c.v, eu, c.eye_v, ew, eh)
        inside = c.coverage(sclera)
        c.paint(inside, _WHITE)
        iris_u = eu + p.gaze_x * ew * 0.5
        iris_distance = np.hypot(c.u - iris_u, c.v - c.eye_v)
        c.paint(inside * c.coverage(iris_distance - eh * 0.95), p.eye_rgb)
        c.paint(inside * c.coverage(iris_distance - eh * 0.45), _BLACK)
        glint = np.hypot(c.u - iris_u - eh * 0.3, c.v - c.eye_v + eh * 0.3) - eh * 0.22
        c.paint(inside * c.coverage(glint), _WHITE)
        lid = np.maximum(np.abs(sclera) - 0.01, c.v - c.eye_v + eh * 0.2)
        c.paint(c.coverage(lid), _LASH)
        brow_v = c.eye_v - eh - 0.055 - p.brow_lift
        brow = _stroke_sdf(c.u, c.v, eu + side * 0.01, brow_v, 0.085, 0.025, p.brow_thickness)
        c.paint(c.coverage(brow), p.hair_rgb * 0.6)


def _draw_nose(c: _Canvas, p: FaceParams) -> None:
    """A shadow down the side of the bridge away from the light, a soft tip shadow and two nostrils."""
    nose_u = 0.08 * p.yaw  # the nose tip sticks out most, so a turn moves it most
    c = c.crop(nose_u - 0.08, nose_u + 0.08, c.eye_v, c.nose_v + 0.04)
    if c is None:
        return
    skin = p.skin_rgb * c.shade
    shadow_u = nose_u + (-0.03 if p.light_direction[0] > 0 else 0.03)
    bridge = _box_sdf(c.u, c.v, shadow_u, c.eye_v + p.nose_length * 0.55, 0.008, p.nose_length * 0.4, 0.008)
    c.paint(0.35 * c.coverage(bridge), skin * 0.6)
    c.paint(0.35 * c.coverage(_ellipse_sdf(c.u, c.v, nose_u, c.nose_v + 0.005, 0.05, 0.022)), skin * 0.6)
    for side in (-1.0, 1.0):
        nostril = _ellipse_sdf(c.u, c.v, nose_u + side * 0.025, c.nose_v + 0.008, 0.014, 0.008)
        c.paint(0.8 * c.coverage(nostril), skin * 0.35)


def _draw_mouth(c: _Canvas, p: FaceParams) -> None:
    """A smile opens into a crescent showing the teeth; a neutral mouth is a pair of closed lips."""
    mw, curve = p.mouth_width, p.smile_curve
    c = c.crop(c.shift - mw - 0.03, c.shift + mw + 0.03, c.mouth_v - 0.1, c.mouth_v + 0.1)
    if c is None:
        return
    corners_v = c.mouth_v - curve
    if p.smiling:
        upper = _curve_offset(c.u, c.v, c.shift, corners_v, mw, -curve)
        lower = _curve_offset(c.u, c.v, c.shift, corners_v, mw, -curve - p.mouth_open)
        teeth_edge = _curve_offset(c.u, c.v, c.shift, corners_v, mw, -curve - p.mouth_open * 0.45)
        opening = np.maximum(np.maximum(-upper, lower), np.abs(c.u - c.shift) - mw)
        c.paint(c.coverage(opening - 0.008), p.lip_rgb)
        c.paint(c.coverage(opening), _MOUTH_INSIDE)
        c.paint(c.coverage(np.maximum(opening, teeth_edge)), _TEETH)
    else:
        lower_lip = _stroke_sdf(c.u, c.v, c.shift, corners_v + 0.014, mw * 0.85, -curve - 0.02, 0.03, 0.7)
        c.paint(c.coverage(lower_lip), p.lip_rgb * np.sqrt(c.shade))
        upper_lip = _stroke_sdf(c.u, c.v, c.shift, corners_v - 0.006, mw * 0.95, 0.01 - curve, 0.024, 0.6)
        c.paint(c.coverage(upper_lip), p.lip_rgb * 0.85)
        parting = _stroke_sdf(c.u, c.v, c.shift, corners_v, mw, -curve, 0.009, 0.3)
        c.paint(c.coverage(parting), p.lip_rgb * 0.45)


def _draw_glasses(c: _Canvas, p: FaceParams) -> None:
    """Rounded rectangular rims with tinted lenses, a bridge, and arms running back to the ears."""
    g, thickness = p.glasses_size, 0.016
    c = c.crop(-c.a - 0.05, c.a + 0.05, c.eye_v - 0.1, c.eye_v + 0.1)
    if c is None:
        return
    for side in (-1.0, 1.0):
        eu = side * p.eye_spacing + c.shift
        rim = _box_sdf(c.u, c.v, eu, c.eye_v, g, g * 0.72, g * 0.45)
        c.paint(0.18 * c.coverage(rim), _LENS)
        c.paint(c.coverage(np.abs(rim) - thickness / 2), p.frame_rgb)
        arm_from, arm_to = eu + side * g, side * c.a * 0.98
        along = np.maximum(side * (arm_from - c.u), side * (c.u - arm_to))
        c.paint(c.coverage(np.maximum(np.abs(c.v - c.eye_v + 0.02) - thickness / 2, along)), p.frame_rgb)
    inner = p.eye_spacing - g
    bridge = np.maximum(
        np.abs(_curve_offset(c.u, c.v, c.shift, c.eye_v - 0.02, inner, 0.015)) - thickness / 2,
        np.abs(c.u - c.shift) - inner,
    )
    c.paint(c.coverage(bridge), p.frame_rgb)


def draw_face(params: FaceParams, size: int) -> np.ndarray:
    """Draw a face from its parameters, back to front.

    Args:
        params: the face, from :func:`sample_face_params`.
        size: output side in pixels, at least ``MIN_SIZE``.

    Returns:
        ``uint8 [size, size, 3]`` RGB image.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE} (features vanish below it), got {size!r}")
    c = _Canvas(params, int(size))
    _draw_background(c, params)
    if HAIR_STYLES[params.hair_style] == "long":
        _draw_hair_behind(c, params)
    _draw_body(c, params)
    _draw_head(c, params)
    if params.beard:
        _draw_beard(c, params)
    _draw_hair(c, params)
    _draw_eyes(c, params)
    _draw_nose(c, params)
    _draw_mouth(c, params)
    if params.glasses:
        _draw_glasses(c, params)
    return np.round(np.clip(c.rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
