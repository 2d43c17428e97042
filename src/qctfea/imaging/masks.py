"""Masks: the target vertebra from a label map, its body and trabecular ROI.

The label map (VerSe, TotalSegmentator or the demo generator's) is read and,
when it is on a different grid than the CT, resampled onto it by nearest
neighbour. The target vertebra is the configured label (``mask.label``), or the
label of a named level (``mask.vertebra``, e.g. ``L4``) under a named label
convention (``mask.convention``):

- ``verse``: the VerSe / TPTBox vertebra labels (``TPTBox.core.vert_constants``,
  ``Vertebra_Instance``; the VerSe challenge data, Sekuboyina et al., Med Image Anal
  2021): C1-C7 = 1-7, T1-T12 = 8-19, L1-L5 = 20-24, L6 = 25 (a sixth lumbar vertebra),
  T13 = 28 (a thirteenth thoracic vertebra); S1 = 26 (a neighbour only, not a target).
- ``totalsegmentator``: TotalSegmentator v2, task ``total``
  (``totalsegmentator/map_to_binary.py``, ``class_map["total"]``): vertebrae_L5 = 27,
  L4 = 28, L3 = 29, L2 = 30, L1 = 31, T12 = 32, ... T1 = 43, C7 = 44, ... C1 = 50;
  vertebrae_S1 = 26 and sacrum = 25 are neighbours only. Verified against that file of
  the TotalSegmentator repository (v2 class map; v1, ``total_v1``, numbered them
  differently: L5 = 18 ... C1 = 41, and is not supported).
- ``custom`` (default): the numeric ``mask.label`` (default 23).

A folder of one mask per structure (TotalSegmentator without ``--ml``) is composed into
one label map of the named convention first (:mod:`qctfea.imaging.labelfolder`). A NIfTI
label map that names its labels (TotalSegmentator ``--ml``) must name the target as the
configured level (:mod:`qctfea.imaging.labeltable`).

Its parts:

- **vertebral body**: from a sub-region map, or by a morphological opening with the
  rim given back (:mod:`qctfea.imaging.body`).
- **trabecular ROI** (standard QCT): body voxels farther than
  ``trabecular_margin_mm`` (default 3 mm) from the body surface, so cortex,
  endplates and their blur are excluded. A body found by the opening gives the ROI
  from its opened body (dilated by 1 mm), without the restored rim: the rim's
  corners, where endplate and wall meet, would bring the ROI within reach of the
  ring apophysis' dense bone and the slices' blur (the real L1, 2.5 mm slices:
  ROI mean +14 HU, and +3.6 % after a half-voxel resampling instead of +1.5 %).
- **axis**: the body's superior direction (endplate normal): the direction
  near the patient's superior axis along which the body is thinnest; and the
  body's extent along it, which the load cases use for the endplates.

Output label image: 1 = vertebral body outside the trabecular ROI, 2 = posterior
elements, 3 = trabecular ROI (part of the body).

Label QC (:func:`label_qc`, recorded in vertebra.json): the target label's volume,
its connected components (face connectivity, as the model uses: only the largest is
modelled; a warning when it holds less than 95 % of the label), the labels touching it
(26-neighbourhood; contact area from the shared voxel faces) and, under a named
convention, whether the levels above and below are in the map and touch it.
"""

# Long on purpose (about 680 lines): the vertebra's parts from a label map in one place (label
# conventions, trabecular ROI, end caps, metal and field-of-view checks, QC record), as the
# mask step reads them in order; the body is found in qctfea.imaging.body.

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from qctfea.errors import QctfeaError
from qctfea.imaging import body as body_parts
from qctfea.imaging import morphology
from qctfea.config import option

BODY, POSTERIOR, TRABECULAR = 1, 2, 3  #: part labels (trabecular ROI is inside the body)
#: end caps (e.g. PMMA embedding of a specimen) in the parts image; not bone
CAP = 4
BONE_PARTS = (BODY, POSTERIOR, TRABECULAR)


#: Largest connected component of the target label below this volume fraction: warning.
FRAGMENT_WARN_FRACTION = 0.95
DEFAULT_LABEL = 23  #: custom convention without mask.label (VerSe L4)

_C = [f"C{i}" for i in range(1, 8)]
_T = [f"T{i}" for i in range(1, 13)]
_L = [f"L{i}" for i in range(1, 6)]
#: Vertebra labels by convention: level -> label (targets; see the module docstring).
CONVENTIONS: dict[str, dict[str, int]] = {
    "verse": {**{v: i + 1 for i, v in enumerate(_C)}, **{v: i + 8 for i, v in enumerate(_T)},
              "T13": 28, **{v: i + 20 for i, v in enumerate(_L)}, "L6": 25},
    "totalsegmentator": {**{v: 51 - int(v[1:]) for v in _C}, **{v: 44 - int(v[1:]) for v in _T},
                         **{v: 32 - int(v[1:]) for v in _L}},
}
#: Cranio-caudal order of the labels of each convention: (name, label, optional). The
#: neighbours expected above (below) a level are the levels up to and including the first
#: non-optional one in that direction (VerSe: T12's neighbour below is T13 or L1).
_ORDER: dict[str, list[tuple[str, int, bool]]] = {
    "verse": [(v, CONVENTIONS["verse"][v], v in ("T13", "L6"))
              for v in _C + _T + ["T13"] + _L + ["L6"]] + [("S1", 26, False)],
    "totalsegmentator": [(v, CONVENTIONS["totalsegmentator"][v], False)
                         for v in _C + _T + _L] + [("S1", 26, True), ("sacrum", 25, False)],
}
_LEVEL_NAME = re.compile(r"^(C[1-7]|T[1-9]|T1[0-3]|L[1-6])$")


def resolve_label(convention: str, vertebra: str | None, label: int | None
                  ) -> tuple[int, str | None]:
    """The target label and level name from ``mask.convention``, ``mask.vertebra`` and
    ``mask.label``; errors name the keys and the allowed values."""
    allowed = ["custom", *CONVENTIONS]
    if convention not in allowed:
        raise QctfeaError(f"mask.convention {convention!r} is not known; allowed: {allowed}")
    if label is not None and int(label) < 1:
        raise QctfeaError(f"mask.label {label} is not a vertebra label (labels are integers "
                          ">= 1; 0 is the background)")
    if vertebra is not None:
        vertebra = str(vertebra).strip().upper().removeprefix("VERTEBRAE_")
    if convention == "custom":
        if vertebra is not None:
            if label is None:
                raise QctfeaError(
                    f"mask.vertebra {vertebra!r} needs a named mask.convention ("
                    f"{', '.join(CONVENTIONS)}) to look up its label; with mask.convention "
                    "custom give mask.label")
            if not _LEVEL_NAME.match(vertebra):
                raise QctfeaError(f"mask.vertebra {vertebra!r} is not a level name such as "
                                  "L4, T12 or C7")
        return (DEFAULT_LABEL if label is None else int(label)), vertebra
    table = CONVENTIONS[convention]
    if vertebra is None:
        if label is None:
            raise QctfeaError(f"mask.convention {convention} needs mask.vertebra (a level: "
                              f"{', '.join(table)}) or mask.label")
        names = [k for k, v in table.items() if v == label]
        if not names:
            raise QctfeaError(
                f"mask.label {label} is not a vertebra of the {convention} convention "
                f"({_table_text(table)}); correct mask.label or set mask.convention custom")
        return int(label), names[0]
    if vertebra not in table:
        raise QctfeaError(f"mask.vertebra {vertebra!r} is not a level of the {convention} "
                          f"convention; allowed: {', '.join(table)}")
    if label is not None and int(label) != table[vertebra]:
        raise QctfeaError(
            f"mask.label {label} disagrees with mask.vertebra {vertebra} under mask.convention "
            f"{convention} ({convention} {vertebra} = {table[vertebra]}); remove mask.label "
            "or correct one of them")
    return table[vertebra], vertebra


def _table_text(table: dict[str, int]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in table.items())


def expected_neighbours(convention: str, vertebra: str | None) -> dict[str, list]:
    """``{"above": [(name, label), ...], "below": [...]}``: the labels expected next to
    ``vertebra`` (any of each list; empty at the ends); {} without a named convention."""
    if convention not in _ORDER or vertebra is None:
        return {}
    order = _ORDER[convention]
    i = [name for name, _, _ in order].index(vertebra)

    def walk(seq):
        out = []
        for name, lab, optional in seq:
            out.append((name, lab))
            if not optional:
                break
        return out

    return {"above": walk(reversed(order[:i])), "below": walk(order[i + 1:])}


def level_name(convention: str, label: int) -> str | None:
    """The name of ``label`` under ``convention`` (vertebrae and sacral neighbours), or None."""
    for name, lab, _ in _ORDER.get(convention, []):
        if lab == label:
            return name
    return None


@dataclass
class MaskParams:
    #: target vertebra label; None: looked up from ``vertebra`` (named convention), else 23
    label: int | None = option(
        None, minimum=1, shown="null (→ 23)",
        doc=("target vertebra label. Under `custom`: null means 23. Under a named convention: "
             "looked up from `mask.vertebra`; a label given as well must agree, or it is an "
             "error naming both"))
    #: label convention of the map: "verse", "totalsegmentator" or "custom" (``label``)
    convention: str = option(
        "custom", enum=["custom", *CONVENTIONS],
        doc=("label convention of the map: `verse` (VerSe/TPTBox: C1–C7 = 1–7, T1–T12 = 8–19, "
             "T13 = 28, L1–L5 = 20–24, L6 = 25), `totalsegmentator` (v2 task `total`: L5 = 27, "
             "L4 = 28 … L1 = 31, T12 = 32 … T1 = 43, C7 = 44 … C1 = 50), `custom` (numeric "
             "`mask.label`). A label map given as a folder of one mask per structure "
             "(TotalSegmentator without `--ml`) needs a named convention: its files are "
             "labelled by their names"))
    #: target level name, e.g. "L4" (named conventions: the label is looked up)
    vertebra: str | None = option(
        None,
        doc=("target level name, e.g. `L4` (`vertebrae_L4` and lower case accepted). Needed by "
             "a named convention unless `mask.label` is given; unknown levels are refused with "
             "the allowed list. Also sets the expected neighbours in the label QC "
             "(vertebra.json `label_qc`: volume, components, contacts with other labels)"))
    #: sub-region labels of the vertebral body (VerSe/TPTBox: 49 cortical shell, 50 interior)
    body_subregion_labels: list = option(
        factory=lambda: [49, 50], minItems=1, items={"type": "integer", "minimum": 1},
        doc=("when the sample sheet gives a `subregions` map: the sub-region labels forming "
             "the vertebral body (VerSe/TPTBox: 49 cortical shell, 50 interior; "
             "TotalSegmentator's `vertebrae_body` task: `[1]`). The body is the target "
             "vertebra's voxels with these labels, largest component; without a map the "
             "opening below is used"))
    body_opening_mm: float = option(
        7.0, exclusiveMinimum=0,
        doc=("ball radius separating the body from posterior elements (only without a "
             "sub-region map); the first radius tried, raised until the body kept is convex "
             "(`mask.body_opening_solidity`)"))
    body_opening_solidity: float = option(
        0.88, minimum=0, maximum=1,
        doc=("without a sub-region map: the opening's radius grows from "
             "`mask.body_opening_mm` (in steps of 5 % of the vertebra's largest inscribed "
             "radius, up to 75 %) until at least this fraction of the voxels inside the "
             "body's convex hull are the body's (pedicles still attached: 0.72-0.84 on the "
             "real scans enlarged, a body alone 0.90-0.97); 0 (with "
             "`mask.body_opening_asymmetry: 1`) keeps `mask.body_opening_mm`. "
             "The radius used: vertebra.json `body_opening`"))
    body_opening_asymmetry: float = option(
        0.12, minimum=0, maximum=1,
        doc=("without a sub-region map: the opening's radius also grows until the body is "
             "mirror-symmetric about a mid-sagittal plane (turned up to 30° about the "
             "superior axis, 15° about the anterior one): at most this fraction of its voxels "
             "mirror outside it (bodies alone 0.05-0.08 on real 0.7-3 mm scans; "
             "TotalSegmentator's L5 with one pedicle attached 0.18); 1 turns the test off"))
    trabecular_margin_mm: float = option(
        3.0, minimum=0, doc="trabecular ROI distance inside the body surface")
    #: labels that together form the vertebra (e.g. [1, 2]: trabecular and cortical bone of
    #: a voxel-FE benchmark's label map) instead of the single ``label``
    bone_labels: list | None = option(
        None, minItems=1, items={"type": "integer", "minimum": 1},
        doc=("labels that together form the vertebra (e.g. `[1, 2]`: trabecular and cortical "
             "bone of a voxel-FE benchmark's label map) instead of the single target label"))
    #: labels of end caps (e.g. PMMA embedding): meshed as their own subdomain with
    #: ``materials.cap_modulus_mpa``; the compression platens then load the caps' outer faces
    cap_labels: list | None = option(
        None, minItems=1, items={"type": "integer", "minimum": 1},
        doc=("labels of end caps (e.g. `[3]`: PMMA embedding): meshed as their own subdomain "
             "(tag 5) with `materials.cap_modulus_mpa`, and the compression (and pullout) "
             "platens then hold/load the caps' outer faces instead of the endplates. With "
             "density data already in mg/cm³ use `calibration: {method: fixed, slope: 1, "
             "intercept: 0}`: the configuration of published voxel-FE benchmarks, with "
             "tetrahedra (`tests/test_caps.py`; through the workflow with `loads.cases: "
             "[compression]` and `loads.platens: free`: "
             "[docs/specimens.md](../docs/specimens.md))"))

    #: CT number above which a voxel in or within 2 mm of the target vertebra is metal
    metal_hu: float | None = option(
        2800.0, exclusiveMinimum=0,
        doc=("a scan with at least `mask.metal_min_mm3` of voxels above this CT number (HU) in "
             "the target vertebra or within 2 mm of it is refused: metal (a screw, rod, "
             "cement with contrast) in the model would take a bone modulus from a density it "
             "does not have. Bone reads at most about 1,700 HU on the real scans "
             "(docs/science.md, \"Segmentation and regions\"); titanium saturates clinical CT "
             "(3071 HU on a 12-bit scale). `null` turns the check off (for images whose values "
             "are not HU)"))
    metal_min_mm3: float = option(
        20.0, minimum=0, row="metal_hu",
        doc="volume of metal voxels (mm³) that refuses the scan (see `mask.metal_hu`)")

    def __post_init__(self):
        for key in ("bone_labels", "cap_labels"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, (list, tuple)) or not v or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
                raise QctfeaError(f"mask.{key} {v!r} must be a non-empty list of positive "
                                  "integer labels")
        if self.bone_labels and self.cap_labels and set(self.bone_labels) & set(self.cap_labels):
            raise QctfeaError(f"mask.bone_labels {self.bone_labels} and mask.cap_labels "
                              f"{self.cap_labels} overlap")
        self.label, self.vertebra = resolve_label(self.convention, self.vertebra, self.label)
        labels = self.body_subregion_labels
        if (not isinstance(labels, (list, tuple)) or not labels
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in labels)):
            raise QctfeaError(f"mask.body_subregion_labels {labels!r} must be a non-empty list "
                              "of positive integer labels (VerSe/TPTBox body: [49, 50])")
        self.body_subregion_labels = [int(v) for v in labels]


def voxel_centres_mm(image: sitk.Image, idx_zyx: np.ndarray) -> np.ndarray:
    """Physical coordinates (N, 3) of voxel indices given as (N, 3) rows in z, y, x order."""
    o = np.array(image.GetOrigin())
    s = np.array(image.GetSpacing())
    d = np.array(image.GetDirection()).reshape(3, 3)
    ijk = idx_zyx[:, ::-1].astype(float)
    return o + (ijk * s) @ d.T


def resample_labels_to(labels: sitk.Image, reference: sitk.Image, context: str = "") -> sitk.Image:
    """Labels on the reference grid, nearest neighbour; warn when a resampling was needed.

    An error when the label map has labels but none of them lands on the reference grid
    (the two images do not overlap: another scan's labels, or a wrong origin/direction).
    """
    same = same_voxels(labels, reference)
    if same is not None:
        return same
    warnings.warn(f"{context}: label map is on another grid than the CT; resampled "
                  "(nearest neighbour)", stacklevel=2)
    out = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        labels.GetPixelID())
    if sitk.GetArrayViewFromImage(labels).any() and not sitk.GetArrayViewFromImage(out).any():
        raise QctfeaError(
            f"{context}: the label map does not overlap the CT: it covers "
            f"{_bounds(labels)} mm, the CT {_bounds(reference)} mm (physical LPS "
            "coordinates); give the label map of this scan, or correct its origin/direction"
        )
    return out


def same_voxels(image: sitk.Image, reference: sitk.Image) -> sitk.Image | None:
    """``image`` on ``reference``'s grid when it holds the same voxels, possibly in another
    axis order (ingest stores every scan as LPS, a label map stays on the source file's
    grid): reordered without interpolation. None when the grids differ otherwise."""
    if same_grid(image, reference):
        return image
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        reference.GetDirection())
    reordered = sitk.DICOMOrient(image, code)
    return reordered if same_grid(reordered, reference) else None


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same voxel grid: size, origin (1 µm), spacing and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _bounds(image: sitk.Image) -> str:
    """Physical bounding box of an image's grid, as text: [min x, y, z] to [max x, y, z]."""
    size = np.array(image.GetSize()) - 1.0
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint(
        (size * np.array(c)).tolist()) for c in np.ndindex(2, 2, 2)])
    return (f"{np.round(corners.min(axis=0), 1).tolist()} to "
            f"{np.round(corners.max(axis=0), 1).tolist()}")


def _target_text(params: MaskParams) -> str:
    """``label 23`` or ``label 23 (verse L4)`` for messages."""
    named = (f" ({params.convention} {params.vertebra})"
             if params.vertebra and params.convention != "custom" else "")
    return f"label {params.label}{named}"


#: A whole vertebra's volume (cm³) lies within these: on a real chest CT (TotalSegmentator
#: labels) the complete T1-L2 held 18.6-53.0 cm³, the real VerSe L3 59.7 cm³; the lower end
#: leaves room for small specimens (a 4.4 cm³ synthetic one is tested). A target label
#: outside them is another structure: the same map read in another convention numbers a
#: kidney cyst (0.17 cm³) or the colon (319 cm³) where it expected a vertebra.
VERTEBRA_CM3 = (1.0, 200.0)


def check_vertebra_volume(target_zyx: np.ndarray, spacing_xyz, params: MaskParams,
                          context: str, bound: str) -> float:
    """The target label's volume (cm³); raises :class:`QctfeaError` when it lies beyond the
    ``bound`` ("lower" or "upper") end of :data:`VERTEBRA_CM3`, naming the keys that choose
    the label."""
    volume = float(target_zyx.sum() * np.prod(spacing_xyz) / 1000.0)
    lo, hi = VERTEBRA_CM3
    if volume >= lo if bound == "lower" else volume <= hi:
        return volume
    hint = ("set mask.label to this vertebra's number in the map, or name the map's "
            "mask.convention and mask.vertebra" if params.convention == "custom" else
            "check mask.convention (the conventions number vertebrae differently: L4 is 23 "
            "in verse, 28 in totalsegmentator v2, 19 in TotalSegmentator v1) and "
            "mask.vertebra, or give mask.label")
    sp = " x ".join(f"{v:.3g}" for v in spacing_xyz)
    raise QctfeaError(
        f"{context}: {_target_text(params)} holds {volume:.2f} cm³, outside a whole "
        f"vertebra's {lo:g}-{hi:g} cm³: the label is probably another structure; {hint}. "
        f"If it is the vertebra, check the label map's voxel spacing ({sp} mm on the CT's "
        "grid) in its header")


def require_target(labels_zyx: np.ndarray, params: MaskParams, context: str = "") -> None:
    """Raise :class:`QctfeaError` unless the label map holds the target vertebra (its
    label, or any of ``params.bone_labels`` when several labels form it): the message
    lists the labels present, or says the map is empty, and what to set."""
    if np.isin(labels_zyx, [params.label, *(params.bone_labels or [])]).any():
        return
    present = sorted(int(v) for v in np.unique(labels_zyx) if v != 0)
    if not present:
        raise QctfeaError(f"{context}: the label map is empty (every voxel is 0); give the "
                          "segmentation of this scan (labels column of the sample sheet)")
    hint = ("set mask.label in the cohort config" if params.convention == "custom" else
            "check mask.convention and mask.vertebra (or mask.label) in the cohort config")
    target = (f"{_target_text(params)} (nor mask.bone_labels {params.bone_labels})"
              if params.bone_labels else _target_text(params))
    named = ", ".join(f"{v} ({name})" if (name := level_name(params.convention, v)) else str(v)
                      for v in present)
    raise QctfeaError(f"{context}: {target} is not in the label map (labels present: "
                      f"[{named}]); {hint}")


def vertebra_parts(
    labels_zyx: np.ndarray, spacing_xyz, params: MaskParams, context: str = "",
    subregions_zyx: np.ndarray | None = None, subregions_context: str = "", direction=None,
) -> dict:
    """Vertebra, body, posterior and trabecular-ROI masks (boolean arrays, z, y, x), and
    ``body_opening``: the record of the opening that found the body (None with sub-regions).

    With ``subregions_zyx`` (a sub-region map on the same grid) the body is the vertebra's
    voxels in ``params.body_subregion_labels``; else it is found by a morphological opening.
    ``subregions_context`` names the scan and the sub-region file in its errors;
    ``direction`` is the grid's direction matrix (the opening's symmetry test needs the
    patient's left-right axis; identity when None)."""
    require_target(labels_zyx, params, context)
    vert = morphology.largest_component(labels_zyx == params.label)
    # Crop to the vertebra for the morphology (fast), then paste back.
    sl = morphology.box_around(vert, 8)
    v = vert[sl]
    opening = None  # the opening's record (the body without a sub-region map)
    if subregions_zyx is not None:
        body = rounded = body_parts.from_subregions(
            v, subregions_zyx[sl], params, subregions_context or context, _target_text(params))
    else:
        body, rounded, opening = body_parts.from_opening(v, spacing_xyz, params, context,
                                                         direction)
    dist = ndimage.distance_transform_edt(rounded, sampling=spacing_xyz[::-1])
    trab = dist > params.trabecular_margin_mm
    out = {}
    for name, m in (("vertebra", v), ("body", body), ("trabecular", trab)):
        full = np.zeros(vert.shape, bool)
        full[sl] = m
        out[name] = full
    out["posterior"] = out["vertebra"] & ~out["body"]
    out["body_opening"] = opening
    if not out["trabecular"].any():
        raise QctfeaError(f"{context}: trabecular ROI is empty; lower mask.trabecular_margin_mm")
    return out


METAL_MARGIN_MM = 2.0  #: metal is sought in the target vertebra and this far around it


def check_no_metal(values: np.ndarray, target: np.ndarray, spacing_xyz, params: MaskParams,
                   context: str, ct_path) -> dict:
    """Refuse a scan with metal in or beside the target vertebra: at least
    ``mask.metal_min_mm3`` of voxels above ``mask.metal_hu`` within
    :data:`METAL_MARGIN_MM` of ``target`` (``values``: the CT's numbers on the same box,
    z y x). Returns the record (voxels, volume, largest value) for vertebra.json."""
    sampling = tuple(float(v) for v in spacing_xyz)[::-1]
    near = ndimage.distance_transform_edt(~target, sampling=sampling) <= METAL_MARGIN_MM
    vals = values[near]
    record = {"threshold_hu": params.metal_hu, "max_hu": float(vals.max()) if vals.size else None,
              "voxels": 0, "volume_mm3": 0.0}
    if params.metal_hu is None:
        return record
    n = int((vals > params.metal_hu).sum())
    vol = n * float(np.prod(sampling))
    record.update(voxels=n, volume_mm3=vol)
    if n and vol >= params.metal_min_mm3:
        raise QctfeaError(
            f"{context}: {vol:.0f} mm³ of the CT {ct_path} in or within {METAL_MARGIN_MM:g} mm "
            f"of the target vertebra ({_target_text(params)}) read above {params.metal_hu:g} "
            f"HU (up to {record['max_hu']:.0f} HU): metal (a screw, rod or cement) in the "
            "vertebra, whose model would take a bone modulus from it. Model another level "
            "(mask.vertebra / mask.label) or leave this scan out; if these voxels are bone "
            "(a very dense scan), raise mask.metal_hu")
    return record


#: A vertebra whose section on an edge of the grid is at least this fraction of its largest
#: section along that axis is cut by the field of view (a cut through the body: 0.83 and 1.0
#: for the two cut vertebrae of the real VerSe crop); a smaller section on an edge is a tight
#: crop touching the vertebra's extreme (0.00-0.06 on the real L1 and L3 cropped to their
#: bounding boxes, 0.42 at the synthetic demo's flat endplate) or a clipped process: warned.
CUT_SECTION_FRACTION = 0.5


def edges_reached(mask_zyx: np.ndarray, image: sitk.Image) -> list[tuple[str, int, float]]:
    """The edges of ``image``'s voxel grid that ``mask_zyx`` (on that grid) reaches: (the
    patient direction the edge faces, the voxels on it, their fraction of the mask's largest
    section parallel to that edge)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    names = (("right", "left"), ("anterior", "posterior"), ("inferior", "superior"))
    out = []
    for axis in range(3):  # ITK axis; numpy axis 2 - axis
        sections = mask_zyx.sum(axis=tuple(a for a in range(3) if a != 2 - axis))
        for side, index in ((-1, 0), (1, -1)):
            n = int(sections[index])
            if n:
                v = side * d[:, axis]
                k = int(np.argmax(np.abs(v)))
                out.append((names[k][int(v[k] > 0)], n, n / float(sections.max())))
    return out


def check_not_cut(mask_zyx: np.ndarray, image: sitk.Image, what: str, params: MaskParams,
                  context: str) -> list[str]:
    """Refuse a target vertebra (the largest component of ``mask_zyx``) cut by an edge of
    ``image`` (the CT, or the label map on its own grid): its section on the edge is at least
    :data:`CUT_SECTION_FRACTION` of its largest, so part of it lies outside and every number
    of its model would miss that bone. A smaller section on an edge is warned about and
    returned (text per edge) for the QC record."""
    edges = edges_reached(morphology.largest_component(mask_zyx), image)
    text = [f"{name} ({n} voxels, {frac:.0%} of its largest section)"
            for name, n, frac in edges]
    target = _target_text(params)
    if any(frac >= CUT_SECTION_FRACTION for _, _, frac in edges):
        raise QctfeaError(
            f"{context}: the target vertebra ({target}) is cut by the edge of the {what} "
            f"({', '.join(text)}): part of it lies outside the field of view, so its model "
            "would miss bone. Give a scan and label map that hold the whole vertebra (a "
            "longer scan range, an uncropped label map), or model another level "
            "(mask.vertebra / mask.label)")
    if edges:
        warnings.warn(f"{context}: the target vertebra ({target}) touches the edge of the "
                      f"{what} ({', '.join(text)}): a tight crop or a clipped process; check "
                      "that no bone is missing (roi.png)", stacklevel=2)
    return text


def label_contacts(labels_zyx: np.ndarray, target: np.ndarray, spacing_xyz) -> dict[int, dict]:
    """Other labels touching ``target`` (boolean, z, y, x): per label, its voxels in the
    target's 26-neighbourhood, the voxel faces it shares with the target and their area
    (mm²). Label 0 (background) is left out."""
    if not target.any():
        return {}
    sl = morphology.box_around(target, 1)
    t, lab = target[sl], labels_zyx[sl]
    ring = ndimage.binary_dilation(t, structure=np.ones((3, 3, 3), bool)) & ~t
    vals, counts = np.unique(lab[ring], return_counts=True)
    out = {int(a): {"voxels": int(b), "faces": 0, "area_mm2": 0.0}
           for a, b in zip(vals, counts, strict=True) if a != 0}
    sp = np.asarray(spacing_xyz, float)[::-1]  # z, y, x
    for axis in range(3):
        face = float(np.prod(sp) / sp[axis])
        n = t.shape[axis]
        lo = (slice(None),) * axis + (slice(0, n - 1),)
        hi = (slice(None),) * axis + (slice(1, n),)
        for a, b in ((lo, hi), (hi, lo)):  # target voxel at a, its face neighbour at b
            other = lab[b][t[a] & ~t[b]]
            vals, counts = np.unique(other[other != 0], return_counts=True)
            for v, c in zip(vals, counts, strict=True):
                out[int(v)]["faces"] += int(c)
                out[int(v)]["area_mm2"] += float(c) * face
    return out


def labels_present(labels_zyx: np.ndarray) -> set[int]:
    """The non-zero labels of a label map (a count per value for integer maps: no sorted
    copy of a whole-body map)."""
    a = np.asarray(labels_zyx).ravel()
    if a.dtype.kind in "ui" and a.size and int(a.min()) >= 0 and int(a.max()) < 2**20:
        counts = np.zeros(int(a.max()) + 1, np.int64)
        for start in range(0, a.size, 1 << 22):  # in blocks: bincount widens to int64
            block = np.bincount(a[start:start + (1 << 22)])
            counts[:block.size] += block
        return {int(v) for v in np.flatnonzero(counts)} - {0}
    return {int(v) for v in np.unique(a)} - {0}


def label_qc(labels_zyx: np.ndarray, spacing_xyz, params: MaskParams, context: str = "",
             present: set[int] | None = None) -> dict:
    """QC of the target label in the label map (the ``label_qc`` record of vertebra.json).

    Volume (mm³), connected components (face connectivity; the model keeps the largest) and
    the largest one's volume fraction (a warning below 95 %: fragments), the labels touching
    the target (26-neighbourhood, contact area from shared voxel faces) and, with a named
    convention, whether the levels above and below are in the map and touch the target (a
    warning when other vertebrae of the convention are in the map but neither neighbour
    is: a wrong level or convention). Warnings name ``context`` (scan and file).
    ``present``: the labels of the whole map, when ``labels_zyx`` is only a box of it around
    the target (the mask step); None: those of ``labels_zyx``."""
    target = labels_zyx == params.label
    vox = float(np.prod(spacing_xyz))
    lab, n = ndimage.label(target)
    sizes = ndimage.sum(target, lab, range(1, n + 1)) if n else np.zeros(0)
    frac = float(sizes.max() / sizes.sum()) if n else 0.0
    messages = []
    if n > 1 and frac < FRAGMENT_WARN_FRACTION:
        messages.append(
            f"{context}: {_target_text(params)} is in {n} connected pieces; the largest holds "
            f"{100 * frac:.1f} % of its {target.sum() * vox / 1000:.1f} cm³ (< "
            f"{100 * FRAGMENT_WARN_FRACTION:.0f} %) and only it is modelled: check the "
            "segmentation (fragments, or parts of another vertebra carrying this label)")
    contacts = label_contacts(labels_zyx, target, spacing_xyz)
    if present is None:  # labels of the whole map (given when labels_zyx is a box of it)
        present = labels_present(labels_zyx)
    neighbours = {}
    for side, cands in expected_neighbours(params.convention, params.vertebra).items():
        there = [lab_ for _, lab_ in cands if lab_ in present]
        neighbours[side] = {
            "levels": [name for name, _ in cands], "labels": [lab_ for _, lab_ in cands],
            "present": bool(there), "touching": any(lab_ in contacts for lab_ in there)}
    if neighbours:
        table = CONVENTIONS[params.convention]
        others = sorted(v for v in present & set(table.values()) if v != params.label)
        expected = {lab_ for e in neighbours.values() for lab_ in e["labels"]}
        if others and not (expected & present):
            names = [f"{level_name(params.convention, v)} ({v})" for v in others]
            messages.append(
                f"{context}: the label map has other vertebrae of the {params.convention} "
                f"convention ({', '.join(names)}) but neither neighbour of "
                f"{params.vertebra} ({_target_text(params)}); check mask.convention and "
                "mask.vertebra")
    for m in messages:
        warnings.warn(m, stacklevel=2)
    return {
        "label": int(params.label),
        "convention": params.convention,
        "vertebra": params.vertebra,
        "volume_mm3": float(target.sum() * vox),
        "components": int(n),
        "largest_component_fraction": frac,
        "connectivity": "face (6-neighbourhood)",
        "contacts": [{"label": k, "level": level_name(params.convention, k), **v}
                     for k, v in sorted(contacts.items())],
        "contact_neighbourhood": "26-neighbourhood; faces: shared voxel faces",
        "expected_neighbours": neighbours,
        "warnings": messages,
    }


#: The body's superior axis is sought within this angle of the patient's superior axis: an
#: L5 in a supine lordotic spine tilts 20-35°, and the real L1 (18.5° in its scan) extended by
#: 25° in the scanner lies 43.5° off (found at the cone's edge, 32°, with a 30° cone)
MAX_BODY_TILT_DEG = 45.0
#: ... in steps of this tilt (24 azimuths each), then refined around the best one
BODY_TILT_STEP_DEG = 2.0


def body_axis(image: sitk.Image, body_zyx: np.ndarray,
              max_tilt_deg: float = MAX_BODY_TILT_DEG) -> dict:
    """Body centroid, superior axis (unit, mm) and extent along it.

    The superior axis is the endplate normal: the direction, within
    ``max_tilt_deg`` of the patient's superior axis (LPS +z), along which the
    body is thinnest (robust extent, 0.5-99.5 percentiles). A principal-axis
    fit is not used because a vertebral body's height and depth are often
    nearly equal, which makes its principal axes ill-defined.
    """
    idx = np.argwhere(body_zyx)
    pts = voxel_centres_mm(image, idx)
    c = pts.mean(axis=0)
    rel = pts - c
    if len(rel) > 40000:
        rel_s = rel[np.random.default_rng(0).choice(len(rel), 40000, replace=False)]
    else:
        rel_s = rel

    def extent(theta, phi):
        d = np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
        lo, hi = np.percentile(rel_s @ d, [0.5, 99.5])
        return hi - lo, d

    best = (np.inf, np.array([0.0, 0.0, 1.0]))
    step = np.deg2rad(BODY_TILT_STEP_DEG)
    for theta in np.arange(0.0, np.deg2rad(max_tilt_deg) + 1e-9, step):
        for phi in np.linspace(0, 2 * np.pi, 1 if theta == 0 else 24, endpoint=False):
            best = min(best, extent(theta, phi), key=lambda t: t[0])
    # Refine around the best direction.
    th0 = np.arccos(np.clip(best[1][2], -1, 1))
    ph0 = np.arctan2(best[1][1], best[1][0])
    for theta in np.linspace(max(0, th0 - step), th0 + step, 9):
        for phi in np.linspace(ph0 - 0.15, ph0 + 0.15, 9):
            best = min(best, extent(theta, phi), key=lambda t: t[0])
    axis = best[1]
    h = rel @ axis
    return {
        "centroid_mm": c.tolist(),
        "superior_axis": axis.tolist(),
        "inferior_extent_mm": float(h.min()),
        "superior_extent_mm": float(h.max()),
        "height_mm": float(h.max() - h.min()),
    }


def contact_with_neighbours(labels_zyx: np.ndarray, vert: np.ndarray, label: int) -> dict:
    """Count of vertebra surface voxels touching each other non-zero label (QC)."""
    ring = ndimage.binary_dilation(vert) & ~vert
    vals, counts = np.unique(labels_zyx[ring], return_counts=True)
    return {int(a): int(b) for a, b in zip(vals, counts, strict=True) if a not in (0, label)}
