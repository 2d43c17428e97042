"""Label maps given as a folder of one binary mask per structure.

TotalSegmentator writes one file per structure unless it is run with ``--ml``
(``vertebrae_L4.nii.gz``, ``vertebrae_S1.nii.gz``, ``sacrum.nii.gz``, ``aorta.nii.gz``,
``liver.nii.gz``, ...; the names of its class map ``class_map["total"]`` in
``totalsegmentator/map_to_binary.py``, the same in v1, v2 and v3 for the vertebrae). A lab
that kept that output can name the folder in the sample sheet's ``labels`` column; the
folder is composed here into one label map in the numbering of ``mask.convention``, so
every later step sees what the multilabel file would have given:

- ``vertebrae_<level>`` (C1-C7, T1-T12, L1-L5, and T13/L6 under ``verse``) gets the level's
  label of the convention (:data:`qctfea.imaging.masks.CONVENTIONS`), ``vertebrae_S1`` 26
  under both conventions, ``sacrum`` 25 under ``totalsegmentator``;
- ``aorta`` gets 52 under ``totalsegmentator`` (its label in the v2 class map), so that
  ``calibration.phantomless.blood_label: 52`` finds the blood pool as in the ``--ml`` file,
  and the paraspinal and psoas muscles (``autochthon_*``, ``iliopsoas_*``) 86-89, where the
  phantomless calibration may sample muscle (:func:`muscle_labels`);
- every other structure gets a label from 1001 on, in the order of the file names: it is
  not a target or a neighbour, but it is labelled (the phantomless calibration keeps its
  fat and muscle samples away from labelled structures, as with the multilabel file).

The masks must share one grid (TotalSegmentator writes them on the CT's); a mask on
another grid, a folder with no vertebra mask and a ``custom`` convention (no level names)
are refused with an error naming the folder and what to give instead. Written by hand:
TotalSegmentator's own ``totalseg_combine_masks`` needs the TotalSegmentator package
(PyTorch, nnU-Net), far too heavy a dependency for reading file names.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.imaging.masks import CONVENTIONS, same_grid

#: File suffixes read as structure masks.
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: First label given to structures that are neither vertebrae nor named neighbours.
OTHER_FROM = 1001
#: Labels of named structures other than the vertebral levels, by convention (TotalSegmentator
#: v2 ``class_map["total"]``: sacrum 25, vertebrae_S1 26, aorta 52; VerSe: S1 26).
NAMED: dict[str, dict[str, int]] = {
    "totalsegmentator": {"sacrum": 25, "vertebrae_S1": 26, "aorta": 52,
                         "autochthon_left": 86, "autochthon_right": 87,
                         "iliopsoas_left": 88, "iliopsoas_right": 89},
    "verse": {"vertebrae_S1": 26},
}
#: Structures of skeletal muscle (TotalSegmentator): the phantomless calibration may sample
#: muscle inside them (``calibration.phantomless.muscle_labels``).
MUSCLE_STRUCTURES = ("autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right")


def blood_label(convention: str, structures: dict[str, int] | None = None) -> int | None:
    """Label of the blood pool sampled by the phantomless calibration when
    ``calibration.phantomless.blood_label`` is not given: a structure folder's aorta mask,
    else the convention's aorta (TotalSegmentator v2 52; none for VerSe and custom maps)."""
    if structures is not None:
        return structures.get("aorta")
    return NAMED.get(convention, {}).get("aorta")


def muscle_labels(convention: str, structures: dict[str, int] | None = None) -> list[int]:
    """Labels of skeletal muscle: those of a structure folder's muscle masks, else the
    convention's (TotalSegmentator v2 86-89; none for VerSe and custom label maps)."""
    if structures is not None:
        return sorted(v for k, v in structures.items() if k in MUSCLE_STRUCTURES)
    named = NAMED.get(convention, {})
    return [named[k] for k in MUSCLE_STRUCTURES if k in named]
_VERTEBRA = re.compile(r"^vertebrae_([CTLS]\d{1,2})$")


def structure_name(path: Path) -> str | None:
    """The structure name of a mask file (its name without the image suffix), or None."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def structure_files(folder: Path) -> dict[str, Path]:
    """Structure name -> file of every mask file in ``folder`` (not recursive)."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        name = structure_name(f) if f.is_file() else None
        if name is not None:
            out.setdefault(name, f)
    return out


def has_vertebrae(folder: Path) -> bool:
    """True when ``folder`` holds at least one ``vertebrae_*`` mask file."""
    return any(_VERTEBRA.match(n) for n in structure_files(folder))


def labels_of(names, convention: str) -> dict[str, int]:
    """The label each structure name gets under ``convention`` (module docstring)."""
    levels = CONVENTIONS[convention]
    named = NAMED.get(convention, {})
    out, others = {}, []
    for name in sorted(names):
        m = _VERTEBRA.match(name)
        if name in named:
            out[name] = named[name]
        elif m and m.group(1) in levels:
            out[name] = levels[m.group(1)]
        else:
            others.append(name)
    out.update({name: OTHER_FROM + i for i, name in enumerate(others)})
    return out


def compose(folder, convention: str, where: str) -> tuple[sitk.Image, dict[str, int]]:
    """One label map (UInt16, the masks' grid) from a folder of structure masks, and the
    label of each structure. ``where`` names the scan in errors."""
    folder = Path(folder)
    if convention not in CONVENTIONS:
        raise QctfeaError(
            f"{where}: the label map {folder} is a folder of structure masks; its file names "
            f"(vertebrae_L4, ...) need a named mask.convention ({', '.join(CONVENTIONS)}, "
            "TotalSegmentator's output: totalsegmentator) with mask.vertebra, not "
            f"{convention!r}")
    files = structure_files(folder)
    if not any(_VERTEBRA.match(n) for n in files):
        raise QctfeaError(
            f"{where}: the label map {folder} is a folder without a vertebrae_<level> mask file "
            f"({len(files)} mask files); give TotalSegmentator's output folder of the task "
            "`total` (vertebrae_L4.nii.gz, ...), or its multilabel file (TotalSegmentator --ml)")
    labels = labels_of(files, convention)
    ref, out = None, None
    # other structures first, vertebrae and named neighbours last: they win any overlap
    for name in sorted(files, key=lambda n: (labels[n] < OTHER_FROM, n)):
        path = files[name]
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise QctfeaError(f"{where}: structure mask {path} cannot be read as an image "
                              f"({str(exc).strip()[-160:]}); check that the file is complete, "
                              "or remove it from the folder") from exc
        if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() != 3:
            raise QctfeaError(f"{where}: structure mask {path} is not a 3D single-channel image")
        if ref is None:
            ref = img
            out = np.zeros(sitk.GetArrayViewFromImage(img).shape, np.uint16)
        elif not same_grid(img, ref):
            raise QctfeaError(
                f"{where}: structure mask {path} is on another grid than "
                f"{_first(files, labels)} (size "
                f"{img.GetSize()} against {ref.GetSize()}, or origin, spacing or direction); "
                "the masks of one folder must come from one segmentation of this scan")
        out[sitk.GetArrayViewFromImage(img) > 0] = labels[name]
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(ref)
    return image, labels


def _first(files: dict[str, Path], labels: dict[str, int]) -> Path:
    return files[min(files, key=lambda n: (labels[n] < OTHER_FROM, n))]
