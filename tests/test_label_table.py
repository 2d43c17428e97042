"""A label map whose NIfTI file names its labels (TotalSegmentator --ml writes a Caret XML
label table into a header extension): the mask step checks the target against the name and
refuses a map numbered by another version (TotalSegmentator v1: vertebrae_L1 = 22), which
would otherwise model another vertebra without any warning."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from qctfea.steps import vertebra as steps_vertebra
from qctfea.errors import QctfeaError
from qctfea.imaging.labeltable import read_label_table
from qctfea.imaging.masks import CONVENTIONS

V2 = {v: f"vertebrae_{k}" for k, v in CONVENTIONS["totalsegmentator"].items()}
#: TotalSegmentator v1 (`total_v1`): vertebrae_L5 = 18, L4 = 19, ... L1 = 22, T12 = 23 ...
V1 = {18 + i: f"vertebrae_{n}" for i, n in enumerate(
    ["L5", "L4", "L3", "L2", "L1"] + [f"T{k}" for k in range(12, 0, -1)])}


def _with_table(src, dst, table: dict[int, str]):
    """``src`` (NIfTI-1, gzipped) with the label table TotalSegmentator writes
    (nifti_ext_header.add_label_map_to_nifti: Caret XML, extension code 0)."""
    raw = gzip.open(src).read()
    assert struct.unpack("<i", raw[:4])[0] == 348 and raw[348] == 0
    body = "".join(f'<Label Key="{k}" Red="1.0" Green="0.0" Blue="0.0" Alpha="1">'
                   f"<![CDATA[{v}]]></Label>\n" for k, v in table.items())
    xml = ('<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  <Date><![CDATA['
           '2013-07-14T05:45:09]]></Date>   <VolumeInformation Index="0">   <LabelTable>\n'
           + body + '\n  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  '
           '<VolumeType><![CDATA[Label]]></VolumeType>   </VolumeInformation>'
           '</CaretExtension>\n              ').encode()
    esize = -(-(8 + len(xml)) // 16) * 16
    ext = struct.pack("<ii", esize, 0) + xml + b"\0" * (esize - 8 - len(xml))
    vox = int(struct.unpack("<f", raw[108:112])[0])
    head = bytearray(raw[:348])
    head[108:112] = struct.pack("<f", float(352 + esize))
    out = bytes(head) + b"\x01\0\0\0" + ext + raw[vox:]
    dst.write_bytes(gzip.compress(out))
    return dst


@pytest.fixture
def real_l1(real_l1_ingested):
    return real_l1_ingested


def _mask(real_l1, labels, out):
    out.mkdir()
    steps_vertebra.mask(ct_path=real_l1["root"] / "ct.nii.gz", labels_path=labels,
                        out_parts=out / "vertebra.nii.gz", out_json=out / "vertebra.json",
                        cfg={"convention": "totalsegmentator", "vertebra": "L1"},
                        context="T01 M00")
    return json.loads((out / "vertebra.json").read_text())


def test_a_table_that_names_the_target_as_configured_is_read_and_recorded(real_l1, tmp_path):
    src = real_l1["src"] / "labels.nii.gz"
    labels = _with_table(src, tmp_path / "labels.nii.gz", {5: "liver", 52: "aorta", **V2})
    table = read_label_table(labels)
    assert table[31] == "vertebrae_L1" and table[52] == "aorta" and len(table) == 2 + 24
    # the voxels are untouched by the extension
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(labels))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(src))))
    assert read_label_table(src) is None  # no extension
    rec = _mask(real_l1, labels, tmp_path / "out")
    assert rec["label"] == 31 and rec["label_name_in_file"] == "vertebrae_L1"


def test_a_map_numbered_by_another_version_is_refused_with_the_files_label(real_l1, tmp_path):
    """The same voxels under a TotalSegmentator v1 table: label 31 is vertebrae_T4 there."""
    labels = _with_table(real_l1["src"] / "labels.nii.gz", tmp_path / "labels.nii.gz",
                         {7: "aorta", **V1})
    with pytest.raises(QctfeaError) as err:
        _mask(real_l1, labels, tmp_path / "out")
    msg = str(err.value)
    for part in ("T01 M00", str(labels), "target label 31 'vertebrae_T4', not vertebrae_L1",
                 "its label 22 is vertebrae_L1", "mask.label: 22"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "out" / "vertebra.nii.gz").exists()


def _seg_nrrd(src, dst, names: dict[int, str]):
    """``src`` as a 3D Slicer segmentation file: one layer, SegmentN_Name / _LabelValue."""
    img = sitk.ReadImage(str(src))
    for i, (value, name) in enumerate(names.items()):
        for key, v in (("ID", f"Segment_{i + 1}"), ("Name", name), ("LabelValue", str(value)),
                       ("Layer", "0")):
            img.SetMetaData(f"Segment{i}_{key}", v)
    sitk.WriteImage(img, str(dst), useCompression=True)
    return dst


@pytest.mark.parametrize("names, ok", [
    ({31: "L1", 32: "T12"}, "L1"),  # level names as a person types them in Slicer
    ({31: "Segment_1"}, "Segment_1"),  # no level named: recorded only
    ({31: "L2", 30: "L1"}, None),  # the configured level is another label: refused
])
def test_slicer_segment_names_are_checked_like_a_label_table(real_l1, tmp_path, names, ok):
    labels = _seg_nrrd(real_l1["src"] / "labels.nii.gz", tmp_path / "labels.seg.nrrd", names)
    assert read_label_table(labels) == names
    if ok:
        assert _mask(real_l1, labels, tmp_path / "out")["label_name_in_file"] == ok
    else:
        with pytest.raises(QctfeaError, match="names the target label 31 'L2', not "
                                              "vertebrae_L1 .its label 30 is L1"):
            _mask(real_l1, labels, tmp_path / "out")


def test_a_label_map_with_several_layers_is_refused(real_l1, tmp_path):
    """Overlapping segments stored as a 4D image (several layers) are not one label map."""
    layer = sitk.ReadImage(str(real_l1["src"] / "labels.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([layer, layer]), str(tmp_path / "layers.nrrd"))  # 4D
    with pytest.raises(QctfeaError, match="4 dimensions and 1 value.s. per voxel.*Export to "
                                          "labelmap"):
        _mask(real_l1, tmp_path / "layers.nrrd", tmp_path / "out")


def test_a_dicom_segmentation_as_label_map_says_how_to_convert_it(real_l1, tmp_path):
    """A DICOM SEG file (minimal: preamble, SEG modality) in the labels column is refused."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Modality = "SEG"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    with pytest.raises(QctfeaError, match=r"is a DICOM segmentation \(SEG\), not a label "
                                          r"image.*segimage2itkimage"):
        _mask(real_l1, tmp_path / "seg.dcm", tmp_path / "out")
