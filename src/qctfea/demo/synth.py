"""Synthetic longitudinal QCT cohort: real DICOM CT series of an L4-like vertebra.

The demo cohort lets a user run the whole pipeline without patient data. For
one patient x timepoint, :func:`generate_scan` writes

- ``dicom/``: one CT Image Storage series (int16, RescaleSlope 1,
  RescaleIntercept -1024, in-plane spacing 0.78 mm, 1 mm slices), with made-up
  patient identifiers that the pipeline must never copy to its outputs;
- ``labels.nii.gz``: the vertebra label map on the CT grid (target label from
  the parameters, VerSe L4 = 23 by default);
- ``landmarks.json``: pedicle screw entry and target point per side, in the
  scan's physical (DICOM patient, LPS) coordinates in mm;
- ``dxa.json``: a clinical DXA-like areal BMD (g/cm²) with the confounders
  DXA has (projected posterior elements, degenerative changes, noise);
- ``truth.json``: the ground truth (true calibration, true vBMD, pose). The
  pipeline never reads it; only tests and validation scripts do.

Anatomy is built from signed distance functions in an anatomical frame
(x left, y posterior, z superior; origin at the vertebral body centre):
an elliptic vertebral body with a cortical shell and endplates, two
pedicles, a lamina, a spinous process and two transverse processes. Bone
density is K2HPO4-equivalent (mg/cm³); trabecular bone is heterogeneous (a
smooth random field of the patient) and gains density over time like under
denosumab. The patient lies on a calibration phantom (rods of known K2HPO4
density in a polyethylene-like block) and moves slightly between scans (a
rigid change of pose); the phantom stays with the scanner.

Every scan has its own effective energy (a seeded draw in
:data:`ENERGY_RANGE_KEV`, recorded in truth.json), and its tissues are
rendered from their mass attenuation at that energy (``qctfea.imaging.calibration``:
tissue compositions, xraydb coefficients): air -1000 HU, fat (ICRP adipose
tissue), muscle (ICRU-44 skeletal muscle), the discs (skeletal muscle at
1.09 g/cm³), and bone and phantom rods as K2HPO4 in water
(``qctfea.imaging.attenuation.k2hpo4_hu_per_mg``, the model of the effective-energy
phantomless calibration): HU = k(E) x density. The true calibration is
therefore density = HU / k(E), intercept 0. The HU image is rendered on a
supersampled grid, blurred by a Gaussian point spread function, averaged down
to the scan grid and given Gaussian noise.

Everything is deterministic from ``(seed, patient id, months)``: a patient's
anatomy depends only on the seed and the patient id, so adding a patient never
changes another one.
"""

# Long on purpose (about 630 lines): one generator, rendering one anatomy (vertebra, pedicles,
# phantom, tissues, pose) into a DICOM series and its truth file; its parts are only used
# together and are tested as a whole against that truth.

from __future__ import annotations

import datetime as _dt
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_dir, atomic_path, provenance, write_json
from qctfea.config import option

WATER_HU = 0.0
#: Effective energies (keV) of the synthetic scans: each scan draws one uniformly (seeded).
ENERGY_RANGE_KEV = (60.0, 80.0)
#: Density (g/cm³) of the intervertebral discs, rendered as ICRU-44 skeletal muscle.
DISC_DENSITY_G_CM3 = 1.09


@dataclass
class SynthParams:
    """Scanner and phantom settings of the synthetic cohort (all documented defaults)."""

    spacing_xy_mm: float = option(0.78, exclusiveMinimum=0, doc="in-plane pixel spacing")
    slice_mm: float = option(1.0, exclusiveMinimum=0, doc="slice spacing and thickness")
    fov_x_mm: float = option(
        150.0, exclusiveMinimum=0, doc="reconstructed field of view, left-right")
    fov_y_mm: float = option(
        160.0, exclusiveMinimum=0, doc="reconstructed field of view, anterior-posterior")
    fov_z_mm: float = option(42.0, exclusiveMinimum=0, doc="scan length")
    supersample: int = option(2, minimum=1, doc="rendering supersampling per axis before blur")
    blur_sigma_xy_mm: float = option(0.55, minimum=0, doc="Gaussian PSF sigma in-plane")
    blur_sigma_z_mm: float = option(0.7, minimum=0, doc="Gaussian PSF sigma along z")
    noise_hu: float = option(15.0, minimum=0, doc="white noise SD after blurring")
    rod_densities_mg_cm3: tuple[float, ...] = option(
        (0.0, 50.0, 100.0, 150.0, 200.0), minItems=2,
        doc="K2HPO4 densities of the phantom's rods (mg/cm³)")
    rod_diameter_mm: float = option(12.0, exclusiveMinimum=0, doc="rod diameter")
    phantom_block_hu: float = option(-100.0, doc="polyethylene-like phantom body")
    vertebra_label: int = option(23, minimum=1, doc="label of the vertebra (VerSe L4)")
    max_rotation_deg: float = option(2.0, minimum=0, doc="pose change between scans, per axis")
    max_translation_mm: float = option(
        2.0, minimum=0, doc="pose change between scans, per axis (translation)")
    gain_12m_range: tuple[float, float] = option(
        (0.03, 0.11), doc="trabecular vBMD gain at 12 months")
    gain_24m_extra_range: tuple[float, float] = option(
        (0.01, 0.08), doc="further gain by 24 months")
    trabecular_mean_range_mg_cm3: tuple[float, float] = option(
        (55.0, 110.0), doc="range of the patients' baseline trabecular vBMD (mg/cm³)")


@dataclass
class PatientAnatomy:
    """One patient's vertebra: dimensions (mm), densities (mg/cm³), treatment response."""

    body_half_width: float
    body_half_depth: float
    body_height: float
    cortex_mm: float
    pedicle_half_width: float
    pedicle_half_height: float
    pedicle_offset_x: float
    pedicle_medial_deg: float
    trabecular_mg_cm3: float
    cortical_mg_cm3: float
    posterior_factor: float
    gain_12m: float
    gain_24m: float
    dxa_offset_g_cm2: float
    field_seed: int
    pedicle_z: float = field(init=False)

    def __post_init__(self) -> None:
        self.pedicle_z = self.body_height / 2 - self.pedicle_half_height - 1.5

    def gain(self, months: float) -> float:
        """Fractional trabecular density gain after ``months`` of treatment."""
        t = np.array([0.0, 12.0, 24.0])
        g = np.array([0.0, self.gain_12m, self.gain_24m])
        if months <= 24:
            return float(np.interp(months, t, g))
        return float(self.gain_24m + (months - 24) * (self.gain_24m - self.gain_12m) / 12)

    def pedicle_axis(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(posterior end, unit direction towards the anterior body) of a pedicle."""
        s = 1.0 if side == "left" else -1.0
        th = np.deg2rad(self.pedicle_medial_deg)
        ant = np.array([s * self.pedicle_offset_x, self.body_half_depth - 5.0, self.pedicle_z])
        length = self.body_half_depth * 0.0 + 23.0
        post = ant + length * np.array([s * np.sin(th), np.cos(th), 0.0])
        d = (ant - post) / np.linalg.norm(ant - post)
        return post, d


def _rng(seed: int, *keys: object) -> np.random.Generator:
    words = [seed] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(words)


def patient_anatomy(seed: int, patient: str, params: SynthParams | None = None) -> PatientAnatomy:
    """The anatomy of ``patient``, a function of the seed and the patient id only."""
    p = params or SynthParams()
    r = _rng(seed, "anatomy", patient)
    g12 = r.uniform(*p.gain_12m_range)
    return PatientAnatomy(
        body_half_width=r.uniform(20.5, 24.0),
        body_half_depth=r.uniform(15.0, 17.5),
        body_height=r.uniform(24.5, 28.5),
        cortex_mm=r.uniform(0.8, 1.1),
        pedicle_half_width=r.uniform(4.6, 5.2),
        pedicle_half_height=r.uniform(6.5, 7.5),
        pedicle_offset_x=r.uniform(11.0, 12.5),
        pedicle_medial_deg=r.uniform(8.0, 13.0),
        trabecular_mg_cm3=r.uniform(*p.trabecular_mean_range_mg_cm3),
        cortical_mg_cm3=r.uniform(600.0, 800.0),
        posterior_factor=r.uniform(1.6, 2.0),
        gain_12m=g12,
        gain_24m=g12 + r.uniform(*p.gain_24m_extra_range),
        dxa_offset_g_cm2=r.uniform(0.0, 0.20),
        field_seed=int(r.integers(0, 2**31 - 1)),
    )


# --- signed distance functions in the anatomical frame (mm; < 0 inside) ---


def _sd_segment_capsule_2d(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    """Distance in the xy-plane from points to the segment p0-p1."""
    ax, ay = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * ax + (y - p0[1]) * ay) / (ax * ax + ay * ay), 0.0, 1.0)
    return np.hypot(x - p0[0] - t * ax, y - p0[1] - t * ay)


def _body_sdf(anat: PatientAnatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Vertebral body: elliptic cylinder (distance approximated by the scaled ellipse
    radius) intersected with the slab |z| <= h."""
    a, b, h = anat.body_half_width, anat.body_half_depth, anat.body_height / 2
    r_ell = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    return np.maximum((r_ell - 1.0) * min(a, b), np.abs(z) - h)


def vertebra_sdf(anat: PatientAnatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict:
    """Signed distances of the vertebra's parts; keys body, posterior, all."""
    body = _body_sdf(anat, x, y, z)
    parts = []
    lam_mid = None
    for side in ("left", "right"):
        post, d = anat.pedicle_axis(side)
        s = 1.0 if side == "left" else -1.0
        # Pedicle: elliptic cylinder along its axis, from inside the body to its
        # posterior end (where the screw enters).
        rx, ry, w = x - post[0], y - post[1], z - post[2]
        u = d[0] * rx + d[1] * ry  # along the axis (towards anterior)
        lat = np.array([d[1], -d[0]])
        v = lat[0] * rx + lat[1] * ry
        length = 23.0
        ell = np.sqrt((v / anat.pedicle_half_width) ** 2 + (w / anat.pedicle_half_height) ** 2)
        ped = np.maximum((ell - 1.0) * anat.pedicle_half_width, np.maximum(-u, u - length))
        parts.append(ped)
        # Lamina: thick plate from the pedicle's posterior end to the midline.
        lam_mid = (0.0, post[1] + 9.0)
        d_lam = _sd_segment_capsule_2d(x, y, (post[0], post[1]), lam_mid) - 3.2
        parts.append(np.maximum(d_lam, np.abs(z - (anat.pedicle_z - 2.0)) - 9.0))
        # Transverse process: lateral bar from the pedicle's posterior end.
        tip = (post[0] + s * 24.0, post[1] - 3.0)
        d_tp = _sd_segment_capsule_2d(x, y, (post[0], post[1]), tip) - 3.5
        parts.append(np.maximum(d_tp, np.abs(z - anat.pedicle_z) - 4.5))
    # Spinous process: from the lamina's midline posteriorly, sloping down.
    zc = anat.pedicle_z - 4.0 - 0.25 * np.clip(y - lam_mid[1], 0, None)
    d_sp = np.maximum(np.abs(x) - 2.8, np.maximum(lam_mid[1] - 2.0 - y, y - lam_mid[1] - 24.0))
    parts.append(np.maximum(d_sp, np.abs(z - zc) - 8.0))
    posterior = np.minimum.reduce(parts)
    return {"body": body, "posterior": posterior, "all": np.minimum(body, posterior)}


def _trabecular_field(anat: PatientAnatomy) -> tuple[np.ndarray, float]:
    """Unit-SD smooth random field on a 2 mm anatomical grid, and its grid origin."""
    r = np.random.default_rng(anat.field_seed)
    shape = (35, 30, 40)  # x, y, z at 2 mm from -34 mm
    f = ndimage.gaussian_filter(r.standard_normal(shape), sigma=2.0, mode="wrap")
    return (f - f.mean()) / f.std(), -34.0


def true_density(anat: PatientAnatomy, months: float, x, y, z) -> tuple[np.ndarray, dict]:
    """True K2HPO4-equivalent density (mg/cm³) at anatomical points; 0 outside bone."""
    sd = vertebra_sdf(anat, x, y, z)
    g = anat.gain(months)
    cort = anat.cortical_mg_cm3 * (1.0 + 0.3 * g)
    rho = np.zeros_like(x, dtype=np.float64)
    inside = sd["all"] <= 0
    shell = inside & (sd["all"] > -anat.cortex_mm)
    body_core = sd["body"] <= -anat.cortex_mm
    post_core = inside & ~shell & ~body_core
    # the trabecular field only where it is used (map_coordinates is pointwise)
    core = body_core | post_core
    fld, o = _trabecular_field(anat)
    coords = np.stack([(x[core] - o) / 2.0, (y[core] - o) / 2.0, (z[core] - o) / 2.0])
    noise = np.zeros_like(rho)
    noise[core] = ndimage.map_coordinates(fld, coords, order=1, mode="nearest")
    trab = anat.trabecular_mg_cm3 * (1.0 + g) * (1.0 + 0.15 * noise)
    rho[body_core] = trab[body_core]
    rho[post_core] = anat.posterior_factor * trab[post_core] + 40.0
    rho[shell] = cort
    return rho, sd


def truth_vbmd(anat: PatientAnatomy, months: float, step: float = 0.4) -> dict:
    """True mean densities on a fine anatomical grid (independent of the scan)."""
    ax = np.arange(-26.0, 26.0, step) + step / 2
    ay = np.arange(-19.0, 19.0, step) + step / 2
    az = np.arange(-16.0, 16.0, step) + step / 2
    x, y, z = np.meshgrid(ax, ay, az, indexing="ij")
    # Both means are over the body (its trabecular core lies inside it): the density only
    # there (true_density is pointwise; the same values in the same order as on the whole
    # grid, half the points)
    body = _body_sdf(anat, x, y, z) <= 0
    rho, sd = true_density(anat, months, x[body], y[body], z[body])
    trab = sd["body"] <= -anat.cortex_mm
    return {
        "trabecular_vbmd_mg_cm3": float(rho[trab].mean()),
        "integral_body_vbmd_mg_cm3": float(rho.mean()),
    }


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class ScanPose:
    """Scan-level randomness: effective energy of the scan and patient pose."""

    energy_kev: float  #: effective energy at which the scan's tissues are rendered
    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    noise_seed: int

    @property
    def matrix(self) -> np.ndarray:
        return rotation_matrix(self.rotation_deg)

    @property
    def hu_per_mg(self) -> float:
        """HU per mg/cm³ of K2HPO4 (bone, rods) at the scan's effective energy."""
        from qctfea.imaging.attenuation import k2hpo4_hu_per_mg

        return float(k2hpo4_hu_per_mg(self.energy_kev))

    @property
    def slope(self) -> float:
        """True calibration: density (mg/cm³) = intercept + slope * HU."""
        return 1.0 / self.hu_per_mg

    intercept = 0.0

    def tissue_hu(self) -> dict[str, float]:
        """HU of the soft tissues at the scan's effective energy."""
        from qctfea.imaging.attenuation import theoretical_hu

        e = self.energy_kev
        return {"air": -1000.0, "fat": float(theoretical_hu("fat", e)),
                "muscle": float(theoretical_hu("muscle", e)),
                "disc": float(theoretical_hu("muscle", e, DISC_DENSITY_G_CM3))}


def scan_pose(seed: int, patient: str, months: float, params: SynthParams) -> ScanPose:
    r = _rng(seed, "scan", patient, f"{months:g}")
    energy = r.uniform(*ENERGY_RANGE_KEV)
    r.uniform(-8.0, 4.0)  # formerly the intercept: keeps the poses and noise of older versions
    return ScanPose(
        energy_kev=energy,
        rotation_deg=r.uniform(-1, 1, 3) * params.max_rotation_deg,
        translation_mm=r.uniform(-1, 1, 3) * params.max_translation_mm,
        noise_seed=int(r.integers(0, 2**31 - 1)),
    )


# Where the vertebral body centre sits in scanner coordinates (mm) before the
# pose change, and where the image starts: a table position like a real scan.
CENTRE = np.array([1.5, -12.0, -478.0])


#: Fine z-slices rendered at a time by :func:`render_scan` (bounds its temporaries)
RENDER_SLAB = 8


def _grid(params: SynthParams) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """Scan grid origin (first voxel centre), size (nx, ny, nz) and spacing."""
    sp = np.array([params.spacing_xy_mm, params.spacing_xy_mm, params.slice_mm])
    size = (
        int(round(params.fov_x_mm / sp[0])),
        int(round(params.fov_y_mm / sp[1])),
        int(round(params.fov_z_mm / sp[2])),
    )
    lo = CENTRE + np.array([-params.fov_x_mm / 2, -45.0, -params.fov_z_mm / 2]) + sp / 2
    return lo, size, sp


def _in_vertebra_box(ax, ay, az):
    """Anatomical points in the box that holds the whole vertebra (transverse processes to
    +-43 mm, spinous process to y = 65 mm)."""
    return (np.abs(ax) < 50) & (ay > -22) & (ay < 72) & (np.abs(az) < 22)


def render_scan(
    anat: PatientAnatomy, pose: ScanPose, months: float, params: SynthParams
) -> dict[str, np.ndarray]:
    """HU image (z, y, x) and label map (z, y, x) of one scan.

    Rendered on a supersampled grid, ``RENDER_SLAB`` fine slices at a time with the axes
    broadcast (every step is pointwise, so the image does not depend on the slab size; 3x
    faster than whole-grid arrays), then blurred, averaged down and given noise."""
    origin, size, sp = _grid(params)
    ss = params.supersample
    fsp = sp / ss
    nx, ny, nz = (s * ss for s in size)
    fo = origin - sp / 2 + fsp / 2  # first fine voxel centre
    X = fo[0] + fsp[0] * np.arange(nx)
    Y = fo[1] + fsp[1] * np.arange(ny)
    Z = fo[2] + fsp[2] * np.arange(nz)
    R = pose.matrix
    centre = CENTRE + pose.translation_mm

    def to_anat(xw, yw, zw):
        # R^T (world - centre), summed term by term
        d = (xw - centre[0], yw - centre[1], zw - centre[2])
        return tuple(R[0, i] * d[0] + R[1, i] * d[1] + R[2, i] * d[2] for i in range(3))

    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    xx, yy = X[None, None, :], Y[None, :, None]
    # Phantom: fixed to the scanner, under the patient (posterior = +y).
    y_ph0 = CENTRE[1] + 90.0
    block = (np.abs(xx - CENTRE[0]) <= 62.0) & (yy >= y_ph0) & (yy <= y_ph0 + 22.0)
    rod_x = CENTRE[0] + np.linspace(-48.0, 48.0, len(params.rod_densities_mg_cm3))
    k = pose.hu_per_mg
    tissue = pose.tissue_hu()
    rods = [((xx - xr) ** 2 + (yy - (y_ph0 + 11.0)) ** 2 <= (params.rod_diameter_mm / 2) ** 2,
             k * rho) for xr, rho in zip(rod_x, params.rod_densities_mg_cm3, strict=True)]
    for z0 in range(0, nz, RENDER_SLAB):
        zz = Z[z0:z0 + RENDER_SLAB, None, None]
        h = hu[z0:z0 + RENDER_SLAB]
        h[np.broadcast_to(block, h.shape)] = params.phantom_block_hu
        for rod, v in rods:
            h[np.broadcast_to(rod, h.shape)] = v
        # Torso (moves with the patient): muscle inside, a layer of fat, discs.
        ax_, ay_, az_ = to_anat(xx, yy, zz)
        torso = (ax_ / 150.0) ** 2 + ((ay_ + 20.0) / 102.0) ** 2
        h[np.broadcast_to(torso <= 1.0, h.shape)] = tissue["fat"]
        h[np.broadcast_to(torso <= 0.78, h.shape)] = tissue["muscle"]
        disc = ((ax_ / (anat.body_half_width + 0.5)) ** 2
                + (ay_ / (anat.body_half_depth + 0.5)) ** 2) <= 1
        h[np.broadcast_to(disc, h.shape)] = tissue["disc"]
        # Vertebra: only evaluated in its bounding box.
        inb = _in_vertebra_box(ax_, ay_, az_)
        if inb.any():
            rho, sd = true_density(anat, months, ax_[inb], ay_[inb], az_[inb])
            bone = sd["all"] <= 0
            vals = h[inb]
            vals[bone] = k * rho[bone]
            h[inb] = vals
    # Scanner: PSF blur on the fine grid, average down, add noise.
    sig = (params.blur_sigma_z_mm / fsp[2], params.blur_sigma_xy_mm / fsp[1],
           params.blur_sigma_xy_mm / fsp[0])
    hu = ndimage.gaussian_filter(hu, sigma=sig, mode="nearest")
    hu = hu.reshape(size[2], ss, size[1], ss, size[0], ss).mean(axis=(1, 3, 5))
    rnoise = np.random.default_rng(pose.noise_seed)
    hu = hu + rnoise.normal(0.0, params.noise_hu, hu.shape)
    # Labels on the scan grid (voxel centres).
    zc = (origin[2] + sp[2] * np.arange(size[2]))[:, None, None]
    yc = (origin[1] + sp[1] * np.arange(size[1]))[None, :, None]
    xc = (origin[0] + sp[0] * np.arange(size[0]))[None, None, :]
    ax_, ay_, az_ = np.broadcast_arrays(*to_anat(xc, yc, zc))
    inb = _in_vertebra_box(ax_, ay_, az_)
    lab = np.zeros(ax_.shape, np.uint8)
    inside = vertebra_sdf(anat, ax_[inb], ay_[inb], az_[inb])["all"] <= 0
    lab[inb] = inside * params.vertebra_label
    return {"hu": hu.astype(np.float32), "labels": lab, "origin": origin, "spacing": sp}


def landmarks_world(anat: PatientAnatomy, pose: ScanPose) -> dict:
    """Screw landmarks per side in scanner coordinates (mm).

    Entry: the pedicle axis at the posterior bone surface; target: on the
    same axis, 36 mm deeper, in the anterior vertebral body.
    """
    R = pose.matrix
    centre = CENTRE + pose.translation_mm
    out = {}
    for side in ("left", "right"):
        post, d = anat.pedicle_axis(side)
        entry = post
        target = post + 36.0 * d
        out[side] = {
            "entry_mm": (R @ entry + centre).round(3).tolist(),
            "target_mm": (R @ target + centre).round(3).tolist(),
        }
    return out


#: x columns of the DXA projection grid evaluated at once (``dxa_areal_bmd``)
DXA_BLOCK = 8


def dxa_areal_bmd(anat: PatientAnatomy, months: float, seed: int, patient: str) -> float:
    """A DXA-like AP areal BMD (g/cm²) with DXA's confounders.

    The true density is projected antero-posteriorly over the whole vertebra
    (body and posterior elements) and divided by the projected bone area;
    scaled to a hydroxyapatite-like DXA value, plus a patient-specific
    degenerative offset (osteophytes, aortic calcification) and measurement
    noise, which is why DXA tracks the bone around a screw poorly.
    """
    step = 0.5
    ax = np.arange(-50.0, 50.0, step) + step / 2
    ay = np.arange(-22.0, 72.0, step) + step / 2
    az = np.arange(-18.0, 18.0, step) + step / 2
    # DXA_BLOCK x columns at a time: the sum of each column along y is the same, and the
    # block's arrays are reused from the allocator instead of faulting in 20 MB temporaries
    # of the whole grid (0.34 instead of 1.0-1.6 s in a fresh process; bitwise the same)
    proj = np.empty((len(ax), len(az)))
    for i in range(0, len(ax), DXA_BLOCK):
        x, y, z = np.meshgrid(ax[i:i + DXA_BLOCK], ay, az, indexing="ij")
        proj[i:i + DXA_BLOCK] = true_density(anat, months, x, y, z)[0].sum(axis=1)
    proj = proj * step / 10.0 / 1000.0  # g/cm² per column (mm -> cm)
    area = proj > 0
    base = 1.15 * float(proj[area].mean())
    r = _rng(seed, "dxa", patient, f"{months:g}")
    return base + anat.dxa_offset_g_cm2 + float(r.normal(0.0, 0.025))


def _write_dicom_series(
    hu: np.ndarray,
    origin: np.ndarray,
    spacing: np.ndarray,
    out_dir: Path,
    patient: str,
    months: float,
    seed: int,
) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    r = _rng(seed, "identity", patient)
    fake_name = f"SYNTH^{''.join(chr(65 + int(c)) for c in r.integers(0, 26, 6))}"
    fake_id = f"MRN{int(r.integers(10**7, 10**8))}"
    study_date = (_dt.date(2020, 1, 6) + _dt.timedelta(days=int(round(months * 30.44))))
    key = f"{seed}-{patient}-{months:g}"
    study_uid = generate_uid(entropy_srcs=[key, "study"])
    series_uid = generate_uid(entropy_srcs=[key, "series"])
    frame_uid = generate_uid(entropy_srcs=[key, "frame"])
    stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.int16)
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid(entropy_srcs=[key, "sop", str(k)])
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.Manufacturer = "qctfea synthetic"
        ds.PatientName = fake_name
        ds.PatientID = fake_id
        ds.PatientBirthDate = "19480312"
        ds.PatientSex = "F"
        ds.AccessionNumber = f"ACC{int(r.integers(10**5, 10**6))}"
        ds.InstitutionName = "Synthetic General Hospital"
        ds.ReferringPhysicianName = "Referrer^Synthetic"
        ds.StudyDate = ds.SeriesDate = study_date.strftime("%Y%m%d")
        ds.StudyDescription = "LUMBAR SPINE QCT"
        ds.SeriesDescription = "L-spine 1.0 B30f"
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.KVP = 120
        ds.ConvolutionKernel = "B30f"
        ds.SliceThickness = float(spacing[2])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        pos = origin + np.array([0.0, 0.0, k * spacing[2]])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{pos[2]:.4f}"
        ds.PixelSpacing = [f"{spacing[1]:.4f}", f"{spacing[0]:.4f}"]
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        # File names do not follow slice order, like many PACS exports.
        name = f"IM{zlib.crc32(sop_uid.encode()) % 10**8:08d}.dcm"
        pydicom.dcmwrite(out_dir / name, ds, enforce_file_format=True)


#: The modules whose code decides the generated images and truth: the generator and the
#: HU model it renders tissues and rods with (its mass attenuation from xraydb).
GENERATOR_MODULES = ("qctfea.demo.synth", "qctfea.imaging.attenuation")


def generator_digest() -> str:
    """SHA-256 of the generator's code (:data:`GENERATOR_MODULES`) and the xraydb version.

    The workflow passes it to rule ``generate_demo_scan`` as a parameter, so Snakemake's
    parameter trigger regenerates the demo scans (and everything computed from them) when
    the generator changes; without it an updated qctfea would keep the old scans."""
    import hashlib
    import importlib.util

    import xraydb

    h = hashlib.sha256(f"xraydb {xraydb.__version__}\n".encode())
    for name in GENERATOR_MODULES:
        h.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return h.hexdigest()[:16]


def generate_scan(
    out_dir: str | Path,
    patient: str,
    timepoint: str,
    months: float,
    seed: int = 2021,
    params: SynthParams | None = None,
) -> dict:
    """Write one synthetic scan (DICOM series and side files) into ``out_dir``."""
    import SimpleITK as sitk

    p = params or SynthParams()
    out = Path(out_dir)
    if months < 0:
        raise QctfeaError(f"patient {patient}, timepoint {timepoint}: months must be >= 0")
    anat = patient_anatomy(seed, patient, p)
    pose = scan_pose(seed, patient, months, p)
    img = render_scan(anat, pose, months, p)
    dicom_dir = out / "dicom"
    with atomic_dir(dicom_dir) as tmp_dir:
        _write_dicom_series(img["hu"], img["origin"], img["spacing"], tmp_dir, patient, months,
                            seed)

    lab = sitk.GetImageFromArray(img["labels"])
    lab.SetOrigin(tuple(float(v) for v in img["origin"]))
    lab.SetSpacing(tuple(float(v) for v in img["spacing"]))
    with atomic_path(out / "labels.nii.gz") as tmp:
        sitk.WriteImage(lab, str(tmp), True)

    write_json(out / "landmarks.json", {
        "coordinates": "scanner physical coordinates (DICOM patient LPS), mm",
        **landmarks_world(anat, pose),
    })
    dxa = dxa_areal_bmd(anat, months, seed, patient)
    write_json(out / "dxa.json", {"areal_bmd_g_cm2": round(dxa, 4), "site": "L4 AP"})
    truth = {
        "patient": patient,
        "timepoint": timepoint,
        "months": months,
        "calibration": {"slope": pose.slope, "intercept": pose.intercept,
                        "model": "density_mg_cm3 = intercept + slope * HU"},
        "effective_energy_kev": pose.energy_kev,
        "tissue_hu": pose.tissue_hu(),
        "hu_model": "tissues from ICRP/ICRU-44 composition and xraydb mass attenuation at the "
                    "effective energy; bone and rods K2HPO4 in water, HU = density / slope "
                    "(qctfea.imaging.attenuation.k2hpo4_hu_per_mg)",
        **truth_vbmd(anat, months),
        "anatomy": asdict(anat),
        "pose": {"rotation_deg": pose.rotation_deg, "translation_mm": pose.translation_mm},
        "phantom_rods_mg_cm3": list(p.rod_densities_mg_cm3),
        "dxa_areal_bmd_g_cm2": dxa,
        "provenance": provenance("synth", {"seed": seed, **asdict(p)}),
    }
    write_json(out / "truth.json", truth)
    return truth
