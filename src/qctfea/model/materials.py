"""Materials: calibrated density to Young's modulus per element.

Chain (docs/science.md#materials): QCT density rho_QCT (K2HPO4-equivalent, g/cm³) ->
ash density ``rho_ash = ash_intercept + ash_slope * rho_QCT`` -> modulus E
by a named density-modulus law, floored at ``e_floor_mpa``.

Element properties are **integrated over the element** (Bonemat's "V3"
scheme): the law is applied voxel by voxel first (an E image), and each
tetrahedron takes the mean of that image over its volume. The mean is the
composite centroid rule of a two-level midpoint subdivision of the tet into
64 sub-tetrahedra of equal volume, with trilinear interpolation of the E
image; it converges to the exact volume average as the subdivision is
refined and is exact for fields linear in space. Screws are titanium.

Default ash conversion: rho_ash = 0.0523 + 1.22 rho_K2HPO4 (g/cm³), the
conversion used with the Keyak laws in Keyak et al., Clin Orthop Relat Res
2005;437:219 (after Les et al. 1994). Set slope 1, intercept 0 to feed the
QCT density to the law directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.config import option


def _keyak_1998_e(rho: np.ndarray) -> np.ndarray:
    return np.where(
        rho <= 0.27,
        33900.0 * np.clip(rho, 0, None) ** 2.20,
        np.where(rho < 0.6, 5307.0 * rho + 469.0, 10200.0 * rho**2.01),
    )


def _keyak_1998_yield(rho: np.ndarray) -> np.ndarray:
    # "effectively none" below 0.2 g/cm³ ash: report infinity (never yields).
    return np.where(
        rho <= 0.2,
        np.inf,
        np.where(rho < 0.317, 137.0 * rho**1.88, 114.0 * rho**1.72),
    )


#: name -> (E(rho) in MPa, yield stress(rho) in MPa or None, density the law expects, source)
LAWS = {
    "keyak1998": (_keyak_1998_e, _keyak_1998_yield, "ash",
                  "Keyak et al. 1998, table in J Orthop Surg Res 2018;13:192"),
    "kopperdahl2002": (lambda r: 2980.0 * np.clip(r, 0, None) ** 1.05,
                       lambda r: 37.4 * np.clip(r, 0, None) ** 1.39, "qct",
                       "Kopperdahl et al. 2002 (coefficients as in Bonelab Ogo)"),
    "morgan2003": (lambda r: 4730.0 * np.clip(r, 0, None) ** 1.56, None, "apparent",
                   "Morgan et al. 2003, vertebra"),
    "crawford2003": (lambda r: -34.7 + 3230.0 * r, None, "qct", "Crawford et al. 2003"),
    "keller1994": (lambda r: 1890.0 * np.clip(r, 0, None) ** 1.92, None, "ash",
                   "Keller 1994, vertebra"),
}


def custom_law(spec: dict | None):
    """E(rho) of a user-defined piecewise power law (config ``materials.custom``).

    ``{"density": "qct" | "ash" | "apparent", "pieces": [{"below": r1, "a": .., "b": ..,
    "c": ..}, ..., {"a": .., "b": ..}]}``: E = a * rho^b + c (MPa; c defaults to 0) for
    rho (g/cm³ of the named kind) below ``below``; the last piece has no ``below``. The
    breakpoints must rise. Returns (E function, density kind).
    """
    where = "config section 'materials.custom'"
    if not isinstance(spec, dict) or not isinstance(spec.get("pieces"), list) \
            or not spec["pieces"]:
        raise QctfeaError(f"{where}: materials.law 'custom' needs materials.custom with a "
                          "non-empty list 'pieces' of {below, a, b, c}; see config/README.md")
    unknown = sorted(set(spec) - {"density", "pieces"})
    kind = spec.get("density", "qct")
    if unknown or kind not in ("qct", "ash", "apparent"):
        raise QctfeaError(f"{where}: keys are 'density' (qct, ash or apparent) and 'pieces'; "
                          f"got {sorted(spec)} with density {kind!r}")
    pieces = []
    for i, pc in enumerate(spec["pieces"]):
        last = i == len(spec["pieces"]) - 1
        ok = isinstance(pc, dict) and not set(pc) - {"below", "a", "b", "c"} \
            and {"a", "b"} <= set(pc) and (("below" in pc) != last) \
            and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                    and np.isfinite(v) for v in pc.values())
        if not ok:
            raise QctfeaError(f"{where}: piece {i + 1} {pc!r} must be numbers a, b (and "
                              "optionally c), with 'below' on every piece but the last")
        pieces.append((float(pc.get("below", np.inf)), float(pc["a"]), float(pc["b"]),
                       float(pc.get("c", 0.0))))
    if any(p1[0] >= p2[0] for p1, p2 in zip(pieces, pieces[1:])):
        raise QctfeaError(f"{where}: the 'below' breakpoints must rise from piece to piece")

    def e_fn(rho):
        rho = np.clip(np.asarray(rho, float), 0.0, None)
        out = np.empty_like(rho)
        lower = -np.inf
        for below, a, b, c in pieces:
            sel = (rho >= lower) & (rho < below)
            out[sel] = a * rho[sel] ** b + c
            lower = below
        return out

    return e_fn, kind


@dataclass
class MaterialParams:
    law: str = option(
        "keyak1998",
        enum=[*LAWS, "custom"],
        doc=("`keyak1998`, `kopperdahl2002`, `morgan2003`, `crawford2003`, `keller1994` "
             "(sources in `src/qctfea/model/materials.py` and "
             "[docs/science.md](../docs/science.md#materials)), or `custom`"))
    #: rho_ash = ash_intercept + ash_slope * rho_QCT (g/cm³)
    ash_slope: float = option(1.22, doc="rho_ash = intercept + slope·rho_QCT (g/cm³)")
    ash_intercept: float = option(0.0523, row="ash_slope")
    e_floor_mpa: float = option(1.0, exclusiveMinimum=0, doc="modulus floor")
    #: yield stress relation (uniaxial compressive yield, MPa) for the nonlinear analysis:
    #: a preset name with a yield law, or "none" (bone stays elastic)
    yield_law: str = option(
        "kopperdahl2002", enum=[*(k for k, v in LAWS.items() if v[1] is not None), "none"],
        doc=("yield stress for the nonlinear analysis: a law with a yield relation "
             "(`kopperdahl2002`, `keyak1998`) or `none`; taken from the element's mean "
             "density. Kopperdahl's is measured on vertebral trabecular bone; Keyak's has no "
             "yield below ash density 0.2 g/cm³ (most osteoporotic trabecular bone), so with "
             "it strength comes from the denser bone alone"))
    yield_floor_mpa: float = option(0.1, minimum=0, doc="yield stress floor (near-empty elements)")
    poisson_bone: float = option(0.3, minimum=0, exclusiveMaximum=0.5, doc="bone Poisson ratio")
    #: "integrated" (volume mean) or "centroid"
    sampling: str = option(
        "integrated", enum=["integrated", "centroid"],
        doc="`integrated` (volume mean) or `centroid`")
    #: 8**levels sub-tets per element
    subdivision_levels: int = option(2, minimum=0, doc="8^levels sample points per element")
    #: user-defined piecewise power law for ``law: custom`` (see :func:`custom_law`)
    custom: dict | None = option(
        None,
        properties={
            "density": {"enum": ["qct", "ash", "apparent"]},
            "pieces": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "properties": {k: {"type": "number"} for k in ("below", "a", "b", "c")},
                "required": ["a", "b"], "additionalProperties": False}}},
        required=["pieces"], additionalProperties=False,
        doc=("for `law: custom`: a piecewise power law `{density: qct\\|ash\\|apparent, "
             "pieces: [{below: 0.27, a: 33900, b: 2.2}, {below: 0.6, a: 5307, b: 1, c: 469}, "
             "{a: 10200, b: 2.01}]}`: E = a·ρ^b + c (MPa, ρ in g/cm³ of the named kind, `ash` "
             "through `ash_slope`/`ash_intercept`) below each `below`; the last piece has "
             "none. The example is Keyak 1998"))
    #: end caps (mask.cap_labels): PMMA
    cap_modulus_mpa: float = option(
        2500.0, exclusiveMinimum=0, doc="end caps (`mask.cap_labels`): PMMA, elastic")
    cap_poisson: float = option(0.3, minimum=0, exclusiveMaximum=0.5, row="cap_modulus_mpa")
    #: 0: every element its own modulus (exact); N > 0: bone moduli grouped into N bins of
    #: equal width in E, each element taking its bin's mean (Bonemat-style material groups)
    bins: int = option(
        0, minimum=0,
        doc=("0: every element its own modulus (exact); N: bone moduli grouped into N "
             "equal-width bins, each element taking its bin's mean (Bonemat-style material "
             "groups)"))

    def __post_init__(self):
        if self.custom is not None and self.law != "custom":
            raise QctfeaError(f"materials.custom is given but materials.law is {self.law!r}; "
                              "set materials.law: custom to use it, or remove it")
        if self.law == "custom":
            custom_law(self.custom)
        elif self.law not in LAWS:
            raise QctfeaError(f"unknown material law '{self.law}'; choose one of "
                              f"{sorted(LAWS)} or 'custom'")
        if self.bins < 0:
            raise QctfeaError(f"materials.bins must be 0 (exact) or a positive number of "
                              f"bins, not {self.bins}")


def _law_density(density_mg_cm3, kind: str, params: MaterialParams) -> np.ndarray:
    rho = np.asarray(density_mg_cm3, float) / 1000.0
    if kind == "ash":
        rho = params.ash_intercept + params.ash_slope * rho
    return np.clip(rho, 0.0, None)


def modulus_mpa(density_mg_cm3: np.ndarray, params: MaterialParams) -> np.ndarray:
    """Young's modulus (MPa) from calibrated QCT density (mg/cm³)."""
    if params.law == "custom":
        e_fn, kind = custom_law(params.custom)
    elif params.law in LAWS:
        e_fn, _, kind, _ = LAWS[params.law]
    else:
        raise QctfeaError(f"unknown material law '{params.law}'; choose one of {sorted(LAWS)} "
                          "or 'custom'")
    return np.maximum(e_fn(_law_density(density_mg_cm3, kind, params)), params.e_floor_mpa)


def bin_moduli(e: np.ndarray, n_bins: int) -> np.ndarray:
    """Group moduli into ``n_bins`` bins of equal width in E; each value becomes its bin's
    mean (so the mean modulus is preserved). ``n_bins`` 0 returns ``e`` unchanged."""
    e = np.asarray(e, float)
    if n_bins == 0 or e.size == 0 or e.min() == e.max():
        return e.copy()
    edges = np.linspace(e.min(), e.max(), n_bins + 1)
    idx = np.clip(np.searchsorted(edges, e, side="right") - 1, 0, n_bins - 1)
    sums = np.bincount(idx, weights=e, minlength=n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    return (sums / np.maximum(counts, 1))[idx]


def yield_mpa(density_mg_cm3: np.ndarray, params: MaterialParams) -> np.ndarray:
    """Yield stress (MPa) from QCT density (mg/cm³) by ``params.yield_law``; inf = no yield.

    Floored at ``yield_floor_mpa`` so that near-empty elements do not lose all
    shear stiffness at zero load. Keyak 1998 has no yield below ash density
    0.2 g/cm³ (infinity here): with it, osteoporotic trabecular bone never
    yields and strength comes from the denser bone alone.
    """
    if params.yield_law == "none":
        return np.full(np.shape(density_mg_cm3), np.inf)
    law = LAWS.get(params.yield_law)
    if law is None or law[1] is None:
        with_yield = sorted(k for k, v in LAWS.items() if v[1] is not None)
        raise QctfeaError(f"materials.yield_law '{params.yield_law}' has no yield relation; "
                          f"choose one of {with_yield} or 'none'")
    _, y_fn, kind, _ = law
    return np.maximum(y_fn(_law_density(density_mg_cm3, kind, params)), params.yield_floor_mpa)


def _subdivide(levels: int) -> np.ndarray:
    """Barycentric centroids of the 8**levels midpoint sub-tets of the unit tet (equal volumes)."""
    tets = [np.eye(4)]  # rows: barycentric coordinates of the 4 vertices
    for _ in range(levels):
        nxt = []
        for t in tets:
            m = {(i, j): (t[i] + t[j]) / 2 for i in range(4) for j in range(i + 1, 4)}
            v = t
            nxt += [
                np.array([v[0], m[0, 1], m[0, 2], m[0, 3]]),
                np.array([m[0, 1], v[1], m[1, 2], m[1, 3]]),
                np.array([m[0, 2], m[1, 2], v[2], m[2, 3]]),
                np.array([m[0, 3], m[1, 3], m[2, 3], v[3]]),
                # the octahedron split along the diagonal m02-m13 into 4 tets
                np.array([m[0, 1], m[0, 2], m[0, 3], m[1, 3]]),
                np.array([m[0, 1], m[0, 2], m[1, 2], m[1, 3]]),
                np.array([m[0, 2], m[0, 3], m[1, 3], m[2, 3]]),
                np.array([m[0, 2], m[1, 2], m[1, 3], m[2, 3]]),
            ]
        tets = nxt
    return np.array([t.mean(axis=0) for t in tets])


def sample_image(image_zyx: np.ndarray, reference: sitk.Image, pts: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a voxel array (z, y, x) at physical points (N, 3)."""
    from scipy import ndimage

    o = np.array(reference.GetOrigin())
    s = np.array(reference.GetSpacing())
    d = np.array(reference.GetDirection()).reshape(3, 3)
    ijk = ((pts - o) @ d) / s  # continuous index (x, y, z)
    return ndimage.map_coordinates(image_zyx, ijk[:, ::-1].T, order=1, mode="nearest")


def crop_to_points(image_zyx: np.ndarray, reference: sitk.Image, pts: np.ndarray,
                   margin: int = 2) -> tuple[np.ndarray, sitk.Image]:
    """The part of a voxel array (z, y, x) on ``reference``'s grid that trilinear sampling
    at ``pts`` (physical, N x 3) reads, and the grid of that part: the points' bounding box
    in voxels, ``margin`` voxels wider, within the image. :func:`sample_image` gives the same
    values on the part as on the whole (its edges clamp the same way), and the material
    laws then work on the mesh's box instead of the whole scan (a 512 x 512 x 420 CT: 4.4 GB
    of temporaries in the materials step)."""
    o = np.array(reference.GetOrigin())
    s = np.array(reference.GetSpacing())
    d = np.array(reference.GetDirection()).reshape(3, 3)
    ijk = ((np.asarray(pts, float) - o) @ d) / s
    size = np.array(image_zyx.shape[::-1])
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - margin, 0, size - 1)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + margin + 1, lo + 1, size)
    part = sitk.Image([1, 1, 1], sitk.sitkUInt8)  # only the grid of the part is needed
    part.SetSpacing(reference.GetSpacing())
    part.SetDirection(reference.GetDirection())
    part.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    return image_zyx[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]], part


def element_moduli(
    points: np.ndarray,
    cells: np.ndarray,
    e_image_zyx: np.ndarray,
    reference: sitk.Image,
    sampling: str = "integrated",
    levels: int = 2,
    chunk: int = 20000,
) -> np.ndarray:
    """Volume-mean (or centroid) of the E image over each tetrahedron."""
    if sampling == "centroid":
        bary = np.full((1, 4), 0.25)
    elif sampling == "integrated":
        bary = _subdivide(levels)
    else:
        raise QctfeaError(f"materials.sampling must be 'integrated' or 'centroid', not {sampling!r}")
    out = np.empty(len(cells))
    for start in range(0, len(cells), chunk):
        c = cells[start:start + chunk]
        p = points[c]  # (n, 4, 3)
        q = np.einsum("kv,nvd->nkd", bary, p).reshape(-1, 3)
        vals = sample_image(e_image_zyx, reference, q).reshape(len(c), len(bary))
        out[start:start + chunk] = vals.mean(axis=1)
    return out
