"""Procedural thorax/abdomen phantom in HU, defined analytically in continuous millimetres.

Coordinates follow DICOM LPS: ``x`` to the patient's left (image columns), ``y`` posterior (image rows),
``z`` superior; ``z = 0`` is about the top of the diaphragm. The anatomy is a function of (x, y, z), so any
pose or deformation renders by evaluating it on warped coordinates. Slices are rendered with 2x2
supersampling (anti-aliasing, partial volume); labels are the most frequent sub-sample label.

Shapes and sizes are drawn per patient from a seeded ``numpy.random.Generator``; the diaphragm domes, the
heart, the organs' cross-sections and the ribs change with z. The patient table lives in scanner
coordinates and does not move with the patient.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

# Label ids of the ROI masks (the same numbers as ``synthetic.LABELS``).
AIR, HEART, LIVER, SPLEEN, MUSCLE, FAT, LUNG, BONE, VESSEL, LESION, TABLE = range(11)
LABEL_NAMES: dict[int, str] = {
    HEART: "heart",
    LIVER: "liver",
    SPLEEN: "spleen",
    MUSCLE: "muscle",
    FAT: "fat",
    LUNG: "lung",
    BONE: "bone",
    VESSEL: "vessel",
    LESION: "lesion",
    TABLE: "table",
}
OTHER = AIR  # skin, bowel, stomach, kidneys, spinal canal: label 0 ("air/other")


@dataclass
class Anatomy:
    """Per-patient random shape parameters (mm, HU); see :func:`random_anatomy`."""

    body_a: float  # lateral semi-axis of the body
    body_b: float  # antero-posterior semi-axis
    body_power: float  # superellipse exponent (2 = ellipse, larger = boxier)
    fat_front: float  # subcutaneous fat thickness, anterior
    fat_side: float
    fat_back: float
    muscle: float  # thickness of the muscle wall
    dome_right: float  # z of the diaphragm domes' periphery; lungs lie above, liver below
    dome_left: float
    dome_height: float  # how far the dome centres rise above their periphery
    vertebra_r: float
    vertebra_y: float  # y of the vertebral body centre
    disc_phase: float
    bone_hu: float  # cortical bone
    marrow_hu: float
    liver_hu: float
    spleen_hu: float
    heart_xy: tuple[float, float]
    heart_axes: tuple[float, float, float]
    heart_angle: float
    aorta_xy: tuple[float, float]
    aorta_r: float
    ivc_xy: tuple[float, float]
    liver_center: tuple[float, float]
    liver_axes: tuple[float, float]
    liver_angle: float
    spleen_center: tuple[float, float, float]
    spleen_axes: tuple[float, float, float]
    stomach_center: tuple[float, float, float]
    rib_phase: float
    lesions: list[tuple[float, float, float, float, float]] = field(default_factory=list)  # x, y, z, r, dHU
    lung_vessels: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # x, y, vx, vy, r
    liver_vessels: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    bowel: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # x, y, z, r, gas(0/1)
    texture_k: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # wave vectors, rad/mm
    texture_phase: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # trabecular network of the marrow (empty: the smooth texture, as before); see random_trabecular
    trabecular_k: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    trabecular_phase: np.ndarray = field(default_factory=lambda: np.zeros(0))
    table_y: float = 0.0  # y of the table top in the scanner frame (patient centred in the bore)


@dataclass
class Pose:
    """Where the patient lies relative to the scanner: rigid in-plane motion plus breathing.

    A scanner point (X, Y, Z) shows the anatomy at the patient point obtained by undoing the rigid
    motion (shift, then rotation about the body centre) and the smooth deformation.
    """

    shift_mm: tuple[float, float] = (0.0, 0.0)
    rotation_deg: float = 0.0
    breathing_mm: float = 0.0  # cranio-caudal organ shift (inspiration: organs move down)
    warp_mm: float = 0.0  # amplitude of a smooth random in-plane deformation
    warp_k: tuple[tuple[float, float, float, float], ...] = ()  # (kx, ky, phase, direction angle)


def random_anatomy(rng: np.random.Generator, lesion_z: list[float] | None = None) -> Anatomy:
    """Draw a patient.

    Args:
        rng: random generator (seeded by the caller).
        lesion_z: z positions (mm) to centre liver lesions on, so that they appear in the slices.

    Returns:
        The patient's shape parameters.
    """
    u = rng.uniform
    a = u(135.0, 160.0)
    b = u(95.0, 120.0)
    dome_right = u(-8.0, 8.0)
    vertebra_r = u(15.0, 19.0)
    vertebra_y = b - u(76.0, 90.0)
    anatomy = Anatomy(
        body_a=a,
        body_b=b,
        body_power=u(2.2, 2.7),
        fat_front=u(10.0, 32.0),
        fat_side=u(8.0, 28.0),
        fat_back=u(8.0, 20.0),
        muscle=u(6.0, 11.0),
        dome_right=dome_right,
        dome_left=dome_right - u(8.0, 18.0),
        dome_height=u(35.0, 55.0),
        vertebra_r=vertebra_r,
        vertebra_y=vertebra_y,
        disc_phase=u(0.0, 32.0),
        bone_hu=u(900.0, 1200.0),
        marrow_hu=u(180.0, 300.0),
        liver_hu=u(52.0, 66.0),
        spleen_hu=u(42.0, 52.0),
        heart_xy=(u(15.0, 35.0), -u(0.35, 0.45) * b),
        heart_axes=(u(52.0, 64.0), u(38.0, 46.0), u(55.0, 70.0)),
        heart_angle=u(-45.0, -25.0),
        aorta_xy=(u(14.0, 24.0), vertebra_y - vertebra_r - u(8.0, 14.0)),
        aorta_r=u(10.0, 13.5),
        ivc_xy=(-u(18.0, 28.0), vertebra_y - vertebra_r - u(14.0, 22.0)),
        liver_center=(-u(0.30, 0.40) * a, -u(0.0, 0.10) * b),
        liver_axes=(u(0.52, 0.62) * a, u(0.70, 0.80) * b),
        liver_angle=u(0.0, 20.0),
        spleen_center=(u(0.50, 0.60) * a, u(0.25, 0.40) * b, dome_right - u(35.0, 50.0)),
        spleen_axes=(u(40.0, 52.0), u(22.0, 30.0), u(45.0, 60.0)),
        stomach_center=(u(0.25, 0.35) * a, -u(0.25, 0.40) * b, dome_right - u(30.0, 45.0)),
        rib_phase=u(0.0, 1.0),
    )
    # the table top is 1 mm below the back, wherever the patient is centred
    anatomy.table_y = b + 1.0
    anatomy.lung_vessels = np.column_stack(
        [
            u(-0.8, 0.8, 70) * a,
            u(-0.6, 0.8, 70) * b,
            u(-0.3, 0.3, 70),
            u(-0.3, 0.3, 70),
            u(0.8, 3.2, 70),
        ]
    )
    lx, ly = anatomy.liver_center
    anatomy.liver_vessels = np.column_stack(
        [lx + u(-40, 40, 6), ly + u(-35, 35, 6), u(-0.4, 0.4, 6), u(-0.4, 0.4, 6), u(2.0, 4.0, 6)]
    )
    anatomy.bowel = np.column_stack(
        [
            u(-0.55, 0.6, 14) * a,
            u(-0.75, 0.15, 14) * b,
            dome_right - u(40.0, 160.0, 14),
            u(9.0, 18.0, 14),
            (rng.random(14) < 0.4).astype(float),
        ]
    )
    # band-limited texture: plane waves with wavelengths of 4-25 mm
    n_waves = 16
    direction = rng.normal(size=(n_waves, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    anatomy.texture_k = direction * (2 * math.pi / u(4.0, 25.0, n_waves))[:, None]
    anatomy.texture_phase = u(0.0, 2 * math.pi, n_waves)
    anatomy.lesions = _place_lesions(rng, anatomy, lesion_z or [])
    return anatomy


def _place_lesions(rng: np.random.Generator, anatomy: Anatomy, lesion_z: list[float]) -> list:
    """2-4 small (3-8 mm) low-contrast (10-20 HU) liver lesions, centred inside the liver."""
    lesions: list[tuple[float, float, float, float, float]] = []
    candidates = [z for z in lesion_z if z < anatomy.dome_right - 5.0]
    if not candidates:
        return lesions
    for _ in range(int(rng.integers(2, 5))):
        radius = rng.uniform(1.5, 4.0)
        contrast = rng.choice([-1.0, -1.0, 1.0]) * rng.uniform(10.0, 20.0)
        for _ in range(50):  # rejection sampling: centre well inside the liver
            z = float(rng.choice(candidates))
            x = anatomy.liver_center[0] + rng.uniform(-0.7, 0.7) * anatomy.liver_axes[0]
            y = anatomy.liver_center[1] + rng.uniform(-0.7, 0.7) * anatomy.liver_axes[1]
            pts = torch.tensor([[x + dx, y + dy] for dx in (-8, 0, 8) for dy in (-8, 0, 8)])
            _, labels = evaluate(anatomy, pts[:, 0], pts[:, 1], torch.full((9,), z))
            if bool((labels == LIVER).all()):
                lesions.append((x, y, z, radius, contrast))
                break
    return lesions


def with_habitus(anatomy: Anatomy, factor: float) -> Anatomy:
    """The same patient, slimmer (``factor < 1``) or larger (``> 1``): the subcutaneous fat changes.

    The body's semi-axes change by ``(factor - 1)`` times themselves and the fat layers by the same
    millimetres, so the muscle wall, the organs and the spine stay where they are; every fat layer keeps
    at least 3 mm.

    Args:
        anatomy: the patient.
        factor: body-size factor (1 returns an equal copy).

    Returns:
        A new :class:`Anatomy`.
    """
    da = max((factor - 1.0) * anatomy.body_a, 3.0 - anatomy.fat_side)
    # front and back grow by the same amount, so the cavity (its centre and AP semi-axis) stays put
    db = max((factor - 1.0) * anatomy.body_b, 3.0 - min(anatomy.fat_front, anatomy.fat_back))
    return dataclasses.replace(
        anatomy,
        body_a=anatomy.body_a + da,
        fat_side=anatomy.fat_side + da,
        body_b=anatomy.body_b + db,
        fat_front=anatomy.fat_front + db,
        fat_back=anatomy.fat_back + db,
        table_y=anatomy.table_y + db,
    )


def random_trabecular(rng: np.random.Generator, n_waves: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Wave vectors and phases of a band-pass random field for trabecular bone (wavelengths 3-6 mm).

    Args:
        rng: random generator.
        n_waves: number of plane waves (more: a less regular network).

    Returns:
        ``(k, phase)``: (n_waves, 3) wave vectors in rad/mm and (n_waves,) phases.
    """
    direction = rng.normal(size=(n_waves, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = direction * (2 * math.pi / rng.uniform(3.0, 6.0, n_waves))[:, None]
    return k, rng.uniform(0.0, 2 * math.pi, n_waves)


# share of the marrow that the trabecular sheets fill (|field| < TRABECULAR_HALF_WIDTH, field ~ N(0, 1))
TRABECULAR_HALF_WIDTH = 0.5
TRABECULAR_FILL = math.erf(TRABECULAR_HALF_WIDTH / math.sqrt(2.0))
MARROW_SPACE_HU = 30.0  # red/yellow marrow between the trabeculae


def trabecular_bone(
    anatomy: Anatomy, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, mean_hu: float
) -> torch.Tensor:
    """HU of cancellous bone: thin sheets (the zero-level set of a band-pass random field) in marrow.

    A sum of random plane waves is approximately a Gaussian field; the points where it is near zero form a
    connected, foam-like network of sheets and rods, the look of trabecular bone at CT resolution. The
    sheets' HU is chosen so that the bone's mean is ``mean_hu`` (its bone mineral density), with
    :data:`MARROW_SPACE_HU` in between; the edges are soft over ~0.1 of the field's SD (partial volume).

    Args:
        anatomy: the patient (its ``trabecular_k`` and ``trabecular_phase``).
        x, y, z: points in mm (any one shape).
        mean_hu: mean HU of the cancellous bone.

    Returns:
        float32 HU at the points.
    """
    field_ = plane_wave_field(anatomy.trabecular_k, anatomy.trabecular_phase, x, y, z)
    sheet = torch.sigmoid((TRABECULAR_HALF_WIDTH - field_.abs()) / 0.1)
    sheet_hu = MARROW_SPACE_HU + (mean_hu - MARROW_SPACE_HU) / TRABECULAR_FILL
    return MARROW_SPACE_HU + (sheet_hu - MARROW_SPACE_HU) * sheet


def random_pose(rng: np.random.Generator, strength: float = 1.0) -> Pose:
    """A different day's pose: a few mm and degrees of rigid motion, breathing and a smooth warp.

    Args:
        rng: random generator.
        strength: scales every component (0 gives the identity pose).

    Returns:
        The pose.
    """
    if strength == 0:
        return Pose()
    sign = rng.choice([-1.0, 1.0], size=3)
    waves = tuple(
        (float(k[0]), float(k[1]), float(p), float(d))
        for k, p, d in zip(
            rng.normal(size=(3, 2)) * (2 * math.pi / 160.0),
            rng.uniform(0, 2 * math.pi, 3),
            rng.uniform(0, 2 * math.pi, 3),
            strict=True,
        )
    )
    return Pose(
        shift_mm=(sign[0] * rng.uniform(1.0, 3.0) * strength, sign[1] * rng.uniform(0.0, 1.5) * strength),
        rotation_deg=sign[2] * rng.uniform(1.0, 3.0) * strength,
        breathing_mm=rng.uniform(2.0, 5.0) * strength,
        warp_mm=1.5 * strength,
        warp_k=waves,
    )


def _rotate(x: torch.Tensor, y: torch.Tensor, cx: float, cy: float, angle_deg: float):
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def _ellipse(x, y, cx, cy, a, b, angle_deg=0.0, power=2.0) -> torch.Tensor:
    """Normalised superellipse radius: < 1 inside."""
    u, v = _rotate(x, y, cx, cy, angle_deg) if angle_deg else (x - cx, y - cy)
    return ((u / a).abs() ** power + (v / b).abs() ** power) ** (1.0 / power)


def _ellipsoid_scale(z: torch.Tensor, cz: float, hz: float) -> torch.Tensor:
    """Cross-section scale of an ellipsoid at height z (0 outside it)."""
    return (1.0 - ((z - cz) / hz) ** 2).clamp_min(0.0).sqrt()


def plane_wave_field(
    k: np.ndarray, phase: np.ndarray, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """A zero-mean, unit-variance random field: the normalised sum of plane waves ``cos(k . p + phase)``.

    Args:
        k: (K, 3) wave vectors in rad/mm.
        phase: (K,) phases.
        x, y, z: points in mm (any one shape).

    Returns:
        The field at the points, the dtype of ``x``.
    """
    k_t = torch.as_tensor(k, dtype=x.dtype)
    phase_t = torch.as_tensor(phase, dtype=x.dtype)
    out = torch.zeros_like(x)
    for i in range(k_t.shape[0]):
        out += torch.cos(k_t[i, 0] * x + k_t[i, 1] * y + k_t[i, 2] * z + phase_t[i])
    return out * math.sqrt(2.0 / k_t.shape[0])


def texture(anatomy: Anatomy, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Smooth zero-mean, unit-variance tissue texture (a sum of random plane waves)."""
    return plane_wave_field(anatomy.texture_k, anatomy.texture_phase, x, y, z)


class _Canvas:
    """HU and labels being painted at a set of points; later paint covers earlier paint."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, tex: torch.Tensor) -> None:
        self.x, self.y, self.z, self.tex = x, y, z, tex
        self.hu = torch.full_like(x, -1000.0)
        self.lab = torch.zeros(x.shape, dtype=torch.int64)
        self.z_min, self.z_max = float(z.min()), float(z.max())

    def spans(self, z0: float, z1: float) -> bool:
        """Whether any point lies between z0 and z1 (to skip organs absent from this slab)."""
        return self.z_max >= z0 and self.z_min <= z1

    def paint(self, mask: torch.Tensor, value: float, label: int, tex_amp: float = 0.0) -> None:
        val = value + tex_amp * self.tex if tex_amp else torch.tensor(value)
        self.hu = torch.where(mask, val, self.hu)
        self.lab.masked_fill_(mask, label)

    def paint_marrow(self, mask: torch.Tensor, an: Anatomy, mean_hu: float, tex_amp: float) -> None:
        """Cancellous bone: :func:`trabecular_bone` where the patient has a network, else smooth texture."""
        if an.trabecular_k.size == 0:
            self.paint(mask, mean_hu, BONE, tex_amp)
            return
        idx = mask.nonzero(as_tuple=True)
        if idx[0].numel():
            self.hu[idx] = trabecular_bone(an, self.x[idx], self.y[idx], self.z[idx], mean_hu)
            self.lab[idx] = BONE

    def paint_dots(
        self,
        region: torch.Tensor,
        dots: np.ndarray,
        value: np.ndarray | float,
        label: int,
        tex_amp: float = 0.0,
    ) -> None:
        """Paint many small ellipsoids/cylinders, evaluated only at the points of ``region``.

        Args:
            region: where the dots may appear (e.g. the lungs).
            dots: (K, 7) rows ``x0, y0, vx, vy, z0, half_z, r``: centre ``(x0 + vx z, y0 + vy z)`` at height
                z, radius ``r``, semi-axis ``half_z`` along z (``inf`` for a cylinder).
            value: HU, one per dot or one for all.
            label: label id.
            tex_amp: texture amplitude in HU.
        """
        dots = np.asarray(dots, dtype=np.float64).reshape(-1, 7)
        value = np.broadcast_to(np.asarray(value, dtype=np.float64), (len(dots),))
        keep = (dots[:, 4] - dots[:, 5] <= self.z_max) & (dots[:, 4] + dots[:, 5] >= self.z_min)
        dots, value = dots[keep], value[keep]
        if len(dots) == 0 or not bool(region.any()):
            return
        idx = region.nonzero(as_tuple=True)
        x, y, z = self.x[idx][:, None], self.y[idx][:, None], self.z[idx][:, None]
        d = torch.as_tensor(np.asarray(dots, dtype=np.float32))
        d2 = ((x - d[:, 0] - d[:, 2] * z) ** 2 + (y - d[:, 1] - d[:, 3] * z) ** 2) / d[:, 6] ** 2
        d2 = d2 + ((z - d[:, 4]) / d[:, 5]) ** 2
        d2_min, nearest = d2.min(dim=1)
        inside = d2_min < 1.0
        val = torch.as_tensor(np.broadcast_to(np.asarray(value, dtype=np.float32), (len(dots),)).copy())[
            nearest
        ]
        if tex_amp:
            val = val + tex_amp * self.tex[idx]
        hu = self.hu[idx]
        self.hu[idx] = torch.where(inside, val, hu)
        lab = self.lab[idx]
        self.lab[idx] = torch.where(inside, torch.tensor(label), lab)


def evaluate(
    anatomy: Anatomy, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, tex: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HU and label of the patient at patient-frame points (any broadcastable shape, mm).

    Args:
        anatomy: the patient.
        x: lateral coordinate (to the patient's left).
        y: antero-posterior coordinate (posterior positive).
        z: cranio-caudal coordinate (superior positive).
        tex: the texture at these points, when already computed (see :func:`texture`).

    Returns:
        ``(hu, labels)``: float32 HU and int64 labels, the broadcast shape of the inputs.
    """
    x, y, z = (t.contiguous() for t in torch.broadcast_tensors(x.float(), y.float(), z.float()))
    cv = _Canvas(x, y, z, texture(anatomy, x, y, z) if tex is None else tex)
    an = anatomy
    thorax = torch.sigmoid((z - an.dome_right) / 25.0)  # 0 in the abdomen, 1 in the chest
    a = an.body_a * (1.0 + 0.03 * thorax)
    b = an.body_b * (1.0 + 0.06 * thorax)
    cy = an.body_b - b  # the back stays on the table
    p = an.body_power

    body = _ellipse(x, y, 0.0, cy, a, b, power=p)
    inside_body = body < 1.0
    cv.paint(inside_body, 30.0, OTHER)  # skin
    fat_top = cy + (an.fat_front - an.fat_back) / 2
    fat_a, fat_b = a - an.fat_side, b - (an.fat_front + an.fat_back) / 2
    cv.paint(body < 1.0 - 2.0 / an.body_a, -105.0, FAT, 10.0)
    cv.paint(_ellipse(x, y, 0.0, fat_top, fat_a, fat_b, power=p) < 1.0, 52.0, MUSCLE, 6.0)
    cav_a, cav_b = fat_a - an.muscle, fat_b - an.muscle
    cavity = _ellipse(x, y, 0.0, fat_top, cav_a, cav_b, power=p) < 1.0
    cv.paint(cavity, -95.0, FAT, 10.0)  # visceral / mediastinal fat

    _paint_abdomen(an, cv, cavity)
    _paint_chest(an, cv, cavity, (cav_a, cav_b, fat_top))
    _paint_spine_and_ribs(an, cv, inside_body, (fat_a, fat_b, fat_top))
    return cv.hu, cv.lab


def _dome(an: Anatomy, x: torch.Tensor, y: torch.Tensor, side: float) -> torch.Tensor:
    """z of the diaphragm at (x, y) on one side (+1 left, -1 right): highest at the centre."""
    base = an.dome_left if side > 0 else an.dome_right
    rho2 = ((x - side * 0.45 * an.body_a) / (0.55 * an.body_a)) ** 2 + (
        (y + 0.1 * an.body_b) / an.body_b
    ) ** 2
    return base + an.dome_height * (1.0 - rho2).clamp_min(0.0)


def _paint_abdomen(an: Anatomy, cv: _Canvas, cavity: torch.Tensor) -> None:
    x, y, z = cv.x, cv.y, cv.z
    # bowel loops (lower slices), kidneys, stomach, spleen, liver: later ones cover earlier ones
    bx, by, bz, br, gas = an.bowel.T
    zeros = np.zeros_like(bx)
    loops = np.column_stack([bx, by, zeros, zeros, bz, 3.0 * br, br])
    cv.paint_dots(cavity, loops, 35.0, OTHER, 4.0)
    lumen = np.column_stack([bx, by, zeros, zeros, bz, 3.0 * br - 3.0, br - 3.0])
    cv.paint_dots(cavity, lumen, np.where(gas > 0, -900.0, 15.0), OTHER)
    for side, dz in ((1.0, 0.0), (-1.0, -15.0)):
        kz = an.dome_right - 115.0 + dz
        if cv.spans(kz - 55.0, kz + 55.0):
            scale = _ellipsoid_scale(z, kz, 55.0)
            kidney = _ellipse(
                x, y, side * 62.0, an.vertebra_y, 30.0 * scale + 1e-3, 24.0 * scale + 1e-3, 25.0 * side
            )
            cv.paint(cavity & (kidney < 1.0), 32.0, OTHER, 4.0)
    sx, sy, sz = an.stomach_center
    if cv.spans(sz - 50.0, sz + 50.0):
        scale = _ellipsoid_scale(z, sz, 50.0)
        stomach = _ellipse(x, y, sx, sy, 48.0 * scale + 1e-3, 34.0 * scale + 1e-3, -20.0)
        cv.paint(cavity & (stomach < 1.0), 40.0, OTHER, 4.0)
        inner = cavity & (stomach < 1.0 - 4.0 / 34.0)
        cv.paint(inner, 12.0, OTHER, 3.0)
        cv.paint(inner & (y < sy - 10.0 * scale), -950.0, OTHER)  # air-fluid level: gas rises anteriorly
    sx, sy, sz = an.spleen_center
    ax, ay, az = an.spleen_axes
    if cv.spans(sz - az, sz + az):
        scale = _ellipsoid_scale(z, sz, az)
        spleen = _ellipse(x, y, sx, sy, ax * scale + 1e-3, ay * scale + 1e-3, -40.0)
        cv.paint(cavity & (z < _dome(an, x, y, 1.0)) & (spleen < 1.0), an.spleen_hu, SPLEEN, 4.0)

    if cv.spans(-1e9, an.dome_right + an.dome_height):
        depth = (an.dome_right + an.dome_height - z).clamp_min(0.0)  # below the dome top
        shrink = (1.0 - (depth / 200.0) ** 2).clamp_min(0.05)  # the liver tapers towards its tip
        lx, ly = an.liver_center
        la, lb = an.liver_axes
        right_lobe = _ellipse(x, y, lx, ly, la * shrink, lb * shrink, an.liver_angle, power=2.3) < 1.0
        left_lobe = (_ellipse(x, y, 20.0, -0.45 * an.body_b, 65.0, 32.0, -10.0) < 1.0) & (
            z > an.dome_right - 45.0
        )
        liver = cavity & (z < _dome(an, x, y, -1.0)) & (right_lobe | left_lobe)
        cv.paint(liver, an.liver_hu, LIVER, 4.0)
        v = an.liver_vessels
        vessels = np.column_stack([v[:, :4], np.zeros(len(v)), np.full(len(v), np.inf), v[:, 4]])
        cv.paint_dots(liver, vessels, an.liver_hu - 18.0, VESSEL, 3.0)
        if an.lesions:
            les = np.asarray(an.lesions, dtype=np.float64)
            n = len(les)
            dots = np.column_stack(
                [les[:, 0], les[:, 1], np.zeros(n), np.zeros(n), les[:, 2], 1.5 * les[:, 3], les[:, 3]]
            )
            cv.paint_dots(liver, dots, an.liver_hu + les[:, 4], LESION, 2.0)
    if cv.spans(-1e9, an.dome_right + 10.0):  # inferior vena cava, in and behind the liver
        cv.paint(
            cavity & (z < an.dome_right + 10.0) & (_ellipse(x, y, *an.ivc_xy, 13.0, 10.0) < 1.0),
            38.0,
            VESSEL,
            3.0,
        )


def _paint_chest(an: Anatomy, cv: _Canvas, cavity: torch.Tensor, cav: tuple) -> None:
    x, y, z = cv.x, cv.y, cv.z
    cav_a, cav_b, cav_y = cav
    if cv.spans(min(an.dome_left, an.dome_right), 1e9):
        lung_r = (
            _ellipse(x, y, -0.47 * cav_a, cav_y + 0.05 * cav_b, 0.55 * cav_a, 0.95 * cav_b, power=2.5) < 1.0
        )
        lung_l = (
            _ellipse(x, y, 0.50 * cav_a, cav_y + 0.08 * cav_b, 0.50 * cav_a, 0.92 * cav_b, power=2.5) < 1.0
        )
        lungs = cavity & ((lung_r & (z > _dome(an, x, y, -1.0))) | (lung_l & (z > _dome(an, x, y, 1.0))))
        cv.paint(lungs, -860.0, LUNG, 25.0)
        v = an.lung_vessels
        vessels = np.column_stack([v[:, :4], np.zeros(len(v)), np.full(len(v), np.inf), v[:, 4]])
        cv.paint_dots(lungs, vessels, 30.0, VESSEL, 5.0)
    ax, ay = an.aorta_xy
    aorta_distance = torch.hypot(x - ax, y - ay)
    hx, hy = an.heart_xy
    ha, hb, hz = an.heart_axes
    hcz = an.dome_left + 0.5 * an.dome_height + 0.85 * hz  # resting on the left dome
    if cv.spans(hcz - hz, hcz + hz):
        scale = _ellipsoid_scale(z, hcz, hz)
        heart = _ellipse(x, y, hx, hy, ha * scale + 1e-3, hb * scale + 1e-3, an.heart_angle)
        room = cavity & (aorta_distance > an.aorta_r + 4.0)  # the descending aorta runs behind the heart
        cv.paint(room & (heart < 1.0 + 6.0 / ha), -80.0, FAT, 8.0)  # pericardial fat
        cv.paint(room & (heart < 1.0), 40.0, HEART, 4.0)
    cv.paint(cavity & (aorta_distance < an.aorta_r), 42.0, VESSEL, 3.0)


def _paint_spine_and_ribs(an: Anatomy, cv: _Canvas, inside_body: torch.Tensor, walls: tuple) -> None:
    x, y, z = cv.x, cv.y, cv.z
    fat_a, fat_b, wall_y = walls
    vy, vr = an.vertebra_y, an.vertebra_r
    canal_y = vy + vr + 10.0
    # paraspinal muscles, psoas, then the vertebra: body (or disc), canal, arch and spinous process
    for side in (-1.0, 1.0):
        paraspinal = _ellipse(x, y, side * 34.0, canal_y + 14.0, 28.0, 20.0, side * 15.0) < 1.0
        cv.paint(inside_body & paraspinal, 55.0, MUSCLE, 6.0)
        if cv.spans(-1e9, an.dome_right - 20.0):
            scale = ((an.dome_right - 20.0 - z) / 80.0).clamp(0.0, 1.0)  # the psoas grows caudally
            psoas = _ellipse(x, y, side * (vr + 14.0), vy - 2.0, 18.0 * scale + 1e-3, 15.0 * scale + 1e-3)
            cv.paint(psoas < 1.0, 50.0, MUSCLE, 5.0)
    r = torch.hypot(x, y - vy)
    disc = torch.remainder(z - an.disc_phase, 32.0) < 7.0
    cv.paint(r < vr, an.bone_hu, BONE)
    cv.paint_marrow((r < vr - 2.0) & ~disc, an, an.marrow_hu, 40.0)
    cv.paint((r < vr) & disc, 85.0, OTHER, 5.0)
    arch = _ellipse(x, y, 0.0, canal_y, 14.0, 12.0)
    spinous = _ellipse(x, y, 0.0, canal_y + 18.0, 5.0, 12.0)
    cv.paint(((arch < 1.0) | (spinous < 1.0)) & ~disc, an.bone_hu * 0.8, BONE, 30.0)
    cancellous = an.trabecular_k.size > 0  # the trabecular bone model: cancellous arch, thin rib cortex
    if cancellous:  # lamina and spinous process: ~1.5 mm of cortex around cancellous bone
        inner_arch = (_ellipse(x, y, 0.0, canal_y, 12.5, 10.5) < 1.0) & (
            _ellipse(x, y, 0.0, canal_y, 10.0, 9.0) >= 1.0
        )
        inner_spinous = _ellipse(x, y, 0.0, canal_y + 18.0, 3.5, 10.5) < 1.0
        cv.paint_marrow((inner_arch | inner_spinous) & ~disc, an, an.marrow_hu, 30.0)
    cv.paint(_ellipse(x, y, 0.0, canal_y, 8.5, 7.5) < 1.0, 20.0, OTHER)
    # ribs: cross-sections along the chest wall; they slope, so their angles change with z
    theta = torch.atan2(x, y - wall_y)  # 0 = posterior midline, +-pi = anterior
    spacing = 0.32  # rad between neighbouring ribs
    phase = an.rib_phase * spacing + (z - an.dome_right) * (spacing / 28.0)
    local = torch.remainder(theta.abs() - phase, spacing) - spacing / 2  # angle to the nearest rib
    anterior_limit = 1.4 + 1.2 * torch.sigmoid((z - an.dome_right + 40.0) / 20.0)  # fewer ribs lower down
    in_range = (theta.abs() > 0.35) & (theta.abs() < anterior_limit)
    # the rib ring runs in the middle of the muscle wall
    ring_a, ring_b = fat_a - an.muscle / 2, fat_b - an.muscle / 2
    radial = (_ellipse(x, y, 0.0, wall_y, ring_a, ring_b, power=an.body_power) - 1.0) * ring_a  # ~ mm
    tangential = local * torch.hypot(x, y - wall_y)  # ~ mm along the ring
    rib = in_range & (((tangential / 6.5) ** 2 + (radial / 4.5) ** 2) < 1.0)
    cv.paint(rib, an.bone_hu * 0.85, BONE)
    marrow_t, marrow_r = (5.3, 3.4) if cancellous else (4.5, 2.8)  # cortex ~1.1 mm, else ~1.8 mm
    cv.paint_marrow(
        rib & (((tangential / marrow_t) ** 2 + (radial / marrow_r) ** 2) < 1.0), an, an.marrow_hu, 30.0
    )


def _paint_table(
    x: torch.Tensor, y: torch.Tensor, table_y: float, hu: torch.Tensor, lab: torch.Tensor
) -> None:
    """Pad, carbon-fibre shell and foam core of a curved table, wherever the patient is not."""
    top = table_y + 4e-4 * x**2  # the table top curves up at the sides
    free = lab == AIR
    for y0, y1, value in ((0.0, 6.0, -600.0), (6.0, 9.0, 500.0), (9.0, 30.0, -880.0), (30.0, 33.0, 500.0)):
        part = free & (y >= top + y0) & (y < top + y1) & (x.abs() < 230.0) & (hu < -950.0)
        hu.masked_fill_(part, value)
        lab.masked_fill_(part, TABLE)


def _pose_to_patient(
    pose: Pose, an: Anatomy, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patient-frame coordinates of scanner points for a pose (inverse rigid motion, then inverse warp)."""
    if (
        pose.shift_mm == (0.0, 0.0)
        and pose.rotation_deg == 0.0
        and pose.breathing_mm == 0
        and pose.warp_mm == 0
    ):
        return x, y, z
    centre_y = 0.0
    px, py = _rotate(x - pose.shift_mm[0], y - pose.shift_mm[1], 0.0, centre_y, pose.rotation_deg)
    py = py + centre_y
    # breathing: organs inside the trunk move caudally, the anterior wall moves forward
    r2 = (px / an.body_a) ** 2 + (py / an.body_b) ** 2
    inner = torch.exp(-r2 / 0.35)
    pz = z + pose.breathing_mm * inner
    py = py + 0.4 * pose.breathing_mm * (-py / an.body_b).clamp(0.0, 1.0)
    for kx, ky, phase, direction in pose.warp_k:
        d = pose.warp_mm * torch.sin(kx * px + ky * py + phase) / math.sqrt(len(pose.warp_k))
        px = px - d * math.cos(direction)
        py = py - d * math.sin(direction)
    return px, py, pz


def render_slices(
    anatomy: Anatomy,
    z_mm: list[float] | np.ndarray,
    image_size: int,
    pixel_mm: float,
    pose: Pose | None = None,
    supersample: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render axial slices of a patient in a pose.

    Args:
        anatomy: the patient.
        z_mm: slice positions (patient frame for the reference pose).
        image_size: N of the N x N image, centred on the scanner axis.
        pixel_mm: pixel size in mm.
        pose: patient pose (default: the reference pose).
        supersample: sub-samples per pixel along each axis (averaged for HU, majority for labels).

    Returns:
        ``(hu, labels)``: float32 (S, N, N) and int64 (S, N, N).
    """
    pose = pose or Pose()
    n = image_size * supersample
    coords = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * (pixel_mm / supersample)
    z = torch.as_tensor(np.asarray(z_mm, dtype=np.float32))[:, None, None]
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    # the patient is centred in the bore: the body's AP centre sits on the scanner axis
    hus, labs = [], []
    s = supersample
    for zi in z:
        px, py, pz = _pose_to_patient(pose, anatomy, x, y, zi.expand_as(x))
        # the texture is smooth: evaluate it once per pixel and share it between the sub-samples
        centre = slice(s // 2, None, s)
        tex = texture(anatomy, px[centre, centre], py[centre, centre], pz[centre, centre])
        tex = tex.repeat_interleave(s, 0).repeat_interleave(s, 1)
        hu, lab = evaluate(anatomy, px, py, pz, tex)
        _paint_table(x, y, anatomy.table_y, hu, lab)
        hus.append(hu)
        labs.append(lab)
    hu = torch.stack(hus)
    lab = torch.stack(labs)
    hu = hu.reshape(-1, image_size, s, image_size, s).mean(dim=(2, 4))
    blocks = (
        lab.reshape(-1, image_size, s, image_size, s)
        .permute(0, 1, 3, 2, 4)
        .reshape(-1, image_size, image_size, s * s)
    )
    labels = torch.mode(blocks, dim=-1).values
    return hu, labels
