"""A label map's own table of label names, when its NIfTI file carries one.

TotalSegmentator's multilabel output (``--ml``) stores which label is which structure in a
NIfTI header extension: a CIFTI/Caret XML ``<LabelTable>`` with one
``<Label Key="28" ...><![CDATA[vertebrae_L4]]></Label>`` per label (its
``nifti_ext_header.add_label_map_to_nifti``; the same XML that Connectome Workbench writes).
The numbering differs between TotalSegmentator versions (v1 ``total_v1``: vertebrae_L4 =
19; v2 ``total``: 28; v3 puts vertebrae_L6 at 26), so a map labelled by another version than
``mask.convention`` assumes would silently model another vertebra (v1's label 28 is
vertebrae_T7, whose neighbours 27 and 29 are present and touching: the label QC cannot see
it). 3D Slicer's segmentation files (``.seg.nrrd``) name their segments in the NRRD header
(``SegmentN_Name``, ``SegmentN_LabelValue``). When the file names its labels, the mask step
checks the target against the names (:func:`check_target`) and refuses a mismatch, naming
the label that carries the wanted level in this file.

Read by hand from the header bytes: SimpleITK does not expose NIfTI extensions, and nibabel
is not otherwise needed. The XML is parsed with the standard library.
"""

from __future__ import annotations

import gzip
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

from qctfea.errors import QctfeaError
from qctfea.imaging import niftiheader

_LEVEL = re.compile(r"^(?:vertebrae?[ _-]?)?([CTLS]\d{1,2})$", re.IGNORECASE)


def read_label_table(path) -> dict[int, str] | None:
    """Label -> name of a label map file that names its labels: the NIfTI header extensions
    that hold a ``<LabelTable>`` (NIfTI-1 or -2, gzipped or not), or the segment fields of a
    3D Slicer segmentation (``.seg.nrrd``: ``SegmentN_Name`` and ``SegmentN_LabelValue``);
    None when the file names no labels."""
    name = str(path).lower()
    if not Path(path).is_file():
        return None
    if name.endswith(".nrrd"):
        return _nrrd_segments(path)
    if not name.endswith((".nii", ".nii.gz")):
        return None
    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as fh:
        head = fh.read(544)
        hdr = niftiheader.parse(head)
        if (hdr is None or len(head) < hdr.size + 4 or head[hdr.size] == 0
                or hdr.vox_offset <= hdr.size + 4):
            return None  # not NIfTI, or no extension
        fh.seek(0)
        block = fh.read(hdr.vox_offset)
    end, size = hdr.endian, hdr.size
    table: dict[int, str] = {}
    pos = size + 4
    while pos + 8 <= len(block):
        esize, _code = struct.unpack(f"{end}ii", block[pos:pos + 8])
        if esize < 8:
            break
        data = block[pos + 8:pos + esize]
        pos += esize
        if b"LabelTable" in data:
            table.update(_parse(data))
    return table or None


def _nrrd_segments(path) -> dict[int, str] | None:
    """3D Slicer's segment names by label value from a NRRD header (SimpleITK's metadata)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # unreadable: the step reading the image says so
    keys = set(reader.GetMetaDataKeys())
    table = {}
    for key in keys:
        m = re.match(r"^Segment(\d+)_Name$", key)
        value = f"Segment{m.group(1)}_LabelValue" if m else None
        if value in keys:
            try:
                table[int(reader.GetMetaData(value))] = reader.GetMetaData(key).strip()
            except ValueError:
                continue
    return table or None


def level_of(name: str | None) -> str | None:
    """The vertebral level a label name stands for (``vertebrae_L4``, ``L4``, ``vertebra L4``,
    any case), or None."""
    m = _LEVEL.match((name or "").strip())
    return m.group(1).upper() if m else None


def _parse(data: bytes) -> dict[int, str]:
    """The labels of a Caret/CIFTI XML ``LabelTable`` (key -> name); {} when unreadable."""
    text = data.decode("utf-8", "replace").strip().strip("\x00").strip()
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return {}
    out = {}
    for label in root.iter("Label"):
        try:
            out[int(label.get("Key"))] = (label.text or "").strip()
        except (TypeError, ValueError):
            continue
    return out


def check_target(table: dict[int, str] | None, label: int, vertebra: str | None,
                 where: str) -> str | None:
    """The file's name of the target ``label`` (None without a table). An error when the
    table names the target label as another level, or names ``vertebra`` as another label:
    the map was numbered otherwise than the configuration says (another TotalSegmentator
    version, another convention). Names that are no level (a 3D Slicer segment called
    "Segment_1") are only recorded."""
    if table is None:
        return None
    name = table.get(int(label))
    if vertebra is None or level_of(name) == vertebra:
        return name
    carrier = [k for k, v in sorted(table.items()) if level_of(v) == vertebra]
    if not carrier and level_of(name) is None:
        return name
    wanted = f"vertebrae_{vertebra}"
    has = (f"its label {carrier[0]} is {table[carrier[0]]}" if carrier else
           f"it names no label {wanted}")
    vertebrae = sorted((k, v) for k, v in table.items() if level_of(v))
    span = (f"; its vertebrae: {vertebrae[0][1]} = {vertebrae[0][0]} ... "
            f"{vertebrae[-1][1]} = {vertebrae[-1][0]}" if vertebrae else "")
    fix = (f"set mask.convention: custom with mask.label: {carrier[0]} (the file's own "
           f"numbering, e.g. an older TotalSegmentator version)" if carrier else
           "give the label map of this scan that holds the level, or model another one")
    raise QctfeaError(
        f"{where}: the label map's own label table names the target label {label} "
        f"{name!r}, not {wanted} ({has}{span}); {fix}")
