"""The few NIfTI header fields read from the file's own bytes (NIfTI-1 and -2, either byte
order): where ITK does not tell (the data type's NaN, ITK's NaN-as-0 reading; header
extensions). Field offsets from the NIfTI-1 and NIfTI-2 standards (nifti1.h, nifti2.h)."""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class NiftiHeader:
    endian: str  # "<" or ">"
    size: int  # 348 (NIfTI-1) or 540 (NIfTI-2)
    datatype: int  # NIfTI datatype code (16 float32, 64 float64, ...)
    vox_offset: int  # byte offset of the voxel data


def parse(head: bytes) -> NiftiHeader | None:
    """The header fields of ``head`` (the file's first 348 or 540 bytes or more); None when
    it is not a NIfTI-1/-2 header."""
    if len(head) < 348:
        return None
    for end in "<>":
        size = struct.unpack(f"{end}i", head[:4])[0]
        if size == 348:
            return NiftiHeader(end, size, struct.unpack(f"{end}h", head[70:72])[0],
                               int(struct.unpack(f"{end}f", head[108:112])[0]))
        if size == 540 and len(head) >= 540:
            return NiftiHeader(end, size, struct.unpack(f"{end}h", head[12:14])[0],
                               int(struct.unpack(f"{end}q", head[168:176])[0]))
    return None
