"""The mask step's label-fit check on the real CTs of ../shared/data/real
(docs/screw_planning.md, "The label map on the CT").

1. Each scan's label map moved along x by 0-8 mm (its origin changed): the edge contrast
   as given and at the best offset, the offset found, fits or refused.
2. The label maps as given on the grids of tools/planning_check.py (resampled to 0.5 mm,
   1 x 1 x 3, 3 and 0.7 x 0.7 x 5 mm voxels, each also turned 15 degrees about z and 12
   about x): each must fit.

    .venv/bin/python tools/label_fit_check.py --out-md /tmp/label_fit_table.md

Not part of the library or the tests (tests/test_labels.py runs the L1 at 0 and 3 mm).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

import planning_check as pc  # noqa: E402  (its cases and grids)

from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra  # noqa: E402
from qctfea.errors import QctfeaError  # noqa: E402
from qctfea.mdtable import pipe_table  # noqa: E402

CASES = ("TotalSegmentator L1", "VerSe L3")


def _fit(work: Path, ct: Path, labels: Path, cfg: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps_vertebra.mask(ct_path=ct, labels_path=labels, out_parts=work / "v.nii.gz",
                            out_json=work / "v.json", cfg=cfg, context="check")
    return json.loads((work / "v.json").read_text(encoding="utf-8"))["label_fit"]


def shifted() -> list[list[str]]:
    rows = []
    for case in CASES:
        ct_p, lab_p, _, cfg, own = pc.CASES[case]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            steps_imaging.ingest(source=ct_p, out_image=work / "ct.nii.gz",
                                 out_json=work / "scan.json", context="check")
            for mm in (0.0, 1.0, 2.0, 3.0, 4.0, 8.0):
                lab = sitk.ReadImage(str(lab_p))
                origin = np.array(lab.GetOrigin())
                origin[0] += mm
                lab.SetOrigin(origin.tolist())
                sitk.WriteImage(lab, str(work / "labels.nii.gz"))
                try:
                    f = _fit(work, work / "ct.nii.gz", work / "labels.nii.gz", cfg)
                    b0, best, off, result = (f["edge_contrast"], f["best_edge_contrast"],
                                             f["best_offset_mm"], "fits")
                except QctfeaError as exc:
                    msg = str(exc)
                    off = [float(v) for v in msg.split("moved by (")[1].split(")")[0].split(",")]
                    b0, best = (float(v) for v in
                                msg.split("edge contrast ")[1].split(")")[0].split(" -> "))
                    result = "refused"
                vox = " x ".join(f"{v:g}" for v in own)
                rows.append([f"{case} ({vox} mm)", f"{mm:g}", f"{b0:.0f} → {best:.0f}",
                             ", ".join(f"{v:.1f}" for v in off), result])
                print(" | ".join(rows[-1]), flush=True)
    return rows


def variants() -> list[list[str]]:
    rows = []
    for case in CASES:
        for spacing in ((0.5, 0.5, 0.5), (1.0, 1.0, 3.0), (3.0, 3.0, 3.0), (0.703, 0.703, 5.0)):
            for axis, deg in ((None, 0.0), ("z", 15.0), ("x", 12.0)):
                with tempfile.TemporaryDirectory() as tmp:
                    pc.check(case, spacing, axis, deg, "traditional", Path(tmp))
                    record = (Path(tmp) / "vertebra.json").read_text(encoding="utf-8")
                    f = json.loads(record)["label_fit"]
                rows.append([case, " x ".join(f"{v:g}" for v in spacing),
                             f"{deg:g}° about {axis}" if axis else "none",
                             f"{f['edge_contrast']:.0f} → {f['best_edge_contrast']:.0f}",
                             ", ".join(f"{v:.1f}" for v in f["best_offset_mm"]),
                             "fits" if f["fits"] else "REFUSED"])
                print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-md", type=Path, required=True)
    args = ap.parse_args()
    a = pipe_table(["scan", "label map moved along x (mm)",
                    "edge contrast as given → at the best offset (HU)",
                    "best offset found (x, y, z mm)", "result"], shifted(), "lrrll")
    b = pipe_table(["scan", "voxels (mm)", "grid rotation",
                    "edge contrast as given → at the best offset (HU)",
                    "best offset (x, y, z mm)", "result"], variants(), "lllrll")
    args.out_md.write_text(a + "\n\n" + b + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
