"""A label map's own table of label names, when its NIfTI file carries one.

TotalSegmentator's multilabel output (``--ml``) stores which label is which structure in a
NIfTI header extension: a CIFTI/Caret XML ``<LabelTable>`` with one
``<Label Key="28" ...><![CDATA[vertebrae_L4]]></Label>`` per label (its
``nifti_ext_header.add_label_map_to_nifti``; the same XML that Connectome Workbench writes).
The numbering differs between TotalSegmentator versions (v1 ``total_v1``: vertebrae_L4 =
19; v2 ``total``: 28; v3 puts vertebrae_L6 at 26), so a map labelled by another version than
``mask.convention`` assumes would silently model another vertebra (v1's label 28 is
vertebrae_T7, whose neighbours 27 and 29 are present and touching: the label QC cannot see
it). When the file names its labels, the mask step checks the target against the name and
refuses a mismatch, naming the label that carries the wanted level in this file.

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

_VERTEBRA = re.compile(r"^vertebrae_([CTLS]\d{1,2})$")


def read_label_table(path) -> dict[int, str] | None:
    """Label -> name from the NIfTI header extensions of ``path`` that hold a
    ``<LabelTable>`` (NIfTI-1 or -2, gzipped or not); None when the file is not NIfTI or
    names no labels."""
    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")) or not Path(path).is_file():
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
    """The file's name of the target ``label`` (None without a table). A table that names
    the target label other than ``vertebrae_<vertebra>`` is an error naming the file's label
    of that level (if any) and what to configure."""
    if table is None:
        return None
    name = table.get(int(label))
    if vertebra is None:
        return name
    wanted = f"vertebrae_{vertebra}"
    if name == wanted:
        return name
    carrier = [k for k, v in table.items() if v == wanted]
    has = (f"its label {carrier[0]} is {wanted}" if carrier else
           f"it names no label {wanted}")
    vertebrae = sorted((k, v) for k, v in table.items() if _VERTEBRA.match(v))
    span = (f"; its vertebrae: {vertebrae[0][1]} = {vertebrae[0][0]} ... "
            f"{vertebrae[-1][1]} = {vertebrae[-1][0]}" if vertebrae else "")
    fix = (f"set mask.convention: custom with mask.label: {carrier[0]} (the file's own "
           f"numbering, e.g. an older TotalSegmentator version)" if carrier else
           "give the label map of this scan that holds the level, or model another one")
    raise QctfeaError(
        f"{where}: the label map's own label table names the target label {label} "
        f"{name!r}, not {wanted} ({has}{span}); {fix}")
