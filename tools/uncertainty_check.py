"""Error of the yield-weighted strength scheme against full nonlinear Monte Carlo.

For one scan of a finished run (default: demo P01 M00), ``--draws`` draws of all three
sources (calibration line, screw placement, yield coefficient; qctfea.uncertainty). Each
draw is modelled in full: the density image mapped by the drawn line, the screws moved,
the model re-meshed, materials assigned (yield stress times the drawn coefficient) and
compression and both pullouts solved nonlinearly (``mpiexec -n 2 qctfea solve``). The same
draw is given to the scheme. Writes a CSV of the draws and a markdown table (per outcome:
SD of the full Monte Carlo and of the scheme, their ratio, and the scheme's per-draw
error) for docs/uncertainty.md.

    python tools/uncertainty_check.py --scan results/demo/P01/M00 --draws 10 \\
        --out results/uncertainty_check
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml

from qctfea.imaging import masks
from qctfea import steps
from qctfea import logs
from qctfea.mdtable import pipe_table
from qctfea.steps import model as steps_model
from qctfea.imaging.bmd import BmdParams
from qctfea.model import materials as mat
from qctfea import uncertainty as unc
from qctfea.provenance import read_json


def _draws(cal: dict, screws: list, p: unc.UncertaintyParams, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    draws = unc.calibration_draws(cal, n, rng)
    alpha, beta = unc.rescale(cal, draws)
    return {"draws": draws, "alpha": alpha, "beta": beta,
            "factor": unc.yield_factors(p.yield_coefficient_cv, n, rng),
            "offsets": {sc.side: rng.normal(0, p.screw_position_sd_mm, (n, 3)) for sc in screws},
            "tilts": {sc.side: rng.normal(0, np.radians(p.screw_angle_sd_deg), (n, 2))
                      for sc in screws}}


def _solve(case: str, d: Path, cfg: dict, side: str | None = None) -> float | None:
    out = d / (f"pullout_{side}.json" if side else "compression.json")
    cmd = ["mpiexec", "-n", "2", "qctfea", "solve", case, "--patient", "check",
           "--timepoint", d.name, "--mesh", str(d / "mesh.xdmf"),
           "--materials", str(d / "materials.npz"), "--vertebra", str(d / "vertebra.json"),
           "--screws", str(d / "screws.json"), "--out-json", str(out),
           "--out-curve", str(out.with_suffix(".csv")), "--out-plot", str(out.with_suffix(".png")),
           "--out-fields", str(out.with_suffix(".xdmf")),
           "--params", json.dumps(cfg.get("loads") or {}),
           "--solver-params", json.dumps(cfg.get("solver") or {})]
    if side:
        cmd[5:5] = ["--side", side]
    subprocess.run(cmd, check=True, capture_output=True)
    r = read_json(out)
    return r["strength_n"] if r.get("peak_reached", True) else None


# Long on purpose: the check's script, in the order it runs (arguments, each draw modelled in
# full and given to the scheme, then the CSV of the draws and the markdown table).
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", default="results/demo/P01/M00")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default="results/uncertainty_check")
    ap.add_argument("--config", default="config/cohorts/demo/config.yaml",
                    help="the cohort config the scan was run with (mesh, materials, loads, "
                         "bmd, uncertainty sections)")
    a = ap.parse_args(argv)
    logs.log_to(sys.stderr)  # the library's progress messages
    scan, out = Path(a.scan), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(a.config).read_text(encoding="utf-8")) or {}
    p = steps.params_from(unc.UncertaintyParams, cfg.get("uncertainty"), "uncertainty")
    mp = steps.params_from(mat.MaterialParams, cfg.get("materials"), "materials")
    shell = steps.params_from(BmdParams, cfg.get("bmd"), "bmd").shell_mm
    cal = read_json(scan / "calibration.json")
    if cal.get("covariance") is None:
        sys.exit(f"{scan}/calibration.json has no covariance: rerun its calibrate step")
    screws = steps.load_screws(scan / "screws.json")
    strength = read_json(scan / "strength.json")["cases"]
    dens = sitk.ReadImage(str(scan / "density.nii.gz"))
    rho_img = sitk.GetArrayFromImage(dens).astype(float)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(scan / "vertebra.nii.gz")))
    vert = np.isin(lab, masks.BONE_PARTS)
    inp = unc.ScanInputs(
        calibration=cal, bmd=read_json(scan / "bmd.json"), density=rho_img[vert],
        points_mm=masks.voxel_centres_mm(dens, np.argwhere(vert)),
        body=np.isin(lab[vert], (masks.BODY, masks.TRABECULAR)), screws=screws,
        strength={"compression": strength["compression"]["strength_n"],
                  "left": strength["pullout_left"]["strength_n"],
                  "right": strength["pullout_right"]["strength_n"]},
        yield_fn=lambda r: mat.yield_mpa(r, mp), shell_mm=shell)
    src = _draws(cal, screws, p, a.draws, a.seed)
    scheme = unc._outcome_draws(p, inp, src, a.draws)
    rows = []
    for i in range(a.draws):
        t0 = time.perf_counter()
        d = out / f"draw{i:02d}"
        d.mkdir(exist_ok=True)
        img = sitk.GetImageFromArray((src["alpha"][i] + src["beta"][i] * rho_img)
                                     .astype(np.float32))
        img.CopyInformation(dens)
        sitk.WriteImage(img, str(d / "density.nii.gz"))
        moved = [unc.jittered(sc, src["offsets"][sc.side][i], src["tilts"][sc.side][i])
                 for sc in screws]
        (d / "screws.json").write_text(json.dumps({"screws": [s.to_dict() for s in moved]}),
            encoding="utf-8")
        (d / "vertebra.json").write_text((scan / "vertebra.json").read_text(encoding="utf-8"),
            encoding="utf-8")
        steps_model.mesh(parts_path=scan / "vertebra.nii.gz", screws_path=d / "screws.json",
                         out_mesh=d / "mesh.xdmf", out_json=d / "mesh.json",
                         cfg=cfg.get("mesh") or {}, context=f"draw {i}")
        steps_model.materials(mesh_path=d / "mesh.xdmf", density_path=d / "density.nii.gz",
                              screws_path=d / "screws.json", out_npz=d / "materials.npz",
                              out_json=d / "materials.json", cfg=cfg.get("materials") or {},
                              context=f"draw {i}")
        m = dict(np.load(d / "materials.npz"))
        m["yield_mpa"] = m["yield_mpa"] * src["factor"][i]
        np.savez_compressed(d / "materials.npz", **m)
        row = {"draw": i, "factor": src["factor"][i], "beta": src["beta"][i],
               "alpha": src["alpha"][i],
               "compression_full": _solve("compression", d, cfg),
               "compression_scheme": scheme["compression_strength_n"][i]}
        for sc in screws:
            row[f"pullout_{sc.side}_full"] = _solve("pullout", d, cfg, sc.side)
            row[f"pullout_{sc.side}_scheme"] = scheme[f"pullout_strength_{sc.side}_n"][i]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"[uncertainty-check] draw {i + 1}/{a.draws}: " + ", ".join(
            f"{k} {v:.0f}" for k, v in row.items() if k.endswith(("full", "scheme"))
            and v is not None), flush=True)
        pd.DataFrame(rows).to_csv(out / "draws.csv", index=False)
    df = pd.DataFrame(rows)
    header = ["outcome", "nominal (N)", "SD full MC (N)", "SD scheme (N)", "ratio",
              "per-draw error of the scheme: mean abs (max) %"]
    lines = []
    for key, nominal in (("compression", inp.strength["compression"]),
                         *((f"pullout_{s.side}", inp.strength[s.side]) for s in screws)):
        full, sch = df[f"{key}_full"].astype(float), df[f"{key}_scheme"].astype(float)
        err = 100 * (sch / full - 1)
        lines.append([key, f"{nominal:.0f}", f"{full.std(ddof=1):.0f}",
                      f"{sch.std(ddof=1):.0f}", f"{sch.std(ddof=1) / full.std(ddof=1):.2f}",
                      f"{err.abs().mean():.1f} ({err.abs().max():.1f})"])
    md = pipe_table(header, lines, "lrrrrl") + (f"\n\n{a.draws} draws of {scan}, seed {a.seed}; "
                             f"{df['seconds'].sum():.0f} s in all.\n")
    (out / "summary.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
