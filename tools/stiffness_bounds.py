"""The stiffness bounds of solved models (qctfea.fea.bounds; docs/science.md, "Stiffness
bounds"), with columns every 0.5 mm (the solves' own check uses 1 mm), against each load
case's solved stiffness: one markdown row per model folder (one holding mesh.h5,
materials.npz, vertebra.json, compression.json and, with screws, screws.json and
pullout_*.json).

Usage: python tools/stiffness_bounds.py results/demo/*/M00 results/verse-l3/*/M00

docs/science.md's figures were made with it (2026-12-07)."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qctfea.fea.bounds import compression_bounds, pullout_upper_bound
from qctfea.fea.loadcases import LoadParams
from qctfea.model.mesh_arrays import read_model


def row(folder: Path, ray_mm: float) -> str:
    points, cells, tags = read_model(folder / "mesh.xdmf")
    mat = np.load(folder / "materials.npz")
    axis = json.loads((folder / "vertebra.json").read_text())
    comp = json.loads((folder / "compression.json").read_text())
    lp = LoadParams()
    where = {"zone_fraction": lp.endplate_zone_fraction, "angle_deg": lp.endplate_angle_deg}
    args = (points, cells, tags, mat["youngs_mpa"], mat["poisson"], axis["superior_axis"],
            axis["centroid_mm"])
    b = compression_bounds(*args, **where, ray_mm=ray_mm)
    cells_out = [str(folder), f"{comp['stiffness_n_per_mm'] / 1e3:.1f}",
                 f"{b['lower_n_per_mm'] / 1e3:.1f}–{b['upper_n_per_mm'] / 1e3:.1f}",
                 f"{b['column_area_mm2']:.0f}"]
    pulls = []
    screws = folder / "screws.json"
    for screw in json.loads(screws.read_text())["screws"] if screws.is_file() else []:
        up = pullout_upper_bound(*args, screw, **where, head_face_mm=lp.head_face_mm)
        k = json.loads((folder / f"pullout_{screw['side']}.json").read_text())
        pulls.append(f"{screw['side']} {k['stiffness_n_per_mm'] / 1e3:.1f} ≤ "
                     f"{up['upper_n_per_mm'] / 1e3:.1f} "
                     f"({k['stiffness_n_per_mm'] / up['upper_n_per_mm']:.2f})")
    return "| " + " | ".join(cells_out + ["; ".join(pulls) or "–"]) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--ray-mm", type=float, default=0.5)
    a = ap.parse_args(argv)
    print("| model | compression kN/mm | bounds kN/mm | columns mm² | pullout kN/mm ≤ bound "
          "(ratio) |")
    print("| --- | --- | --- | --- | --- |")
    for f in a.folders:
        print(row(f, a.ray_mm), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
